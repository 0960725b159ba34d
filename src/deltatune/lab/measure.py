"""What the lab measures, each number computed one documented way.

- trainable parameters: from :meth:`DeltaModel.parameter_report` (count and % of the base)
  plus, as a cross-check, the parameters that actually require gradients;
- peak memory during training: on CUDA ``torch.cuda.max_memory_allocated`` (exact, reset
  before the run); on CPU the peak resident set size (RSS) sampled every few milliseconds
  by a thread, minus the RSS just before training, after returning freed heap to the OS
  (``malloc_trim``), so earlier runs in the same process do not hide the increase.
  ``memory_kind`` in every result says which of the two was used;
- optimizer state: trainable parameters x (gradient + two Adam moments) x bytes per value,
  the part of training memory that PEFT shrinks by construction;
- training throughput: real (non-padding) input tokens per second of optimizer steps;
- inference latency: median wall time of one forward pass on a fixed batch, with the delta
  unmerged, merged (where the method merges) and disabled (the base model);
- checkpoint size: the bytes of every file the delta's save writes.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# bytes of training state per trainable value besides the value itself: its gradient and
# AdamW's two moments, all in the parameter dtype.
ADAM_STATE_FACTOR = 3


def parameter_counts(dm: Any) -> dict[str, Any]:
    """Return trainable-parameter numbers of a DeltaModel.

    ``delta_parameters`` sums :meth:`DeltaModel.parameter_report` over the active deltas;
    ``trainable_parameters`` counts tensors with ``requires_grad`` (they differ only for
    methods that unfreeze base weights, such as full fine-tuning or BitFit, when those
    live outside delta tensors); ``trainable_percent`` is trainable / base parameters.
    """
    report = dm.parameter_report()
    delta = sum(r.parameters for r in report if r.active)
    trainable = sum(p.numel() for p in dm.trainable_parameters())
    base = dm.base_parameter_count()
    bytes_per = _bytes_per_value(dm)
    return {
        "delta_parameters": delta,
        "trainable_parameters": trainable,
        "base_parameters": base,
        "trainable_percent": 100.0 * trainable / max(base, 1),
        "optimizer_state_mb": trainable * ADAM_STATE_FACTOR * bytes_per / 2**20,
    }


def _bytes_per_value(dm: Any) -> int:
    for p in dm.trainable_parameters():
        return p.element_size()
    return 4


def directory_size(path: str | Path) -> int:
    """Return the total size in bytes of the regular files under ``path``."""
    root = Path(path)
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


# -- memory -------------------------------------------------------------------------------
def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _trim_heap() -> None:
    """Give freed heap memory back to the OS so RSS reflects what is in use (glibc only)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class PeakMemory:
    """Result of :func:`track_peak_memory`: the peak in MiB above the start, and how."""

    peak_mb: float = 0.0
    kind: str = ""


@contextlib.contextmanager
def track_peak_memory(device: torch.device | str, interval_s: float = 0.005
                      ) -> Iterator[PeakMemory]:
    """Measure the peak memory used inside the ``with`` block.

    CUDA: ``max_memory_allocated`` minus the allocation at entry (kind
    ``cuda_max_allocated``). CPU: peak sampled RSS minus the RSS at entry (kind
    ``cpu_rss_peak``); sampling can miss a spike shorter than ``interval_s``.
    """
    out = PeakMemory()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        try:
            yield out
        finally:
            torch.cuda.synchronize(device)
            out.peak_mb = (torch.cuda.max_memory_allocated(device) - start) / 2**20
            out.kind = "cuda_max_allocated"
        return
    _trim_heap()
    start = _rss_bytes()
    peak = [start]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            stop.wait(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], _rss_bytes())
        out.peak_mb = (peak[0] - start) / 2**20
        out.kind = "cpu_rss_peak"


# -- latency ------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def median_latency_ms(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1,
                      device: torch.device | str = "cpu") -> float:
    """Return the median wall time of ``fn()`` in milliseconds over ``repeats`` calls."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(times))


def inference_latencies(dm: Any, forward: Callable[[Any], Any], *, mergeable: bool,
                        repeats: int = 5, device: torch.device | str = "cpu"
                        ) -> dict[str, float | None]:
    """Time ``forward(model)`` with the delta unmerged, merged and disabled.

    Returns ``latency_unmerged_ms`` (the DeltaModel as trained), ``latency_merged_ms``
    (a copy passed through ``merge_and_unload``: a plain model with the delta folded into
    its weights; None when the method cannot merge) and ``latency_base_ms`` (deltas
    bypassed: the bare model's cost). ``dm`` is left as it was, in eval mode.
    """
    import copy

    dm.eval()
    out: dict[str, float | None] = {
        "latency_unmerged_ms": median_latency_ms(lambda: forward(dm), repeats=repeats,
                                                 device=device)}
    out["latency_merged_ms"] = None
    if mergeable and dm.active:
        merged = copy.deepcopy(dm).merge_and_unload()
        merged.eval()
        out["latency_merged_ms"] = median_latency_ms(lambda: forward(merged), repeats=repeats,
                                                     device=device)
        del merged
    if dm.active:
        with dm.disabled():
            out["latency_base_ms"] = median_latency_ms(lambda: forward(dm), repeats=repeats,
                                                       device=device)
    else:
        out["latency_base_ms"] = out["latency_unmerged_ms"]
    return out
