"""Adapters and the unified view: identity at init, hand formulas, LoRA equivalence,
placement, merging, save/load, per-row batches, presets as configs, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.core.errors import ConfigError, MergeError, TargetError
from deltatune.methods.unified import DIMENSIONS
from tests.conftest import (
    FACTORIES,
    model_inputs,
    randomize_deltas,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
)
from tests.helpers import assert_rows_match_alone, logits

ZERO_INIT = {
    "pfeiffer": dt.PfeifferConfig(),
    "parallel_ffn": dt.ParallelAdapterConfig(bottleneck_size=16),
    "parallel_attention": dt.ParallelAdapterConfig(modified_representation=["attention"],
                                                   bottleneck_size=8),
    "houlsby_zero": dt.HoulsbyConfig(init="zero_up", bottleneck_size=8),
    "unified_gate": dt.UnifiedConfig(composition="gate", bottleneck_size=8,
                                     modified_representation=["attention", "ffn"]),
}


def test_zero_up_adapters_are_the_identity_at_init(arch):
    inputs = model_inputs(arch)
    expected = logits(FACTORIES[arch](), inputs)
    dm = dt.DeltaModel(FACTORIES[arch]())
    for name, config in ZERO_INIT.items():
        dm.add(name, config)
        dm.activate(name)
        assert torch.equal(logits(dm, inputs), expected), name
    dm.activate(*ZERO_INIT)  # all of them at once, stacked on the same layers
    assert torch.equal(logits(dm, inputs), expected)


def test_houlsby_init_is_near_identity_truncated_gaussian():
    inputs = model_inputs("bert")
    expected = logits(tiny_bert(), inputs)
    dm = dt.attach(tiny_bert(hidden_size=64, intermediate_size=128), dt.HoulsbyConfig())
    layer = dm.model.bert.encoder.layer[0].output.dense.deltas["default"]
    for w in (layer.down.weight, layer.up.weight):
        assert w.abs().max().item() <= 2e-2  # truncated at two standard deviations
        assert w.std().item() == pytest.approx(1e-2 * 0.88, rel=0.15)  # std of N truncated at 2
    assert torch.count_nonzero(layer.down.bias) == 0 and torch.count_nonzero(layer.up.bias) == 0
    dm = dt.attach(tiny_bert(), dt.HoulsbyConfig())
    got = logits(dm, inputs)
    assert 0 < (got - expected).abs().max().item() < 1e-3


def _ffn_input_and_output(dm):
    """Run layer 0's FFN of a tiny Llama on a fixed input; return (x, block output)."""
    mlp = dm.model.model.layers[0].mlp
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return x, mlp(x)


def _weights(delta):
    return [t.detach().double() for t in (delta.down.weight, delta.down.bias,
                                         delta.up.weight, delta.up.bias)]


def test_sequential_and_parallel_ffn_adapters_follow_their_formulas():
    base = tiny_llama()
    mlp0 = base.model.layers[0].mlp
    results = {}
    for insertion in ("sequential", "parallel"):
        cfg = dt.UnifiedConfig(insertion=insertion, bottleneck_size=4, scaling=2.5)
        dm = dt.attach(tiny_llama(), cfg)
        randomize_deltas(dm, std=0.3)
        x, got = _ffn_input_and_output(dm)
        wd, bd, wu, bu = _weights(dm.model.model.layers[0].mlp.down_proj.deltas["default"])
        with torch.no_grad():
            h = mlp0(x).double()  # the frozen FFN's output
        u = h if insertion == "sequential" else x.double()
        expected = h + 2.5 * (F.relu(u @ wd.T + bd) @ wu.T + bu)
        assert torch.allclose(got.double(), expected, atol=1e-5), insertion
        results[insertion] = got
    # Same weights, different placement: the two differ (they read h versus x).
    assert (results["sequential"] - results["parallel"]).abs().max() > 1e-2


def test_sequential_attention_adapter_sits_before_bert_residual_and_norm():
    dm = dt.attach(tiny_bert(), dt.HoulsbyConfig(bottleneck_size=4, train_layer_norms=False,
                                                 modified_representation=["attention"]))
    randomize_deltas(dm, std=0.3)
    out_module = dm.model.bert.encoder.layer[0].attention.output
    wd, bd, wu, bu = _weights(out_module.dense.deltas["default"])
    ctx = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    resid = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = out_module(ctx, resid).double()
        h = out_module.dense.base(ctx).double()
        adapted = h + F.gelu(h @ wd.T + bd) @ wu.T + bu
        ln = out_module.LayerNorm
        expected = F.layer_norm(adapted + resid.double(), (32,), ln.weight.double(),
                                ln.bias.double(), ln.eps)
    assert torch.allclose(got, expected, atol=1e-5)


