"""The papers' ablations as sweep specs: named lists of variants run through :func:`compare`.

Each :class:`Sweep` names the claim it tests (SPEC.md, "The lab"), the task it runs on by
default, the methods it needs, and a function that builds its variants (as
:class:`RunSpec` s) from the loaded model, so "equal budget" variants can size their rank
from the model's real matrix shapes. :func:`run_sweep` runs them, writes the usual
comparison files and ``sweep.png`` (the metric per variant), plus sweep-specific
outputs such as AdaLoRA's final-rank heatmap.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from deltatune.core.blocks import layout_for
from deltatune.core.errors import ConfigError, UnknownMethodError
from deltatune.lab.methods import ICL, RunSpec, registered, resolve
from deltatune.lab.runner import CompareResult, compare, pick_device, sized
from deltatune.lab.tasks import LabTask, Loaded, TaskSize, get_task


@dataclasses.dataclass(frozen=True)
class Sweep:
    """One ablation: the claim, default task, methods needed, and how to build variants."""

    name: str
    claim: str
    task: str
    methods: tuple[str, ...]
    variants: Callable[[Loaded, TaskSize], list[RunSpec]]
    # numeric x value per label for a line plot (e.g. rank, prompt length); else bars
    x_values: Callable[[list[RunSpec]], dict[str, float]] | None = None
    x_label: str = ""
    inspect: Callable[[Any, dict[str, Any]], None] | None = None
    after: Callable[[CompareResult, Path], list[Path]] | None = None


# -- sizing helpers -----------------------------------------------------------------------
def linear_shapes(model: nn.Module, suffixes: Sequence[str]) -> list[tuple[int, int]]:
    """Return (d_in, d_out) of every linear layer whose name ends with one of ``suffixes``."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(name == s or name.endswith("." + s)
                                                 for s in suffixes):
            out.append((module.in_features, module.out_features))
    return out


def lora_parameters(model: nn.Module, suffixes: Sequence[str], r: int) -> int:
    """LoRA's parameter count on those linears: r (d_in + d_out) each (A and B)."""
    return sum(r * (i + o) for i, o in linear_shapes(model, suffixes))


def rank_for_budget(model: nn.Module, suffixes: Sequence[str], budget: int) -> int:
    """The rank whose LoRA parameter count on ``suffixes`` is closest to ``budget``."""
    per_rank = lora_parameters(model, suffixes, 1)
    if per_rank == 0:
        raise ConfigError(f"no linear layer ends with {list(suffixes)}", field="target_modules")
    return max(1, round(budget / per_rank))


def _numeric(key: str, *, unless: str | None = None
             ) -> Callable[[list[RunSpec]], dict[str, float]]:
    """x value per label from override ``key``; variants setting ``unless`` are left off the
    line (drawn as reference lines instead, e.g. prefix-length's embedding-only and infix)."""
    def x(specs: list[RunSpec]) -> dict[str, float]:
        return {s.label: float(s.overrides[key]) for s in specs
                if key in s.overrides and (unless is None or unless not in s.overrides)}
    return x


# -- the sweeps ---------------------------------------------------------------------------
def _lora_rank(loaded: Loaded, size: TaskSize) -> list[RunSpec]:
    # alpha = r keeps the scale alpha / r at 1, so only the rank changes
    return [RunSpec(f"lora-r{r}", "lora", {"r": r, "lora_alpha": float(r)})
            for r in (1, 2, 4, 8, 16, 64)]


