"""Parallel adapter (He et al. 2022, arXiv:2110.04366) as a preset of the unified view.

The bottleneck reads the block's input x instead of its output and is added beside it:

    h <- block(x) + s * ReLU(x W_down + b_down) W_up + b_up

He et al.'s "scaled parallel adapter" on the FFN (m = 512, s = 4) is the default; it
beats the sequential adapter at equal budget and modifying the FFN beats modifying
attention. ``modified_representation=['attention']`` puts it beside the attention block
(the paper uses a smaller m there, e.g. 30 or 150). Init as in the authors' code: W_down
as ``nn.Linear`` (Kaiming-uniform), W_up = 0 and biases 0, so step 0 is the base model.
Not mergeable (the nonlinearity, and x and h live in different layers).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from deltatune.core.config import param
from deltatune.methods.unified import Representation, UnifiedAdapter, UnifiedConfig


@dataclasses.dataclass(kw_only=True)
class ParallelAdapterConfig(UnifiedConfig):
    """Scaled parallel adapter beside the FFN (default) or the attention block."""

    method = "parallel_adapter"
    fixed: ClassVar = {"functional_form": ("bottleneck",), "insertion": ("parallel",),
                       "modified_representation": (["ffn"], ["attention"], ["attention", "ffn"],
                                                   ["ffn", "attention"]),
                       "composition": ("scale", "add")}

    functional_form: Literal["bottleneck", "low_rank"] = param("bottleneck", help="fixed")
    insertion: Literal["sequential", "parallel"] = param("parallel", help="fixed")
    modified_representation: list[Representation] = param(
        default_factory=lambda: ["ffn"], help="['ffn'] (default) or ['attention'] or both")
    composition: Literal["add", "scale", "gate"] = param("scale", help="h + s f(x)")
    scaling: float = param(4.0, gt=0, help="s (He et al.: 4 on the FFN)")
    bottleneck_size: int = param(512, min=1, help="m (He et al.: 512 on the FFN)")


class ParallelAdapter(UnifiedAdapter):
    """Scaled parallel adapter (He et al. 2022)."""

    name = "parallel_adapter"
    config_cls = ParallelAdapterConfig
    summary = "bottleneck beside the FFN (or attention), scaled by s (He et al. 2022)"
