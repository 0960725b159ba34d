"""The one place the lab trains a model.

``train`` runs AdamW with linear warm-up and decay over a fixed list of batches, calling
the deltas' step callbacks (AdaLoRA's budget schedule) the way deltatune's trainer does,
and returns what the lab reports: tokens processed, seconds spent in optimizer steps and
the loss curve. The lab's comparisons go through this function only, so moving them onto
another training loop is a change here.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch

from deltatune.core.errors import NonFiniteError
from deltatune.lab.tasks import Batch, count_tokens


@dataclasses.dataclass
class TrainStats:
    """What one training run did: optimizer steps, real tokens seen, seconds, losses."""

    steps: int
    tokens: int
    seconds: float
    losses: list[float]

    @property
    def tokens_per_second(self) -> float:
        """Real (non-padding) input tokens per second of training."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def train(dm: Any, batches: list[Batch], *, lr: float, weight_decay: float = 0.0,
          warmup_ratio: float = 0.06, max_grad_norm: float = 1.0, progress: bool = False,
          desc: str = "train") -> TrainStats:
    """Train the trainable parameters of ``dm`` for one optimizer step per batch.

    Raises :class:`NonFiniteError` when the loss becomes NaN or infinite (the run is
    reported failed rather than silently diverged). Leaves the model in eval mode.
    """
    params = [p for p in dm.parameters() if p.requires_grad]
    if not params:
        raise NonFiniteError("nothing to train: no parameter requires gradients")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = len(batches)
    warmup = max(1, math.ceil(warmup_ratio * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, total, warmup))
    callbacks = dm.training_callbacks() if hasattr(dm, "training_callbacks") else []
    for cb in callbacks:
        cb.on_train_begin(dm, total)
    iterator: Any = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc=desc, unit="step", leave=False)
    dm.train()
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    for step, batch in enumerate(iterator, start=1):
        loss = dm(**batch).loss
        if not torch.isfinite(loss):
            dm.eval()
            raise NonFiniteError(f"training loss became {float(loss)} at step {step}; lower the "
                                 f"learning rate (was {lr})")
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        for cb in callbacks:
            cb.on_optimizer_step(dm, step)
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(float(loss.detach()))
        tokens += count_tokens(batch)
    if batches and next(iter(batches[0].values())).device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    dm.eval()
    return TrainStats(steps=total, tokens=tokens, seconds=seconds, losses=losses)
