"""Houlsby adapter (Houlsby et al. 2019, arXiv:1902.00751) as a preset of the unified view.

A bottleneck d -> m -> d with a nonlinearity and an internal skip connection,

    h <- h + f(h W_down + b_down) W_up + b_up

inserted sequentially twice per layer: on the output of the attention block (after its
output projection, before the residual add and layer norm) and on the output of the
FFN block. The layer norms are trained too (``train_layer_norms``, as in the paper).
Init: near identity, every weight ~ N(0, 10^-2) truncated at two standard deviations
and biases 0 (the paper's choice); ``init='zero_up'`` makes it exactly the identity.
The nonlinearity is GELU, as in the authors' code (adapter-bert); m = 64 is one of the
paper's sizes {8, 64, 256}. Not mergeable (the nonlinearity sits between the layers).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from deltatune.core.config import param
from deltatune.methods.unified import Activation, Representation, UnifiedAdapter, UnifiedConfig


@dataclasses.dataclass(kw_only=True)
class HoulsbyConfig(UnifiedConfig):
    """Houlsby adapter: sequential bottlenecks after attention and after the FFN."""

    method = "houlsby"
    fixed: ClassVar = {"functional_form": ("bottleneck",), "insertion": ("sequential",),
                       "composition": ("add",)}

    functional_form: Literal["bottleneck", "low_rank"] = param("bottleneck", help="fixed")
    insertion: Literal["sequential", "parallel"] = param("sequential", help="fixed")
    modified_representation: list[Representation] = param(
        default_factory=lambda: ["attention", "ffn"], help="blocks whose output is adapted")
    composition: Literal["add", "scale", "gate"] = param("add", help="fixed: h + f(h)")
    scaling: float = param(1.0, gt=0, help="unused (composition is add)")
    activation: Activation | None = param("gelu", help="nonlinearity of the bottleneck")
    bottleneck_size: int = param(64, min=1, help="m, the bottleneck width")
    init: Literal["zero_up", "houlsby"] = param("houlsby", help="near-identity init")
    train_layer_norms: bool = param(True, help="train the layer norms, as in the paper")


class Houlsby(UnifiedAdapter):
    """Houlsby adapter (two sequential bottlenecks per layer + trainable layer norms)."""

    name = "houlsby"
    config_cls = HoulsbyConfig
    # Near identity (N(0, 1e-2) weights), not exactly; init='zero_up' is exact.
    identity_at_init = False
    summary = "bottleneck adapters after attention and FFN, trained layer norms (Houlsby 2019)"
