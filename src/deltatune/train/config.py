"""TrainConfig: every setting of a training run, validated, with a JSON/YAML round trip."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from deltatune.core.errors import ConfigError

SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("no", "fp16", "bf16")
NONFINITE_POLICIES = ("halt", "skip-step")

# Fields that shape the trajectory of the weights: a resume must not change them.
TRAJECTORY_FIELDS = (
    "epochs", "max_steps", "batch_size", "grad_accum", "lr", "weight_decay", "betas", "eps",
    "schedule", "warmup_steps", "warmup_ratio", "min_lr_ratio", "lr_ratios", "loraplus_ratio",
    "max_grad_norm", "seed", "mixed_precision", "nonfinite", "packing",
)


@dataclass
class TrainConfig:
    """Settings of one training run (see docs/training.md for each field's meaning).

    Steps are optimizer steps. One optimizer step consumes ``batch_size`` examples per
    process per micro-batch, times ``grad_accum`` micro-batches, times the number of
    processes. ``epochs`` sets the length unless ``max_steps`` is given.
    """

    output_dir: str = "runs/default"
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    # regex on parameter name -> learning-rate multiplier (first match wins)
    lr_ratios: dict[str, float] = field(default_factory=dict)
    # LoRA+ (Hayou et al. 2024): learning rate of every LoRA B matrix = lr * ratio
    loraplus_ratio: float | None = None
    max_grad_norm: float | None = 1.0
    seed: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    # Liger-Kernel's RMSNorm, RoPE and SwiGLU kernels during fit (integrations/liger.py)
    liger_kernel: bool = False
    # each decoder layer torch.compile'd in place during fit (train/compile.py)
    compile_layers: bool = False
    # causal LM: several examples per row, attention kept inside each (tasks/packing.py)
    packing: bool = False
    eval_every: int | None = None
    eval_batch_size: int | None = None
    save_every: int | None = None
    keep_checkpoints: int = 2
    log_every: int = 10
    metric_for_best: str | None = None
    greater_is_better: bool | None = None
    keep_best: bool = True
    early_stopping_patience: int | None = None
    nonfinite: str = "halt"
    max_skipped_steps: int = 10
    allow_partial_resume: bool = False
    handle_signals: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field and what it allows."""
        def positive(name: str, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive int, got {v!r}", field=name)

        for name in ("epochs", "batch_size", "grad_accum", "keep_checkpoints", "log_every",
                     "max_skipped_steps"):
            positive(name)
        for name in ("max_steps", "eval_every", "save_every", "eval_batch_size",
                     "early_stopping_patience"):
            positive(name, allow_none=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be an int >= 0, got {self.seed!r}", field="seed")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) \
                or self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}",
                              field="warmup_steps")
        for name, lo, hi in (("lr", 0.0, None), ("weight_decay", 0.0, None), ("eps", 0.0, None),
                             ("warmup_ratio", 0.0, 1.0), ("min_lr_ratio", 0.0, 1.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < lo or \
                    (hi is not None and v > hi) or v != v:
                rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
                raise ConfigError(f"{name} must be a number {rng}, got {v!r}", field=name)
        for name in ("packing", "gradient_checkpointing", "liger_kernel", "compile_layers"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}",
                                  field=name)
        if self.lr == 0:
            raise ConfigError("lr must be > 0", field="lr")
        betas = tuple(self.betas)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas!r}",
                              field="betas")
        self.betas = (float(betas[0]), float(betas[1]))
        for name, allowed in (("schedule", SCHEDULES), ("mixed_precision", PRECISIONS),
                              ("nonfinite", NONFINITE_POLICIES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got "
                                  f"{getattr(self, name)!r}", field=name)
        if self.max_grad_norm is not None and (
                not isinstance(self.max_grad_norm, (int, float)) or self.max_grad_norm <= 0):
            raise ConfigError(f"max_grad_norm must be > 0 or None (no clipping), got "
                              f"{self.max_grad_norm!r}", field="max_grad_norm")
        if self.loraplus_ratio is not None and (
                not isinstance(self.loraplus_ratio, (int, float)) or self.loraplus_ratio <= 0):
            raise ConfigError(f"loraplus_ratio must be > 0, got {self.loraplus_ratio!r}",
                              field="loraplus_ratio")
        if not isinstance(self.lr_ratios, dict):
            raise ConfigError("lr_ratios must map a parameter-name regex to a multiplier",
                              field="lr_ratios")
        for pattern, ratio in self.lr_ratios.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"lr_ratios pattern {pattern!r} is not a valid regex ({exc})",
                                  field="lr_ratios") from None
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio <= 0:
                raise ConfigError(f"lr_ratios[{pattern!r}] must be a number > 0, got {ratio!r}",
                                  field="lr_ratios")

    # -- round trip ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Return the settings as JSON/YAML-able values."""
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build a config from a dict; an unknown key is an error listing the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown training setting(s) {', '.join(map(repr, unknown))}; "
                              f"known: {', '.join(sorted(known))}", field=unknown[0])
        data = dict(data)
        if "betas" in data and isinstance(data["betas"], list):
            data["betas"] = tuple(data["betas"])
        return cls(**data)

    def replace(self, **changes: Any) -> TrainConfig:
        """Return a copy with ``changes`` applied (validated)."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})