def _lora_targets(loaded: Loaded, size: TaskSize) -> list[RunSpec]:
    """W_q,W_v at r=8 against other target sets at the same parameter budget (LoRA Table 5)."""
    model = loaded.model
    lay = layout_for(model, what="the LoRA target sweep")
    q, k, v, o = lay.query[0], lay.key[0], lay.value[0], lay.attn_out[0]
    budget = lora_parameters(model, [q, v], 8)
    sets = {"Wq": [q], "Wk": [k], "Wv": [v], "Wo": [o], "Wq+Wk": [q, k], "Wq+Wv": [q, v],
            "Wq+Wk+Wv+Wo": [q, k, v, o]}
    out = []
    for label, targets in sets.items():
        r = 8 if label == "Wq+Wv" else rank_for_budget(model, targets, budget)
        out.append(RunSpec(f"{label}-r{r}", "lora",
                           {"r": r, "lora_alpha": float(r), "target_modules": targets}))
    return out


def _prefix_length(loaded: Loaded, size: TaskSize) -> list[RunSpec]:
    out = [RunSpec(f"prefix-{n}", "prefix", {"prefix_length": n}) for n in (1, 5, 10, 20, 50)]
    out.append(RunSpec("embedding-only-10", "prefix", {"prefix_length": 10,
                                                       "mode": "embedding"}))
    out.append(RunSpec("infix-10", "prefix", {"prefix_length": 10, "mode": "infix"}))
    return out


def _prompt_length_init(loaded: Loaded, size: TaskSize) -> list[RunSpec]:
    out = [RunSpec(f"prompt-{n}-random", "prompt", {"prompt_length": n, "init": "random"})
           for n in (1, 5, 20, 50)]
    out.append(RunSpec("prompt-20-vocab", "prompt", {"prompt_length": 20, "init": "vocab"}))
    names = getattr(loaded.task, "label_names", ())
    if loaded.tokenizer is not None and names:
        ids = [loaded.tokenizer(n, add_special_tokens=False)["input_ids"] for n in names]
        out.append(RunSpec("prompt-20-labels", "prompt",
                           {"prompt_length": 20, "init": "labels", "label_token_ids": ids}))
    return out


def _krona_init(loaded: Loaded, size: TaskSize) -> list[RunSpec]:
    return [RunSpec("krona-zero-one-factor", "krona", {"init": "zero"}),
            RunSpec("krona-gaussian-both", "krona", {"init": "gaussian"})]


def _unified(loaded: Loaded, size: TaskSize) -> list[RunSpec]:
    """One unified-view choice changed at a time, same bottleneck m (so equal budget)."""
    m = 64
    common = {"functional_form": "bottleneck", "composition": "scale", "scaling": 4.0,
              "bottleneck_size": m}
    return [
        RunSpec("sequential-ffn", "unified", {**common, "insertion": "sequential",
                                              "modified_representation": ["ffn"]}),
        RunSpec("parallel-ffn", "unified", {**common, "insertion": "parallel",
                                            "modified_representation": ["ffn"]}),
        RunSpec("parallel-attn", "unified", {**common, "insertion": "parallel",
                                             "modified_representation": ["attention"]}),
        RunSpec("mam", "mam"),
        RunSpec("full", "full"),
    ]


