"""The table printed before training: what a delta attached to, and what it trains.

One row per module location holding the delta (its base weight shape and the delta's
parameter count there), then the trainable total and its share of all parameters.
"""

from __future__ import annotations

from typing import Any

import torch

from deltatune.core.layers import DeltaLayer, ModuleCopy
from deltatune.core.targets import get_submodule


def _base_shape(model: torch.nn.Module, location: str) -> str:
    module = get_submodule(model, location) if location else model
    base = module.base if isinstance(module, DeltaLayer) else (
        module.original if isinstance(module, ModuleCopy) else module)
    weight = getattr(base, "weight", None)
    return str(list(weight.shape)) if isinstance(weight, torch.Tensor) else "-"


def target_rows(dm: Any, name: str | None = None) -> list[tuple[str, str, str, int]]:
    """Return (location, module type, base weight shape, delta parameters) per location."""
    delta = dm._single(name)
    rows = []
    for location, part in delta.parts.items():
        module = get_submodule(dm.model, location) if location else dm.model
        base = module.base if isinstance(module, DeltaLayer) else (
            module.original if isinstance(module, ModuleCopy) else module)
        count = sum(p.numel() for p in part.parameters())
        rows.append((location or "(model)", type(base).__name__,
                     _base_shape(dm.model, location), count))
    return rows


def target_table(dm: Any, name: str | None = None) -> str:
    """Return the matched-modules table of delta ``name`` plus the trainable share."""
    rows = target_rows(dm, name)
    width = max([len(r[0]) for r in rows] + [6])
    lines = [f"{'module':<{width}}  {'type':<14} {'weight':<14} {'parameters':>12}"]
    lines += [f"{loc:<{width}}  {kind:<14} {shape:<14} {count:>12,}"
              for loc, kind, shape, count in rows]
    trainable = sum(p.numel() for p in dm.trainable_parameters())
    total = dm.base_parameter_count() + sum(
        p.numel() for d in dm.delta_names for p in dm.get_delta(d).parameters())
    lines.append(f"{len(rows)} modules; trainable: {trainable:,} of {total:,} "
                 f"({100.0 * trainable / max(total, 1):.4f}%)")
    return "\n".join(lines)
