"""Triton kernels: the LoRA term computed inside the base matmul, in one launch.

Decoding one token runs every adapted linear at batch 1-32, where a matmul is bound by
latency, not arithmetic: the cuBLAS path (:mod:`.lora_linear`) launches three kernels per
layer (``x W^T``, ``h = x A^T``, ``y += s h B^T``) and the two small ones cost about as
much as the base GEMV (docs/performance.md). Here one program per output tile streams
its tile of ``W`` and, beside it, the (tiny, L2-resident) ``A``, so ``h`` is formed in the
same K loop, and the expand ``s h B_tile^T`` is added to the accumulator before the single
store:

- :func:`lora_matmul` (one adapter): ``y = x W^T + b + s (x A^T) B^T``; optionally also
  writes ``h`` (what a backward pass needs). ``h`` may instead be given (computed once
  beforehand, for large M where recomputing it per output tile would cost r / BLOCK_N
  extra arithmetic).
- :func:`bgmv_matmul` (one adapter per row, Punica's BGMV): a shrink kernel forms each
  row's ``h = x_m A[idx_m]^T`` once (split over K, partial sums kept apart), then the
  matmul kernel adds ``h_m B[idx_m]^T`` per row in its epilogue. Two launches whatever
  the number of adapters, instead of a gather, a mask and three matmuls.

Everything here is inference-side arithmetic with no host synchronisation and no
allocation that depends on data, so it can be captured in a CUDA graph
(:mod:`.graph_decode`); Triton compiles on the first call of each configuration, which
the decoder's eager warm-up steps take before capture. Triton is imported lazily:
:func:`available` is False without it (CPU-only installs), and callers keep the
cuBLAS/plain path. ``TRITON_INTERPRET=1`` runs the same kernels on the CPU (tests).
"""

from __future__ import annotations

import functools
import os

import torch

SMALL_M = 64  # up to this many rows (tokens) the fused kernels replace the cuBLAS path
MAX_RANK = 64  # larger ranks keep the cuBLAS path (register and shared-memory budget)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=1)
def _triton():
    """Return (triton, triton.language, kernels) or None when triton cannot be imported."""
    try:
        import triton
        import triton.language as tl
    except Exception:  # no triton, or a broken install: the cuBLAS path stays
        return None
    if interpreted():
        _patch_interpreter()
    return triton, tl, _build(triton, tl)


def _patch_interpreter() -> None:
    """Let Triton's CPU interpreter read scalar arguments under numpy >= 2.3.

    The interpreter keeps every scalar as a 1-element array and converts it with
    ``int(array)``, which recent numpy refuses for arrays of one dimension (a loop bound
    taken from an argument then fails); read the single element instead.
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "deltatune", False):
        return

    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.deltatune = True
    interpreter._patch_lang_tensor = patched


def interpreted() -> bool:
    """True when Triton runs its kernels in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(x: torch.Tensor | None = None) -> bool:
    """True when the Triton kernels can run (on ``x``'s device, when given)."""
    if os.environ.get("DELTATUNE_TRITON", "1") == "0":
        return False
    if x is not None and not (x.is_cuda or interpreted()):
        return False
    return _triton() is not None


def supports(x: torch.Tensor, weight: torch.Tensor, rank: int) -> bool:
    """True when :func:`lora_matmul` handles this input (dtype, rank, device)."""
    # the CPU interpreter mis-reads bfloat16 (numpy has no such type): fp32/fp16 only there
    dtypes = _DTYPES[::2] if interpreted() and not x.is_cuda else _DTYPES
    return (x.dtype in dtypes and weight.dtype == x.dtype and 0 < rank <= MAX_RANK
            and available(x))


