"""Run a comparison: every (method, seed) trained and measured once, resumably.

    from deltatune.lab import compare
    result = compare("sentiment", ["full", "bitfit", "lora"], seeds=[0, 1], out="runs/cmp")
    print(result.table)

For each run: seed everything, load a fresh pretrained model, attach the method's delta,
train through :func:`deltatune.lab.training.train` while tracking peak memory, evaluate,
save the delta (its size on disk is the checkpoint size), time inference unmerged and
merged. The record goes into results.json before the next run starts; a run whose
record is there with the same spec is not trained again.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import random
import shutil
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from deltatune.core.errors import ConfigError, DeltaTuneError
from deltatune.lab import measure, plots
from deltatune.lab.methods import (
    RunSpec,
    build_config,
    check_available,
    parse_methods,
    with_task_defaults,
)
from deltatune.lab.results import (
    ResultStore,
    fingerprint,
    format_table,
    run_key,
    summarize,
    write_csvs,
)
from deltatune.lab.tasks import LabTask, Loaded, TaskSize, get_task
from deltatune.lab.training import train

logger = logging.getLogger("deltatune.lab")
# Recorded in each run's fingerprint: results of another training loop are not reused.
TRAINER = "deltatune.train.Trainer"


@dataclasses.dataclass
class CompareResult:
    """What :func:`compare` produced: the records, the summary, the table and file paths."""

    directory: Path
    runs: dict[str, dict[str, Any]]
    summary: list[dict[str, Any]]
    table: str
    files: list[Path]
    skipped: list[str]  # runs found finished in results.json and not trained again


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's generators (model init of new heads, dropout, deltas)."""
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def pick_device(device: str | None) -> torch.device:
    """Return ``device``, or CUDA when available, else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_once(task: LabTask, spec: RunSpec, seed: int, size: TaskSize, device: torch.device,
             workdir: Path, *, progress: bool = False,
             inspect: Callable[[Any, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train and measure one (method, seed); return its record (``status`` ``done``).

    ``inspect(dm, record)``, when given, sees the trained model before it is freed (the
    AdaLoRA sweep reads its final ranks there). ``workdir`` receives the saved delta.
    """
    from deltatune.core.model import DeltaModel

    seed_everything(seed)
    loaded = task.load(device)
    record: dict[str, Any] = {"seed": seed, "metric_name": task.metric}
    if not spec.trains:
        return _run_icl(task, spec, seed, size, loaded, record)
    config = build_config(spec, task.head_modules)
    dm = DeltaModel(loaded.model)
    seed_everything(seed)  # the delta's init depends on the seed only, not on loading
    dm.add("lab", config)
    loaded.infix = getattr(config, "mode", None) == "infix"
    record.update(measure.parameter_counts(dm))
    record["config"] = config.to_dict()
    batches = task.train_batches(loaded, size, seed)
    train_dir = workdir / "train"
    if train_dir.exists():  # a run interrupted earlier: start it afresh
        shutil.rmtree(train_dir)
    with measure.track_peak_memory(device) as mem:
        stats = train(dm, batches, lr=spec.learning_rate(), workdir=train_dir, seed=seed,
                      progress=progress)
    record.update({"peak_memory_mb": mem.peak_mb, "memory_kind": mem.kind,
                   "train_steps": stats.steps, "train_tokens": stats.tokens,
                   "train_seconds": stats.seconds,
                   "train_tokens_per_s": stats.tokens_per_second,
                   "loss_first": stats.losses[0], "loss_last": stats.losses[-1]})
    record["metrics"] = task.evaluate(dm, loaded, size)
    # the trainer saved the delta; its files are the checkpoint a user would keep
    ckpt = stats.delta_dir if stats.delta_dir is not None else train_dir / "delta"
    if not ckpt.is_dir():
        dm.save_delta(ckpt)
    record["checkpoint_bytes"] = measure.directory_size(ckpt)
    record["checkpoint_dir"] = str(ckpt)
    batch = task.latency_batch(loaded, size)
    record["mergeable"] = bool(dm.get_delta("lab").method.mergeable)
    record.update(measure.inference_latencies(
        dm, lambda m: m(**batch), mergeable=record["mergeable"],
        repeats=size.latency_repeats, device=device))
    if inspect is not None:
        inspect(dm, record)
    record["status"] = "done"
    return record


def _run_icl(task: LabTask, spec: RunSpec, seed: int, size: TaskSize, loaded: Loaded,
             record: dict[str, Any]) -> dict[str, Any]:
    """ICL: no training, no checkpoint; latency is the forward pass over the long prompts."""
    metrics, batch = task.evaluate_icl(loaded, size, spec.shots, seed)
    model = loaded.model
    record.update({"trainable_parameters": 0, "delta_parameters": 0, "trainable_percent": 0.0,
                   "base_parameters": sum(p.numel() for p in model.parameters()),
                   "optimizer_state_mb": 0.0, "peak_memory_mb": None, "memory_kind": None,
                   "train_tokens_per_s": None, "checkpoint_bytes": 0, "mergeable": False,
                   "metrics": metrics, "prompt_tokens": int(batch["attention_mask"].sum())})
    latency = measure.median_latency_ms(lambda: model(**batch), repeats=size.latency_repeats,
                                        device=loaded.device)
    record.update({"latency_unmerged_ms": latency, "latency_merged_ms": None,
                   "latency_base_ms": latency})
    record["status"] = "done"
    return record


