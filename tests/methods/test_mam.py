"""MAM adapter: equals prefix tuning + scaled parallel FFN adapter, as one delta."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.core.errors import ConfigError, MergeError
from tests.conftest import FACTORIES, model_inputs, randomize_deltas, tiny_llama
from tests.helpers import logits

SMALL = dict(prefix_length=3, bottleneck_size=8, reparam_hidden=8)


def test_paper_defaults():
    cfg = dt.MamConfig()
    assert (cfg.prefix_length, cfg.bottleneck_size, cfg.scaling) == (30, 512, 4.0)
    assert cfg.adapter_config().dimensions() == {
        "functional_form": "bottleneck", "insertion": "parallel",
        "modified_representation": ["ffn"], "composition": "scale", "scaling": 4.0}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "neox", "bert", "t5", "bart"])
def test_mam_equals_prefix_plus_parallel_adapter(arch):
    """Reference: the two parts as two separate deltas, both active, same tensors."""
    cfg = dt.MamConfig(**SMALL, scaling=2.0)
    mam = dt.attach(FACTORIES[arch](), cfg)
    randomize_deltas(mam, std=0.3)
    parts = dt.DeltaModel(FACTORIES[arch]())
    parts.add("prefix", cfg.prefix_config())
    parts.add("ffn", cfg.adapter_config())
    parts.activate("prefix", "ffn")
    ours = mam.get_delta("default")
    with torch.no_grad():
        for (_, mine), (_, theirs) in zip(
                ours.named_tensors(),
                [*parts.get_delta("prefix").named_tensors(),
                 *parts.get_delta("ffn").named_tensors()], strict=True):
            theirs.copy_(mine)
    inputs = model_inputs(arch)
    assert torch.allclose(logits(mam, inputs), logits(parts, inputs), atol=1e-6)
    # Each part matters: without the adapter, or without the prefix, the output differs.
    parts.activate("prefix")
    assert not torch.allclose(logits(mam, inputs), logits(parts, inputs), atol=1e-4)
    parts.activate("ffn")
    assert not torch.allclose(logits(mam, inputs), logits(parts, inputs), atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "neox", "bert", "t5"])
def test_save_load_roundtrip_drops_the_prefix_mlp(tmp_path, arch):
    dm = dt.attach(FACTORIES[arch](), dt.MamConfig(**SMALL))
    randomize_deltas(dm, std=0.3)
    inputs = model_inputs(arch)
    expected = logits(dm, inputs)
    dm.save_delta(tmp_path / "m")
    saved = dt.read_delta_directory(tmp_path / "m")
    assert saved.config.reparameterize is False
    assert "prefix.prefix" in saved.tensors
    assert all(k == "prefix.prefix" or k.rsplit(".", 2)[1] in ("down", "up")
               for k in saved.tensors)
    loaded = dt.load(FACTORIES[arch](), tmp_path / "m")
    assert torch.allclose(logits(loaded, inputs), expected, atol=1e-6)


def test_mam_prefix_on_gpt_neox_equals_peft_prefix_tuning():
    """GPT-NeoX keeps only ``head_size`` on its attention module (fused query_key_value);
    MAM's prefix part must still find 4 heads of 8 and put the prefix where PEFT does.

    Reference: PEFT's own prefix tuning on the same NeoX, with MAM's FFN adapter
    contributing nothing (up projection zero); then the adapter is switched on.
    """
    import warnings

    import peft

    from tests.conftest import tiny_neox

    p = SMALL["prefix_length"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_neox(), peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=p))
    peft_prefix = pm.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        peft_prefix.copy_(torch.randn(peft_prefix.shape,
                                      generator=torch.Generator().manual_seed(5)) * 0.5)
    pm.eval()
    inputs = model_inputs("neox")
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        expected = pm(**inputs).logits  # (a prefix lives in the cache: no extra positions)
    assert expected.shape[1] == n
    # (P, layers * 2 * hidden): per layer the keys, then the values, of 4 heads of 8.
    assert peft_prefix.shape == (p, 2 * 2 * 4 * 8)

    mam = dt.attach(tiny_neox(), dt.MamConfig(**SMALL, reparameterize=False))
    randomize_deltas(mam, std=0.3)
    tensors = dict(mam.get_delta("default").named_tensors())
    prefix = tensors.pop("deltatune_model_deltas.default.prefix_weight")
    assert prefix.shape == peft_prefix.shape  # the layout PEFT uses (interop copies it)
    assert {k.split(".mlp.")[0] for k in tensors} == {"gpt_neox.layers.0",
                                                       "gpt_neox.layers.1"}
    with torch.no_grad():
        prefix.copy_(peft_prefix)
        for key, t in tensors.items():
            if ".up." in key:
                t.zero_()  # the FFN adapter adds nothing: MAM's output is its prefix's
    # PEFT's cache puts the real tokens after the prefix: positions P .. P + n - 1.
    shifted = {**inputs, "position_ids": torch.arange(p, p + n).expand(2, -1)}
    torch.testing.assert_close(logits(mam, shifted), expected, rtol=1e-5, atol=1e-5)
    assert (logits(tiny_neox(), inputs) - expected).abs().max() > 1e-2  # the prefix matters
    with torch.no_grad():
        for key, t in tensors.items():
            if ".up." in key:
                t.normal_(0, 0.3, generator=torch.Generator().manual_seed(7))
    assert (logits(mam, shifted) - expected).abs().max() > 1e-3  # and so does the adapter


def test_only_mam_parameters_train_and_base_stays_bit_identical():
    dm = dt.attach(tiny_llama(), dt.MamConfig(**SMALL))
    before = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    trainable = {n for n, p in dm.named_parameters() if p.requires_grad}
    assert any("deltatune_model_deltas" in n for n in trainable)
    assert any(".deltas.default." in n for n in trainable)
    assert all("deltatune_model_deltas" in n or ".deltas.default." in n for n in trainable)
    inputs = model_inputs("llama")
    opt = torch.optim.SGD(dm.trainable_parameters(), lr=0.1)
    dm.train()
    for _ in range(2):
        dm(**inputs).logits.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    plain = dm.unload()
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in before.items())


def test_disable_delete_and_merge():
    inputs = model_inputs("llama")
    expected = logits(tiny_llama(), inputs)
    dm = dt.attach(tiny_llama(), dt.MamConfig(**SMALL))
    randomize_deltas(dm, std=0.3)
    assert not torch.allclose(logits(dm, inputs), expected)
    with dm.disabled():
        assert torch.equal(logits(dm, inputs), expected)
    with pytest.raises(MergeError, match="cannot be merged"):
        dm.merge()
    dm.delete("default")
    assert torch.equal(logits(dm, inputs), expected)
    assert not any(m._forward_pre_hooks for m in dm.model.modules())
    assert not hasattr(dm.model, "deltatune_model_deltas")


def test_bad_configs_name_the_field():
    with pytest.raises(ConfigError) as info:
        dt.MamConfig(prefix_length=0)
    assert info.value.field == "prefix_length"
    with pytest.raises(ConfigError) as info:
        dt.MamConfig(site_modules={"mlp": ["fc1", "fc2"]})
    assert info.value.field == "site_modules"
