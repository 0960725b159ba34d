"""PEFT LoRA adapters both ways: outputs equal to peft's on the same weights, exact files."""

from __future__ import annotations

import json

import pytest
import torch

import deltatune as dt
from deltatune.core.layers import DeltaLayer
from tests.conftest import FACTORIES, randomize_deltas
from tests.interop.helpers import CASES, logits, peft_model


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_with_peft_outputs(case, tmp_path):
    arch, kwargs = CASES[case]
    pm = peft_model(FACTORIES[arch], **kwargs)
    pm.save_pretrained(tmp_path / "adapter")
    expected = logits(pm, arch)
    assert (expected - logits(FACTORIES[arch](), arch)).abs().max() > 1e-2  # not a no-op
    dm = dt.load_peft(tmp_path / "adapter", model=FACTORIES[arch]())
    got = logits(dm, arch)
    assert (got - expected).abs().max() < 1e-5
    # The mapping is exact: every PEFT LoRA factor became one of ours, nothing else.
    n_peft = sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n or
                 "modules_to_save" in n)
    assert dm.parameter_report()[0].parameters == n_peft


@pytest.mark.parametrize("case", sorted(CASES))
def test_our_peft_save_loads_in_peft_with_our_outputs(case, tmp_path):
    from peft import PeftModel

    arch, kwargs = CASES[case]
    # Build the same delta in deltatune by loading PEFT's layout, then randomise it anew
    # so the tensors are ours, not PEFT's.
    pm = peft_model(FACTORIES[arch], **kwargs)
    pm.save_pretrained(tmp_path / "src")
    dm = dt.load_peft(tmp_path / "src", model=FACTORIES[arch]())
    randomize_deltas(dm, std=0.3, seed=11)
    expected = logits(dm, arch)
    dm.save_delta(tmp_path / "out", format="peft")
    theirs = PeftModel.from_pretrained(FACTORIES[arch](), tmp_path / "out").eval()
    assert (logits(theirs, arch) - expected).abs().max() < 1e-5


def test_attached_lora_saves_to_peft_with_leaf_targets_and_patterns(tmp_path):
    from peft import PeftModel

    config = dt.LoraConfig(r=4, lora_alpha=16, use_rslora=True,
                           target_modules=["q_proj", "v_proj", "o_proj"],
                           rank_pattern={"o_proj": 2}, alpha_pattern={"v_proj": 3.0})
    dm = dt.attach(FACTORIES["llama"](), config)
    randomize_deltas(dm, std=0.3)
    dm.save_delta(tmp_path / "p", format="peft")
    saved = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    # Leaf names select exactly our modules, so serving engines get the usual form.
    assert saved["target_modules"] == ["o_proj", "q_proj", "v_proj"]
    assert saved["use_rslora"] is True and saved["r"] == 4 and saved["lora_alpha"] == 16
    assert saved["rank_pattern"] == {f"model.layers.{i}.self_attn.o_proj": 2 for i in (0, 1)}
    assert saved["task_type"] == "CAUSAL_LM" and saved["use_dora"] is False
    theirs = PeftModel.from_pretrained(FACTORIES["llama"](), tmp_path / "p").eval()
    assert (logits(theirs, "llama") - logits(dm, "llama")).abs().max() < 1e-5


def test_layer_subset_is_written_as_full_paths(tmp_path):
    dm = dt.attach(FACTORIES["llama"](), dt.LoraConfig(r=2, target_modules=["q_proj"],
                                                       layers=[1]))
    dm.save_delta(tmp_path / "p", format="peft")
    saved = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["model.layers.1.self_attn.q_proj"]


def test_round_trip_ours_peft_ours_is_exact(tmp_path):
    dm = dt.attach(FACTORIES["gpt2"](), dt.LoraConfig(r=3, lora_alpha=6,
                                                      target_modules=["c_attn", "wte"]))
    randomize_deltas(dm)
    dm.save_delta(tmp_path / "p", format="peft", card={"training_data": "unit test"})
    back = dt.load(FACTORIES["gpt2"](), tmp_path / "p")
    before, after = dm.delta_state_dict(), back.delta_state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # Our fingerprint and card travel in the safetensors metadata.
    assert back.get_delta("default").info["card"] == {"training_data": "unit test"}


def test_peft_file_keys_match_peft_own_save(tmp_path):
    from safetensors.torch import load_file

    arch, kwargs = CASES["llama-rslora-embed-patterns"]
    pm = peft_model(FACTORIES[arch], **kwargs)
    pm.save_pretrained(tmp_path / "theirs")
    dt.load_peft(tmp_path / "theirs", model=FACTORIES[arch]()).save_delta(
        tmp_path / "ours", format="peft")
    theirs = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    # PEFT also saves the embedding's base weight (save_embedding_layers='auto'); we do not.
    lora_keys = {k for k in theirs if "lora_" in k}
    assert set(ours) == lora_keys
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_loaded_adapter_merges_like_peft(tmp_path):
    arch, kwargs = CASES["gpt2-conv1d-wte"]
    kwargs = {**kwargs, "target_modules": ["c_attn", "c_fc"]}
    pm = peft_model(FACTORIES[arch], **kwargs)
    pm.save_pretrained(tmp_path / "a")
    dm = dt.load_peft(tmp_path / "a", model=FACTORIES[arch]())
    ours = dm.merge_and_unload()
    theirs = pm.merge_and_unload()
    for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), theirs.state_dict().items(),
                                  strict=True):
        assert n1 == n2 and torch.allclose(p1, p2, atol=1e-6), n1
    assert not any(isinstance(m, DeltaLayer) for m in ours.modules())