def test_gate_composition_formula():
    cfg = dt.UnifiedConfig(composition="gate", bottleneck_size=4, scaling=3.0, activation="tanh")
    dm = dt.attach(tiny_llama(), cfg)
    randomize_deltas(dm, std=0.3)
    x, got = _ffn_input_and_output(dm)
    delta = dm.model.model.layers[0].mlp.down_proj.deltas["default"]
    wd, bd, wu, bu = _weights(delta)
    wg, bg = delta.gate.weight.double(), delta.gate.bias.double()
    with torch.no_grad():
        h = tiny_llama().model.layers[0].mlp(x).double()
    xd = x.double()
    expected = h + 3.0 * torch.sigmoid(xd @ wg.T + bg) * (torch.tanh(xd @ wd.T + bd) @ wu.T + bu)
    assert torch.allclose(got.double(), expected, atol=1e-5)


@pytest.mark.parametrize(("factory", "arch", "reps", "lora_targets"), [
    (tiny_llama, "llama", ["query", "value"], None),
    (tiny_gpt2, "gpt2", ["query"], ["c_attn"]),
])
def test_linear_parallel_adapter_equals_lora(factory, arch, reps, lora_targets):
    r, alpha = 4, 12.0
    lora = dt.attach(factory(), dt.LoraConfig(r=r, lora_alpha=alpha, target_modules=lora_targets))
    randomize_deltas(lora, std=0.3)
    unified = dt.attach(factory(), dt.UnifiedConfig(
        functional_form="low_rank", insertion="parallel", modified_representation=reps,
        composition="scale", scaling=alpha / r, bottleneck_size=r))
    lora_sd = lora.delta_state_dict()
    with torch.no_grad():
        for key, tensor in unified.delta_state_dict().items():
            # "<layer>.down.weight" holds A, "<layer>.up.weight" holds B.
            layer, part, _ = key.rsplit(".", 2)
            tensor.copy_(lora_sd[f"{layer}.{'lora_A' if part == 'down' else 'lora_B'}"])
    assert len(unified.delta_state_dict()) == len(lora_sd)
    inputs = model_inputs(arch)
    assert torch.allclose(logits(unified, inputs), logits(lora, inputs), atol=1e-6)


def test_linear_forms_merge_and_unmerge_bitwise():
    for cfg in (dt.UnifiedConfig(functional_form="low_rank", modified_representation=["value"],
                                 bottleneck_size=4),
                dt.UnifiedConfig(insertion="sequential", activation="identity", bottleneck_size=4,
                                 modified_representation=["attention", "ffn"],
                                 train_layer_norms=True)):
        dm = dt.attach(tiny_llama(), cfg)
        randomize_deltas(dm, std=0.1)
        inputs = model_inputs("llama")
        before = {k: v.clone() for k, v in dm.model.state_dict().items()}
        unmerged = logits(dm, inputs)
        dm.merge()
        assert (logits(dm, inputs) - unmerged).abs().max() < 1e-4
        dm.unmerge()
        after = dm.model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items())


def test_nonlinear_adapters_refuse_to_merge():
    dm = dt.attach(tiny_llama(), dt.HoulsbyConfig())
    with pytest.raises(MergeError, match="cannot be merged"):
        dm.merge()


def test_save_then_load_reproduces_outputs(tmp_path, arch):
    dm = dt.attach(FACTORIES[arch](), dt.HoulsbyConfig(bottleneck_size=8))
    dm.add("pa", dt.ParallelAdapterConfig(bottleneck_size=8, modified_representation=["attention",
                                                                                      "ffn"]))
    randomize_deltas(dm, std=0.2)
    inputs = model_inputs(arch)
    for name in ("default", "pa"):
        dm.activate(name)
        expected = logits(dm, inputs)
        dm.save_delta(tmp_path / name, name)
        loaded = dt.load(FACTORIES[arch](), tmp_path / name)
        assert torch.equal(logits(loaded, inputs), expected)


