"""results.json (the record of every run), its summary over seeds, the CSV and the table.

``results.json`` holds one record per (label, seed) with its spec fingerprint; it is
rewritten atomically (temporary file + rename) after every run, so an interrupted
comparison loses at most the run in progress and a restart skips every finished one.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

from deltatune.core.errors import AdapterFileCorrupt

RESULTS_FILE = "results.json"
SUMMARY_CSV = "summary.csv"
RUNS_CSV = "runs.csv"
FORMAT = "deltatune.lab.results"
VERSION = 1

# Numbers averaged over seeds in the summary (the metric also gets its spread).
MEASURES = ("trainable_parameters", "trainable_percent", "delta_parameters",
            "peak_memory_mb", "optimizer_state_mb", "train_tokens_per_s", "train_seconds",
            "latency_unmerged_ms", "latency_merged_ms", "latency_base_ms",
            "checkpoint_bytes")


def fingerprint(data: dict[str, Any]) -> str:
    """Return a short stable hash of a JSON-able dict (what a run was asked to do)."""
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_key(label: str, seed: int) -> str:
    """The key of one run in results.json."""
    return f"{label}/seed{seed}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling and a rename (never half)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ResultStore:
    """The runs of one comparison directory, loaded from and saved to results.json."""

    def __init__(self, directory: str | Path, header: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.path = self.directory / RESULTS_FILE
        self.header = header
        self.runs: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise AdapterFileCorrupt(self.path, f"not valid JSON ({exc})",
                                         "delete it to start the comparison afresh") from None
            if data.get("format") != FORMAT:
                raise AdapterFileCorrupt(self.path, "not a deltatune lab results file",
                                         "use another --out directory")
            self.runs = dict(data.get("runs", {}))

    def finished(self, key: str, spec_fingerprint: str) -> dict[str, Any] | None:
        """Return the record of ``key`` if it finished with the same spec, else None."""
        rec = self.runs.get(key)
        if rec and rec.get("status") == "done" and rec.get("fingerprint") == spec_fingerprint:
            return rec
        return None

    def put(self, key: str, record: dict[str, Any]) -> None:
        """Store one run's record and rewrite results.json atomically."""
        self.runs[key] = record
        self.save()

    def save(self) -> None:
        """Write results.json (header, runs, summary) atomically."""
        self.directory.mkdir(parents=True, exist_ok=True)
        data = {"format": FORMAT, "version": VERSION, **self.header,
                "runs": self.runs, "summary": summarize(self.runs.values())}
        atomic_write_text(self.path, json.dumps(data, indent=2, sort_keys=True,
                                                default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    mean = statistics.fmean(vals)
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return mean, std


def summarize(records: Any) -> list[dict[str, Any]]:
    """Group finished runs by label; return one row per label with means over seeds.

    The task metric gets ``metric_mean``, ``metric_std`` (sample standard deviation,
    0 for one seed), ``metric_min`` and ``metric_max``; failed runs are counted.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    order: list[str] = []
    for rec in records:
        label = rec["spec"]["label"]
        if label not in groups:
            groups[label] = []
            order.append(label)
        groups[label].append(rec)
    rows = []
    for label in order:
        recs = groups[label]
        done = [r for r in recs if r.get("status") == "done"]
        row: dict[str, Any] = {"label": label, "method": recs[0]["spec"]["method"],
                               "seeds": sorted(r["seed"] for r in done),
                               "failed": len(recs) - len(done),
                               "metric": recs[0].get("metric_name")}
        metric = [r["metrics"].get(row["metric"]) for r in done if row["metric"]]
        mean, std = _mean_std(metric)
        row["metric_mean"], row["metric_std"] = mean, std
        vals = [v for v in metric if v is not None]
        row["metric_min"] = min(vals) if vals else None
        row["metric_max"] = max(vals) if vals else None
        for name in MEASURES:
            row[name] = _mean_std([r.get(name) for r in done])[0]
        row["memory_kind"] = done[0].get("memory_kind") if done else None
        row["mergeable"] = done[0].get("mergeable") if done else None
        if len(done) < len(recs):
            row["error"] = next(r.get("error") for r in recs if r.get("status") != "done")
        rows.append(row)
    return rows


def _fmt_count(n: float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


TABLE_COLUMNS = ("method", "trainable", "% of model", "metric", "peak mem MB",
                 "optim MB", "train tok/s", "lat unmerged ms", "lat merged ms", "ckpt")


def table_rows(summary: list[dict[str, Any]]) -> list[list[str]]:
    """Return the printed table's cells, one list per label (strings, already formatted)."""
    out = []
    for row in summary:
        if row["metric_mean"] is None:
            metric = "failed" if row["failed"] else "-"
        else:
            metric = f"{row['metric_mean']:.4f}"
            if len(row["seeds"]) > 1:
                metric += f" ± {row['metric_std']:.4f}"
        out.append([row["label"], _fmt_count(row["trainable_parameters"]),
                    _fmt(row["trainable_percent"], ".4f"), metric,
                    _fmt(row["peak_memory_mb"], ".0f"), _fmt(row["optimizer_state_mb"], ".1f"),
                    _fmt(row["train_tokens_per_s"], ".0f"),
                    _fmt(row["latency_unmerged_ms"], ".1f"),
                    _fmt(row["latency_merged_ms"], ".1f"),
                    _fmt_bytes(row["checkpoint_bytes"])])
    return out


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def format_table(summary: list[dict[str, Any]], title: str = "") -> str:
    """Return the comparison as a fixed-width text table (metric as mean ± std over seeds)."""
    rows = table_rows(summary)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(TABLE_COLUMNS)]
    lines = [title] if title else []
    lines.append("  ".join(h.ljust(w) for h, w in zip(TABLE_COLUMNS, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    kinds = {row.get("memory_kind") for row in summary if row.get("memory_kind")}
    if kinds:
        lines.append(f"peak mem: {', '.join(sorted(kinds))} above the loaded model; optim: "
                     f"trainable x (grad + 2 Adam moments)")
    for row in summary:
        if row.get("error"):
            lines.append(f"{row['label']} failed: {row['error']}")
    return "\n".join(lines)


def write_csvs(directory: Path, runs: dict[str, dict[str, Any]],
               summary: list[dict[str, Any]]) -> tuple[Path, Path]:
    """Write summary.csv (one row per label) and runs.csv (one row per run); return paths."""
    summary_cols = ["label", "method", "seeds", "failed", "metric", "metric_mean",
                    "metric_std", "metric_min", "metric_max", *MEASURES, "memory_kind"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(summary_cols)
    for row in summary:
        w.writerow([" ".join(map(str, row[c])) if c == "seeds" else _csv(row.get(c))
                    for c in summary_cols])
    spath = directory / SUMMARY_CSV
    atomic_write_text(spath, buf.getvalue())
    metric_names = sorted({k for r in runs.values() for k, v in r.get("metrics", {}).items()
                           if isinstance(v, (int, float))})
    run_cols = ["key", "label", "method", "seed", "status", *MEASURES, "memory_kind",
                *metric_names]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(run_cols)
    for key, r in runs.items():
        base = {"key": key, "label": r["spec"]["label"], "method": r["spec"]["method"],
                "seed": r["seed"], "status": r.get("status")}
        w.writerow([_csv(base[c]) if c in base else
                    _csv(r.get("metrics", {}).get(c)) if c in metric_names else _csv(r.get(c))
                    for c in run_cols])
    rpath = directory / RUNS_CSV
    atomic_write_text(rpath, buf.getvalue())
    return spath, rpath


def _csv(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)