def sized(task: LabTask, size: str, steps: int | None = None) -> TaskSize:
    """Return ``task``'s size called ``size``, with ``steps`` optimizer steps when given."""
    task_size = task.size(size)
    if steps is None:
        return task_size
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}", field="steps")
    return dataclasses.replace(task_size, steps=steps)


def run_identity(task: LabTask, size: TaskSize, spec: RunSpec, seed: int,
                 device: torch.device) -> dict[str, Any]:
    """What makes a run the same run (hashed into its fingerprint for resuming).

    The model is named only when it is not the task's own default, so results made
    before models could be swapped keep their fingerprints.
    """
    identity = {"task": task.name, "size": dataclasses.asdict(size), "spec": spec.to_dict(),
                "seed": seed, "device": device.type, "trainer": TRAINER}
    if task.model_name != type(task).model_name:
        identity["model"] = task.model_name
    return identity


def compare(task: str | LabTask, methods: str | Sequence[str] | Sequence[RunSpec], *,
            seeds: Sequence[int] = (0,), out: str | Path = "lab-runs", size: str = "default",
            device: str | None = None, lr: dict[str, float] | None = None,
            steps: int | None = None, model: str | None = None,
            progress: bool = True, keep_going: bool = True, plots_too: bool = True,
            inspect: Callable[[Any, dict[str, Any]], None] | None = None,
            echo: Callable[[str], None] | None = print) -> CompareResult:
    """Train every method with every seed on ``task``; write results, CSVs, plots.

    ``methods``: names (``"full,bitfit,lora"``) or :class:`RunSpec` s (sweeps use those
    for variants). ``lr`` overrides the learning rate per label. ``steps``
    replaces the size's number of optimizer steps (a longer budget; part of each run's
    fingerprint). ``model`` swaps the task's model when ``task`` is a name (see
    :func:`~deltatune.lab.tasks.get_task`). A run already finished in ``out/results.json``
    with the same spec is
    skipped. With ``keep_going`` a failing run
    is recorded as failed (with the error) and the others still run.
    """
    lab_task = get_task(task, model) if isinstance(task, str) else task
    task_size = sized(lab_task, size, steps)
    if isinstance(methods, str) or (methods and isinstance(next(iter(methods)), str)):
        specs = parse_methods(list(methods) if not isinstance(methods, str) else methods)
    else:
        specs = list(methods)  # type: ignore[arg-type]
        for s in specs:
            check_available(s.method)
    specs = [with_task_defaults(s, lab_task.method_defaults) for s in specs]
    if lr:
        specs = [dataclasses.replace(s, lr=lr.get(s.label, lr.get(s.method, s.lr)))
                 for s in specs]
    if not seeds:
        raise DeltaTuneError("no seeds given")
    dev = pick_device(device)
    directory = Path(out)
    header = {"task": lab_task.name, "task_description": lab_task.description,
              "model": lab_task.model_name, "size": size, "size_spec":
              dataclasses.asdict(task_size), "device": str(dev), "torch": torch.__version__,
              "threads": torch.get_num_threads()}
    store = ResultStore(directory, header)
    skipped = []
    for spec in specs:
        for seed in seeds:
            key = run_key(spec.label, seed)
            fp = fingerprint(run_identity(lab_task, task_size, spec, seed, dev))
            if store.finished(key, fp):
                skipped.append(key)
                if echo:
                    echo(f"{key}: finished earlier, not trained again")
                continue
            workdir = directory / "runs" / spec.label / f"seed{seed}"
            workdir.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            try:
                record = run_once(lab_task, spec, seed, task_size, dev, workdir,
                                  progress=progress, inspect=inspect)
            except Exception as exc:  # recorded, so one bad method does not sink the rest
                if not keep_going:
                    raise
                logger.debug("run %s failed", key, exc_info=True)
                record = {"seed": seed, "status": "failed", "metric_name": lab_task.metric,
                          "error": f"{type(exc).__name__}: {exc}",
                          "traceback": traceback.format_exc(limit=6)}
            record.update({"spec": spec.to_dict(), "fingerprint": fp,
                           "wall_seconds": time.perf_counter() - started})
            store.put(key, record)
            gc.collect()
            if echo:
                metric = record.get("metrics", {}).get(lab_task.metric)
                echo(f"{key}: {record['status']}"
                     + (f", {lab_task.metric} {metric:.4f}" if metric is not None else "")
                     + (f" ({record['error']})" if record.get("error") else "")
                     + f" in {record['wall_seconds']:.0f} s")
    wanted = {run_key(s.label, seed) for s in specs for seed in seeds}
    runs = {k: v for k, v in store.runs.items() if k in wanted}
    summary = summarize(runs.values())
    title = f"{lab_task.name} ({lab_task.model_name}, size {size}" + (
        f", {task_size.steps} steps)" if steps is not None else ")")
    table = format_table(summary, title)
    files = list(write_csvs(directory, runs, summary))
    files.insert(0, store.path)
    if plots_too:
        files.extend(plots.write_plots(summary, directory, title))
    (directory / "table.txt").write_text(table + "\n", encoding="utf-8")
    files.append(directory / "table.txt")
    return CompareResult(directory, runs, summary, table, files, skipped)