def test_houlsby_parameter_count():
    dm = dt.attach(tiny_llama(), dt.HoulsbyConfig(bottleneck_size=16))
    d, m, layers = 32, 16, 2
    adapters = 2 * layers * (2 * d * m + d + m)
    norms = (2 * layers + 1) * d  # RMSNorm: a scale only; two per layer and the final one
    report = dm.parameter_report()[0]
    assert report.parameters == adapters + norms
    base_total = sum(p.numel() for p in tiny_llama().parameters())
    assert report.percent_of_base == pytest.approx(100 * (adapters + norms) / base_total)
    bert = dt.attach(tiny_bert(), dt.PfeifferConfig())  # m = 32 / 16 = 2, one site per layer
    assert bert.parameter_report()[0].parameters == 2 * (2 * 32 * 2 + 32 + 2)


def test_training_changes_only_the_delta(arch):
    dm = dt.attach(FACTORIES[arch](), dt.HoulsbyConfig(bottleneck_size=8))
    base_before = {k: v.clone() for k, v in dm.model.state_dict().items()
                   if ".deltas." not in k}
    trainable = {n for n, p in dm.named_parameters() if p.requires_grad}
    assert trainable and all(".deltas.default." in n for n in trainable)
    opt = torch.optim.SGD(dm.trainable_parameters(), lr=0.1)
    inputs = model_inputs(arch)
    for _ in range(2):
        dm(**inputs).logits.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    after = dm.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())
    norm_deltas = [p for n, p in dm.named_parameters() if "norm_weight_delta" in n]
    assert norm_deltas and any(torch.count_nonzero(p) for p in norm_deltas)


def test_per_row_mixed_batch_equals_each_row_alone():
    dm = dt.DeltaModel(tiny_llama())
    dm.add("par", dt.ParallelAdapterConfig(bottleneck_size=8,
                                           modified_representation=["attention", "ffn"]))
    dm.add("seq", dt.HoulsbyConfig(bottleneck_size=8))
    randomize_deltas(dm, std=0.3)
    inputs = model_inputs("llama", batch=3)
    names = ["par", None, "seq"]
    assert_rows_match_alone(dm, inputs, names, atol=1e-5)


def test_composes_with_lora_and_delete_removes_hooks():
    inputs = model_inputs("llama")
    expected = logits(tiny_llama(), inputs)
    dm = dt.DeltaModel(tiny_llama())
    dm.add("lora", dt.LoraConfig(r=2))  # wraps q_proj, where the attention adapter reads x
    dm.add("pa", dt.ParallelAdapterConfig(bottleneck_size=4, modified_representation=["attention"]))
    randomize_deltas(dm, std=0.3)
    dm.activate("lora", "pa")
    both = logits(dm, inputs)
    dm.activate("lora")
    assert not torch.allclose(both, logits(dm, inputs))
    with dm.disabled():
        assert torch.equal(logits(dm, inputs), expected)
    dm.delete("pa")
    dm.delete("lora")
    assert torch.equal(logits(dm, inputs), expected)
    assert not any(m._forward_pre_hooks for m in dm.model.modules())


# -- the unified view as configuration -------------------------------------------------
PRESETS = [dt.HoulsbyConfig(bottleneck_size=8), dt.PfeifferConfig(),
           dt.ParallelAdapterConfig(bottleneck_size=8),
           dt.ParallelAdapterConfig(modified_representation=["attention"], bottleneck_size=8)]


@pytest.mark.parametrize("preset", PRESETS, ids=lambda c: f"{c.method}-{c.modified_representation}")
def test_unified_config_reproduces_each_preset(preset, tmp_path):
    unified = preset.to_unified()
    assert unified.method == "unified" and unified.dimensions() == preset.dimensions()
    # Spelled out by hand, the four choices give the same config.
    by_hand = dt.UnifiedConfig(**{k: getattr(preset, k) for k in DIMENSIONS},
                               scaling=preset.scaling, activation=preset.activation,
                               bottleneck_size=preset.bottleneck_size,
                               reduction_factor=preset.reduction_factor, init=preset.init,
                               train_layer_norms=preset.train_layer_norms)
    assert by_hand == unified
    a = dt.attach(tiny_llama(), preset)
    b = dt.attach(tiny_llama(), unified)
    randomize_deltas(a)
    randomize_deltas(b)
    assert a.delta_state_dict().keys() == b.delta_state_dict().keys()
    inputs = model_inputs("llama")
    assert torch.equal(logits(a, inputs), logits(b, inputs))
    # A preset's saved delta loads as itself.
    a.save_delta(tmp_path / "p")
    assert dt.load(tiny_llama(), tmp_path / "p").get_delta("default").config == preset


