"""GPU fast paths, each beside the plain PyTorch path it must reproduce.

The fast paths are cuBLAS-shaped reorderings of the same math (see docs/performance.md):

- :mod:`.lora_linear`: one autograd Function for a LoRA'd linear layer (base matmul,
  rank-r shrink computed once, expand accumulated into the base output with the scale
  folded into the matmul, hand-written backward that saves only ``x`` and ``x A^T``);
- :mod:`.multi_lora`: mixed-adapter batches (one adapter per row) in two batched
  matmuls instead of one small group per adapter;
- :mod:`.fused_ce`: linear + cross-entropy in token chunks that never holds the full
  logits;
- :mod:`.triton_lora`: Triton kernels (imported lazily, CUDA only) computing
  ``x W^T + s (x A^T) B^T`` in one launch for decode-sized batches, and a BGMV variant
  for one adapter per row (or only its LoRA term, added to a cuBLAS base output); taken
  under CUDA-graph decoding (:mod:`.graph_decode`);
- :mod:`.shared_shrink`: layers reading the same input (q, k, v; gate, up) share one
  BGMV shrink launch in a mixed-adapter decode step;
- :mod:`.graph_decode`: decoding replayed from CUDA graphs (left-padded prompts, rows
  routed per call over a fixed adapter set), greedy or sampled (:mod:`.sampling`).

Which path runs is decided by :func:`fast_path_enabled`: with the default mode
``"auto"`` only CUDA tensors take the fast paths, so CPU results stay exactly those of
the plain path. ``"on"`` forces them everywhere (the CPU tests use it), ``"off"``
disables them. The environment variable ``DELTATUNE_FAST_PATH`` sets the initial mode.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from deltatune.core.errors import ConfigError

_MODES = ("auto", "on", "off")
_mode = os.environ.get("DELTATUNE_FAST_PATH", "auto")
if _mode not in _MODES:
    _mode = "auto"


def set_fast_path(mode: str) -> None:
    """Set the fast-path mode: 'auto' (CUDA only, the default), 'on' or 'off'."""
    global _mode
    if mode not in _MODES:
        raise ConfigError(f"fast path mode {mode!r} is not one of {', '.join(_MODES)}")
    _mode = mode


def get_fast_path() -> str:
    """Return the current fast-path mode ('auto', 'on' or 'off')."""
    return _mode


@contextmanager
def fast_path(mode: str) -> Iterator[None]:
    """Use fast-path ``mode`` inside the context, then restore the previous one."""
    previous = _mode
    set_fast_path(mode)
    try:
        yield
    finally:
        set_fast_path(previous)


def fast_path_enabled(x: torch.Tensor) -> bool:
    """Return True when computations on ``x`` should take the fast paths."""
    if _mode == "off":
        return False
    return _mode == "on" or x.is_cuda


__all__ = ["fast_path", "fast_path_enabled", "get_fast_path", "set_fast_path"]
