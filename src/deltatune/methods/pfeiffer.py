"""Pfeiffer adapter (Pfeiffer et al. 2020, AdapterFusion arXiv:2005.00247; MAD-X
arXiv:2005.00052) as a preset of the unified view.

One bottleneck per layer, on the output of the FFN block only:

    h <- h + ReLU(h W_down + b_down) W_up + b_up,     m = d / 16

Pfeiffer et al. found that dropping Houlsby's adapter after attention keeps quality
while halving the adapter count. Our decisions: the adapter sits on the FFN block's
output before the residual add and layer norm (the placement of He et al.'s unified
view); AdapterHub's exact layout, which re-applies the layer's norm around the adapter,
is not reproduced. The papers do not fix an init; we use W_up = 0 (exact identity).
Layer norms stay frozen. Not mergeable.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from deltatune.core.config import param
from deltatune.methods.unified import Activation, Representation, UnifiedAdapter, UnifiedConfig


@dataclasses.dataclass(kw_only=True)
class PfeifferConfig(UnifiedConfig):
    """Pfeiffer adapter: one sequential bottleneck after the FFN (reduction factor 16)."""

    method = "pfeiffer"
    fixed: ClassVar = {"functional_form": ("bottleneck",), "insertion": ("sequential",),
                       "modified_representation": (["ffn"],), "composition": ("add",)}

    functional_form: Literal["bottleneck", "low_rank"] = param("bottleneck", help="fixed")
    insertion: Literal["sequential", "parallel"] = param("sequential", help="fixed")
    modified_representation: list[Representation] = param(
        default_factory=lambda: ["ffn"], help="fixed: the FFN block's output")
    composition: Literal["add", "scale", "gate"] = param("add", help="fixed: h + f(h)")
    scaling: float = param(1.0, gt=0, help="unused (composition is add)")
    activation: Activation | None = param("relu", help="nonlinearity of the bottleneck")
    reduction_factor: float | None = param(16.0, gt=0, help="m = d / reduction_factor")


class Pfeiffer(UnifiedAdapter):
    """Pfeiffer adapter (one sequential bottleneck after each FFN)."""

    name = "pfeiffer"
    config_cls = PfeifferConfig
    summary = "one bottleneck adapter after each FFN block (Pfeiffer et al. 2020)"