def _build(triton, tl):
    """Define the kernels (only once triton is importable)."""

    @triton.jit
    def lora_mm_kernel(x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, h_ptr, idx_ptr, y_ptr,
                       M, N, K, R, scale,
                       s_xm, s_xk, s_wn, s_wk, s_ar, s_ak, s_be, s_bn, s_br,
                       s_hs, s_hm, s_hr, s_ym, s_yn,
                       MODE: tl.constexpr, STORE_H: tl.constexpr, HAS_BIAS: tl.constexpr,
                       PREC: tl.constexpr, SPLIT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
        # MODE 0: h = x A^T in the K loop; 1: h given (M, R); 2: per-row adapters, h
        # given as SPLIT partial sums (SPLIT, M, R) and B gathered by idx (scale folded in).
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        # grouped order: GROUP_M row tiles share each W tile while it is in L2
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % size_m
        pid_n = (pid % per_group) // size_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, BLOCK_R)
        rk = tl.arange(0, BLOCK_K)
        mask_m = rm < M
        mask_n = rn < N
        mask_r = rr < R
        x_ptrs = x_ptr + rm[:, None] * s_xm + rk[None, :] * s_xk
        w_ptrs = w_ptr + rk[:, None] * s_wk + rn[None, :] * s_wn
        a_ptrs = a_ptr + rk[:, None] * s_ak + rr[None, :] * s_ar
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask_k = rk < K - k0
            xt = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(xt, wt, acc, input_precision=PREC)
            if MODE == 0:
                at = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
                h = tl.dot(xt, at, h, input_precision=PREC)
                a_ptrs += BLOCK_K * s_ak
            x_ptrs += BLOCK_K * s_xk
            w_ptrs += BLOCK_K * s_wk
        in_ty = x_ptr.dtype.element_ty
        if MODE == 2:
            entry = tl.load(idx_ptr + rm, mask=mask_m, other=0)
            for j in range(0, R):
                hj = tl.zeros((BLOCK_M,), dtype=tl.float32)
                for s in range(SPLIT):
                    hj += tl.load(h_ptr + s * s_hs + rm * s_hm + j * s_hr, mask=mask_m,
                                  other=0.0)
                bj = tl.load(b_ptr + entry[:, None] * s_be + rn[None, :] * s_bn + j * s_br,
                             mask=mask_m[:, None] & mask_n[None, :], other=0.0)
                acc += hj[:, None] * bj.to(tl.float32)
        else:
            h_mask = mask_m[:, None] & mask_r[None, :]
            h_ptrs = h_ptr + rm[:, None] * s_hm + rr[None, :] * s_hr
            if MODE == 1:
                h = tl.load(h_ptrs, mask=h_mask, other=0.0).to(tl.float32)
            elif STORE_H:
                # one column of programs writes h; the others computed the same values
                tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=h_mask & (pid_n == 0))
            hs = (h * scale).to(in_ty)
            bt = tl.load(b_ptr + rr[:, None] * s_br + rn[None, :] * s_bn,
                         mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(hs, bt, acc, input_precision=PREC)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * s_ym + rn[None, :] * s_yn, acc.to(y_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def bgmv_shrink_kernel(x_ptr, a_ptr, idx_ptr, h_ptr, K, R, k_per_split,
                           s_xm, s_xk, s_ae, s_ar, s_ak, s_hs, s_hm, s_hr,
                           BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        # program (m, s): row m's partial h over the s-th slice of K, in float32
        m = tl.program_id(0)
        s = tl.program_id(1)
        entry = tl.load(idx_ptr + m)
        rr = tl.arange(0, BLOCK_R)
        rk = tl.arange(0, BLOCK_K)
        mask_r = rr < R
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        k_start = s * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        for k0 in range(k_start, k_end, BLOCK_K):
            kk = k0 + rk
            mask_k = kk < k_end
            xk = tl.load(x_ptr + m * s_xm + kk * s_xk, mask=mask_k, other=0.0)
            at = tl.load(a_ptr + entry * s_ae + rr[:, None] * s_ar + kk[None, :] * s_ak,
                         mask=mask_r[:, None] & mask_k[None, :], other=0.0)
            acc += at.to(tl.float32) * xk.to(tl.float32)[None, :]
        tl.store(h_ptr + s * s_hs + m * s_hm + rr * s_hr, tl.sum(acc, axis=1), mask=mask_r)

    return {"lora_mm": lora_mm_kernel, "bgmv_shrink": bgmv_shrink_kernel}


def _precision(x: torch.Tensor) -> str | None:
    """tl.dot input precision: exact float32 products for float32 (no TF32), else default."""
    return "ieee" if x.dtype == torch.float32 else None


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _config(M: int, N: int, K: int) -> dict:
    """Tile sizes for an (M x K) @ (K x N) problem: enough programs to cover the SMs.

    Small M (decode) is bound by streaming W: narrow N tiles so that about 128 programs
    each stream a slice; large M uses the usual compute-bound tiles.
    """
    if interpreted():  # the CPU interpreter: small tiles keep it quick
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=1)
    if M <= SMALL_M:
        block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
        block_n = 16
        while block_n < 64 and N // (block_n * 2) >= 128:
            block_n *= 2
        return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=256 if K >= 256 else 64,
                    GROUP_M=1, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


_OVERRIDE: dict | None = None  # set by the bench's config sweep


def set_config_override(cfg: dict | None) -> None:
    """Force the tile configuration of :func:`lora_matmul` (the bench's sweep), or reset."""
    global _OVERRIDE
    _OVERRIDE = cfg


def lora_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                A: torch.Tensor, B: torch.Tensor, scale: float, *,
                h: torch.Tensor | None = None, store_h: bool = False,
                out: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return (x W^T + b + s (x A^T) B^T, h) for 2-D ``x`` (M, K), in one kernel launch.

    ``weight`` (N, K), ``A`` (r, K) and ``B`` (N, r) may be any strided views (a
    transposed weight serves the input gradient). With ``h`` given (M, r), it is used
    instead of ``x A^T`` (A is then not read). With ``store_h`` the returned h is
    ``x A^T`` in float32 (M, r); otherwise the second item is None. Float32 inputs use
    exact float32 products (no TF32).
    """
    kern = _triton()
    assert kern is not None, "triton is not available"
    triton, _, kernels = kern
    M, K = x.shape
    N, r = weight.shape[0], A.shape[0]
    if A.dtype != x.dtype:
        A = A.to(x.dtype)
    if B.dtype != x.dtype:
        B = B.to(x.dtype)
    y = out if out is not None else torch.empty((M, N), device=x.device, dtype=x.dtype)
    h_out = None
    if store_h and h is None:
        h_out = torch.empty((M, r), device=x.device, dtype=torch.float32)
    h_arg = h if h is not None else h_out
    hs = h_arg.stride() if h_arg is not None else (0, 0)
    cfg = dict(_OVERRIDE or _config(M, N, K))
    cfg["BLOCK_R"] = max(16, _next_pow2(r))
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    kernels["lora_mm"][grid](
        x, weight, bias if bias is not None else x, A, B,
        h_arg if h_arg is not None else x, x, y,
        M, N, K, r, float(scale),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        A.stride(0), A.stride(1), 0, B.stride(0), B.stride(1),
        0, hs[0], hs[1], y.stride(0), y.stride(1),
        MODE=1 if h is not None else 0, STORE_H=h_out is not None,
        HAS_BIAS=bias is not None, PREC=_precision(x), SPLIT=1, **cfg)
    return y, h_out


def _shrink_split(M: int, K: int, block_k: int) -> int:
    """How many K slices the BGMV shrink uses: about 128 programs in all."""
    if interpreted():
        return 2
    target = max(1, min(128 // max(M, 1), K // (block_k * 2)))
    split = 1
    while split * 2 <= target:
        split *= 2
    return split


def bgmv_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                a_stack: torch.Tensor, b_stack: torch.Tensor, index: torch.Tensor
                ) -> torch.Tensor:
    """Return x W^T + b plus row m's s_e (x_m A_e^T) B_e^T with e = ``index[m]``.

    ``a_stack`` (E, r, K) and ``b_stack`` (E, N, r) hold every adapter, the scale already
    folded into B (:func:`deltatune.kernels.multi_lora.stack_padded`; its last entry is
    all zeros, the base model's rows). ``x`` is (M, K); two kernel launches in all.
    """
    kern = _triton()
    assert kern is not None, "triton is not available"
    triton, _, kernels = kern
    M, K = x.shape
    N, r = weight.shape[0], a_stack.shape[1]
    block_r = max(16, _next_pow2(r))
    block_k = 32 if interpreted() else 256
    split = _shrink_split(M, K, block_k)
    per = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
    h = torch.empty((split, M, r), device=x.device, dtype=torch.float32)
    kernels["bgmv_shrink"][(M, split)](
        x, a_stack, index, h, K, r, per,
        x.stride(0), x.stride(1), a_stack.stride(0), a_stack.stride(1), a_stack.stride(2),
        h.stride(0), h.stride(1), h.stride(2),
        BLOCK_K=block_k, BLOCK_R=block_r, num_warps=4)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    cfg = dict(_OVERRIDE or _config(M, N, K))
    cfg["BLOCK_R"] = block_r
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    kernels["lora_mm"][grid](
        x, weight, bias if bias is not None else x, x, b_stack, h, index, y,
        M, N, K, r, 1.0,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        0, 0, b_stack.stride(0), b_stack.stride(1), b_stack.stride(2),
        h.stride(0), h.stride(1), h.stride(2), y.stride(0), y.stride(1),
        MODE=2, STORE_H=False, HAS_BIAS=bias is not None, PREC=_precision(x),
        SPLIT=split, **cfg)
    return y


__all__ = ["MAX_RANK", "SMALL_M", "available", "bgmv_matmul", "interpreted", "lora_matmul",
           "set_config_override", "supports"]
