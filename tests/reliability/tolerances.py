"""The one table of merge tolerances (RELIABILITY.md row 7), justified in docs/reliability.md.

The error measured is max |merged - unmerged| / max |unmerged| over a tiny model's
logits. Merging rounds each merged weight once to the weight dtype (relative error at
most eps/2: 2^-24 float32, 2^-11 float16, 2^-9 bfloat16) where the unmerged path rounds
the base output and the delta output separately; two transformer layers and the head
amplify that by a small factor. Worst errors measured over every mergeable method on
tiny Llama: 2.4e-7 (float32), 9.1e-4 (float16), 6.3e-3 (bfloat16); the bounds below
leave a 10-40x margin for other CPUs and drawn shapes, and are far below PEFT's ad-hoc
atol=0.3 (docs/reliability.md).
"""

from __future__ import annotations

import torch

MERGE_RTOL: dict[torch.dtype, float] = {
    torch.float32: 1e-5,
    torch.float16: 2e-2,
    torch.bfloat16: 6e-2,
}
# Per-method exceptions (none so far); a method that needs one must say why here.
METHOD_RTOL: dict[tuple[str, torch.dtype], float] = {}


def merge_rtol(method: str, dtype: torch.dtype) -> float:
    """Return the relative tolerance of merged vs unmerged outputs for ``method``."""
    return METHOD_RTOL.get((method, dtype), MERGE_RTOL[dtype])


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Return max |got - expected| / max |expected| in float64."""
    got, expected = got.double(), expected.double()
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
