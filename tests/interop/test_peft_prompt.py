"""PEFT prompt tuning and prefix tuning both ways: outputs equal to peft's."""

from __future__ import annotations

import warnings

import pytest
import torch

import deltatune as dt
from deltatune.core.errors import BaseModelMismatchError, ConfigError
from tests.conftest import FACTORIES, model_inputs, randomize_deltas

P = 4


def _peft(arch, kind, seed=5, **kwargs):
    import peft

    task = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "neox": "CAUSAL_LM", "bert": "SEQ_CLS",
            "t5": "SEQ_2_SEQ_LM"}[arch]
    cls = {"prompt": peft.PromptTuningConfig, "prefix": peft.PrefixTuningConfig}[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(FACTORIES[arch](), cls(task_type=task, num_virtual_tokens=P,
                                                        **kwargs))
    randomize_trainable(pm, seed)
    return pm.eval()


def _out(model, arch, positions=False):
    inputs = model_inputs(arch)
    if positions:  # PEFT's prefix cache shifts the real tokens' positions by P
        n = inputs["input_ids"].shape[1]
        inputs["position_ids"] = torch.arange(P, P + n).expand(inputs["input_ids"].shape[0], -1)
    with torch.no_grad():
        return model(**inputs).logits


def _peft_out(pm, arch):
    inputs = model_inputs(arch)
    with torch.no_grad():
        logits = pm(**inputs).logits
    # PEFT returns logits for the virtual tokens too; deltatune's line up with the caller's
    # input_ids (docs/core.md, model-level deltas), so compare the real positions only
    n = inputs.get("decoder_input_ids", inputs["input_ids"]).shape[1]
    return logits[:, logits.shape[1] - n:]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_prompt_tuning_peft_to_ours_and_back(arch, tmp_path):
    from peft import PeftModel

    pm = _peft(arch, "prompt")
    pm.save_pretrained(tmp_path / "a")
    expected = _peft_out(pm, arch)
    dm = dt.load_peft(tmp_path / "a", model=FACTORIES[arch]())
    assert dm.get_delta("default").config.method == "prompt"
    assert (_out(dm, arch) - expected).abs().max() < 1e-5
    randomize_deltas(dm, std=0.5, seed=9)
    ours = _out(dm, arch)
    dm.save_delta(tmp_path / "b", format="peft")
    theirs = PeftModel.from_pretrained(FACTORIES[arch](), tmp_path / "b").eval()
    assert (_peft_out(theirs, arch) - ours).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2", "neox"])
@pytest.mark.parametrize("projection", [False, True])
def test_prefix_tuning_peft_to_ours_and_back(arch, projection, tmp_path):
    from peft import PeftModel

    kwargs = dict(prefix_projection=True, encoder_hidden_size=16) if projection else {}
    pm = _peft(arch, "prefix", **kwargs)
    pm.save_pretrained(tmp_path / "a")
    expected = _peft_out(pm, arch)
    dm = dt.load_peft(tmp_path / "a", model=FACTORIES[arch]())
    assert (_out(dm, arch, positions=True) - expected).abs().max() < 1e-5
    randomize_deltas(dm, std=0.5, seed=9)
    ours = _out(dm, arch, positions=True)
    dm.save_delta(tmp_path / "b", format="peft")
    theirs = PeftModel.from_pretrained(FACTORIES[arch](), tmp_path / "b").eval()
    assert (_peft_out(theirs, arch) - ours).abs().max() < 1e-5


def test_prompt_of_another_width_and_unmapped_cases_are_refused(tmp_path):
    _peft("llama", "prompt").save_pretrained(tmp_path / "a")
    dm = dt.DeltaModel(FACTORIES["llama"](hidden_size=48))
    with pytest.raises(BaseModelMismatchError, match="48 wide"):
        dm.load_delta(tmp_path / "a")
    assert not dm.delta_names
    ens = dt.attach(FACTORIES["llama"](), dt.PromptTuningConfig(prompt_length=P, num_prompts=3,
                                                                init="random"))
    with pytest.raises(ConfigError, match="ensemble"):
        ens.save_delta(tmp_path / "e", format="peft")
    _peft("t5", "prefix").save_pretrained(tmp_path / "t5")
    with pytest.raises(ConfigError, match="encoder-decoder"):
        dt.load_peft(tmp_path / "t5", model=FACTORIES["t5"]())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
def test_ptuning_peft_to_ours_and_back(arch, encoder, tmp_path):
    from peft import PeftModel

    pm = _peft_ptuning(arch, encoder)
    pm.save_pretrained(tmp_path / "a")
    expected = _peft_out(pm, arch)
    dm = dt.load_peft(tmp_path / "a", model=FACTORIES[arch]())
    config = dm.get_delta("default").config
    assert (config.method, config.placement, config.encoder) == ("ptuning", "prefix", "none")
    assert (_out(dm, arch) - expected).abs().max() < 1e-5
    randomize_deltas(dm, std=0.5, seed=9)
    ours = _out(dm, arch)
    dm.save_delta(tmp_path / "b", format="peft")
    theirs = PeftModel.from_pretrained(FACTORIES[arch](), tmp_path / "b").eval()
    assert (_peft_out(theirs, arch) - ours).abs().max() < 1e-5


def _peft_ptuning(arch, encoder):
    import peft

    task = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}[arch]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(FACTORIES[arch](), peft.PromptEncoderConfig(
            task_type=task, num_virtual_tokens=P, encoder_hidden_size=16,
            encoder_reparameterization_type=encoder))
    randomize_trainable(pm)
    return pm.eval()


def test_ptuning_template_is_refused(tmp_path):
    dm = dt.attach(FACTORIES["llama"](), dt.PTuningConfig(prompt_length=3, pseudo_token_id=3))
    with pytest.raises(ConfigError, match="template"):
        dm.save_delta(tmp_path / "t", format="peft")


@pytest.mark.parametrize("kind", ["prompt", "ptuning"])
def test_sequence_classifier_head_copy_moves_both_ways(kind, tmp_path):
    """SEQ_CLS: PEFT trains and saves a copy of the classifier beside the prompt."""
    import peft
    from peft import PeftModel

    if kind == "prompt":
        pm = _peft("bert", "prompt")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(FACTORIES["bert"](), peft.PromptEncoderConfig(
                task_type="SEQ_CLS", num_virtual_tokens=P, encoder_hidden_size=16))
        randomize_trainable(pm)
    pm.save_pretrained(tmp_path / "a")
    inputs = model_inputs("bert")
    with torch.no_grad():
        expected = pm(**inputs).logits
        base = FACTORIES["bert"]()(**inputs).logits
    dm = dt.load_peft(tmp_path / "a", model=FACTORIES["bert"]())
    delta = dm.get_delta("default")
    assert delta.config.modules_to_save == ["classifier"]
    # PEFT's trained head copy and prompt change the logits; ours equal PEFT's
    assert not torch.allclose(expected, base, atol=1e-3)
    assert (_out(dm, "bert") - expected).abs().max() < 1e-5
    randomize_deltas(dm, std=0.5, seed=9)
    ours = _out(dm, "bert")
    dm.save_delta(tmp_path / "b", format="peft")
    theirs = PeftModel.from_pretrained(FACTORIES["bert"](), tmp_path / "b").eval()
    with torch.no_grad():
        assert (theirs(**inputs).logits - ours).abs().max() < 1e-5


def randomize_trainable(pm, seed=5):
    """Fill every trainable tensor of a PEFT model with N(0, 0.25) draws."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
