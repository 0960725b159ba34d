"""A LoRA'd linear's forward for many rows as one GEMM with the expand in its epilogue.

cuBLAS cannot add ``s h B^T`` inside its GEMM, so :mod:`deltatune.kernels.lora_linear`
writes the expand first and lets the GEMM read it back (beta = 1): one extra write and
read of the whole output. Here a persistent Triton GEMM fed by the tensor memory
accelerator (TMA: tiles copied by descriptors, Hopper and later) computes
``x W^T + b + s h B^T`` with the rank-r product as one more MMA before its single store.

Measured on an H200, bf16 (``bench/tma_probe.py``, runs ``tma_probe-20261201-185415`` and
``-190109``), against cuBLAS + the expand pass, at 16384 rows: 0.945x / 0.875x at
4096 -> 14336, 0.845x / 0.873x at 2048 -> 8192, but 0.968x / 1.039x at 2048 -> 2048 and
slower where the output is narrower than the input (1.02-1.04x at 8192 -> 2048,
1.25-1.32x at 2048 -> 512); at 4096 rows 0.932x (4096 -> 14336), 0.993x (2048 -> 8192)
and 1.14x (2048 -> 2048). So by default (``auto``) it is taken for at least
:data:`MIN_ROWS` rows and outputs at least :data:`MIN_WIDEN` times the input's width (an
MLP's up and gate projections) and ranks up to 16 (larger ones need narrower tiles, which
measured 1.10x / 1.21x cuBLAS + the expand at rank 32, run ``tma_probe-20261201-202838``),
in bf16/fp16 on a GPU of compute capability 9 or more,
outside ``torch.compile``. ``DELTATUNE_TMA_LORA=0`` turns it off, ``always`` takes it
wherever the layout allows (tests; on the CPU through Triton's interpreter).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from deltatune.kernels import triton_lora

MIN_ROWS = 4096
MIN_WIDEN = 2
# BM, BN, BK, pipeline stages, warps: the best of five at every measured shape it takes
CONFIG = (128, 256, 64, 3, 8)
# ranks above 16: the h and B tiles no longer fit beside that one's stages in the H200's
# 227 KiB of shared memory (237 KiB needed at rank 32), so narrower output tiles
WIDE_RANK_CONFIG = (128, 128, 64, 3, 8)
MAX_RANK = 64
_INTERPRETER_CONFIG = (32, 32, 32, 1, 4)


def _mode() -> str:
    return triton_lora.auto_off_always("DELTATUNE_TMA_LORA")


def _aligned(t: torch.Tensor) -> bool:
    # TMA descriptors: unit stride along the row, 16-byte aligned rows and base address;
    # plain tensors only (a DTensor or other subclass keeps the torch path)
    return (type(t) in (torch.Tensor, torch.nn.Parameter) and t.dim() == 2
            and t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
            and t.data_ptr() % 16 == 0)


def applies(x2: torch.Tensor, weight: torch.Tensor, rank: int) -> bool:
    """Whether :func:`lora_gemm` computes this (rows, d_in) input through ``weight`` and
    an adapter of this rank."""
    mode = _mode()
    if rank > MAX_RANK:
        return False
    if mode == "off" or torch.compiler.is_compiling() or triton_lora._triton() is None:
        return False
    if triton_lora.interpreted():
        if mode != "always" or x2.device.type != "cpu":
            return False
    elif (not x2.is_cuda or torch.version.hip is not None  # TMA: NVIDIA Hopper and later
          or torch.cuda.get_device_capability(x2.device)[0] < 9):
        return False
    if (x2.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x2.dtype
            or not (_aligned(x2) and _aligned(weight))):
        return False
    return mode == "always" or pays(x2.shape[0], weight.shape[1], weight.shape[0], rank)


def pays(rows: int, d_in: int, d_out: int, rank: int) -> bool:
    """Where the TMA GEMM measured faster than cuBLAS + the expand pass (module docstring):
    many rows, outputs at least :data:`MIN_WIDEN` times the input's width, rank up to 16
    (larger ranks take WIDE_RANK_CONFIG, measured slower than cuBLAS at rank 32)."""
    return rows >= MIN_ROWS and d_out >= MIN_WIDEN * d_in and rank <= 16


_REFUSED: set[tuple] = set()  # (config, dtype) the GPU refused (out of shared memory)


def lora_gemm(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              h: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor | None:
    """Return ``x2 W^T + b + s h B^T`` (rows, d_out) in one launch, or None where this GPU
    cannot run the tile configuration (the caller then takes the cuBLAS path; the
    configuration is not tried again).

    ``h`` is the shrink ``x2 A^T`` (rows, r) and ``B`` (d_out, r), both in ``x2``'s dtype;
    ranks that are not a multiple of 16 are zero-padded (the MMA's smallest K). Check
    :func:`applies` first.
    """
    from triton.runtime.errors import OutOfResources
    from triton.tools.tensor_descriptor import TensorDescriptor

    triton, _, kernels = triton_lora._triton()
    rows = x2.shape[0]
    d_out, r = B.shape
    rank = max(16, -(-r // 16) * 16)
    if rank != r:
        h, B = F.pad(h, (0, rank - r)), F.pad(B, (0, rank - r))
    B = B.to(x2.dtype).contiguous()
    if not _aligned(h):  # a slice of a shared shrink's output is read where it is
        h = h.contiguous()
    y = torch.empty(rows, d_out, device=x2.device, dtype=x2.dtype)
    interpreted = triton_lora.interpreted()
    bm, bn, bk, stages, warps = (_INTERPRETER_CONFIG if interpreted else
                                 CONFIG if rank <= 16 else WIDE_RANK_CONFIG)
    key = (bm, bn, bk, stages, warps, rank, x2.dtype)
    if key in _REFUSED:
        return None
    programs = 4 if interpreted else torch.cuda.get_device_properties(
        x2.device).multi_processor_count
    tiles = triton.cdiv(rows, bm) * triton.cdiv(d_out, bn)
    try:
        launch(kernels["tma_lora_gemm"], (min(programs, tiles),), TensorDescriptor, x2,
                weight, y, h, B, bias, scale, (bm, bn, bk, stages, warps), rank,
                min(programs, tiles))
    except OutOfResources:
        _REFUSED.add(key)
        return None
    return y


def launch(kernel: Any, grid: tuple[int], descriptor: Any, x2: torch.Tensor,
           weight: torch.Tensor, y: torch.Tensor, h: torch.Tensor, B: torch.Tensor,
           bias: torch.Tensor | None, scale: float, config: tuple[int, ...], rank: int,
           programs: int, lora: bool = True) -> None:
    """Launch the TMA GEMM on ``grid`` with tile ``config`` (BM, BN, BK, stages, warps):
    ``y = x2 W^T + b + s h B^T``, or without the rank-``rank`` term when ``lora`` is False
    (the bench's plain-GEMM reference). ``descriptor`` is triton's TensorDescriptor."""
    bm, bn, bk, stages, warps = config
    rows, d_in = x2.shape
    kernel[grid](
        descriptor.from_tensor(x2, [bm, bk]), descriptor.from_tensor(weight, [bn, bk]),
        descriptor.from_tensor(y, [bm, bn]), descriptor.from_tensor(h, [bm, rank]),
        descriptor.from_tensor(B, [bn, rank]), bias if bias is not None else y,
        rows, y.shape[1], d_in, float(scale),
        BM=bm, BN=bn, BK=bk, R=rank, GROUP_M=8, PROGRAMS=programs,
        HAS_BIAS=bias is not None, HAS_LORA=lora, num_stages=stages, num_warps=warps)


__all__ = ["CONFIG", "MAX_RANK", "MIN_ROWS", "MIN_WIDEN", "WIDE_RANK_CONFIG", "applies", "pays",
           "lora_gemm"]
