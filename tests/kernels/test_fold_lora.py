"""Folding one adapter into a scratch weight (many rows, no autograd) against other paths."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.kernels import fast_path, fold_lora
from deltatune.kernels.lora_linear import lora_linear, lora_linear_reference
from tests.conftest import randomize_deltas, tiny_gpt2, tiny_llama
from tests.helpers import count_calls


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _tensors(dtype, rows=96, d_in=24, d_out=40, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
                 for s in ((rows, d_in), (d_out, d_in), (d_out,), (r, d_in), (d_out, r)))


@pytest.fixture
def spy(monkeypatch):
    """Counts the folded calls (the real function still computes them)."""
    return count_calls(monkeypatch, fold_lora, "folded_linear")


def test_folded_linear_is_the_formula_in_float64():
    x, w, b, A, B = _tensors(torch.float64)
    before = w.clone()
    got = fold_lora.folded_linear(x, w, b, A, B, 0.75)
    by_hand = x @ (w + 0.75 * B @ A).T + b
    assert _rel(got, by_hand) < 1e-13
    assert _rel(got, lora_linear_reference(x, w, b, A, B, 0.75)) < 1e-13
    assert torch.equal(w, before)  # the base weight is never written


def test_lora_linear_folds_many_rows_without_autograd_only(monkeypatch, spy):
    x, w, b, A, B = _tensors(torch.float32)
    ref = lora_linear_reference(x, w, b, A, B, 2.0)
    monkeypatch.setenv("DELTATUNE_FOLD_LORA", "always")
    with torch.no_grad():
        got = lora_linear(x, w, b, A, B, 2.0)
    assert spy["n"] == 1 and _rel(got, ref) < 1e-5
    with torch.no_grad():
        lora_linear(x[:8], w, b, A, B, 2.0)  # decoding-sized: never folded
    assert spy["n"] == 1
    # under autograd the adapter's gradients need x A^T: never folded
    A_train, B_train = A.clone().requires_grad_(), B.clone().requires_grad_()
    out = lora_linear(x, w, b, A_train, B_train, 2.0)
    assert spy["n"] == 1 and _rel(out, ref) < 1e-5
    monkeypatch.setenv("DELTATUNE_FOLD_LORA", "0")
    with torch.no_grad():
        lora_linear(x, w, b, A, B, 2.0)
    assert spy["n"] == 1


def test_fp32_master_adapters_fold_in_the_weights_dtype(monkeypatch, spy):
    x, w, b, _, _ = _tensors(torch.bfloat16)
    _, _, _, A, B = _tensors(torch.float32, seed=5)
    monkeypatch.setenv("DELTATUNE_FOLD_LORA", "always")
    with torch.no_grad():
        got = lora_linear(x, w, b, A, B, 1.5)
    assert spy["n"] == 1 and got.dtype == torch.bfloat16
    ref = lora_linear_reference(x.double(), w.double(), b.double(), A.bfloat16().double(),
                                B.bfloat16().double(), 1.5)
    assert _rel(got, ref) < 1e-2


@pytest.mark.parametrize("rows,d_in,d_out,folds", [
    # measured fold / LoRA kernels on an H200 (run 20261201-221233) in the comments
    (16384, 2048, 8192, True),    # 0.94
    (8192, 2048, 8192, True),     # 0.97
    (4096, 2048, 8192, False),    # 1.02
    (4096, 8192, 2048, False),    # 1.00
    (16384, 4096, 14336, True),   # 0.93
    (8192, 4096, 14336, False),   # 1.05
    (8192, 14336, 4096, False),   # 1.03
    (8192, 4096, 4096, True),     # 0.95
    (1024, 2048, 2048, True),     # 0.47: small weights, launches dominate
    (1024, 4096, 1024, True),     # 0.47
    (1024, 2048, 512, True),      # 0.47
    (512, 2048, 2048, False),     # below the measured rows
    (64, 2048, 512, False),
])
def test_cost_model(rows, d_in, d_out, folds):
    assert fold_lora.pays(rows, d_in, d_out) is folds


def test_policy_auto_off_and_bad_values(monkeypatch):
    x = torch.zeros(4096, 64)
    w = torch.zeros(64, 64)
    monkeypatch.delenv("DELTATUNE_FOLD_LORA", raising=False)
    assert fold_lora.mode() == "auto" and not fold_lora.applies(x, w)  # auto: CUDA only
    monkeypatch.setenv("DELTATUNE_FOLD_LORA", "always")
    assert fold_lora.applies(x, w)
    assert not fold_lora.applies(x, w.double())  # mixed dtypes keep the LoRA kernels
    monkeypatch.setenv("DELTATUNE_FOLD_LORA", "Off")
    assert fold_lora.mode() == "off" and not fold_lora.applies(x, w)
    monkeypatch.setenv("DELTATUNE_FOLD_LORA", "sometimes")
    with pytest.warns(UserWarning, match="DELTATUNE_FOLD_LORA='sometimes'"):
        assert fold_lora.mode() == "auto"


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_prompt_logits_equal_the_unfolded_and_merged_models(monkeypatch, spy, factory):
    # A whole prompt's forward pass, every linear folded (GPT-2's Conv1D through W^T):
    # the same logits as the LoRA kernels and the merged model; the model stays unmerged
    # and an in-place adapter change is seen by the next call.
    dm = dt.attach(factory(), dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_deltas(dm, std=0.2)
    dm.eval()
    ids = torch.randint(3, 100, (3, 40), generator=torch.Generator().manual_seed(1))
    base = {k: v.clone() for k, v in dm.model.state_dict().items() if "base" in k}

    def logits(fold):
        monkeypatch.setenv("DELTATUNE_FOLD_LORA", fold)
        with torch.no_grad(), fast_path("on"):
            return dm(input_ids=ids).logits

    folded, unfolded = logits("always"), logits("0")
    linears = sum(k.endswith(".lora_A") for k in dm.model.state_dict())
    assert linears > 0 and spy["n"] == linears  # every adapted linear, once
    assert _rel(folded, unfolded) < 1e-5
    for k, v in dm.model.state_dict().items():
        if k in base:
            assert torch.equal(v, base[k]), k
    state = {k: v * 1.5 + 0.02 for k, v in dm.delta_state_dict().items()}
    dm.load_delta_state_dict(state)
    folded, unfolded = logits("always"), logits("0")
    assert _rel(folded, unfolded) < 1e-5
    dm.merge()
    with torch.no_grad():
        merged = dm(input_ids=ids).logits
    assert _rel(folded, merged) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_fold_matches_float64_and_is_taken_by_default(spy):
    x, w, b, A, B = (t.cuda() for t in _tensors(torch.bfloat16, rows=4096, d_in=512,
                                                  d_out=512, r=16))
    with torch.no_grad():
        got = lora_linear(x, w, b, A, B, 2.0)
    assert spy["n"] == 1  # a small weight at >= 1024 rows
    ref = lora_linear_reference(*(t.double() for t in (x, w, b, A, B)), 2.0)
    assert _rel(got, ref) < 1e-2
