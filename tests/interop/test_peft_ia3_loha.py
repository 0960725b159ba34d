"""PEFT IA3 and LoHa adapters both ways: outputs equal to peft's on the same weights."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import deltatune as dt
from deltatune.core.errors import ConfigError
from tests.conftest import FACTORIES, randomize_deltas
from tests.interop.helpers import logits

IA3_CASES = {
    "llama": ("llama", dict(target_modules=["k_proj", "v_proj", "down_proj"],
                            feedforward_modules=["down_proj"])),
    "gpt2-fused": ("gpt2", dict(target_modules=["c_attn", "mlp.c_proj"],
                                feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True)),
    "bert-head": ("bert", dict(target_modules=["key", "value", "output.dense"],
                               feedforward_modules=["output.dense"], task_type="SEQ_CLS")),
    "t5": ("t5", dict(target_modules=["k", "v", "wo"], feedforward_modules=["wo"])),
}
LOHA_CASES = {
    "llama": ("llama", dict(r=2, alpha=6, target_modules=["q_proj", "v_proj", "gate_proj"])),
    "bert-head": ("bert", dict(r=2, alpha=4, target_modules=["query", "value"],
                               modules_to_save=["classifier"])),
    "t5": ("t5", dict(r=3, alpha=3, target_modules=["q", "v", "wi"])),
}


def _peft(arch, method, kwargs, seed=5):
    from peft import IA3Config, LoHaConfig, get_peft_model

    cls = {"ia3": IA3Config, "loha": LoHaConfig}[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(FACTORIES[arch](), cls(**kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "ia3_l" in name:
                noise = 1 + 0.5 * torch.randn(p.shape, generator=gen)
                if ".c_attn." in name:  # PEFT scales GPT-2's queries too; ours does not
                    noise[: p.shape[0] // 3] = 1
                p.copy_(noise)
            elif "hada_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
    return pm.eval()


CASES = [("ia3", k, *v) for k, v in IA3_CASES.items()] + \
        [("loha", k, *v) for k, v in LOHA_CASES.items()]


@pytest.mark.parametrize(("method", "case", "arch", "kwargs"), CASES,
                         ids=[f"{m}-{c}" for m, c, *_ in CASES])
def test_peft_adapter_loads_with_peft_outputs(method, case, arch, kwargs, tmp_path):
    pm = _peft(arch, method, kwargs)
    pm.save_pretrained(tmp_path / "a")
    expected = logits(pm, arch)
    assert (expected - logits(FACTORIES[arch](), arch)).abs().max() > 1e-2
    dm = dt.load_peft(tmp_path / "a", model=FACTORIES[arch]())
    assert dm.get_delta("default").config.method == method
    assert (logits(dm, arch) - expected).abs().max() < 1e-5


@pytest.mark.parametrize(("method", "case", "arch", "kwargs"), CASES,
                         ids=[f"{m}-{c}" for m, c, *_ in CASES])
def test_our_peft_save_loads_in_peft_with_our_outputs(method, case, arch, kwargs, tmp_path):
    from peft import PeftModel

    _peft(arch, method, kwargs).save_pretrained(tmp_path / "src")
    dm = dt.load_peft(tmp_path / "src", model=FACTORIES[arch]())
    randomize_deltas(dm, std=0.4, seed=13)
    expected = logits(dm, arch)
    dm.save_delta(tmp_path / "out", format="peft")
    theirs = PeftModel.from_pretrained(FACTORIES[arch](), tmp_path / "out").eval()
    assert (logits(theirs, arch) - expected).abs().max() < 1e-5


def test_attached_ia3_defaults_save_to_peft(tmp_path):
    from peft import PeftModel

    dm = dt.attach(FACTORIES["llama"](), dt.IA3Config())
    randomize_deltas(dm, std=0.4)
    dm.save_delta(tmp_path / "p", format="peft")
    saved = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "IA3"
    assert saved["target_modules"] == ["down_proj", "k_proj", "v_proj"]
    assert saved["feedforward_modules"] == ["down_proj"]
    theirs = PeftModel.from_pretrained(FACTORIES["llama"](), tmp_path / "p").eval()
    assert (logits(theirs, "llama") - logits(dm, "llama")).abs().max() < 1e-5


def test_trained_query_scales_of_a_fused_layer_are_refused(tmp_path):
    pm = _peft("gpt2", "ia3", IA3_CASES["gpt2-fused"][1])
    with torch.no_grad():
        pm.base_model.model.transformer.h[0].attn.c_attn.ia3_l["default"][0] = 2.0
    pm.save_pretrained(tmp_path / "a")
    dm = dt.DeltaModel(FACTORIES["gpt2"]())
    with pytest.raises(ConfigError, match="queries"):
        dm.load_delta(tmp_path / "a")
    assert not dm.delta_names


def test_loha_per_module_rank_and_pfedpara_are_refused(tmp_path):
    kwargs = dict(LOHA_CASES["llama"][1], rank_pattern={"v_proj": 4})
    _peft("llama", "loha", kwargs).save_pretrained(tmp_path / "a")
    with pytest.raises(ConfigError, match="rank"):
        dt.load_peft(tmp_path / "a", model=FACTORIES["llama"]())
    dm = dt.attach(FACTORIES["llama"](), dt.LoHaConfig(r=2, mode="pfedpara"))
    with pytest.raises(ConfigError, match="pfedpara"):
        dm.save_delta(tmp_path / "p", format="peft")
    assert not (tmp_path / "p").exists()


def test_loha_effective_conv2d_is_refused(tmp_path):
    _peft("llama", "loha", LOHA_CASES["llama"][1]).save_pretrained(tmp_path / "a")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["use_effective_conv2d"] = True
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="effective-Conv2d"):
        dt.load_peft(tmp_path / "a", model=FACTORIES["llama"]())