# -- bad input ---------------------------------------------------------------------------
def test_preset_refuses_to_change_its_defining_choice():
    with pytest.raises(ConfigError, match="HoulsbyConfig fixes insertion to 'sequential'.*"
                                          "UnifiedConfig"):
        dt.HoulsbyConfig(insertion="parallel")
    with pytest.raises(ConfigError, match="fixes modified_representation"):
        dt.PfeifferConfig(modified_representation=["attention"])


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"composition": "add", "scaling": 4.0}, "scaling"),
    ({"functional_form": "low_rank", "activation": "relu"}, "activation"),
    ({"modified_representation": []}, "modified_representation"),
    ({"modified_representation": ["ffn", "ffn"]}, "modified_representation"),
    ({"modified_representation": ["mlp"]}, "modified_representation"),
    ({"site_modules": {"mlp": ["fc1", "fc2"]}}, "site_modules"),
    ({"bottleneck_size": 0}, "bottleneck_size"),
])
def test_bad_config_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as info:
        dt.UnifiedConfig(**kwargs)
    assert info.value.field == field


def test_unknown_layout_names_site_modules_and_by_hand_names_work():
    inputs = model_inputs("llama")
    known = dt.attach(tiny_llama(), dt.PfeifferConfig())
    randomize_deltas(known)
    model = tiny_llama()
    model.config.model_type = "mystery"
    with pytest.raises(TargetError, match="model type 'mystery'.*site_modules"):
        dt.attach(model, dt.PfeifferConfig())
    by_hand = dt.attach(model, dt.PfeifferConfig(site_modules={"ffn": ["gate_proj", "down_proj"]}))
    randomize_deltas(by_hand)
    assert torch.equal(logits(by_hand, inputs), logits(known, inputs))


def test_site_modules_must_be_linear_and_layers_in_range():
    with pytest.raises(TargetError, match="not a linear layer"):
        dt.attach(tiny_llama(), dt.PfeifferConfig(site_modules={"ffn": ["mlp.act_fn", "mlp"]}))
    with pytest.raises(TargetError, match="no ffn block found"):
        dt.attach(tiny_llama(), dt.PfeifferConfig(site_modules={"ffn": ["fc1", "fc2"]}))
    with pytest.raises(TargetError, match=r"layers \[5\] are out of range"):
        dt.attach(tiny_llama(), dt.PfeifferConfig(layers=[5]))
    dm = dt.attach(tiny_llama(), dt.PfeifferConfig(layers=[1]))
    assert list(dm.get_delta("default").parts) == ["model.layers.1.mlp.down_proj"]


@pytest.mark.parametrize("arch", ["llama", "bart"])
def test_generate_with_cache_equals_without(arch):
    dm = dt.attach(FACTORIES[arch](), dt.ParallelAdapterConfig(
        bottleneck_size=8, modified_representation=["attention", "ffn"]))
    randomize_deltas(dm, std=0.5)
    inputs = model_inputs(arch, batch=2)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=1)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        cached = dm.generate(input_ids=ids, attention_mask=mask, use_cache=True, **kw)
        uncached = dm.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
        with dm.disabled():
            base = dm.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, base)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_llama()
        dm = dt.attach(model, dt.ParallelAdapterConfig(
            bottleneck_size=8, modified_representation=["attention", "ffn"]))
        randomize_deltas(dm, std=0.3)
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
            assert model.model.gradient_checkpointing
        dm.train()
        dm(**model_inputs("llama")).logits.pow(2).mean().backward()
        grads.append([p.grad.clone() for p in dm.trainable_parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))


def test_bf16_model_runs_adapters_in_bf16():
    dm = dt.attach(tiny_llama().to(torch.bfloat16), dt.HoulsbyConfig(bottleneck_size=8))
    delta = dm.model.model.layers[0].mlp.down_proj.deltas["default"]
    assert delta.down.weight.dtype == torch.bfloat16
    assert dm(**model_inputs("llama")).logits.dtype == torch.bfloat16


def test_parallel_adapter_keeps_no_activation_after_forward():
    dm = dt.DeltaModel(tiny_llama())
    dm.add("a", dt.ParallelAdapterConfig(bottleneck_size=4))
    dm.add("b", dt.ParallelAdapterConfig(bottleneck_size=4))  # b active, a inactive
    logits(dm, model_inputs("llama"))
    deltas = [dm.model.model.layers[i].mlp.down_proj.deltas[n] for i in (0, 1) for n in "ab"]
    assert all(d.captured is None for d in deltas)
