"""Many rows through one adapter: fold the delta into a scratch weight, one GEMM.

For a prompt's forward pass (thousands of rows, one adapter for all of them, no autograd)
the rank-r term of ``x W^T + b + s (x A^T) B^T`` costs more than its FLOPs say: the
shrink re-reads the input, the expand writes a whole output that the base GEMM reads back
(or a custom GEMM slower than cuBLAS carries it), and every linear launches two or three
kernels more. Those costs grow with the rows. Folding costs what the weight costs instead:
``W' = W + s B A`` is one ``addmm`` into a scratch tensor (read W, write W'), then
``x W'^T + b`` is the merged model's own GEMM. The model stays unmerged: ``W`` is never
written, the adapter can be switched, disabled or trained between calls, and a mixed batch
keeps its per-row kernels (this is for one adapter on every row only).

The rounding is the merged model's: ``W'`` is rounded to the weight's dtype once, where the
unmerged path rounds the base output and the LoRA term separately. In float32 the two
agree to ~1e-6; in bf16 they differ as merged and unmerged outputs do (< 1e-2 relative).

The policy (``auto``) folds on CUDA when the rows make the LoRA passes cost more than the
weight's read and write, measured on an H200 (see :func:`pays`), and never under autograd
(the delta's gradients need ``x A^T``). ``DELTATUNE_FOLD_LORA=0`` turns it off, ``always``
folds wherever it applies (tests, CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deltatune.kernels import triton_lora

# Fold when rows * (d_in + d_out) >= ROWS_PER_WEIGHT * d_in * d_out: the LoRA passes read
# and write about rows * (d_in + 2 d_out) elements, the fold 2 d_in d_out. Measured on an
# H200 in bf16 at rank 16 (bench/profile_gaps.py fold, run 20261201-221233), the fold's time
# over the LoRA kernels' crosses 1 at rows * (d_in + d_out) / (d_in d_out) = 2.5-3.8 for
# the 1B and 8B shapes of 16M elements and more (2048 -> 8192: 1.02 at 4096 rows, 0.97 at
# 8192; 4096 -> 14336: 1.05 at 8192, 0.93 at 16384).
ROWS_PER_WEIGHT = 4.0
# Up to this many weight elements the fold's extra read and write (<= 32 MiB in bf16) costs
# less than the LoRA kernels' launches from MIN_ROWS rows on: 0.34-0.67x them at
# 2048 -> 2048, 2048 -> 512 and 4096 -> 1024 from 1024 rows (the smallest measured).
SMALL_WEIGHT = 2048 * 4096
MIN_ROWS = 1024


def mode() -> str:
    """The policy from ``DELTATUNE_FOLD_LORA``: ``"auto"`` (default), ``"off"`` or ``"always"``."""
    return triton_lora.auto_off_always("DELTATUNE_FOLD_LORA")


def pays(rows: int, d_in: int, d_out: int) -> bool:
    """True when ``rows`` rows make folding cheaper than the LoRA passes (the cost model)."""
    if rows < MIN_ROWS:
        return False
    return (d_in * d_out <= SMALL_WEIGHT
            or rows * (d_in + d_out) >= ROWS_PER_WEIGHT * d_in * d_out)


def applies(x2: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when :func:`folded_linear` should compute this call (policy and layout).

    ``x2`` is the (rows, d_in) input, ``weight`` the (d_out, d_in) base weight; the caller
    has already ruled out autograd.
    """
    chosen = mode()
    # plain tensors only: a DTensor or quantized subclass keeps the LoRA kernels
    plain = type(weight) in (torch.Tensor, torch.nn.Parameter)
    if chosen == "off" or weight.dtype != x2.dtype or not plain:
        return False
    if chosen == "always":
        return True
    return x2.is_cuda and pays(x2.shape[0], weight.shape[1], weight.shape[0])


def folded_linear(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """Return ``x2 (W + s B A)^T + b`` (rows, d_out) with ``W + s B A`` in a scratch tensor.

    ``A`` (r, d_in) and ``B`` (d_out, r) are cast to the weight's dtype; ``weight`` is left
    untouched. One ``addmm`` (beta = 1, alpha = s) forms the folded weight, rounded once.
    """
    folded = torch.addmm(weight, B.to(weight.dtype), A.to(weight.dtype), alpha=scale)
    return F.linear(x2, folded, bias)


__all__ = ["MIN_ROWS", "ROWS_PER_WEIGHT", "SMALL_WEIGHT", "applies", "folded_linear", "mode",
           "pays"]
