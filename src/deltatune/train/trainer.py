"""The training loop: accelerate underneath, exact resume, non-finite halting, signals.

One optimizer step ("window") = ``grad_accum`` micro-batches of ``batch_size`` examples
per process. The data order is a fixed function of (seed, epoch): epoch ``e`` visits
``randperm(n, generator=seed + e)``, cut into global micro-batches of
``batch_size * processes`` rows; process ``r`` takes rows ``r, r + P, r + 2P, ...`` of each.
So the position in the data is fully given by (optimizer step, micro-batch in window),
which is what a checkpoint stores; no data loader state is needed.

The loss of a window is the task's summed item loss (response tokens, labels...)
divided by the number of items in the **whole window on all processes**, so the
gradient does not depend on how the window is split into micro-batches or processes.
Method regularisers (``DeltaModel.extra_loss``) are added once per window.

The torch generator is re-seeded at the start of every window from
(seed, step, process), so dropout masks depend only on the position in training;
a checkpoint taken mid-window also restores the generator states.

Non-finite values stop training (policy ``halt``) within the step they appear in: a
NaN/inf loss, gradient or updated parameter raises :class:`NonFiniteError` naming the
optimizer step, the micro-batch, the example indices and the first offending
parameter; no checkpoint holding them is ever written. Policy ``skip-step`` drops the
window instead and counts it, halting after ``max_skipped_steps``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltatune.core.errors import ConfigError, DeltaTuneError, NonFiniteError
from deltatune.tasks.base import Encoded, Example, Task, unwrap
from deltatune.train import checkpoint as ckpt
from deltatune.train.config import TRAJECTORY_FIELDS, TrainConfig

logger = logging.getLogger("deltatune.train")
LOG_FILE = "log.jsonl"
ADAPTER_DIR = "adapter"  # the final trained delta, inside output_dir
LORA_B = r"(^|\.)lora_B(\.|$)"


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM.

    After the first signal the current micro-batch is finished and a checkpoint written:
    ``checkpoint`` is that directory. After a second signal (``immediate`` is True) the
    run stops where it is without writing anything: ``checkpoint`` is then the last
    complete checkpoint written before (or None). ``exit_code`` is 128 + the number of
    the signal that ended the run (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signum: int, checkpoint: Path | None, immediate: bool = False) -> None:
        self.signum = signum
        self.checkpoint = checkpoint
        self.immediate = immediate
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        if immediate:
            where = (f"nothing written; last complete checkpoint: {checkpoint}" if checkpoint
                     else "nothing written; no checkpoint yet")
            super().__init__(f"second {name}: stopping now; {where}")
        else:
            where = (f"checkpoint written to {checkpoint}" if checkpoint
                     else "no checkpoint written")
            super().__init__(f"training interrupted by {name}; {where}")


class TrainingOutOfMemory(DeltaTuneError, MemoryError):
    """The device ran out of memory in a training step; the message says what to change."""


class TrainerCallback:
    """User hooks; every method is optional. ``trainer.request_stop()`` ends training cleanly."""

    def on_micro_step(self, trainer: Trainer) -> None:
        """After each micro-batch's backward pass (``trainer.step``, ``trainer.micro``)."""

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """After each optimizer step, with its log record (step, loss, lr, grad_norm)."""

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """After each evaluation."""


