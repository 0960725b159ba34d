"""The task contract: what the trainer needs from a task, and nothing else.

A task turns raw rows (dicts read from JSONL/CSV/...) into *examples* (dicts of plain
Python lists: token ids, label ids), collates examples into a batch of tensors,
computes the **summed** loss of a batch together with the number of items it sums
over, and evaluates a model on examples. The trainer divides the summed loss by the
number of items in the whole optimizer step (all micro-batches and all processes),
so the gradient is the same whatever the micro-batch size, gradient accumulation or
number of processes (unlike averaging per micro-batch, which weights short batches
more).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from deltatune.core.errors import DataError

Row = dict[str, Any]
Example = dict[str, Any]
Batch = dict[str, torch.Tensor]
IGNORE = -100  # label id that the loss skips (PyTorch's cross_entropy ignore_index)


@dataclass
class EncodeStats:
    """What encoding did to the rows: how many were truncated or dropped, and why."""

    rows: int = 0
    truncated: int = 0
    dropped: int = 0
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """Return a one-line summary."""
        return (f"{self.rows} rows, {self.truncated} truncated, {self.dropped} dropped"
                + (f" ({'; '.join(self.notes[:3])})" if self.notes else ""))


class Encoded(list):
    """A list of already-encoded examples; :meth:`Task.encode_rows` passes it through."""


class Task:
    """Base class: subclasses implement encode/collate/loss_sum/evaluate."""

    name = "task"
    #: metric the trainer uses for best-model keeping and early stopping by default
    default_metric = "loss"
    #: whether a larger value of ``default_metric`` is better
    greater_is_better = False

    def __init__(self) -> None:
        self.stats = EncodeStats()

    # -- data -------------------------------------------------------------------------
    def encode(self, row: Row) -> Example | None:
        """Turn one row into an example; None drops it (counted in ``stats``)."""
        raise NotImplementedError

    def encode_rows(self, rows: Iterable[Row], source: str = "data") -> list[Example]:
        """Encode every row; a bad row is a :class:`DataError` naming ``source`` and the row.

        Row numbers are 1-based, as in an editor (line numbers for JSONL). Raises
        :class:`DataError` when nothing is left.
        """
        if isinstance(rows, Encoded):
            return rows
        out: list[Example] = []
        self.stats = EncodeStats()
        locate = getattr(rows, "where", None)
        source = getattr(rows, "source", None) or source
        for i, row in enumerate(rows, 1):
            where = locate(i - 1) if callable(locate) else f"{source} row {i}"
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a mapping of column -> value, got "
                                f"{type(row).__name__}")
            self.stats.rows += 1
            try:
                ex = self.encode(row)
            except DataError as exc:
                raise DataError(f"{where}: {exc}") from None
            except (KeyError, TypeError, ValueError) as exc:
                raise DataError(f"{where}: cannot encode this row for task {self.name!r} "
                                f"({type(exc).__name__}: {exc})") from None
            if ex is None:
                self.stats.dropped += 1
                continue
            out.append(ex)
        out = Encoded(out)
        if not out:
            raise DataError(f"{source}: no usable examples for task {self.name!r} "
                            f"({self.stats.describe()}); check the file and the column names")
        return out

    def collate(self, examples: Sequence[Example]) -> Batch:
        """Stack examples into a batch of tensors (padded)."""
        raise NotImplementedError

    def count_items(self, example: Example) -> int:
        """Number of loss items (e.g. target tokens) one example contributes."""
        return 1

    # -- training -----------------------------------------------------------------------
    def loss_sum(self, model: Any, batch: Batch) -> tuple[torch.Tensor, int]:
        """Return (sum of per-item losses as a float32 scalar, number of items)."""
        raise NotImplementedError

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self, model: Any, examples: Sequence[Example], *, batch_size: int = 8,
                 progress: bool = False) -> dict[str, float]:
        """Return metrics of ``model`` on ``examples`` (always including ``loss``)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Return the task's settings as JSON-able values (written to the run file)."""
        return {"task": self.name}


def require(row: Row, key: str, kind: type | tuple[type, ...] = str) -> Any:
    """Return ``row[key]`` checked to be of ``kind``; raise a :class:`DataError` otherwise."""
    if key not in row:
        have = ", ".join(map(str, row)) or "none"
        raise DataError(f"missing column {key!r} (columns here: {have})")
    value = row[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataError(f"column {key!r} must be {names}, got {type(value).__name__}")
    return value


def pad_to(rows: Sequence[Sequence[int]], value: int, *, left: bool = False) -> torch.Tensor:
    """Pad lists of ints to the longest with ``value`` (right by default); return a LongTensor."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            t = torch.as_tensor(list(r), dtype=torch.long)
            if left:
                out[i, width - len(r):] = t
            else:
                out[i, :len(r)] = t
    return out


def batched(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    """Yield consecutive slices of ``items`` of length ``size`` (the last may be shorter)."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def unwrap(model: Any) -> Any:
    """Return the module under DDP / FSDP / ``torch.compile`` wrappers."""
    from torch.nn.parallel import DistributedDataParallel

    wrappers: tuple[type, ...] = (DistributedDataParallel,)
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        wrappers += (FullyShardedDataParallel,)
    except ImportError:  # a torch build without distributed support
        pass
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
