"""Chunked linear + cross-entropy against the plain logits path."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.kernels import fast_path
from deltatune.kernels.fused_ce import (
    FusedLinearCrossEntropy,
    fused_linear_cross_entropy,
    linear_cross_entropy_reference,
)
from deltatune.kernels.head_loss import causal_lm_loss
from tests.conftest import randomize_deltas, tiny_llama, token_batch


def _case(dtype=torch.float64, n=11, d=6, v=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(v, d, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(v, generator=g, dtype=dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    t[[2, 7]] = -100
    return h, w, b, t


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_gradcheck_float64():
    h, w, b, t = _case()
    assert torch.autograd.gradcheck(
        lambda h, w, b: FusedLinearCrossEntropy.apply(h, w, b, t, -100, 4), (h, w, b))


@pytest.mark.parametrize("chunk", [1, 3, 11, 64])
def test_matches_reference_for_any_chunking(chunk):
    h, w, b, t = _case(torch.float32)
    fast = fused_linear_cross_entropy(h, w, b, t, chunk=chunk)
    fg = torch.autograd.grad(fast * 1.7, (h, w, b))
    ref = linear_cross_entropy_reference(h, w, b, t)
    rg = torch.autograd.grad(ref * 1.7, (h, w, b))
    assert abs(fast.item() - ref.item()) / abs(ref.item()) < 1e-6
    for a, r in zip(fg, rg):
        assert _rel(a, r) < 1e-5


def test_all_ignored_gives_zero_loss_and_gradient():
    h, w, _b, t = _case()
    t[:] = -100
    loss = fused_linear_cross_entropy(h, w, None, t, chunk=4)
    (gh,) = torch.autograd.grad(loss, (h,))
    assert loss.item() == 0.0 and torch.count_nonzero(gh) == 0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_causal_lm_loss_equals_the_model_loss(checkpointing):
    dm = dt.attach(tiny_llama(), dt.LoraConfig(r=4, target_modules="all-linear"))
    randomize_deltas(dm, std=0.2)
    dm.set_trainable("default")
    if checkpointing:
        dm.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    dm.train()
    ids = token_batch(3, 10)
    labels = ids.clone()
    labels[0, :4] = -100
    params = dm.trainable_parameters()
    with fast_path("off"):
        ref = dm(input_ids=ids, labels=labels).loss
        ref_grads = torch.autograd.grad(ref, params)
    with fast_path("on"):
        fast = causal_lm_loss(dm, ids, labels, chunk=7)
        fast_grads = torch.autograd.grad(fast, params)
    assert abs(fast.item() - ref.item()) < 1e-5 * abs(ref.item())
    for a, r in zip(fast_grads, ref_grads):
        assert _rel(a, r) < 1e-5


def test_lora_on_the_head_falls_back_to_the_model_loss():
    dm = dt.attach(tiny_llama(), dt.LoraConfig(r=4, target_modules=["lm_head", "q_proj"]))
    randomize_deltas(dm, std=0.2)
    ids = token_batch(2, 6)
    with torch.no_grad():
        assert torch.equal(causal_lm_loss(dm, ids, ids), dm(input_ids=ids, labels=ids).loss)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_float64_reference():
    h, w, _b, t = _case(torch.float64, n=300, d=64, v=1000)
    hb, wb = (x.detach().cuda().bfloat16().requires_grad_() for x in (h, w))
    loss = fused_linear_cross_entropy(hb, wb, None, t.cuda(), chunk=128)
    gh, gw = torch.autograd.grad(loss, (hb, wb))
    hd, wd = (x.detach().double().requires_grad_() for x in (hb, wb))
    ref = linear_cross_entropy_reference(hd, wd, None, t.cuda())
    rh, rw = torch.autograd.grad(ref, (hd, wd))
    assert abs(loss.item() - ref.item()) < 1e-2 * abs(ref.item())
    assert _rel(gh.double(), rh) < 1e-2 and _rel(gw.double(), rw) < 1e-2


def test_regularisers_of_active_deltas_join_the_loss_as_in_forward():
    from deltatune.methods.adalora import AdaLoraConfig

    dm = dt.attach(tiny_llama(), AdaLoraConfig(init_r=4, target_r=2, total_step=10,
                                               target_modules=["q_proj", "v_proj"]))
    dm.train()
    ids = token_batch(2, 8)
    with torch.no_grad():
        ref = dm(input_ids=ids, labels=ids).loss
        fast = causal_lm_loss(dm, ids, ids)
    assert abs(fast.item() - ref.item()) < 1e-5 * abs(ref.item())
