"""IA3: which units are scaled on each layout, the formula by hand, merge, save/load, peft."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.core.errors import ConfigError, TargetError
from deltatune.core.layers import DeltaLayer
from deltatune.methods.ia3 import IA3Delta, IA3InputDelta
from tests.conftest import FACTORIES, model_inputs, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5
from tests.helpers import assert_rows_match_alone, lm_losses, logits, save_and_reload

LAYOUT_ARCHS = ["llama", "gpt2", "bert", "t5", "neox", "opt", "bart", "roberta"]


def randomize(dm, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dm.get_delta("default").parameters():
            p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen))


def targets(dm):
    return {n: type(m.deltas["default"]) for n, m in dm.model.named_modules()
            if isinstance(m, DeltaLayer)}


@pytest.mark.parametrize(("factory", "expected", "total"), [
    (tiny_llama, {"self_attn.k_proj": IA3Delta, "self_attn.v_proj": IA3Delta,
                  "mlp.down_proj": IA3InputDelta}, 6),
    (tiny_gpt2, {"attn.c_attn": IA3Delta, "mlp.c_proj": IA3InputDelta}, 4),
    (tiny_bert, {"attention.self.key": IA3Delta, "attention.self.value": IA3Delta,
                 "layer.0.output.dense": IA3InputDelta}, 6),
    (tiny_t5, {"SelfAttention.k": IA3Delta, "SelfAttention.v": IA3Delta,
               "EncDecAttention.k": IA3Delta, "EncDecAttention.v": IA3Delta,
               "DenseReluDense.wo": IA3InputDelta}, 2 * 3 + 2 * 5),
])
def test_default_targets_are_keys_values_and_ffn_input(factory, expected, total):
    dm = dt.attach(factory(), dt.IA3Config())
    found = targets(dm)
    for suffix, cls in expected.items():
        hits = [n for n in found if n.endswith(suffix)]
        assert hits, suffix
        assert {found[n] for n in hits} == {cls}, suffix
    # BERT: the attention output projection is not the FFN down-projection.
    assert not any(n.endswith("attention.output.dense") for n in found)
    assert len(found) == total


def test_identity_at_init_on_every_layout():
    for arch in LAYOUT_ARCHS:
        inputs = model_inputs(arch)
        expected = logits(FACTORIES[arch](), inputs)
        dm = dt.attach(FACTORIES[arch](), dt.IA3Config())
        assert torch.equal(logits(dm, inputs), expected), arch


def test_formula_by_hand_on_llama_layer():
    dm = dt.attach(tiny_llama(), dt.IA3Config(layers=[0]))
    randomize(dm)
    attn = dm.model.model.layers[0].self_attn
    mlp = dm.model.model.layers[0].mlp
    x = torch.randn(3, 32, dtype=torch.float64)
    lk = attn.k_proj.deltas["default"].ia3_l.double()
    wk = attn.k_proj.base.weight.double()
    assert torch.allclose(attn.k_proj(x.float()).double(), (x @ wk.T) * lk, atol=1e-5)
    h = torch.randn(3, 64, dtype=torch.float64)
    lff = mlp.down_proj.deltas["default"].ia3_l.double()
    wd = mlp.down_proj.base.weight.double()
    assert torch.allclose(mlp.down_proj(h.float()).double(), (h * lff) @ wd.T, atol=1e-5)


def test_gpt2_fused_qkv_scales_only_keys_and_values():
    dm = dt.attach(tiny_gpt2(), dt.IA3Config(layers=[0]))
    layer = dm.model.transformer.h[0].attn.c_attn
    delta = layer.deltas["default"]
    assert delta.ia3_l.numel() == 64  # k and v of n_embd=32 each; q keeps 1
    randomize(dm)
    x = torch.randn(2, 32)
    base = layer.base(x)
    out = layer(x)
    assert torch.equal(out[:, :32], base[:, :32])
    assert torch.allclose(out[:, 32:], base[:, 32:] * delta.ia3_l, atol=1e-6)


def test_neox_fused_qkv_interleaves_per_head():
    dm = dt.attach(FACTORIES["neox"](), dt.IA3Config(layers=[0]))
    delta = dm.model.gpt_neox.layers[0].attention.query_key_value.deltas["default"]
    head = 8  # hidden 32 / 4 heads
    index = delta.index.view(4, 2 * head)
    for h in range(4):
        assert index[h].tolist() == list(range(h * 3 * head + head, (h + 1) * 3 * head))


def test_merge_equals_unmerged_and_unmerge_restores(arch):
    dm = dt.attach(FACTORIES[arch](), dt.IA3Config())
    randomize(dm)
    inputs = model_inputs(arch)
    weights = {k: v.clone() for k, v in dm.model.state_dict().items() if "ia3_l" not in k}
    unmerged = logits(dm, inputs)
    dm.merge()
    merged = logits(dm, inputs)
    assert (merged - unmerged).norm() / unmerged.norm() < 1e-5
    dm.unmerge()
    for k, v in dm.model.state_dict().items():
        if "ia3_l" not in k:
            assert torch.equal(v, weights[k]), k


def test_merge_scales_rows_and_columns_by_hand():
    dm = dt.attach(tiny_bert(), dt.IA3Config(layers=[0]))
    randomize(dm)
    layer = dm.model.bert.encoder.layer[0]
    key, down = layer.attention.self.key, layer.output.dense
    wk, bk = key.base.weight.clone(), key.base.bias.clone()
    wd, bd = down.base.weight.clone(), down.base.bias.clone()
    lk, lff = key.deltas["default"].ia3_l.detach(), down.deltas["default"].ia3_l.detach()
    dm.merge()
    assert torch.allclose(key.base.weight, lk[:, None] * wk)
    assert torch.allclose(key.base.bias, lk * bk)
    assert torch.allclose(down.base.weight, wd * lff[None, :])
    assert torch.equal(down.base.bias, bd)


def test_save_load_roundtrip_and_parameter_count(tmp_path):
    dm = dt.attach(tiny_t5(), dt.IA3Config())
    randomize(dm)
    inputs = model_inputs("t5")
    expected = logits(dm, inputs)
    # Per T5 block: k and v (32 units each) per attention, l_ff (64) per FFN.
    # encoder: 2 x (2*32 + 64); decoder: 2 x (2*(2*32) + 64)
    assert dm.parameter_report()[0].parameters == 2 * (64 + 64) + 2 * (128 + 64)
    loaded = save_and_reload(dm, tmp_path / "d", tiny_t5)
    assert torch.equal(logits(loaded, inputs), expected)


def test_training_changes_only_the_vectors_and_lowers_loss():
    dm = dt.attach(tiny_llama(), dt.IA3Config())
    trainable = {n for n, p in dm.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".deltas.default.ia3_l") for n in trainable)
    inputs = model_inputs("llama", batch=4)
    base_before = {k: v.clone() for k, v in dm.model.state_dict().items() if "ia3_l" not in k}
    losses = lm_losses(dm, inputs, steps=25, lr=0.3)
    assert losses[-1] < losses[0] - 0.1
    assert all(torch.equal(v, base_before[k]) for k, v in dm.model.state_dict().items()
               if "ia3_l" not in k)


def _peft_scale_key(location):
    return f"base_model.model.{location}.ia3_l.default"


@pytest.mark.parametrize(("factory", "arch", "tmods", "ff"), [
    (tiny_llama, "llama", ["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    (tiny_gpt2, "gpt2", ["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    (tiny_t5, "t5", ["k", "v", "wo"], ["wo"]),
])
def test_same_weights_in_peft_give_the_same_outputs(factory, arch, tmods, ff):
    from peft import IA3Config, get_peft_model

    dm = dt.attach(factory(), dt.IA3Config())
    randomize(dm)
    peft_model = get_peft_model(factory(), IA3Config(target_modules=tmods,
                                                     feedforward_modules=ff)).eval()
    sd = peft_model.state_dict()
    copied = 0
    with torch.no_grad():
        for name, module in dm.model.named_modules():
            if isinstance(module, DeltaLayer):
                scale = module.deltas["default"].scale_vector()
                target = sd[_peft_scale_key(name)]
                target.copy_(scale.view_as(target))
                copied += 1
    assert copied == sum(1 for k in sd if k.endswith("ia3_l.default"))
    inputs = model_inputs(arch)
    assert (logits(dm, inputs) - logits(peft_model, inputs)).abs().max() < 1e-5


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ConfigError, match="feedforward_modules"):
        dt.IA3Config(feedforward_modules=[])
    with pytest.raises(TargetError, match="feedforward_modules"):
        dt.attach(tiny_llama(), dt.IA3Config(target_modules=["k_proj"],
                                             feedforward_modules=["down_proj"]))
    from torch import nn

    with pytest.raises(TargetError, match="IA3"):
        dt.attach(nn.Sequential(nn.Linear(4, 4)), dt.IA3Config())


def test_per_row_batch_mixes_ia3_deltas_and_the_base():
    dm = dt.DeltaModel(tiny_llama())
    dm.add("a", dt.IA3Config())
    dm.add("b", dt.IA3Config(layers=[1]))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name in ("a", "b"):
            for p in dm.get_delta(name).parameters():
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen))
    inputs = model_inputs("llama", batch=3)
    names = ["b", None, "a"]
    assert_rows_match_alone(dm, inputs, names, atol=1e-6)
