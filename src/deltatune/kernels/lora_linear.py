"""A LoRA'd linear layer as one autograd Function: y = x W^T + b + s (x A^T) B^T.

Why a Function instead of the composition autograd builds from the plain path
(:func:`lora_linear_reference`):

- the shrink ``h = x A^T`` (N x r) is computed once and is the only thing saved
  besides ``x``, which the frozen base matmul saves anyway: no copy of the input in
  another dtype, no dropout copy, no (N x d_out) temporaries kept for backward;
- the expand is accumulated into the base output by one ``addmm`` with the scale as
  its ``alpha`` (cuBLAS's beta=1 epilogue), instead of three passes over y
  (matmul, multiply by s, add); for many rows on Hopper GPUs, where measured faster, one
  Triton GEMM adds it in its epilogue instead (:mod:`deltatune.kernels.tma_lora`);
- backward is ordered by rank: ``g B`` (N x r) first, then the input gradient as
  ``g W`` plus an in-place ``addmm`` of ``(g B) A``, and the adapter gradients as two
  rank-r products (``s (gB)^T x`` and ``s g^T h``). No d_out x d_in product is ever formed.

Adapters may be stored in another dtype than the base (an fp32 master copy on a bf16
model): the matmuls then run in the base dtype and the gradients come back in the
adapters' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deltatune.kernels import fold_lora, lora_grad, tma_lora, triton_lora
from deltatune.kernels.shared_input_shrink import SHARED_INPUTS

# see _fused_forward (taken above SMALL_M rows); False: base GEMM first, then addmm_ (the
# bench compares both)
EXPAND_FIRST = True


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """Return x W^T + b + s (x A^T) B^T with plain ops (the math the fast path must match).

    ``weight`` is (d_out, d_in), ``A`` (r, d_in), ``B`` (d_out, r); computed in the
    adapters' dtype and cast back, as :class:`deltatune.methods.lora.LoraDelta` does.
    """
    y = F.linear(x, weight, bias)
    hidden = x.to(A.dtype) @ A.t()
    return y + (hidden @ B.t() * scale).to(y.dtype)


def _fused_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   A: torch.Tensor, B: torch.Tensor, scale: float, share: bool = False):
    """Return (y, x2, Ac, Bc, h): the output and what backward needs.

    ``share`` (inference only): linears reading the same input compute their shrinks in
    one GEMM for many rows (:mod:`deltatune.kernels.shared_input_shrink`).
    """
    d_in, d_out = weight.shape[1], weight.shape[0]
    x2 = x.reshape(-1, d_in)
    Ac, Bc = A.to(x.dtype), B.to(x.dtype)
    many = x2.shape[0] > triton_lora.SMALL_M
    h = SHARED_INPUTS.shrink(x, x2, A, Ac) if share and many else x2 @ Ac.t()
    # one Triton GEMM (TMA loads) with the expand in its epilogue: y written once
    y = (tma_lora.lora_gemm(x2, weight, bias, h, Bc, scale)
         if many and tma_lora.applies(x2, weight, Ac.shape[0]) else None)
    if y is not None:
        return y.view(*x.shape[:-1], d_out), x2, Ac, Bc, h
    if EXPAND_FIRST and many:
        # The rank-r expand writes y first (one pass), then the base GEMM accumulates into
        # it with beta=1: cuBLAS reads y in its epilogue, hidden under the compute-bound
        # main loop, instead of a separate read-modify-write pass over y afterwards.
        if bias is not None:
            y = torch.addmm(bias, h, Bc.t(), alpha=scale)
        else:
            y = torch.mm(h if scale == 1.0 else h * scale, Bc.t())
        y.addmm_(x2, weight.t())
    else:
        y = F.linear(x2, weight, bias)
        # beta=1 accumulation into the fresh base output; the scale rides in alpha.
        y.addmm_(h, Bc.t(), alpha=scale)
    return y.view(*x.shape[:-1], d_out), x2, Ac, Bc, h


class LoraLinearFunction(torch.autograd.Function):
    """Fused forward and rank-ordered backward of a LoRA'd linear layer."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
        y, x2, Ac, Bc, h = _fused_forward(x, weight, bias, A, B, scale)
        ctx.save_for_backward(x2, weight, Ac, Bc, h)
        ctx.scale = scale
        ctx.adapter_dtypes = (A.dtype, B.dtype)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x2, weight, Ac, Bc, h = ctx.saved_tensors
        s = ctx.scale
        need_x, need_w, need_b, need_a, need_bb, _ = ctx.needs_input_grad
        g = grad_out.reshape(-1, weight.shape[0])
        if g.dtype != x2.dtype:
            g = g.to(x2.dtype)
        grad_x = grad_w = grad_bias = grad_a = grad_bb = None
        if need_bb and (need_x or need_a) and lora_grad.applies(g, Bc, h):
            # both products that read g, from one pass over it (opt-in, kernels/lora_grad)
            gB, grad_bb = lora_grad.lora_grads(g, Bc, h, s)
            grad_bb = grad_bb.to(ctx.adapter_dtypes[1])
        else:
            gB = g @ Bc if (need_x or need_a) else None  # (N, r), shared by dx and dA
            if need_bb:
                grad_bb = torch.mm(g.t(), h).mul_(s).to(ctx.adapter_dtypes[1])
        if need_a:
            grad_a = torch.mm(gB.t(), x2).mul_(s).to(ctx.adapter_dtypes[0])
        if need_x:
            # as in forward: the rank-r term first, the big GEMM on top
            if EXPAND_FIRST and x2.shape[0] > triton_lora.SMALL_M:
                grad_x = torch.mm(gB, Ac) if s == 1.0 else torch.mm(gB * s, Ac)
                grad_x.addmm_(g, weight)
            else:
                grad_x = g @ weight
                grad_x.addmm_(gB, Ac, alpha=s)
            grad_x = grad_x.view(*grad_out.shape[:-1], weight.shape[1])
        if need_w:
            grad_w = g.t() @ x2
        if need_b and ctx.has_bias:
            grad_bias = g.sum(0)
        return grad_x, grad_w, grad_bias, grad_a, grad_bb, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """Return x W^T + b + s (x A^T) B^T through :class:`LoraLinearFunction`.

    Without autograd recording (inference) the Function is skipped: same kernels, less
    Python per call, which is what decoding one token at a time is bound by. There, under
    CUDA-graph decoding (:class:`~deltatune.kernels.graph_decode.GraphDecoder`), up to
    :data:`~deltatune.kernels.triton_lora.SMALL_M` rows on CUDA take one Triton kernel
    that computes the whole sum (:func:`~deltatune.kernels.triton_lora.lora_matmul`)
    where it measured faster (:func:`~deltatune.kernels.triton_lora.pays`). Above it, one
    adapter on many rows may be folded into a scratch weight for one GEMM
    (:mod:`~deltatune.kernels.fold_lora`).
    """
    if not torch.is_grad_enabled() or not any(
            t is not None and t.requires_grad for t in (x, weight, bias, A, B)):
        rows = x.numel() // max(x.shape[-1], 1)
        if triton_lora.pays(rows, weight.shape[0]) and triton_lora.supports(
                x, weight, A.shape[0]):
            y, _ = triton_lora.lora_matmul(x.reshape(rows, x.shape[-1]), weight, bias, A, B,
                                           float(scale))
            return y.view(*x.shape[:-1], weight.shape[0])
        x2 = x.reshape(rows, x.shape[-1])
        if rows > triton_lora.SMALL_M and fold_lora.applies(x2, weight):
            y = fold_lora.folded_linear(x2, weight, bias, A, B, float(scale))
            return y.view(*x.shape[:-1], weight.shape[0])
        return _fused_forward(x, weight, bias, A, B, float(scale), share=True)[0]
    return LoraLinearFunction.apply(x, weight, bias, A, B, float(scale))


__all__ = ["LoraLinearFunction", "lora_linear", "lora_linear_reference"]
