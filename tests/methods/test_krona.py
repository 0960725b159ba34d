"""KronA and KronA^B_res: Kronecker math by hand, factor shapes, merge, save/load, errors."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.core.errors import HyperparameterError, MergeError, TargetError
from deltatune.core.layers import DeltaLayer
from deltatune.methods.krona import ParallelBlock, balanced_factors, kron_apply
from tests.conftest import (
    FACTORIES,
    model_inputs,
    randomize_deltas,
    tiny_gpt2,
    tiny_llama,
    tiny_opt,
)
from tests.helpers import lm_losses, logits, save_and_reload

ALL = dict(target_modules="all-linear")


@pytest.mark.parametrize(("a", "b"), [((2, 3), (4, 5)), ((1, 6), (7, 2)), ((3, 3), (3, 3))])
def test_kron_apply_equals_materialised_kron(a, b):
    A, B = torch.randn(a, dtype=torch.float64), torch.randn(b, dtype=torch.float64)
    x = torch.randn(4, 2, a[1] * b[1], dtype=torch.float64)
    assert torch.allclose(kron_apply(x, A, B), x @ torch.kron(A, B).T)


def test_balanced_factors():
    assert balanced_factors(768) == (24, 32)
    assert balanced_factors(64) == (8, 8)
    assert balanced_factors(13) == (1, 13)


def test_identity_at_init(arch):
    inputs = model_inputs(arch)
    expected = logits(FACTORIES[arch](), inputs)
    assert torch.equal(logits(dt.attach(FACTORIES[arch](), dt.KronAConfig(**ALL)), inputs),
                       expected)


def test_formula_by_hand_and_shapes():
    dm = dt.attach(tiny_llama(), dt.KronAConfig(scale=2.0, target_modules=["gate_proj"],
                                                layers=[0]))
    layer = dm.model.model.layers[0].mlp.gate_proj   # 32 -> 64
    d = layer.deltas["default"]
    assert tuple(d.krona_A.shape) == (8, 4) and tuple(d.krona_B.shape) == (8, 8)
    assert torch.count_nonzero(d.krona_B) == 0 and torch.count_nonzero(d.krona_A) > 0
    randomize_deltas(dm, std=0.3)
    w0 = layer.base.weight.double().clone()
    delta = 2.0 * torch.kron(d.krona_A.double(), d.krona_B.double())
    x = torch.randn(3, 32, dtype=torch.float64)
    assert torch.allclose(layer(x.float()).double(), x @ (w0 + delta).T, atol=1e-5)
    dm.merge()
    assert torch.allclose(layer.base.weight.double(), w0 + delta, atol=1e-5)


def test_given_factor_shape_and_parameter_count():
    dm = dt.attach(tiny_llama(), dt.KronAConfig(a_shape=[2, 4], target_modules=["q_proj"]))
    d = dm.model.model.layers[0].self_attn.q_proj.deltas["default"]
    assert tuple(d.krona_A.shape) == (2, 4) and tuple(d.krona_B.shape) == (16, 8)
    assert dm.parameter_report()[0].parameters == 2 * (2 * 4 + 16 * 8)


def test_gaussian_init_is_the_papers_ablation():
    dm = dt.attach(tiny_llama(hidden_size=64, intermediate_size=64),
                   dt.KronAConfig(init="gaussian", gaussian_std=0.1, target_modules=["q_proj"]))
    d = dm.model.model.layers[0].self_attn.q_proj.deltas["default"]
    assert d.krona_B.std().item() == pytest.approx(0.1, rel=0.3)
    assert d.krona_A.std().item() == pytest.approx(0.1, rel=0.3)


def test_merge_equals_unmerged_and_unmerge_restores(arch):
    dm = dt.attach(FACTORIES[arch](), dt.KronAConfig(**ALL))
    randomize_deltas(dm, std=0.2)
    inputs = model_inputs(arch)
    weights = {k: v.clone() for k, v in dm.model.state_dict().items() if "krona_" not in k}
    unmerged = logits(dm, inputs)
    dm.merge()
    assert (logits(dm, inputs) - unmerged).norm() / unmerged.norm() < 1e-5
    dm.unmerge()
    for k, v in dm.model.state_dict().items():
        if "krona_" not in k:
            assert torch.equal(v, weights[k]), k


def test_save_load_roundtrip(tmp_path):
    dm = dt.attach(tiny_gpt2(), dt.KronAConfig(**ALL))
    randomize_deltas(dm, std=0.2)
    inputs = model_inputs("gpt2")
    expected = logits(dm, inputs)
    loaded = save_and_reload(dm, tmp_path / "d", tiny_gpt2)
    saved, back = dm.delta_state_dict(), loaded.delta_state_dict()
    assert all(torch.equal(saved[k], back[k]) for k in saved) and set(saved) == set(back)
    # Same tensors; the batched matmul may round differently with another memory alignment.
    assert torch.allclose(logits(loaded, inputs), expected, rtol=0, atol=1e-6)


def _train(dm, steps=12, lr=0.01):
    return lm_losses(dm, model_inputs("llama", batch=4), steps=steps, lr=lr)


def test_training_reaches_only_the_factors_and_lowers_loss():
    dm = dt.attach(tiny_llama(), dt.KronAConfig(**ALL))
    assert all("krona_" in n for n, p in dm.named_parameters() if p.requires_grad)
    losses = _train(dm)
    assert losses[-1] < losses[0] - 0.1


# -- KronA^B_res ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "neox", "t5"])
def test_kronab_identity_at_init_and_not_mergeable(arch):
    inputs = model_inputs(arch)
    expected = logits(FACTORIES[arch](), inputs)
    dm = dt.attach(FACTORIES[arch](), dt.KronABConfig())
    assert any(isinstance(m, ParallelBlock) for m in dm.model.modules())
    assert torch.equal(logits(dm, inputs), expected)
    with pytest.raises(MergeError, match="cannot be merged"):
        dm.merge()


def test_kronab_formula_by_hand():
    dm = dt.attach(tiny_llama(), dt.KronABConfig(scale=3.0, layers=[1]))
    randomize_deltas(dm, std=0.3)
    holder = dm.model.model.layers[1].mlp
    d = holder.deltas["default"]
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    ffn = holder.block(x.float()).double()
    expected = ffn + 3.0 * x @ torch.kron(d.krona_A.double(), d.krona_B.double()).T \
        + d.krona_residual.double() * x
    assert torch.allclose(holder(x.float()).double(), expected, atol=1e-5)
    with dm.disabled():
        assert torch.allclose(holder(x.float()).double(), ffn, atol=1e-6)


def test_kronab_save_load_delete_and_train(tmp_path):
    dm = dt.attach(tiny_llama(), dt.KronABConfig())
    assert dm.parameter_report()[0].parameters == 2 * ((4 * 4) + (8 * 8) + 1)
    losses = _train(dm, lr=0.02)
    assert losses[-1] < losses[0] - 0.1
    inputs = model_inputs("llama")
    dm.eval()
    expected = logits(dm, inputs)
    loaded = save_and_reload(dm, tmp_path / "d", tiny_llama)
    assert torch.allclose(logits(loaded, inputs), expected, rtol=0, atol=1e-6)
    loaded.delete("default")
    assert not any(isinstance(m, ParallelBlock) for m in loaded.model.modules())
    assert torch.equal(logits(loaded, inputs), logits(tiny_llama(), inputs))


def test_bad_inputs():
    with pytest.raises(HyperparameterError, match="a_shape"):
        dt.KronAConfig(a_shape=[2])
    with pytest.raises(HyperparameterError, match="divide"):
        dt.attach(tiny_llama(), dt.KronAConfig(a_shape=[3, 4], target_modules=["q_proj"]))
    with pytest.raises(TargetError, match="not one module"):
        dt.attach(tiny_opt(), dt.KronABConfig())
    with pytest.raises(TargetError, match="output has its input's size"):
        dt.attach(tiny_llama(), dt.KronABConfig(target_modules=["gate_proj"]))
    dm = dt.attach(tiny_llama(), dt.KronAConfig(target_modules=["q_proj"]))
    assert all(isinstance(m.deltas["default"].krona_A, torch.nn.Parameter)
               for m in dm.model.modules() if isinstance(m, DeltaLayer))
