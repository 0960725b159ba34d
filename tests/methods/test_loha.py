"""FedPara / LoHa and pFedPara: Hadamard formula by hand, rank, merge, save/load, peft."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.errors import ConfigError, HyperparameterError
from deltatune.core.layers import DeltaLayer
from deltatune.methods.loha import split_global_local
from tests.conftest import FACTORIES, model_inputs, randomize_deltas, tiny_gpt2, tiny_llama
from tests.helpers import lm_losses, logits, save_and_reload

ALL = dict(target_modules="all-linear", r=2)


def test_identity_at_init(arch):
    inputs = model_inputs(arch)
    expected = logits(FACTORIES[arch](), inputs)
    # pFedPara on every other architecture keeps the run short; both start at zero.
    mode = "pfedpara" if arch in ("gpt2", "llama", "opt", "t5") else "fedpara"
    dm = dt.attach(FACTORIES[arch](), dt.LoHaConfig(mode=mode, **ALL))
    assert torch.equal(logits(dm, inputs), expected)


@pytest.mark.parametrize("mode", ["fedpara", "pfedpara"])
def test_formula_by_hand(mode):
    dm = dt.attach(tiny_llama(), dt.LoHaConfig(r=3, alpha=6.0, mode=mode,
                                               target_modules=["q_proj"], layers=[0]))
    randomize_deltas(dm, std=0.3)
    layer = dm.model.model.layers[0].self_attn.q_proj
    d = layer.deltas["default"]
    X1, Y1, X2, Y2 = (getattr(d, n).double() for n in ("hada_X1", "hada_Y1", "hada_X2",
                                                       "hada_Y2"))
    w2 = X2 @ Y2.T + (1.0 if mode == "pfedpara" else 0.0)
    delta = 2.0 * (X1 @ Y1.T) * w2
    w0 = layer.base.weight.double().clone()
    x = torch.randn(5, 32, dtype=torch.float64)
    assert torch.allclose(layer(x.float()).double(), x @ (w0 + delta).T, atol=1e-5)
    dm.merge()
    assert torch.allclose(layer.base.weight.double(), w0 + delta, atol=1e-5)


def test_rank_goes_beyond_r():
    dm = dt.attach(tiny_llama(), dt.LoHaConfig(r=2, target_modules=["q_proj"], layers=[0]))
    randomize_deltas(dm)
    d = dm.model.model.layers[0].self_attn.q_proj.deltas["default"]
    # Hadamard of two rank-2 matrices: rank up to 4 = r^2 (LoRA with r=2: rank 2).
    X1, Y1, X2, Y2 = (getattr(d, n).detach().double() for n in ("hada_X1", "hada_Y1",
                                                                 "hada_X2", "hada_Y2"))
    assert torch.linalg.matrix_rank((X1 @ Y1.T) * (X2 @ Y2.T)).item() == 4
    assert torch.allclose(d.delta_weight().double(), (X1 @ Y1.T) * (X2 @ Y2.T), atol=1e-5)


def test_merge_equals_unmerged_and_unmerge_restores(arch):
    dm = dt.attach(FACTORIES[arch](), dt.LoHaConfig(**ALL))
    randomize_deltas(dm, std=0.3)
    inputs = model_inputs(arch)
    weights = {k: v.clone() for k, v in dm.model.state_dict().items() if "hada_" not in k}
    unmerged = logits(dm, inputs)
    dm.merge()
    assert (logits(dm, inputs) - unmerged).norm() / unmerged.norm() < 1e-5
    dm.unmerge()
    for k, v in dm.model.state_dict().items():
        if "hada_" not in k:
            assert torch.equal(v, weights[k]), k


def test_conv2d_by_hand_and_merge():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    dm = dt.attach(net, dt.LoHaConfig(r=2, target_modules=["0"]))
    randomize_deltas(dm, std=0.3)
    d = dm.model[0].deltas["default"]
    delta = ((d.hada_X1 @ d.hada_Y1.T) * (d.hada_X2 @ d.hada_Y2.T)).view(4, 3, 3, 3)
    x = torch.randn(2, 3, 5, 5)
    base = dm.model[0].base
    expected = nn.functional.conv2d(x, base.weight + delta, base.bias, padding=1)
    assert torch.allclose(dm.model[0](x), expected, atol=1e-5)
    out = dm(x)
    dm.merge()
    assert torch.allclose(dm(x), out, atol=1e-5)


def test_parameter_count_formula():
    dm = dt.attach(tiny_llama(), dt.LoHaConfig(r=4, target_modules="all-linear"))
    expected = sum(2 * 4 * (m.base.in_features + m.base.out_features)
                   for m in dm.model.modules() if isinstance(m, DeltaLayer))
    assert dm.parameter_report()[0].parameters == expected


def test_save_load_roundtrip(tmp_path):
    dm = dt.attach(tiny_gpt2(), dt.LoHaConfig(mode="pfedpara", **ALL))
    randomize_deltas(dm, std=0.3)
    inputs = model_inputs("gpt2")
    expected = logits(dm, inputs)
    loaded = save_and_reload(dm, tmp_path / "d", tiny_gpt2)
    assert loaded.get_delta("default").config.mode == "pfedpara"
    assert torch.equal(logits(loaded, inputs), expected)


def test_global_and_local_tensors():
    assert dt.LoHaConfig().global_tensor_names() == ["hada_X1", "hada_Y1", "hada_X2",
                                                     "hada_Y2"]
    cfg = dt.LoHaConfig(mode="pfedpara", target_modules=["q_proj"])
    assert cfg.global_tensor_names() == ["hada_X1", "hada_Y1"]
    assert cfg.local_tensor_names() == ["hada_X2", "hada_Y2"]
    dm = dt.attach(tiny_llama(), cfg)
    glob, local = split_global_local(dm.delta_state_dict(), cfg)
    assert len(glob) == len(local) == 2 * 2
    assert all(k.endswith(("hada_X1", "hada_Y1")) for k in glob)
    assert set(glob) | set(local) == set(dm.delta_state_dict())


def test_info_shows_the_global_local_split(tmp_path):
    from deltatune.cli.info import describe

    cfg = dt.LoHaConfig(r=2, mode="pfedpara", target_modules=["q_proj"])
    dt.attach(tiny_llama(), cfg).save_delta(tmp_path / "d")
    summary = describe(str(tmp_path / "d"))["method_summary"]
    # 2 layers x (X1: 32x2 + Y1: 32x2) global, the same count local.
    assert summary["global (sent to the server)"] == "4 tensors, 256 values"
    assert summary["local (stay on the client)"] == "4 tensors, 256 values"


def test_training_reaches_only_the_delta_and_lowers_loss():
    dm = dt.attach(tiny_llama(), dt.LoHaConfig(r=4, target_modules=["q_proj", "v_proj",
                                                                     "down_proj"]))
    assert all("hada_" in n for n, p in dm.named_parameters() if p.requires_grad)
    inputs = model_inputs("llama", batch=4)
    losses = lm_losses(dm, inputs, steps=8, lr=0.02)
    assert losses[-1] < losses[0] - 0.1
    assert all(p.grad is None for n, p in dm.model.named_parameters() if "hada_" not in n)


# peft's LoHa does not wrap GPT-2's Conv1D, so the second case is T5.
@pytest.mark.parametrize(("arch", "tmods"), [
    ("llama", ["q_proj", "v_proj", "down_proj"]),
    ("t5", ["q", "v", "wo"]),
])
def test_same_weights_in_peft_give_the_same_outputs(arch, tmods):
    factory = FACTORIES[arch]
    from peft import LoHaConfig, get_peft_model

    dm = dt.attach(factory(), dt.LoHaConfig(r=3, alpha=9.0, target_modules=tmods))
    randomize_deltas(dm, std=0.3)
    peft_model = get_peft_model(factory(), LoHaConfig(r=3, alpha=9, target_modules=tmods)).eval()
    sd = peft_model.state_dict()
    names = {"hada_X1": ("hada_w1_a", False), "hada_Y1": ("hada_w1_b", True),
             "hada_X2": ("hada_w2_a", False), "hada_Y2": ("hada_w2_b", True)}
    with torch.no_grad():
        for key, tensor in dm.delta_state_dict().items():
            location, _, which = key.rpartition(".")
            theirs, transpose = names[which]
            sd[f"base_model.model.{location}.{theirs}.default"].copy_(
                tensor.t() if transpose else tensor)
    inputs = model_inputs(arch)
    assert (logits(dm, inputs) - logits(peft_model, inputs)).abs().max() < 1e-5


def test_bad_inputs():
    with pytest.raises(ConfigError, match="mode"):
        dt.LoHaConfig(mode="fedavg")
    with pytest.raises(ConfigError, match="alpha"):
        dt.LoHaConfig(alpha=0.0)
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(HyperparameterError, match="groups"):
        dt.attach(net, dt.LoHaConfig(target_modules=["0"]))
