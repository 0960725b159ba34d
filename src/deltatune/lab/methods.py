"""Which methods the lab knows, and how a lab method name becomes something to train.

A lab method is either a registered deltatune method (``lora``, ``bitfit``, ``full``...:
its config's defaults follow the paper, and a task head is added to ``modules_to_save``)
or ``icl``, few-shot prompting with no training. Each has a default learning rate chosen
for the lab's short budgets by a measured sweep (:data:`DEFAULT_LR`). A name that
deltatune does not know is an error listing the known names; a name the lab knows but
whose method is not installed in this build is an error saying so.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from deltatune.core.config import DeltaConfig
from deltatune.core.errors import ConfigError, UnknownMethodError

# Every method the lab's comparison expects (SPEC.md's table), in display order.
LAB_METHODS = ("full", "bitfit", "lora", "adalora", "ia3", "houlsby", "pfeiffer", "parallel",
               "mam", "krona", "loha", "prompt", "prefix", "ptuning", "ptuning-v2", "icl")

# Default learning rates for AdamW (overridable per method), chosen for the lab's short
# budgets (40-60 optimizer steps on the default sizes), not the papers' thousands of steps:
# measured by an lr sweep on `sentiment` (MiniLM-L6, 40 steps x 16, one seed; docs/lab.md,
# "Learning rates"). The papers' rates (LoRA 5e-4..1e-3, BitFit 1e-3, adapters 1e-3, IA3
# 3e-3) left every PEFT method at or near the majority class in 40 steps. The choice is the
# best rate of the grid, or the middle of a plateau when its neighbours were as good.
# Parallel adapters (m = 512, scale 4) need a rate 30x below the sequential ones: their
# scaled output moves the FFN much more per step. Where no rate of the grid left the
# majority class in 40 steps (prompt, P-tuning) the default is the rate that did at 200
# steps. Prefix tuning and MAM left it at no rate and no budget tried: prefix keeps its
# earlier 1e-3, MAM takes 3e-4, the range where its parallel adapter learns.
# Full fine-tuning keeps the BERT recipe's 1e-4.
DEFAULT_LR: dict[str, float] = {
    "full": 1e-4, "bitfit": 5e-3, "lora": 5e-3, "adalora": 1e-2, "ia3": 1e-2,
    "houlsby": 3e-3, "pfeiffer": 3e-3, "parallel": 1e-4, "mam": 3e-4, "krona": 1e-2,
    "loha": 1e-2, "prompt": 3e-1, "prefix": 1e-3, "ptuning": 1e-2, "ptuning-v2": 1e-2,
    "kronab": 1e-2, "unified": 1e-3,
}
FALLBACK_LR = 1e-3
ICL = "icl"
# The untrained hand-written prompt (P-tuning's baseline): ICL with no demonstrations.
MANUAL = "manual"
# Lab spellings of registered method names (the SPEC's and the papers' short names).
ALIASES = {"parallel": "parallel_adapter", "ptuning-v2": "ptuning_v2", "p-tuning-v2": "ptuning_v2",
           "p-tuning": "ptuning", "prompt-tuning": "prompt", "prefix-tuning": "prefix"}


def resolve(method: str) -> str:
    """Return the registry name of a lab method name (``parallel`` -> ``parallel_adapter``)."""
    return ALIASES.get(method, method)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One row of a comparison: a label, the method, config overrides and a learning rate."""

    label: str
    method: str
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    lr: float | None = None
    shots: int = 4  # only for icl

    @property
    def trains(self) -> bool:
        """False for ICL, which only prompts the untuned model."""
        return self.method != ICL

    def learning_rate(self) -> float:
        """The learning rate this run uses (explicit, else the method's default)."""
        if self.lr is not None:
            return self.lr
        return DEFAULT_LR.get(self.method, DEFAULT_LR.get(resolve(self.method), FALLBACK_LR))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (goes into results.json and the resume fingerprint)."""
        out = {"label": self.label, "method": self.method, "overrides": self.overrides,
               "lr": self.learning_rate()}
        if not self.trains:
            out = {"label": self.label, "method": self.method, "shots": self.shots}
        return out


def registered() -> list[str]:
    """Names of the methods this deltatune build has registered."""
    from deltatune.core.registry import known_methods

    return known_methods()


def check_available(method: str) -> None:
    """Raise a clear error unless ``method`` can run in this build."""
    if method in (ICL, MANUAL):
        return
    names = registered()
    if resolve(method) in names:
        return
    if method in LAB_METHODS or method in ALIASES:
        raise UnknownMethodError(
            f"method {method!r} is part of the lab's comparison but is not available in this "
            f"deltatune build yet (registered: {', '.join(names)}); leave it out of --methods",
            field="methods")
    close = difflib.get_close_matches(method, [*names, ICL, MANUAL, *LAB_METHODS], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownMethodError(f"unknown method {method!r}.{hint} Known: "
                             f"{', '.join(sorted(set(names) | {ICL, MANUAL}))}", field="methods")


def parse_methods(text: str | list[str]) -> list[RunSpec]:
    """Turn ``"full,bitfit,lora"`` (or a list) into run specs, checking each is available.

    Every unavailable name is reported at once, so one error lists all fixes.
    """
    items = [m.strip() for m in (text.split(",") if isinstance(text, str) else text)]
    items = [m for m in items if m]
    if not items:
        raise ConfigError("no methods given; e.g. --methods full,bitfit,lora", field="methods")
    if len(set(items)) != len(items):
        raise ConfigError(f"a method is listed twice in {items}", field="methods")
    problems = []
    for m in items:
        try:
            check_available(m)
        except UnknownMethodError as exc:
            problems.append(str(exc))
    if problems:
        raise UnknownMethodError("; ".join(problems), field="methods")
    return [RunSpec(label=m, method=ICL, shots=0) if m == MANUAL else RunSpec(label=m, method=m)
            for m in items]


def with_task_defaults(spec: RunSpec, defaults: dict[str, dict[str, Any]]) -> RunSpec:
    """Return ``spec`` with the task's config defaults for its method under its overrides."""
    base = defaults.get(resolve(spec.method), defaults.get(spec.method, {}))
    if not spec.trains or not base:
        return spec
    return dataclasses.replace(spec, overrides={**base, **spec.overrides})


def build_config(spec: RunSpec, head_modules: tuple[str, ...]) -> DeltaConfig:
    """Return the validated config of ``spec``'s method with its overrides applied.

    The task's new head (``head_modules``) is trained alongside the delta through
    ``modules_to_save``, except for methods that train whole modules already and say so
    by not having that field.
    """
    from deltatune.core.registry import config_class

    check_available(spec.method)
    method = resolve(spec.method)
    cls = config_class(method)
    data: dict[str, Any] = dict(spec.overrides)
    fields = {f.name for f in dataclasses.fields(cls)}
    if head_modules and "modules_to_save" in fields and "modules_to_save" not in data \
            and method != "full":
        data["modules_to_save"] = list(head_modules)
    return cls.from_dict({"method": method, **data})
