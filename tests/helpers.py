"""Small helpers shared by the method tests (tests/methods/*): forward and save/reload.

Tiny model builders and input makers live in ``tests/conftest.py``; this module holds the
scaffolding the method test files used to repeat.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import deltatune as dt


def logits(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Return ``model(**inputs).logits`` computed without gradients."""
    with torch.no_grad():
        return model(**inputs).logits


def save_and_reload(dm: dt.DeltaModel, directory: Path, factory: Callable[[], Any],
                    name: str | None = None, **load_kwargs: Any) -> dt.DeltaModel:
    """Save delta ``name`` of ``dm`` into ``directory`` and load it onto a fresh
    ``factory()`` base; return the loaded :class:`DeltaModel`."""
    if name is None:
        dm.save_delta(directory)
    else:
        dm.save_delta(directory, name)
    return dt.load(factory(), directory, **load_kwargs)