def _adalora(loaded: Loaded, size: TaskSize) -> list[RunSpec]:
    lay = layout_for(loaded.model, what="the AdaLoRA sweep")
    targets = [*lay.query, *lay.key, *lay.value, *lay.attn_out, *lay.ffn_up, *lay.ffn_down]
    # the paper's schedule in proportion: warm-up 10% of the steps, budget fixed for the
    # last 20%; the average rank falls from 12 to 4 so the allocation is visible
    return [RunSpec("adalora", "adalora", {
        "target_modules": targets, "init_r": 12, "target_r": 4,
        "tinit": max(1, size.steps // 10), "tfinal": max(1, size.steps // 5),
        "deltaT": 1})]


def _icl_vs_peft(loaded: Loaded, size: TaskSize) -> list[RunSpec]:
    return [RunSpec("icl-0shot", ICL, shots=0), RunSpec("icl-4shot", ICL, shots=4),
            RunSpec("icl-16shot", ICL, shots=16), RunSpec("lora", "lora"),
            RunSpec("ia3", "ia3")]


def _record_adalora_ranks(dm: Any, record: dict[str, Any]) -> None:
    """Store the rank each AdaLoRA matrix kept (its non-zero singular values)."""
    from deltatune.methods.adalora import saved_ranks

    record["adalora_final_ranks"] = saved_ranks(dm.delta_state_dict("lab"))


def _adalora_heatmap(result: CompareResult, directory: Path) -> list[Path]:
    """Plot the first finished run's final ranks as a layer x matrix heatmap."""
    from deltatune.plotting.rank_heatmap import format_rank_table, plot_rank_heatmap

    rec = next((r for r in result.runs.values() if r.get("adalora_final_ranks")), None)
    if rec is None:
        return []
    ranks = rec["adalora_final_ranks"]
    (directory / "adalora_ranks.txt").write_text(format_rank_table(ranks) + "\n",
                                                 encoding="utf-8")
    return [plot_rank_heatmap(ranks, directory / "adalora_ranks.png",
                              title=f"AdaLoRA final ranks (seed {rec['seed']})"),
            directory / "adalora_ranks.txt"]


SWEEPS: dict[str, Sweep] = {s.name: s for s in [
    Sweep("lora-rank", "LoRA with small r (8) already approaches its best; quality vs rank",
          "sentiment", ("lora",), _lora_rank, _numeric("r"), "LoRA rank r"),
    Sweep("lora-targets", "spreading rank over W_q and W_v beats one matrix at higher rank "
          "(equal parameter budget)", "sentiment", ("lora",), _lora_targets),
    Sweep("prefix-length", "prefix length: quality rises then plateaus; embedding-only < full "
          "prefix; prefixing > infixing", "definitions", ("prefix", "prompt", "ptuning"),
          _prefix_length, _numeric("prefix_length", unless="mode"), "prefix length"),
    Sweep("prompt-length-init", "longer prompts help; init random < sampled vocabulary < label "
          "strings", "sentiment", ("prompt",), _prompt_length_init),
    Sweep("krona-init", "KronA: zero-initialising one factor beats Gaussian-initialising both",
          "sentiment", ("krona",), _krona_init),
    Sweep("unified", "parallel beats sequential; FFN beats attention at equal budget; MAM "
          "approaches full fine-tuning", "sentiment", ("pfeiffer", "parallel", "mam", "full"),
          _unified),
    Sweep("adalora-ranks", "AdaLoRA gives more rank to FFN matrices and top layers",
          "sentiment", ("adalora",), _adalora, inspect=_record_adalora_ranks,
          after=_adalora_heatmap),
    Sweep("icl-vs-peft", "PEFT beats in-context learning in quality and inference cost (T-Few)",
          "definitions", ("lora", "ia3"), _icl_vs_peft),
]}


def get_sweep(name: str) -> Sweep:
    """Return the sweep called ``name``."""
    try:
        return SWEEPS[name]
    except KeyError:
        raise ConfigError(f"unknown sweep {name!r}; sweeps: {', '.join(SWEEPS)}",
                          field="sweep") from None


def missing_methods(sweep: Sweep) -> list[str]:
    """Methods the sweep needs that this deltatune build has not registered."""
    have = set(registered())
    return [m for m in sweep.methods if resolve(m) not in have]


def plot_sweep(result: CompareResult, sweep: Sweep, path: Path) -> Path:
    """Write the metric per variant: a line over x when the sweep has one, else bars."""
    from deltatune.lab.plots import _pyplot

    plt = _pyplot()
    rows = [r for r in result.summary if r.get("metric_mean") is not None]
    xs = sweep.x_values([RunSpec(**{k: v for k, v in rec["spec"].items()
                                    if k in ("label", "method", "overrides", "shots")})
                         for rec in result.runs.values()]) if sweep.x_values else {}
    fig, ax = plt.subplots(figsize=(7, 4))
    metric = next((r["metric"] for r in rows), "metric")
    numeric = [r for r in rows if r["label"] in xs]
    if numeric:
        numeric.sort(key=lambda r: xs[r["label"]])
        ax.errorbar([xs[r["label"]] for r in numeric], [r["metric_mean"] for r in numeric],
                    yerr=[[r["metric_mean"] - r["metric_min"] for r in numeric],
                          [r["metric_max"] - r["metric_mean"] for r in numeric]],
                    marker="o", capsize=3)
        ax.set_xscale("log")
        ax.set_xlabel(sweep.x_label)
        for r in rows:
            if r["label"] not in xs:
                ax.axhline(r["metric_mean"], linestyle="--", linewidth=1, color="grey")
                ax.annotate(r["label"], (0.01, r["metric_mean"]),
                            xycoords=("axes fraction", "data"), fontsize=8)
    else:
        ax.bar(range(len(rows)), [r["metric_mean"] for r in rows],
               yerr=[[r["metric_mean"] - r["metric_min"] for r in rows],
                     [r["metric_max"] - r["metric_mean"] for r in rows]], capsize=3)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r["label"] for r in rows], rotation=30, ha="right", fontsize=8)
        lo = min(r["metric_min"] for r in rows) if rows else 0.0
        ax.set_ylim(bottom=max(0.0, lo - 0.05))
    ax.set_ylabel(f"{metric} (mean; bar: min..max over seeds)")
    ax.set_title(f"sweep {sweep.name}")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_sweep(name: str, *, task: str | LabTask | None = None, seeds: Sequence[int] = (0,),
              out: str | Path | None = None, size: str = "default", device: str | None = None,
              only: Sequence[str] | None = None, progress: bool = True,
              lr: dict[str, float] | None = None, steps: int | None = None,
              model: str | None = None,
              echo: Callable[[str], None] | None = print) -> CompareResult:
    """Run the sweep ``name``; return the comparison result (files include sweep.png).

    Raises :class:`UnknownMethodError` naming the methods this build lacks, before any
    training. ``only`` keeps the variants whose label is listed; ``lr`` sets learning
    rates by variant label or method name (``{"lora": 5e-3}`` for every LoRA variant);
    ``steps`` replaces the size's number of optimizer steps (variants sized by the
    budget, such as AdaLoRA's schedule, follow it); ``model`` swaps the task's model.
    """
    sweep = get_sweep(name)
    missing = missing_methods(sweep)
    if missing:
        raise UnknownMethodError(f"sweep {name!r} needs method(s) {', '.join(missing)}, which "
                                 f"this deltatune build does not have yet", field="sweep")
    lab_task = get_task(task or sweep.task, model) if not isinstance(task, LabTask) else task
    task_size = sized(lab_task, size, steps)
    loaded = lab_task.load(pick_device("cpu"))
    loaded.task = lab_task
    specs = sweep.variants(loaded, task_size)
    del loaded
    have = set(registered())
    not_run = [s.label for s in specs if s.method != ICL and resolve(s.method) not in have]
    specs = [s for s in specs if s.label not in not_run]
    if not_run and echo:
        echo(f"variants left out (their method is not in this build): {', '.join(not_run)}")
    if only:
        specs = [s for s in specs if s.label in set(only)]
        if not specs:
            raise ConfigError(f"--only matched no variant of {name!r}", field="only")
    directory = Path(out or f"lab-runs/sweep-{name}")
    result = compare(lab_task, specs, seeds=seeds, out=directory, size=size, device=device,
                     lr=lr, steps=steps, progress=progress, inspect=sweep.inspect, echo=echo)
    result.files.append(plot_sweep(result, sweep, directory / "sweep.png"))
    if sweep.after is not None:
        result.files.extend(sweep.after(result, directory))
    (directory / "sweep.json").write_text(json.dumps(
        {"sweep": name, "claim": sweep.claim, "task": lab_task.name,
         "variants": [s.to_dict() for s in specs], "not_run": not_run}, indent=2) + "\n",
        encoding="utf-8")
    return result
