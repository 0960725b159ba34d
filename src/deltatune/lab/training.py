"""The one place the lab trains a model: a bridge onto deltatune's :class:`Trainer`.

The lab's tasks build their training batches themselves (the same batches for every
method of a comparison); :class:`PrebuiltBatches` hands them to the trainer one batch per
optimizer step (``batch_size=1`` over a list of batches), with the summed loss and item
count the trainer's contract asks for. The trainer brings AdamW with linear warm-up and
decay, gradient clipping, the deltas' step callbacks (AdaLoRA's budget schedule), their
extra losses, the non-finite policy, and the saved delta, whose size the lab reports.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from deltatune.lab.tasks import Batch, count_tokens
from deltatune.tasks.base import IGNORE, Encoded, Task
from deltatune.train.config import TrainConfig
from deltatune.train.trainer import Trainer, TrainerCallback


@dataclasses.dataclass
class TrainStats:
    """What one training run did: optimizer steps, real tokens seen, seconds, losses."""

    steps: int
    tokens: int
    seconds: float
    losses: list[float]
    delta_dir: Path | None = None

    @property
    def tokens_per_second(self) -> float:
        """Real (non-padding) input tokens per second of optimizer steps."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def loss_items(batch: Batch) -> int:
    """How many loss terms a batch's mean loss averages: labelled (shifted) tokens or rows."""
    labels = batch["labels"]
    if labels.dim() == 1:  # sequence classification: one label per row
        return int(labels.numel())
    # causal LM: transformers shifts labels by one and skips IGNORE
    return int((labels[:, 1:] != IGNORE).sum())


class PrebuiltBatches(Task):
    """A trainer task whose every example is one whole batch built by a lab task."""

    name = "lab-batches"

    def encode(self, row: dict[str, Any]) -> dict[str, Any]:
        """Examples are the batches themselves."""
        return row

    def collate(self, examples: Sequence[dict[str, Any]]) -> Batch:
        """One example per micro-batch: return it as is."""
        (batch,) = examples
        return batch

    def count_items(self, example: dict[str, Any]) -> int:
        """Loss terms in the batch (the trainer divides the summed loss by these)."""
        return loss_items(example)

    def loss_sum(self, model: Any, batch: Batch) -> tuple[torch.Tensor, int]:
        """The model's mean loss times its item count: the summed loss."""
        n = loss_items(batch)
        return model(**batch).loss.float() * n, n

    def evaluate(self, model: Any, examples: Sequence[dict[str, Any]], *, batch_size: int = 8,
                 progress: bool = False) -> dict[str, float]:
        """Unused: the lab evaluates with its own task."""
        raise NotImplementedError


class _StepTimer(TrainerCallback):
    """Records the time of the last optimizer step and the loss curve."""

    def __init__(self) -> None:
        self.last = 0.0
        self.losses: list[float] = []

    def on_step_end(self, trainer: Any, record: dict[str, Any]) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.last = time.perf_counter()
        self.losses.append(float(record["loss"]))


def train(dm: Any, batches: list[Batch], *, lr: float, workdir: Path, seed: int = 0,
          weight_decay: float = 0.0, warmup_ratio: float = 0.06, max_grad_norm: float = 1.0,
          progress: bool = False) -> TrainStats:
    """Train the trainable parameters of ``dm`` for one optimizer step per batch.

    Uses :class:`deltatune.train.trainer.Trainer` (output in ``workdir``; its resumable
    checkpoint is removed afterwards, the saved delta kept). Throughput counts the time
    from the start of training to the end of the last optimizer step, not the final
    saving. A non-finite loss stops the run with the trainer's error.
    """
    config = TrainConfig(output_dir=str(workdir), epochs=1, batch_size=1, lr=lr,
                         weight_decay=weight_decay, warmup_ratio=warmup_ratio,
                         max_grad_norm=max_grad_norm, seed=seed, progress=progress,
                         handle_signals=False, log_every=max(1, len(batches)),
                         keep_best=False)
    timer = _StepTimer()
    trainer = Trainer(dm, PrebuiltBatches(), Encoded(batches), config=config,
                      callbacks=[timer])
    start = time.perf_counter()
    result = trainer.fit()
    seconds = (timer.last or time.perf_counter()) - start
    shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
    dm.eval()
    return TrainStats(steps=result.steps, tokens=sum(count_tokens(b) for b in batches),
                      seconds=seconds, losses=timer.losses or [float("nan")],
                      delta_dir=result.delta_dir)
