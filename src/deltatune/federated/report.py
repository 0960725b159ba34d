"""Tables, results.json and the accuracy-vs-bytes plot of a federated comparison."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from deltatune.federated.run import RoundRecord


def _kb(n: int) -> str:
    return f"{n / 1024:,.1f}"


def format_table(results: dict[str, list[RoundRecord]]) -> str:
    """Return a plain-text table: one row per method and round."""
    head = ("method", "round", "global acc", "client acc", "up KiB", "down KiB", "cum KiB",
            "rejected")
    rows = [head]
    for method, records in results.items():
        for r in records:
            rows.append((method, str(r.round), f"{r.accuracy:.3f}",
                         f"{r.mean_client_accuracy:.3f}", _kb(r.bytes_up), _kb(r.bytes_down),
                         _kb(r.cumulative_bytes), str(len(r.rejected))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_results(results: dict[str, list[RoundRecord]], settings: dict, out: Path) -> Path:
    """Write ``results.json`` (settings + every round of every method); return its path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    body = {"settings": settings,
            "methods": {m: [dataclasses.asdict(r) for r in recs] for m, recs in results.items()}}
    path.write_text(json.dumps(body, indent=2))
    return path


def plot_accuracy_vs_bytes(results: dict[str, list[RoundRecord]], out: Path) -> Path:
    """Plot global and mean client accuracy against cumulative bytes; return the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, recs in results.items():
        x = [r.cumulative_bytes / 1024 for r in recs]
        line, = ax.plot(x, [r.accuracy for r in recs], marker="o", label=f"{method} (global)")
        ax.plot(x, [r.mean_client_accuracy for r in recs], marker="x", linestyle="--",
                color=line.get_color(), label=f"{method} (clients)")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative bytes up + down (KiB, log)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "accuracy_vs_bytes.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
