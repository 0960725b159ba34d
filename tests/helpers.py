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


def adam_losses(dm: dt.DeltaModel, loss_of_step: Callable[[], torch.Tensor], steps: int,
                lr: float) -> list[float]:
    """Train ``dm``'s trainable parameters with Adam for ``steps`` steps; return each loss.

    ``loss_of_step`` runs the forward pass and returns the loss to minimise, so each test
    keeps its own objective (LM loss, verbalizer scores, ...) and shares only the loop.
    """
    opt = torch.optim.Adam(dm.trainable_parameters(), lr=lr)
    dm.train()
    losses = []
    for _ in range(steps):
        loss = loss_of_step()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def lm_losses(dm: dt.DeltaModel, inputs: dict[str, torch.Tensor], steps: int,
              lr: float) -> list[float]:
    """:func:`adam_losses` with the causal-LM loss of ``inputs`` on their own input ids."""
    return adam_losses(dm, lambda: dm(**inputs, labels=inputs["input_ids"]).loss, steps, lr)


def assert_rows_match_alone(dm: dt.DeltaModel, inputs: dict[str, torch.Tensor],
                            names: list[str | None], atol: float) -> None:
    """Assert that a batch routed per row (``delta_names``) equals each row run alone.

    A ``None`` row runs with every delta disabled; otherwise the named delta is activated.
    """
    mixed = logits(dm, {**inputs, "delta_names": names})
    for i, name in enumerate(names):
        row = {k: v[i:i + 1] for k, v in inputs.items()}
        if name is None:
            with dm.disabled():
                alone = logits(dm, row)
        else:
            dm.activate(name)
            alone = logits(dm, row)
        assert torch.allclose(mixed[i:i + 1], alone, atol=atol), name


def count_calls(monkeypatch: Any, owner: Any, name: str) -> dict[str, int]:
    """Replace ``owner.name`` by a wrapper that counts its calls and still runs it; return
    the counter (``{"n": calls}``), read after the code under test ran."""
    calls = {"n": 0}
    real = getattr(owner, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls

