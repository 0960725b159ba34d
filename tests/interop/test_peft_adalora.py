"""PEFT AdaLoRA adapters both ways, including rank-pruned saves (rank_pattern)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import deltatune as dt
from deltatune.core.errors import AdapterFileCorrupt
from tests.conftest import FACTORIES, randomize_deltas
from tests.interop.helpers import logits

CASES = {
    "llama": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    "gpt2": ("gpt2", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "bert-head": ("bert", dict(target_modules=["query", "value"], task_type="SEQ_CLS")),
    "t5": ("t5", dict(target_modules=["q", "v", "wo"])),
}


def _peft(arch, seed=5, **kwargs):
    from peft import AdaLoraConfig, get_peft_model

    cfg = dict(init_r=4, target_r=2, lora_alpha=8, total_step=10, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(FACTORIES[arch](), AdaLoraConfig(**cfg))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
    return pm.eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_with_peft_outputs(case, tmp_path):
    arch, kwargs = CASES[case]
    pm = _peft(arch, **kwargs)
    pm.save_pretrained(tmp_path / "a")
    expected = logits(pm, arch)
    assert (expected - logits(FACTORIES[arch](), arch)).abs().max() > 1e-2
    dm = dt.load_peft(tmp_path / "a", model=FACTORIES[arch]())
    config = dm.get_delta("default").config
    assert (config.method, config.init_r, config.target_r, config.total_step) == \
        ("adalora", 4, 2, 10)
    assert (logits(dm, arch) - expected).abs().max() < 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_our_peft_save_loads_in_peft_with_our_outputs(case, tmp_path):
    from peft import PeftModel

    arch, kwargs = CASES[case]
    _peft(arch, **kwargs).save_pretrained(tmp_path / "src")
    dm = dt.load_peft(tmp_path / "src", model=FACTORIES[arch]())
    randomize_deltas(dm, std=0.4, seed=13)
    expected = logits(dm, arch)
    dm.save_delta(tmp_path / "out", format="peft")
    theirs = PeftModel.from_pretrained(FACTORIES[arch](), tmp_path / "out").eval()
    assert (logits(theirs, arch) - expected).abs().max() < 1e-5


def _pruned(tmp_path):
    """A PEFT AdaLoRA save after rank allocation: each module keeps some triplets."""
    pm = _peft("llama", **CASES["llama"][1])
    masks = [[True, False, True, False], [True, True, True, True], [False, False, False, True]]
    pattern = {}
    for i, (name, _) in enumerate(n for n in pm.base_model.model.named_parameters()
                                  if n[0].endswith("lora_E.default")):
        pattern[name] = masks[i % len(masks)]
    pm.peft_config["default"].rank_pattern = pattern
    pm.save_pretrained(tmp_path / "pruned")
    return tmp_path / "pruned"


def test_rank_pruned_peft_save_loads_with_peft_outputs(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    directory = _pruned(tmp_path)
    shapes = {k: tuple(v.shape) for k, v in
              load_file(directory / "adapter_model.safetensors").items()}
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_A"] == (2, 32)
    theirs = PeftModel.from_pretrained(FACTORIES["llama"](), directory).eval()
    dm = dt.load_peft(directory, model=FACTORIES["llama"]())
    assert (logits(dm, "llama") - logits(theirs, "llama")).abs().max() < 1e-5
    ranks = {k: int(torch.count_nonzero(v)) for k, v in dm.delta_state_dict().items()
             if k.endswith("lora_Lambda")}
    assert ranks["model.layers.0.self_attn.q_proj.lora_Lambda"] == 2
    assert ranks["model.layers.0.self_attn.v_proj.lora_Lambda"] == 4


def test_rank_pattern_that_disagrees_with_tensors_is_corrupt(tmp_path):
    directory = _pruned(tmp_path)
    path = directory / "adapter_config.json"
    cfg = json.loads(path.read_text())
    first = next(iter(cfg["rank_pattern"]))
    cfg["rank_pattern"][first] = [True] * 4
    path.write_text(json.dumps(cfg))
    with pytest.raises(AdapterFileCorrupt, match="rank_pattern"):
        dt.load_peft(directory, model=FACTORIES["llama"]())
