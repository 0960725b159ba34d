"""Both rank-r products of a LoRA linear's backward that read the output gradient, in one pass.

:class:`~deltatune.kernels.lora_linear.LoraLinearFunction` needs ``gB = g B`` (for the
input gradient and dA) and ``dB = s g^T h``. As two cuBLAS calls they read g (tokens x
d_out, the largest tensor of the backward: 470 MB at 16384 x 14336 in bf16) twice, through
GEMMs 16 columns wide that cuBLAS does not run at full bandwidth. One Triton kernel reads
each tile of g once and forms both: gB rows are summed in registers, dB rows across row
blocks by float32 atomics (so the order of that sum, and its last bits, vary from run to
run).

Off by default: the one-layer target of issue 11 is what it is for, and it has not been
timed yet (``bench/gpu_lora.py --layer`` has the row). ``DELTATUNE_FUSED_LORA_GRAD=1``
turns it on (CUDA, fp16/bf16; on the CPU only through Triton's interpreter, the tests).
"""

from __future__ import annotations

import os

import torch

from deltatune.kernels import triton_lora

MAX_RANK = 64


def enabled() -> bool:
    """Whether ``DELTATUNE_FUSED_LORA_GRAD`` asks for the fused backward products."""
    return os.environ.get("DELTATUNE_FUSED_LORA_GRAD", "0").strip().lower() in (
        "1", "true", "always", "on")


def applies(g: torch.Tensor, B: torch.Tensor, h: torch.Tensor) -> bool:
    """Whether :func:`lora_grads` computes the products for these tensors now."""
    if not enabled() or triton_lora._triton() is None or B.shape[1] > MAX_RANK:
        return False
    if triton_lora.interpreted():
        dtypes = (torch.float32, torch.float16)  # the interpreter cannot read bfloat16
        if g.device.type != "cpu":
            return False
    else:
        dtypes = (torch.float16, torch.bfloat16)
        if not g.is_cuda:
            return False
    return (g.dim() == 2 and g.dtype in dtypes and B.dtype == g.dtype
            and h.dtype == g.dtype and not torch.compiler.is_compiling())


def lora_grads(g: torch.Tensor, B: torch.Tensor, h: torch.Tensor,
               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(g B, s g^T h)``: (tokens, r) in ``g``'s dtype and (d_out, r) in float32.

    ``g`` is (tokens, d_out), ``B`` (d_out, r), ``h`` (tokens, r). One launch; check
    :func:`applies` first.
    """
    triton, _, kernels = triton_lora._triton()
    T, N = g.shape
    r = B.shape[1]
    interpreted = triton_lora.interpreted()
    block_t, block_n = (32, 16) if interpreted else (256, 64)
    t_blocks = triton.cdiv(T, block_t)
    # enough programs for every SM: split the columns when there are few row blocks
    split = 2 if interpreted else max(1, min(8, -(-264 // t_blocks)))
    n_per = triton.cdiv(triton.cdiv(N, split), block_n) * block_n
    split = triton.cdiv(N, n_per)
    gb = torch.zeros(T, r, device=g.device, dtype=torch.float32)
    db = torch.zeros(N, r, device=g.device, dtype=torch.float32)
    kernels["lora_grad"][(t_blocks, split)](
        g, B, h, gb, db, T, N, r, n_per, float(scale),
        g.stride(0), g.stride(1), B.stride(0), B.stride(1), h.stride(0), h.stride(1),
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_R=max(16, triton_lora._next_pow2(r)),
        ATOMIC_GB=split > 1, num_warps=4 if interpreted else 8)
    return gb.to(g.dtype), db


__all__ = ["MAX_RANK", "applies", "enabled", "lora_grads"]
