"""Helpers to build saved delta directories and to damage them the way real faults do."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save as st_save

from deltatune.core import io
from deltatune.core.model import DeltaModel
from tests.reliability._toy import fill, lora, toy


def saved_toy_delta(directory: Path, *, seed: int = 0, fill_seed: int = 3, **config) -> Path:
    """Save a filled LoRA delta of ``toy(seed)`` into ``directory``; return it."""
    dm = DeltaModel(toy(seed))
    dm.add("d", lora(**config))
    fill(dm, seed=fill_seed)
    return dm.save_delta(directory)


def rewrite_tensors(directory: Path, edit, *, fix_manifest: bool = True) -> None:
    """Apply ``edit(tensors) -> tensors`` to a saved delta's weights.

    With ``fix_manifest`` the manifest is rewritten too, as a buggy or hostile tool
    would do: the damage must then be caught by the checks after the manifest.
    """
    weights = directory / "delta.safetensors"
    tensors, meta = io.load_tensors(weights)
    weights.write_bytes(st_save(edit(dict(tensors)), metadata=meta))
    if fix_manifest:
        io.write_manifest(directory)


def nan_at(t: torch.Tensor, value: float = float("nan")) -> torch.Tensor:
    """Return a copy of ``t`` with its first element set to ``value``."""
    t = t.clone()
    t.view(-1)[0] = value
    return t
