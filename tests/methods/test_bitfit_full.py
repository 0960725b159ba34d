"""BitFit and full fine-tuning: what trains, what stays bit-identical, save/load, errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.core.errors import DeltaStateError, TargetError
from tests.conftest import (
    FACTORIES,
    model_inputs,
    randomize_deltas,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
)
from tests.helpers import logits


def _train(dm, inputs, steps=2, lr=0.1):
    opt = torch.optim.SGD(dm.trainable_parameters(), lr=lr)
    for _ in range(steps):
        dm(**inputs).logits.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


# -- BitFit -------------------------------------------------------------------------------
def test_bitfit_targets_every_bias_and_only_biases():
    dm = dt.attach(tiny_bert(), dt.BitFitConfig())
    base = tiny_bert()
    biased = {n for n, m in base.named_modules()
              if isinstance(getattr(m, "bias", None), torch.Tensor)}
    assert set(dm.get_delta("default").parts) == biased
    expected = sum(m.bias.numel() for n, m in base.named_modules() if n in biased)
    assert dm.parameter_report()[0].parameters == expected


def test_bitfit_is_identity_at_init(arch):
    inputs = model_inputs(arch)
    cfg = dt.BitFitConfig(add_missing_biases=arch in ("llama", "t5"))
    dm = dt.attach(FACTORIES[arch](), cfg)
    assert torch.equal(logits(dm, inputs), logits(FACTORIES[arch](), inputs))


def test_bitfit_adds_the_bias_change_to_the_output():
    dm = dt.attach(tiny_gpt2(), dt.BitFitConfig(target_modules=["c_fc"], layers=[0]))
    randomize_deltas(dm)
    layer = dm.model.transformer.h[0].mlp.c_fc
    x = torch.randn(3, 32, dtype=torch.float64)
    w, b = layer.base.weight.double(), layer.base.bias.double()  # Conv1D: (d_in, d_out)
    expected = x @ w + b + layer.deltas["default"].bias_delta.double()
    assert torch.allclose(layer(x.float()).double(), expected, atol=1e-5)


def test_bitfit_training_leaves_every_non_bias_weight_bit_identical(arch):
    cfg = dt.BitFitConfig(add_missing_biases=arch in ("llama", "t5"))
    dm = dt.attach(FACTORIES[arch](), cfg)
    before = {k: v.clone() for k, v in FACTORIES[arch]().state_dict().items()}
    _train(dm, model_inputs(arch))
    plain = dm.merge_and_unload()
    after = plain.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(after[k], v)}
    # Bias-less layers (Llama, T5) now carry the biases they learned; nothing else is new.
    new = set(after) - set(before)
    assert changed | new and all(k.endswith(".bias") for k in changed | new), sorted(changed)[:5]


def test_bitfit_merge_and_unmerge():
    dm = dt.attach(tiny_llama(), dt.BitFitConfig(add_missing_biases=True))
    randomize_deltas(dm, std=0.1)
    inputs = model_inputs("llama")
    unmerged = logits(dm, inputs)
    dm.merge()
    assert (logits(dm, inputs) - unmerged).abs().max() < 1e-5
    dm.unmerge()
    assert dm.model.model.layers[0].self_attn.q_proj.base.bias is None
    assert torch.equal(logits(dm, inputs), unmerged)


def test_bitfit_with_a_task_head_and_save_load(tmp_path):
    dm = dt.attach(tiny_bert(), dt.BitFitConfig(modules_to_save=["classifier"]))
    parts = dm.get_delta("default").parts
    assert "classifier" in parts and not any(p.startswith("classifier.") for p in parts
                                             if p != "classifier")
    inputs = model_inputs("bert")
    _train(dm, inputs)
    expected = logits(dm, inputs)
    dm.save_delta(tmp_path / "b")
    keys = load_file(tmp_path / "b" / "delta.safetensors").keys()
    assert all(k.endswith(".bias_delta") or k.startswith("classifier.") for k in keys)
    assert torch.equal(logits(dt.load(tiny_bert(), tmp_path / "b"), inputs), expected)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_t5])
def test_bitfit_on_a_bias_less_model_names_the_option(factory):
    with pytest.raises(TargetError, match="no bias terms.*add_missing_biases=True"):
        dt.attach(factory(), dt.BitFitConfig())


def test_bitfit_per_row_batch():
    dm = dt.DeltaModel(tiny_gpt2())
    dm.add("a", dt.BitFitConfig())
    randomize_deltas(dm, std=0.2)
    inputs = model_inputs("gpt2", batch=2)
    mixed = logits(dm, {**inputs, "delta_names": ["a", None]})
    assert torch.allclose(mixed[:1], logits(dm, {k: v[:1] for k, v in inputs.items()}),
                          atol=1e-6)
    with dm.disabled():
        assert torch.allclose(mixed[1:], logits(dm, {k: v[1:] for k, v in inputs.items()}),
                              atol=1e-6)


# -- full fine-tuning ---------------------------------------------------------------------
def test_full_trains_everything_and_reports_100_percent(arch):
    dm = dt.attach(FACTORIES[arch](), dt.FullConfig())
    total = sum(p.numel() for p in FACTORIES[arch]().parameters())
    report = dm.parameter_report()[0]
    assert report.parameters == total and report.percent_of_base == pytest.approx(100.0)
    assert dm.base_parameter_count() == total
    assert all(p.requires_grad for p in dm.model.parameters())
    assert f"trainable: {total:,} of {total:,} (100.0000%)" in dm.describe_parameters()


def test_full_save_is_the_full_state_dict_and_loads_back(tmp_path, arch):
    dm = dt.attach(FACTORIES[arch](), dt.FullConfig())
    inputs = model_inputs(arch)
    _train(dm, inputs, lr=0.01)
    expected = logits(dm, inputs)
    dm.save_delta(tmp_path / "f")
    saved = load_file(tmp_path / "f" / "delta.safetensors")
    trained = dm.model.state_dict()
    # Every key of the plain model (tied weights once), with the trained values.
    assert set(saved) <= set(trained) and len(saved) >= len(dict(dm.model.named_parameters()))
    assert all(torch.equal(saved[k], trained[k]) for k in saved)
    fresh = FACTORIES[arch]()
    loaded = dt.load(fresh, tmp_path / "f")
    assert torch.equal(logits(loaded, inputs), expected)


def test_full_disable_and_delete_give_the_base_back():
    inputs = model_inputs("gpt2")
    base_out = logits(tiny_gpt2(), inputs)
    dm = dt.DeltaModel(tiny_gpt2())
    dm.add("full", dt.FullConfig())
    _train(dm, inputs)
    trained = logits(dm, inputs)
    assert not torch.allclose(trained, base_out)
    with dm.disabled():
        assert torch.equal(logits(dm, inputs), base_out)
    assert torch.equal(logits(dm, inputs), trained)
    dm.add("lora", dt.LoraConfig(r=2))  # activating another delta switches full off
    with dm.disabled():
        assert torch.equal(logits(dm, inputs), base_out)
    dm.activate("full")
    assert torch.equal(logits(dm, inputs), trained)
    dm.delete("full")
    dm.delete("lora")
    assert torch.equal(logits(dm, inputs), base_out)
    assert not any(p.requires_grad for p in dm.model.parameters())


def test_full_merge_and_unload_returns_the_trained_model():
    inputs = model_inputs("llama")
    dm = dt.attach(tiny_llama(), dt.FullConfig())
    _train(dm, inputs)
    trained = logits(dm, inputs)
    plain = dm.merge_and_unload()
    assert torch.equal(logits(plain, inputs), trained)


def test_full_without_original_cannot_be_switched_off():
    dm = dt.attach(tiny_llama(), dt.FullConfig(keep_original=False))
    with pytest.raises(DeltaStateError, match="keep_original=False"), dm.disabled():
        pass
