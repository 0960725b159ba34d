"""LoRA: the paper's math, merge algebra, save/load, per-row batches, and parity with peft."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.errors import (
    AdapterFileCorrupt,
    BaseModelMismatchError,
    ConfigError,
    HyperparameterError,
    TargetError,
)
from tests.conftest import FACTORIES, model_inputs, randomize_deltas, tiny_gpt2, tiny_llama
from tests.helpers import assert_rows_match_alone, logits, save_and_reload

ALL_LINEAR = dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")


def test_zero_init_is_identity_on_every_architecture(arch):
    base, inputs = FACTORIES[arch](), model_inputs(arch)
    expected = logits(base, inputs)
    dm = dt.attach(FACTORIES[arch](), ALL_LINEAR)
    assert torch.equal(logits(dm, inputs), expected)


def test_merged_equals_unmerged_and_unmerge_is_bitwise(arch):
    dm = dt.attach(FACTORIES[arch](), ALL_LINEAR)
    randomize_deltas(dm, std=0.2)
    inputs = model_inputs(arch)
    weights = {k: v.clone() for k, v in dm.model.state_dict().items() if "lora_" not in k}
    unmerged = logits(dm, inputs)
    dm.merge()
    merged = logits(dm, inputs)
    rel = (merged - unmerged).norm() / unmerged.norm()
    assert rel < 1e-5
    dm.unmerge()
    for k, v in dm.model.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, weights[k]), k
    assert torch.equal(logits(dm, inputs), unmerged)


def test_merge_matches_formula_by_hand():
    dm = dt.attach(tiny_llama(), dt.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"],
                                               layers=[0]))
    randomize_deltas(dm)
    layer = dm.model.model.layers[0].self_attn.q_proj
    A, B = layer.deltas["default"].lora_A.double(), layer.deltas["default"].lora_B.double()
    w0 = layer.base.weight.detach().double().clone()
    x = torch.randn(3, 32, dtype=torch.float64)
    expected = x @ w0.T + (6 / 2) * (x @ A.T) @ B.T
    got = layer(x.float()).double()
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    dm.merge()
    assert torch.allclose(layer.base.weight.double(), w0 + 3.0 * B @ A, atol=1e-6)


def test_rslora_scale():
    dm = dt.attach(tiny_llama(), dt.LoraConfig(r=4, lora_alpha=8, use_rslora=True))
    delta = dm.model.model.layers[0].self_attn.q_proj.deltas["default"]
    assert delta.scale == pytest.approx(8 / math.sqrt(4))


def test_init_distributions():
    dm = dt.attach(tiny_llama(hidden_size=64, intermediate_size=64),
                   dt.LoraConfig(r=8, init="gaussian", target_modules=["q_proj"]))
    d = dm.model.model.layers[0].self_attn.q_proj.deltas["default"]
    assert torch.count_nonzero(d.lora_B) == 0
    assert d.lora_A.std().item() == pytest.approx(1 / 8, rel=0.2)
    dm2 = dt.attach(tiny_llama(hidden_size=64, intermediate_size=64),
                    dt.LoraConfig(r=8, target_modules=["q_proj"]))
    a = dm2.model.model.layers[0].self_attn.q_proj.deltas["default"].lora_A
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert a.abs().max().item() <= bound and a.abs().max().item() > 0.8 * bound


def test_save_then_load_reproduces_outputs(tmp_path, arch):
    dm = dt.attach(FACTORIES[arch](), ALL_LINEAR)
    randomize_deltas(dm, std=0.2)
    inputs = model_inputs(arch)
    expected = logits(dm, inputs)
    loaded = save_and_reload(dm, tmp_path / "d", FACTORIES[arch])
    assert torch.equal(logits(loaded, inputs), expected)
    assert {p.requires_grad for p in loaded.get_delta("default").parameters()} == {False}


def test_only_delta_parameters_require_grad_and_train(arch):
    dm = dt.attach(FACTORIES[arch](), ALL_LINEAR)
    trainable = {n for n, p in dm.named_parameters() if p.requires_grad}
    assert trainable and all(".deltas.default.lora_" in n for n in trainable)
    base_before = {k: v.clone() for k, v in dm.model.state_dict().items() if "lora_" not in k}
    opt = torch.optim.SGD(dm.trainable_parameters(), lr=0.1)
    inputs = model_inputs(arch)
    for _ in range(2):
        out = dm(**inputs)
        out.logits.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(v, base_before[k]) for k, v in dm.model.state_dict().items()
               if "lora_" not in k)
    assert any(torch.count_nonzero(p) for n, p in dm.named_parameters() if "lora_B" in n)


def test_disabled_equals_base_also_after_merge(arch):
    inputs = model_inputs(arch)
    expected = logits(FACTORIES[arch](), inputs)
    dm = dt.attach(FACTORIES[arch](), ALL_LINEAR)
    randomize_deltas(dm, std=0.2)
    adapted = logits(dm, inputs)
    with dm.disabled():
        assert torch.equal(logits(dm, inputs), expected)
    dm.merge()
    with dm.disabled():
        assert torch.equal(logits(dm, inputs), expected)
    merged = logits(dm, inputs)
    assert (merged - adapted).norm() / adapted.norm() < 1e-5


def test_parameter_count_is_r_times_din_plus_dout():
    m = tiny_llama()
    dm = dt.attach(m, dt.LoraConfig(r=4, target_modules="all-linear"))
    expected = 0
    for module in dm.model.modules():
        if hasattr(module, "deltas"):
            d_in, d_out = module.base.in_features, module.base.out_features
            expected += 4 * (d_in + d_out)
    report = dm.parameter_report()[0]
    assert report.parameters == expected
    base_total = sum(p.numel() for p in tiny_llama().parameters())
    assert report.percent_of_base == pytest.approx(100 * expected / base_total)


def _peft_twin(factory, targets, r, alpha, rslora=False):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
                     lora_dropout=0.0, init_lora_weights=True)
    return get_peft_model(factory(), cfg)


def _copy_into_peft(dm, peft_model):
    peft_sd = peft_model.state_dict()
    copied = 0
    with torch.no_grad():
        for key, tensor in dm.delta_state_dict().items():
            location, _, which = key.rpartition(".")
            embedding = which.replace("lora_", "lora_embedding_")
            candidates = [f"base_model.model.{location}.{which}.default.weight",
                          f"base_model.model.{location}.{embedding}.default"]
            target = next(k for k in candidates if k in peft_sd)
            peft_sd[target].copy_(tensor)
            copied += 1
    return copied


@pytest.mark.parametrize(("factory", "targets", "rslora"), [
    (tiny_llama, ["q_proj", "v_proj", "down_proj", "embed_tokens"], False),
    (tiny_llama, ["q_proj", "o_proj"], True),
    (tiny_gpt2, ["c_attn", "c_fc", "wte"], False),
])
def test_same_weights_in_peft_give_the_same_outputs(factory, targets, rslora):
    dm = dt.attach(factory(), dt.LoraConfig(r=4, lora_alpha=12, target_modules=targets,
                                            use_rslora=rslora))
    randomize_deltas(dm, std=0.3)
    peft_model = _peft_twin(factory, targets, 4, 12, rslora).eval()
    assert _copy_into_peft(dm, peft_model) == len(dm.delta_state_dict())
    inputs = model_inputs("llama")
    ours, theirs = logits(dm, inputs), logits(peft_model, inputs)
    assert (ours - theirs).abs().max() < 1e-5


def test_per_row_mixed_batch_equals_each_row_alone():
    dm = dt.DeltaModel(tiny_llama())
    dm.add("a", dt.LoraConfig(r=2, target_modules="all-linear"))
    dm.add("b", dt.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    randomize_deltas(dm, std=0.3)
    inputs = model_inputs("llama", batch=3)
    names = ["a", None, "b"]
    assert_rows_match_alone(dm, inputs, names, atol=1e-6)


def test_generate_passes_through_with_per_row_deltas():
    dm = dt.DeltaModel(tiny_llama())
    dm.add("a", dt.LoraConfig(r=2, target_modules="all-linear"))
    randomize_deltas(dm, std=0.5)
    ids = model_inputs("llama", batch=2)["input_ids"]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = dm.generate(ids, delta_names=["a", None], **kw)
        adapted = dm.generate(ids[:1], **kw)
        with dm.disabled():
            base = dm.generate(ids[1:], **kw)
    assert torch.equal(mixed[0], adapted[0]) and torch.equal(mixed[1], base[0])


def test_several_named_deltas_compose_and_switch():
    dm = dt.DeltaModel(tiny_llama())
    dm.add("a", dt.LoraConfig(r=2))
    dm.add("b", dt.LoraConfig(r=2))
    randomize_deltas(dm)
    inputs = model_inputs("llama")
    assert dm.active == ["b"]
    only_b = logits(dm, inputs)
    dm.activate("a")
    only_a = logits(dm, inputs)
    dm.activate("a", "b")
    both = logits(dm, inputs)
    assert not torch.allclose(only_a, only_b) and not torch.allclose(both, only_a)
    # The two deltas touch the same layers additively: merging both equals running both.
    dm.merge()
    assert (logits(dm, inputs) - both).abs().max() < 1e-4
    dm.unmerge()
    dm.delete("a")
    assert dm.delta_names == ["b"] and dm.active == ["b"]
    assert torch.equal(logits(dm, inputs), only_b)
    dm.delete("b")
    assert not any(hasattr(m, "deltas") for m in dm.model.modules())


def test_bf16_merge_happens_in_the_weight_dtype():
    model = tiny_llama().to(torch.bfloat16)
    dm = dt.attach(model, dt.LoraConfig(r=4, target_modules=["q_proj"]))
    d = dm.model.model.layers[0].self_attn.q_proj
    assert d.deltas["default"].lora_A.dtype == torch.bfloat16
    randomize_deltas(dm, std=0.1)
    w0 = d.base.weight.detach().clone()
    dm.merge()
    expected = (w0.float() + d.deltas["default"].delta_weight()).to(torch.bfloat16)
    assert torch.equal(d.base.weight, expected)
    dm.unmerge()
    assert torch.equal(d.base.weight, w0)


def test_fp32_master_copy_on_bf16_model():
    dm = dt.DeltaModel(tiny_llama().to(torch.bfloat16))
    dm.add("m", dt.LoraConfig(r=4), dtype=torch.float32)
    assert dm.get_delta("m").parameters()[0].dtype == torch.float32
    out = dm(**model_inputs("llama")).logits
    assert out.dtype == torch.bfloat16


def test_merge_and_unload_returns_plain_model_with_same_outputs():
    dm = dt.attach(tiny_llama(), ALL_LINEAR)
    randomize_deltas(dm, std=0.2)
    inputs = model_inputs("llama")
    expected = logits(dm, inputs)
    plain = dm.merge_and_unload()
    assert not any(hasattr(m, "deltas") for m in plain.modules())
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
    assert (logits(plain, inputs) - expected).abs().max() < 1e-4


# -- bad input ---------------------------------------------------------------------------
def test_target_matching_nothing():
    with pytest.raises(TargetError, match="'query' matched no module.*q_proj"):
        dt.attach(tiny_llama(), dt.LoraConfig(target_modules=["query"]))


def test_unknown_config_field():
    with pytest.raises(ConfigError, match="unknown field"):
        dt.config_from_dict({"method": "lora", "rank": 8})


def test_rank_above_layer_dims_names_the_module():
    with pytest.raises(HyperparameterError, match=r"r=40 is larger than min\(d_in, d_out\) = "
                                                  r"min\(32, 16\) = 16 of module "
                                                  r"'model.layers.0.self_attn.k_proj'"):
        dt.attach(tiny_llama(), dt.LoraConfig(r=40, target_modules=["k_proj"]))


def test_a_failed_attach_leaves_the_model_untouched():
    m = tiny_llama()
    with pytest.raises(HyperparameterError):
        dt.attach(m, dt.LoraConfig(r=20, target_modules=["q_proj", "k_proj"]))
    assert not any(hasattr(mod, "deltas") for mod in m.modules())


def test_rank_pattern_must_match_a_target():
    with pytest.raises(HyperparameterError, match="rank_pattern key 'k_proj' matches none"):
        dt.attach(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"],
                                              rank_pattern={"k_proj": 2}))
    dm = dt.attach(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                               rank_pattern={"v_proj": 2}))
    assert dm.model.model.layers[0].self_attn.v_proj.deltas["default"].r == 2


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    dm = dt.attach(tiny_llama(), ALL_LINEAR)
    dm.save_delta(tmp_path / "d")
    weights = tmp_path / "d" / "delta.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    m = tiny_llama()
    with pytest.raises(AdapterFileCorrupt, match="delta.safetensors: size is .* the manifest"):
        dt.load(m, tmp_path / "d")
    assert not any(hasattr(mod, "deltas") for mod in m.modules())


def test_delta_for_another_architecture_is_refused(tmp_path):
    dm = dt.attach(tiny_gpt2(), dt.LoraConfig(target_modules=["c_attn"]))
    dm.save_delta(tmp_path / "gpt2-delta")
    m = tiny_llama()
    with pytest.raises(BaseModelMismatchError, match="saved for model type 'gpt2', this model "
                                                     "is 'llama'"):
        dt.load(m, tmp_path / "gpt2-delta")
    assert not any(hasattr(mod, "deltas") for mod in m.modules())


def test_same_shapes_different_weights_is_refused_unless_overridden(tmp_path):
    dm = dt.attach(tiny_llama(seed=0), dt.LoraConfig())
    dm.save_delta(tmp_path / "d")
    with pytest.raises(BaseModelMismatchError, match="different weights"):
        dt.load(tiny_llama(seed=1), tmp_path / "d")
    assert dt.load(tiny_llama(seed=1), tmp_path / "d", check_base="shapes").active == ["default"]
    # A bf16 copy of the same base still matches.
    assert dt.load(tiny_llama(seed=0).to(torch.bfloat16), tmp_path / "d").active == ["default"]