@dataclass
class TrainResult:
    """What a run did: steps, why it stopped, losses, evaluations and where files are."""

    steps: int
    total_steps: int
    stop_reason: str
    history: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    final_eval: dict[str, float] | None
    best: dict[str, Any] | None
    delta_dir: Path | None
    best_dir: Path | None
    checkpoint: Path | None
    skipped_steps: int
    seconds: float
    resumed_from: Path | None = None
    notes: list[str] = field(default_factory=list)
    # training rows, and how many examples they were packed from (None: no packing)
    train_rows: int | None = None
    packed_from: int | None = None

    @property
    def final_loss(self) -> float | None:
        """Training loss of the last optimizer step that ran (None if none did)."""
        losses = [h["loss"] for h in self.history if "loss" in h]
        return losses[-1] if losses else None

    def summary(self) -> dict[str, Any]:
        """JSON-able summary (for the run file)."""
        return {"steps": self.steps, "total_steps": self.total_steps,
                "stop_reason": self.stop_reason, "final_loss": self.final_loss,
                "final_eval": self.final_eval, "best": self.best,
                "skipped_steps": self.skipped_steps, "seconds": round(self.seconds, 2),
                "delta_dir": str(self.delta_dir) if self.delta_dir else None,
                "best_dir": str(self.best_dir) if self.best_dir else None,
                "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                "train_rows": self.train_rows, "packed_from": self.packed_from}


def lr_factor(step: int, total: int, config: TrainConfig) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based) of ``total``.

    Linear warm-up ``(step + 1) / warmup`` over ``warmup_steps`` (or
    ``ceil(warmup_ratio * total)``), then ``constant``, ``linear`` decay or ``cosine``
    decay towards ``min_lr_ratio``; the decay reaches the floor after the last step.
    """
    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    if config.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    decay = 1.0 - progress if config.schedule == "linear" else \
        0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * max(0.0, decay)


def _fingerprint(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps({k: e[k] for k in sorted(e) if k != "references"},
                            sort_keys=True, default=str).encode())
    return h.hexdigest()


class Trainer:
    """Train the trainable parameters of ``model`` (a DeltaModel, or any module) on a task.

    ``train_data`` / ``eval_data``: rows for ``task.encode_rows`` (lists of dicts, a
    ``deltatune.data`` reader's result) or already-encoded examples
    (:class:`deltatune.tasks.base.Encoded`).
    """

    def __init__(self, model: torch.nn.Module, task: Task, train_data: Sequence[Any],
                 eval_data: Sequence[Any] | None = None, config: TrainConfig | None = None,
                 *, callbacks: Sequence[TrainerCallback] = ()) -> None:
        from accelerate import Accelerator

        self.config = config or TrainConfig()
        self.config.validate()
        self.task = task
        self.callbacks = list(callbacks)
        self.train_examples = task.encode_rows(train_data, "training data")
        self.train_stats = task.stats
        self.packed_from: int | None = None
        if self.config.packing:
            from deltatune.tasks.packing import check_packable

            check_packable(model, task)
            self.packed_from = len(self.train_examples)
            self.train_examples = task.pack_examples(self.train_examples)
            logger.info("packing: %d examples in %d rows of at most %d tokens",
                        self.packed_from, len(self.train_examples), task.max_length)
        self.eval_examples = (task.encode_rows(eval_data, "evaluation data")
                              if eval_data is not None else None)
        # accelerate only sets up multi-process CPU training (gloo) when told cpu=True
        no_accelerator = not torch.cuda.is_available() and not (
            hasattr(torch.backends, "mps") and torch.backends.mps.is_available())
        _allow_new_precision(self.config.mixed_precision)
        self.accelerator = Accelerator(mixed_precision=self.config.mixed_precision,
                                       cpu=no_accelerator)
        self.output_dir = Path(self.config.output_dir)
        self.raw_model = model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ConfigError("the model has no trainable parameters: add (and activate) a "
                              "delta, or set requires_grad on the parameters to train",
                              field="model")
        self.param_names = [n for n, _ in named]
        if self.config.gradient_checkpointing:
            self._enable_gradient_checkpointing(model)
        self.optimizer = torch.optim.AdamW(self._param_groups(named), lr=self.config.lr,
                                           betas=self.config.betas, eps=self.config.eps,
                                           weight_decay=self.config.weight_decay)
        self.model, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        self.method_callbacks = list(getattr(unwrap(self.model), "training_callbacks",
                                             lambda: [])())
        # position and bookkeeping (all of it goes into checkpoints)
        self.step = 0
        self.micro = 0
        self.window_loss = 0.0
        self.history: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.bad_evals = 0
        self.skipped_steps = 0
        self.last_checkpoint: Path | None = None
        self._stop = False
        self._signal: int | None = None
        self._data_fingerprint = _fingerprint(self.train_examples)

    # -- setup ---------------------------------------------------------------------------
    def _param_groups(self, named: list[tuple[str, torch.nn.Parameter]]) -> list[dict[str, Any]]:
        """Groups by learning-rate multiplier and weight decay (none on vectors/biases)."""
        rules = list(self.config.lr_ratios.items())
        if self.config.loraplus_ratio is not None:
            rules.insert(0, (LORA_B, self.config.loraplus_ratio))
        groups: dict[tuple[float, bool], dict[str, Any]] = {}
        self.group_names: list[list[str]] = []
        for name, p in named:
            mult = next((float(r) for pat, r in rules if re.search(pat, name)), 1.0)
            decay = p.ndim >= 2
            key = (mult, decay)
            if key not in groups:
                groups[key] = {"params": [], "lr": self.config.lr * mult, "lr_mult": mult,
                               "weight_decay": self.config.weight_decay if decay else 0.0}
                self.group_names.append([])
            groups[key]["params"].append(p)
            self.group_names[list(groups).index(key)].append(name)
        return list(groups.values())

    @staticmethod
    def _enable_gradient_checkpointing(model: torch.nn.Module) -> None:
        inner = getattr(model, "model", model)
        # Non-reentrant checkpointing works with a frozen embedding (no input grads needed).
        # transformers 5 renamed the switch; the old name still works but warns.
        kwargs = {"use_reentrant": False}
        if hasattr(inner, "activation_checkpointing_enable"):
            inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(inner, "gradient_checkpointing_enable"):
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            raise ConfigError(f"{type(inner).__name__} does not support gradient checkpointing "
                              f"(no gradient_checkpointing_enable)",
                              field="gradient_checkpointing")
        if hasattr(getattr(inner, "config", None), "use_cache"):
            inner.config.use_cache = False

    # -- plan -------------------------------------------------------------------------------
    @property
    def world(self) -> int:
        """Number of processes."""
        return self.accelerator.num_processes

    @property
    def micro_per_epoch(self) -> int:
        """Global micro-batches per epoch."""
        return math.ceil(len(self.train_examples) / (self.config.batch_size * self.world))

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (the last window of an epoch may be shorter)."""
        return math.ceil(self.micro_per_epoch / self.config.grad_accum)

    @property
    def total_steps(self) -> int:
        """Planned number of optimizer steps."""
        return self.config.max_steps or self.config.epochs * self.steps_per_epoch

    def window(self, step: int) -> list[list[int]]:
        """Example indices of each global micro-batch of optimizer step ``step`` (0-based)."""
        epoch, w = divmod(step, self.steps_per_epoch)
        gen = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        perm = torch.randperm(len(self.train_examples), generator=gen).tolist()
        size = self.config.batch_size * self.world
        first = w * self.config.grad_accum
        last = min(first + self.config.grad_accum, self.micro_per_epoch)
        return [perm[j * size:(j + 1) * size] for j in range(first, last)]

    # -- public --------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask the loop to stop after the current micro-batch and write a checkpoint."""
        self._stop = True

    def evaluate(self, examples: Sequence[Example] | None = None) -> dict[str, float]:
        """Evaluate the model (eval mode, no grad) on ``examples`` (default: eval data)."""
        examples = examples if examples is not None else self.eval_examples
        if examples is None:
            raise ConfigError("no evaluation data: pass eval_data to the Trainer",
                              field="eval_data")
        model = unwrap(self.model)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self.accelerator.autocast():
                return self.task.evaluate(model, examples, batch_size=self.config.eval_batch_size
                                          or self.config.batch_size, progress=False)
        finally:
            model.train(was_training)

    def fit(self, resume: str | os.PathLike[str] | None = None) -> TrainResult:
        """Train to the end (or early stop / stop request); return a :class:`TrainResult`.

        ``resume``: None (start fresh), ``"auto"`` (newest complete checkpoint under
        ``output_dir``, if any; torn ones are skipped and reported), or a checkpoint
        directory. On SIGINT/SIGTERM a checkpoint is written and
        :class:`TrainingInterrupted` is raised. With ``liger_kernel`` the model runs
        Liger-Kernel's kernels (:mod:`deltatune.integrations.liger`), with
        ``compile_layers`` its decoder layers compiled (:mod:`deltatune.train.compile`),
        both during the run only.
        """
        with contextlib.ExitStack() as restore:
            if self.config.liger_kernel:
                from deltatune.integrations.liger import apply_liger

                restore.callback(apply_liger(self.raw_model))
            if self.config.compile_layers:
                from deltatune.train.compile import compile_layers

                restore.callback(compile_layers(self.raw_model))
            return self._fit(resume)

    def _fit(self, resume: str | os.PathLike[str] | None) -> TrainResult:
        start = time.perf_counter()
        notes: list[str] = []
        resumed_from = None
        if resume is not None:
            if str(resume) == "auto":
                path, skipped = ckpt.find_resumable(self.output_dir)
                notes.extend(skipped)
                if path is None and skipped and not self.config.allow_partial_resume:
                    # Checkpoints exist but none is complete: starting over silently would
                    # throw their training away (reliability rows 2 and 3).
                    raise ckpt.ResumeError(
                        f"no complete checkpoint to resume in {self.output_dir}: "
                        f"{'; '.join(skipped)}. Restore one, or pass allow_partial_resume=True "
                        f"(CLI: --allow-partial-resume) to start from scratch")
                if path is None:
                    notes.append("no complete checkpoint to resume; starting from scratch")
            else:
                path = Path(resume)
            if path is not None:
                notes.extend(self.load_checkpoint(path))
                resumed_from = path
        for note in notes:
            logger.info(note)
        if self.step == 0 and self.micro == 0:
            for cb in self.method_callbacks:
                cb.on_train_begin(unwrap(self.model), self.total_steps)
        previous = self._install_signals()
        try:
            reason = self._loop()
        finally:
            self._restore_signals(previous)
        if self._signal is not None and reason == "stopped":
            raise TrainingInterrupted(self._signal, self.last_checkpoint)
        # (a signal during the very last step: the run is complete, so it simply finishes)
        return self._finish(reason, time.perf_counter() - start, resumed_from, notes)

    # -- the loop --------------------------------------------------------------------------
    def _loop(self) -> str:
        from tqdm.auto import tqdm

        acc, cfg = self.accelerator, self.config
        total = self.total_steps
        bar = tqdm(total=total, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (cfg.progress and acc.is_main_process))
        self.model.train()
        reason = "completed"
        try:
            while self.step < total:
                if self._stop and self.micro == 0:
                    self.save_checkpoint()
                    return "stopped"
                window = self.window(self.step)
                n_items = sum(self.task.count_items(self.train_examples[i])
                              for mb in window for i in mb)
                if self.micro == 0:
                    torch.manual_seed(cfg.seed * 1_000_003 + self.step * 7_919 + acc.process_index)
                if n_items == 0:
                    self._skip_window("every label in this step's batches is masked")
                    bar.update(1)
                    continue
                if not self._run_window(window, n_items):
                    if self._stop and self.micro:
                        self.save_checkpoint()
                        return "stopped"
                    bar.update(1)  # skipped (skip-step policy)
                    continue
                record = self._optimizer_step(window, n_items)
                if record is None:
                    bar.update(1)
                    continue
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                if self.step % cfg.log_every == 0:
                    logger.info("step %d/%d loss %.4f lr %.3e grad-norm %.3f", self.step, total,
                                record["loss"], record["lr"], record["grad_norm"])
                if cfg.eval_every and self.eval_examples is not None and \
                        self.step % cfg.eval_every == 0 and self._evaluate_and_track():
                    reason = "early-stopping"
                    break
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save_checkpoint()
        finally:
            bar.close()
        return reason

    def _run_window(self, window: list[list[int]], n_items: int) -> bool:
        """Forward/backward the window's remaining micro-batches; False if it was abandoned."""
        acc = self.accelerator
        rank, world = acc.process_index, self.world
        model = self.model
        for j in range(self.micro, len(window)):
            local = window[j][rank::world]
            weight = 1.0
            if not local:  # an uneven last batch: run one row with zero weight (DDP needs it)
                local, weight = window[j][:1], 0.0
            batch = self.task.collate([self.train_examples[i] for i in local])
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            sync = j == len(window) - 1 or world == 1
            ctx = contextlib.nullcontext() if sync else acc.no_sync(model)
            with ctx:
                try:
                    with acc.autocast():
                        loss_sum, _ = self.task.loss_sum(model, batch)
                        extra = getattr(unwrap(model), "extra_loss", lambda: None)()
                except torch.OutOfMemoryError as exc:
                    raise self._oom(batch, exc) from None
                if not torch.isfinite(loss_sum.detach()) or (
                        extra is not None and not torch.isfinite(extra.detach())):
                    value = float(loss_sum) if extra is None else float(loss_sum + extra)
                    if not self._nonfinite(f"the loss is {value}", j, len(window), local):
                        return False
                loss = loss_sum * (weight * world / n_items)
                if extra is not None:
                    loss = loss + extra / len(window)
                try:
                    acc.backward(loss)
                except torch.OutOfMemoryError as exc:
                    raise self._oom(batch, exc) from None
            self.window_loss += float(loss_sum.detach()) * weight
            self.micro = j + 1
            for cb in self.callbacks:
                cb.on_micro_step(self)
            if self._stop and self.micro < len(window) and world == 1:
                return False
        return True

    def _oom(self, batch: dict[str, torch.Tensor], exc: BaseException) -> TrainingOutOfMemory:
        """An out-of-memory error with the batch's size and what to change."""
        cfg = self.config
        shape = tuple(batch["input_ids"].shape) if "input_ids" in batch else None
        used = ""
        if torch.cuda.is_available():
            used = (f" {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB was the peak "
                    f"allocation on {self.accelerator.device}.")
        trainable = sum(p.numel() for _, p in self._trainable())
        hint = (f"batch_size={max(1, cfg.batch_size // 2)} with grad_accum="
                f"{cfg.grad_accum * 2} (same effective batch)" if cfg.batch_size > 1 else
                "a smaller max_length")
        extras = [x for x, on in (("gradient_checkpointing=True",
                                   not cfg.gradient_checkpointing),
                                  ("mixed_precision='bf16'", cfg.mixed_precision == "no"))
                  if on]
        return TrainingOutOfMemory(
            f"out of memory at optimizer step {self.step + 1}, micro-batch {self.micro + 1} "
            f"(batch of token shape {shape}, {trainable:,} trainable parameters).{used} "
            f"Nothing was saved after the last checkpoint ({self.last_checkpoint or 'none'}). "
            f"Try {hint}" + (f", or {' / '.join(extras)}" if extras else "") +
            f". ({type(exc).__name__}: {str(exc)[:200]})")

    def _trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        # FSDP (use_orig_params) and activation checkpointing insert wrapper modules whose
        # names appear in the parameter paths; the recorded names are the unwrapped ones
        params = {_unwrapped_name(n): p for n, p in unwrap(self.model).named_parameters()}
        return [(n, params[n]) for n in self.param_names]

    def _sharded(self) -> bool:
        """True when each rank holds only a shard of the trainable tensors (FSDP, > 1 rank)."""
        acc = self.accelerator
        if self.world == 1 or acc.distributed_type != "FSDP":
            return False
        strategy = getattr(self.model, "sharding_strategy", None)  # FSDP1 root only
        return strategy is None or getattr(strategy, "name", "") != "NO_SHARD"

    def _first_nonfinite(self, grads: bool) -> str | None:
        named = [(n, p.grad if grads else p) for n, p in self._trainable()]
        named = [(n, _local(t)) for n, t in named if t is not None]
        if not named:
            return None
        # one flag per tensor and one host sync (not one per tensor); under FSDP each rank
        # sees its shard, so the flags are combined across ranks and all ranks agree
        bad = torch.stack([~torch.isfinite(t).all() if t.numel() else
                           torch.zeros((), dtype=torch.bool, device=t.device)
                           for _, t in named]).to(torch.uint8)
        if self._sharded():
            bad = self.accelerator.reduce(bad, reduction="sum")
        hits = bad.nonzero()
        return named[int(hits[0, 0])][0] if len(hits) else None

    def _nonfinite(self, what: str, j: int, n_micro: int, rows: Sequence[int], *,
                   halt: bool = False) -> bool:
        """Handle a non-finite value per the policy: raise (halt) or abandon the window."""
        cfg = self.config
        bad_param = self._first_nonfinite(grads=False)
        bad_grad = self._first_nonfinite(grads=True)
        detail = (f"first non-finite parameter: {bad_param}" if bad_param else
                  "every trainable parameter is finite")
        if bad_grad:
            detail += f"; first non-finite gradient: {bad_grad}"
        message = (f"training stopped at optimizer step {self.step + 1} (micro-batch {j + 1} of "
                   f"{n_micro}, training examples {list(rows)[:8]}): {what}; {detail}. ")
        if not halt and cfg.nonfinite == "skip-step" and \
                self.skipped_steps < cfg.max_skipped_steps:
            logger.warning("%sskipping this step (%d skipped so far)", message,
                           self.skipped_steps + 1)
            self._skip_window(what)
            return False
        last = self.last_checkpoint or (ckpt.find_resumable(self.output_dir)[0])
        raise NonFiniteError(
            message + f"No checkpoint was written after this; the last good one is "
            f"{last or 'none'}. Fix: lower lr, set max_grad_norm, use bf16 instead of fp16, "
            f"or check those examples" + (f" (skipped {self.skipped_steps} steps before)"
                                          if self.skipped_steps else ""))

    def _skip_window(self, why: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        self.history.append({"step": self.step + 1, "skipped": why})
        self.step += 1
        self.micro = 0
        self.window_loss = 0.0

    def _optimizer_step(self, window: list[list[int]], n_items: int) -> dict[str, Any] | None:
        acc, cfg = self.accelerator, self.config
        params = [p for _, p in self._trainable()]
        # fp16 on CUDA has a grad scaler (accelerate gives none on CPU): overflow is its
        # business, it skips the step and lowers the scale
        fp16 = getattr(acc, "scaler", None) is not None
        if fp16:
            acc.unscale_gradients()
        else:
            bad = self._first_nonfinite(grads=True)
            if bad is not None and not self._nonfinite(
                    f"the gradient of {bad} is not finite", len(window) - 1, len(window),
                    window[-1]):
                return None
        if cfg.max_grad_norm is not None and not self._sharded():
            # gradients are whole on every rank here (and already unscaled under fp16:
            # accelerate's clip_grad_norm_ would unscale a second time, which GradScaler
            # refuses)
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        else:
            grads = [p.grad for p in params if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(_local(g).float()) for g in grads])) if grads else \
                torch.zeros((), device=acc.device)
            if self._sharded():
                # Each rank holds a shard of every gradient: the norm is the root of the
                # summed squares over ranks. (accelerate's clipping of a parameter subset
                # under FSDP1 would clip each rank by its own shard's norm.)
                norm = acc.reduce(norm.square(), reduction="sum").sqrt()
                if cfg.max_grad_norm is not None:
                    coef = (cfg.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
                    for g in grads:
                        g.mul_(coef.to(g.dtype))
        factor = lr_factor(self.step, self.total_steps, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * group["lr_mult"] * factor
        self.optimizer.step()
        if not fp16 or not acc.optimizer_step_was_skipped:
            bad = self._first_nonfinite(grads=False)
            if bad is not None:
                # Parameters are already updated: halt whatever the policy (no rollback).
                self._nonfinite(f"parameter {bad} became non-finite in the update",
                                len(window) - 1, len(window), window[-1], halt=True)
        step = self.step + 1
        for cb in self.method_callbacks:
            cb.on_optimizer_step(unwrap(self.model), step)
        self.optimizer.zero_grad(set_to_none=True)
        loss_total = self.window_loss
        if self.world > 1:
            t = torch.tensor([loss_total], dtype=torch.float64, device=acc.device)
            loss_total = float(acc.reduce(t, reduction="sum")[0])
        record = {"step": step, "loss": loss_total / n_items, "lr": cfg.lr * factor,
                  "grad_norm": float(_local(norm) if not hasattr(norm, "full_tensor")
                                     else norm.full_tensor()), "items": n_items}
        self.history.append(record)
        self.step = step
        self.micro = 0
        self.window_loss = 0.0
        for cb in self.callbacks:
            cb.on_step_end(self, record)
        return record

    # -- evaluation, best model, early stopping ---------------------------------------------
    def _metric_for_best(self) -> tuple[str, bool]:
        cfg = self.config
        name = cfg.metric_for_best or self.task.default_metric
        if cfg.greater_is_better is not None:
            return name, cfg.greater_is_better
        if name == self.task.default_metric:
            return name, self.task.greater_is_better
        return name, name not in ("loss", "perplexity")

    def _evaluate_and_track(self) -> bool:
        """Evaluate, keep the best delta, count patience; return True to stop early."""
        cfg = self.config
        metrics = self.evaluate()
        self.evals.append({"step": self.step, **metrics})
        for cb in self.callbacks:
            cb.on_evaluate(self, metrics)
        name, greater = self._metric_for_best()
        if name not in metrics:
            raise ConfigError(f"metric_for_best {name!r} is not among the evaluation metrics "
                              f"({', '.join(metrics)})", field="metric_for_best")
        value = metrics[name]
        improved = self.best is None or (value > self.best["value"] if greater
                                         else value < self.best["value"])
        if improved:
            self.best = {"step": self.step, "metric": name, "value": value, "metrics": metrics}
            self.bad_evals = 0
            if cfg.keep_best:
                self._save_model(self.output_dir / "best")
        else:
            self.bad_evals += 1
        return bool(cfg.early_stopping_patience and self.bad_evals >= cfg.early_stopping_patience)

    # -- saving ---------------------------------------------------------------------------
    def _save_model(self, directory: Path) -> Path:
        """Save the trained delta(s) (DeltaModel) or trainable tensors (plain module)."""
        model = unwrap(self.model)
        # Under FSDP every rank holds a shard of each tensor: gather them (a collective,
        # so every rank enters) before the main process writes.
        with full_parameters(self.model):
            self._write_model(model, directory)
        self.accelerator.wait_for_everyone()
        return directory

    def _write_model(self, model: torch.nn.Module, directory: Path) -> None:
        from deltatune.core import io
        from deltatune.core.model import DeltaModel

        if self.accelerator.is_main_process:
            if isinstance(model, DeltaModel):
                trained = [n for n in model.active if model.get_delta(n).trainable] or \
                    model.active
                if len(trained) == 1:
                    model.save_delta(directory, trained[0])
                else:
                    for n in trained:
                        model.save_delta(directory / n, n)
            else:
                with io.atomic_directory(directory) as tmp:
                    io.save_tensors(tmp / ckpt.TRAINABLE_FILE,
                                    {n: p.detach() for n, p in self._trainable()})

    def _state(self) -> dict[str, Any]:
        scaler = getattr(self.accelerator, "scaler", None)
        return {
            "step": self.step, "micro": self.micro, "total_steps": self.total_steps,
            "window_loss": self.window_loss, "config": self.config.to_dict(),
            "world_size": self.world, "data": {"examples": len(self.train_examples),
                                               "sha256": self._data_fingerprint},
            "param_names": self.param_names, "group_names": self.group_names,
            "history": self.history, "evals": self.evals, "best": self.best,
            "bad_evals": self.bad_evals, "skipped_steps": self.skipped_steps,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "task": self.task.describe(),
        }

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the current position atomically; return its directory."""
        acc = self.accelerator
        path = self.output_dir / ckpt.CHECKPOINTS / ckpt.checkpoint_name(self.step, self.micro)
        fsdp = acc.distributed_type == "FSDP"
        if fsdp and acc.is_main_process and not getattr(self, "_warned_fsdp_ckpt", False):
            # the optimizer state (and mid-window gradients) live in per-rank shards;
            # the checkpoint keeps the whole delta and the position, not the moments
            logger.warning("under FSDP checkpoints hold the gathered delta and the position "
                           "but not the optimizer state or partial gradients")
            self._warned_fsdp_ckpt = True
        with full_parameters(self.model):  # every rank enters: gathering is collective
            if acc.is_main_process:
                trainable = self._trainable()
                data = ckpt.CheckpointData(
                    state=self._state(),
                    trainable={n: p.detach() for n, p in trainable},
                    grads=({n: p.grad.detach() if p.grad is not None else torch.zeros_like(p)
                            for n, p in trainable} if self.micro and not fsdp else None),
                    optimizer=None if fsdp else self.optimizer.state_dict(),
                    rng=ckpt.rng_state(),
                    callbacks=[cb.state_dict() for cb in self.method_callbacks])
                ckpt.write_checkpoint(path, data)
                # Complete from here on (a second signal during pruning must name this one).
                self.last_checkpoint = path
                ckpt.prune(self.output_dir, self.config.keep_checkpoints, protect=path)
                self._write_log()
        acc.wait_for_everyone()
        self.last_checkpoint = path
        return path

    def load_checkpoint(self, path: str | os.PathLike[str]) -> list[str]:
        """Restore the full training state from checkpoint ``path``; return notes.

        Raises :class:`ResumeError` when the checkpoint's settings that shape training,
        its data, its process count or its parameter names differ from this run's.
        """
        path = Path(path)
        if self.accelerator.distributed_type == "FSDP":
            raise ConfigError(f"resuming {path} under FSDP is not supported (parameters and "
                              f"optimizer state are sharded across ranks): resume it with DDP "
                              f"or one process; the checkpoint holds the whole delta",
                              field="resume")
        partial = self.config.allow_partial_resume
        data = ckpt.read_checkpoint(path, partial=partial)
        st = data.state
        notes = [f"{path.name} has no {part} state: {why}; the run will not match an "
                 f"uninterrupted one" for part, why in (
                     ("optimizer", "AdamW moments start from zero"),
                     ("rng", "random generators keep their current state"),
                     ("callbacks", "method callbacks start fresh"))
                 if getattr(data, part) is None]
        for note in notes:
            logger.warning(note)
        now = self.config.to_dict()
        # A field newer than the checkpoint was, at the time, at its default value.
        then = {**TrainConfig().to_dict(), **st["config"]}
        changed = [f"{k}: checkpoint {then.get(k)!r}, now {now[k]!r}"
                   for k in TRAJECTORY_FIELDS if then.get(k) != now[k]]
        if changed:
            raise ckpt.ResumeError(f"cannot resume from {path}: settings that shape training "
                                   f"changed ({'; '.join(changed)}). Use the original settings "
                                   f"or start a new output_dir")
        if st["data"] != {"examples": len(self.train_examples),
                          "sha256": self._data_fingerprint}:
            raise ckpt.ResumeError(f"cannot resume from {path}: the training data differs from "
                                   f"the data it was trained on ({st['data']['examples']} "
                                   f"examples then, {len(self.train_examples)} now, or changed "
                                   f"contents)")
        if st["world_size"] != self.world:
            raise ckpt.ResumeError(f"cannot resume from {path}: it was written by "
                                   f"{st['world_size']} process(es), this run has {self.world}; "
                                   f"the global batch and data order would change")
        if st["param_names"] != self.param_names or sorted(data.trainable) != \
                sorted(self.param_names):
            missing = sorted(set(self.param_names) - set(data.trainable))
            extra = sorted(set(data.trainable) - set(self.param_names))
            raise ckpt.ResumeError(f"cannot resume from {path}: trainable parameters differ "
                                   f"(missing from the checkpoint: {missing[:5]}; not trainable "
                                   f"here: {extra[:5]}). Attach the same delta config")
        with torch.no_grad():
            for name, p in self._trainable():
                p.copy_(data.trainable[name].to(p.device, p.dtype))
                p.grad = None
                if data.grads is not None:
                    p.grad = data.grads[name].to(p.device, p.dtype).clone()
        if data.optimizer is not None:
            self.optimizer.load_state_dict(_fix_optimizer_state(data.optimizer))
        if data.callbacks is not None and len(data.callbacks) != len(self.method_callbacks):
            raise ckpt.ResumeError(f"cannot resume from {path}: it holds {len(data.callbacks)} "
                                   f"method callback state(s), the model has "
                                   f"{len(self.method_callbacks)}")
        for cb, state in zip(self.method_callbacks, data.callbacks or []):
            cb.load_state_dict(state)
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        if data.rng is not None:
            ckpt.set_rng_state(data.rng)
        self.step, self.micro = int(st["step"]), int(st["micro"])
        self.window_loss = float(st["window_loss"])
        self.history, self.evals = list(st["history"]), list(st["evals"])
        self.best, self.bad_evals = st["best"], int(st["bad_evals"])
        self.skipped_steps = int(st["skipped_steps"])
        self.last_checkpoint = path
        return [f"resumed from {path} (step {self.step}, micro-batch {self.micro})", *notes]

    def _write_log(self) -> None:
        from deltatune.core import io

        lines = [json.dumps(r, sort_keys=True) for r in self.history]
        lines += [json.dumps({"eval": e}, sort_keys=True) for e in self.evals]
        self.output_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.output_dir / f".{LOG_FILE}.tmp-{os.getpid()}"
        io.write_bytes_durably(tmp, ("\n".join(lines) + "\n").encode())
        os.replace(tmp, self.output_dir / LOG_FILE)

    def _finish(self, reason: str, seconds: float, resumed_from: Path | None,
                notes: list[str]) -> TrainResult:
        final_eval = None
        if self.eval_examples is not None:
            if self.evals and self.evals[-1]["step"] == self.step:
                final_eval = {k: v for k, v in self.evals[-1].items() if k != "step"}
            elif reason != "stopped":
                final_eval = self.evaluate()
                self.evals.append({"step": self.step, **final_eval})
        if reason != "stopped" and (self.last_checkpoint is None or
                                    self.last_checkpoint.name !=
                                    ckpt.checkpoint_name(self.step, self.micro)):
            self.save_checkpoint()
        delta_dir = (self._save_model(self.output_dir / ADAPTER_DIR) if reason != "stopped"
                     else None)
        if self.accelerator.is_main_process:
            self._write_log()
        unwrap(self.model).eval()
        best_dir = self.output_dir / "best" if (self.best and self.config.keep_best) else None
        return TrainResult(steps=self.step, total_steps=self.total_steps, stop_reason=reason,
                           history=self.history, evals=self.evals, final_eval=final_eval,
                           best=self.best, delta_dir=delta_dir, best_dir=best_dir,
                           checkpoint=self.last_checkpoint, skipped_steps=self.skipped_steps,
                           seconds=seconds, resumed_from=resumed_from, notes=notes,
                           train_rows=len(self.train_examples), packed_from=self.packed_from)

    # -- signals ------------------------------------------------------------------------------
    def _install_signals(self) -> dict[int, Any] | None:
        if not self.config.handle_signals or threading.current_thread() is not \
                threading.main_thread():
            return None
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum: int, _frame: Any) -> None:
            if self._signal is not None:  # second signal: leave at once
                self._restore_signals(previous)
                # Whatever was being written is abandoned: saves are atomic, so the last
                # complete checkpoint (``last_checkpoint``) is untouched and resumable.
                raise TrainingInterrupted(signum, self.last_checkpoint, immediate=True)
            self._signal = signum
            self._stop = True
            logger.warning("%s received: finishing this micro-batch and writing a checkpoint "
                           "(send it again to quit at once)", signal.Signals(signum).name)

        for s in previous:
            signal.signal(s, handler)
        return previous

    @staticmethod
    def _restore_signals(previous: dict[int, Any] | None) -> None:
        if previous:
            for s, h in previous.items():
                signal.signal(s, h)


def _allow_new_precision(precision: str) -> None:
    """Let a second Trainer in one single-process program use another mixed precision.

    accelerate keeps one global state and refuses a different ``mixed_precision`` later;
    with one process nothing else depends on that state, so it is reset. Under a
    multi-process launch the state holds the process group and is left alone.
    """
    from accelerate.state import AcceleratorState, PartialState

    if not AcceleratorState._shared_state or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    current = AcceleratorState._shared_state.get("_mixed_precision")
    if current is not None and str(current) != precision:
        AcceleratorState._reset_state(True)
        PartialState._reset_state()


def _fix_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """JSON turned AdamW's betas tuple into a list; give it back its tuple."""
    for group in state.get("param_groups", []):
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return state


WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.",
                    "_orig_mod.")


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (an FSDP2 DTensor's local shard; any other tensor as is)."""
    return t.to_local() if hasattr(t, "to_local") else t


@contextlib.contextmanager
def full_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Inside the context, FSDP-sharded parameters of ``model`` are whole on every rank.

    FSDP1 (``use_orig_params``) shows each rank a flat 1-D slice of every parameter between
    steps, FSDP2 a DTensor shard; saving either as the delta would write one rank's piece.
    This gathers them (every rank must enter: it is a collective) and puts the shards back
    afterwards; changes made inside are not written back. A model without FSDP is left
    alone.
    """
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
    except ImportError:  # torch built without distributed
        yield
        return
    if isinstance(model, FSDP1) or any(isinstance(m, FSDP1) for m in model.modules()):
        with FSDP1.summon_full_params(model, writeback=False):
            yield
        return
    # FSDP2 (and any DTensor parameters): gather each one whole and register it in place of
    # the shard while the context lasts. Every rank walks the modules in the same order,
    # so the collectives match.
    swapped = []
    try:
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and hasattr(p, "full_tensor"):
                    full = torch.nn.Parameter(p.full_tensor().detach(),
                                              requires_grad=p.requires_grad)
                    module._parameters[name] = full
                    swapped.append((module, name, p))
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def _unwrapped_name(name: str) -> str:
    """``name`` without the path segments that FSDP, checkpoint wrappers and compile add."""
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def train(model: torch.nn.Module, task: Task, train_data: Sequence[Any],
          eval_data: Sequence[Any] | None = None, config: TrainConfig | None = None, *,
          resume: str | os.PathLike[str] | None = None,
          callbacks: Sequence[TrainerCallback] = (), **settings: Any) -> TrainResult:
    """Train ``model`` on ``task``; ``settings`` override fields of ``config``.

    Returns the :class:`TrainResult`. See :class:`Trainer` and :class:`TrainConfig`.
    """
    config = config or TrainConfig()
    if settings:
        config = config.replace(**settings)
    return Trainer(model, task, train_data, eval_data, config, callbacks=callbacks).fit(
        resume=resume)


__all__ = ["Encoded", "TrainResult", "Trainer", "TrainerCallback", "TrainingInterrupted",
           "TrainingOutOfMemory", "lr_factor", "train"]
