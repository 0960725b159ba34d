"""PNG plots of a comparison (matplotlib, Agg backend: no display needed).

- ``metric_vs_params.png``: the task metric against trainable parameters (log x), one point
  per method with the min..max spread over seeds as an error bar;
- ``memory.png``: measured peak training memory and computed optimizer state, per method;
- ``speed.png``: training throughput (tokens/s) and inference latency (unmerged, merged,
  base), per method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _done(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in summary if r.get("metric_mean") is not None]


def plot_metric_vs_params(summary: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Write the metric-vs-trainable-parameters scatter (log x); return ``path``."""
    plt = _pyplot()
    rows = [r for r in _done(summary) if r.get("trainable_parameters")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        x, y = r["trainable_parameters"], r["metric_mean"]
        err = [[y - r["metric_min"]], [r["metric_max"] - y]]
        ax.errorbar([x], [y], yerr=err, fmt="o", capsize=3)
        ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    no_params = [r for r in _done(summary) if not r.get("trainable_parameters")]
    for r in no_params:  # ICL trains nothing: a horizontal reference line
        ax.axhline(r["metric_mean"], linestyle="--", color="grey", linewidth=1)
        ax.annotate(f"{r['label']} (no training)", (0.01, r["metric_mean"]),
                    xycoords=("axes fraction", "data"), fontsize=8, color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    metric = next((r["metric"] for r in summary if r.get("metric")), "metric")
    ax.set_ylabel(f"{metric} (mean over seeds; bar: min..max)")
    ax.set_title(title or f"{metric} vs trainable parameters")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _bars(ax: Any, labels: list[str], series: dict[str, list[float | None]], ylabel: str
          ) -> None:
    n = max(1, len(series))
    width = 0.8 / n
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if n > 1:
        ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)


def plot_memory(summary: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Write the memory bars (measured peak and optimizer state); return ``path``."""
    plt = _pyplot()
    rows = [r for r in _done(summary) if r.get("peak_memory_mb") is not None]
    labels = [r["label"] for r in rows]
    kind = next((r.get("memory_kind") for r in rows if r.get("memory_kind")), "")
    fig, ax = plt.subplots(figsize=(7, 4))
    _bars(ax, labels, {f"peak training memory ({kind})": [r["peak_memory_mb"] for r in rows],
                       "optimizer state (computed)": [r["optimizer_state_mb"] for r in rows]},
          "MiB")
    ax.set_title(title or "training memory")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_speed(summary: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Write throughput and latency bars side by side; return ``path``."""
    plt = _pyplot()
    rows = _done(summary)
    labels = [r["label"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    _bars(a1, labels, {"train tokens/s": [r.get("train_tokens_per_s") for r in rows]},
          "tokens / s")
    a1.set_title("training throughput")
    _bars(a2, labels, {"unmerged": [r.get("latency_unmerged_ms") for r in rows],
                       "merged": [r.get("latency_merged_ms") for r in rows],
                       "base model": [r.get("latency_base_ms") for r in rows]}, "ms / batch")
    a2.set_title("inference latency (one forward pass)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(summary: list[dict[str, Any]], directory: Path, title: str = ""
                ) -> list[Path]:
    """Write the three standard plots into ``directory``; return their paths."""
    return [plot_metric_vs_params(summary, directory / "metric_vs_params.png", title),
            plot_memory(summary, directory / "memory.png", title),
            plot_speed(summary, directory / "speed.png", title)]
