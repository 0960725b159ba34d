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


def summarise(records: list[RoundRecord], clients: int) -> dict:
    """Return one method's headline numbers: final/best accuracy, per-client spread, bytes.

    ``payload_bytes`` is one client's download per round (the global payload); the upload
    of a client has the same tensors, so the same size up to the safetensors header.
    """
    last = records[-1]
    best = max(records, key=lambda r: r.accuracy)
    return {
        "rounds": len(records),
        "final_accuracy": last.accuracy,
        "best_accuracy": best.accuracy, "best_round": best.round,
        "final_mean_client_accuracy": last.mean_client_accuracy,
        "best_mean_client_accuracy": max(r.mean_client_accuracy for r in records),
        "final_client_accuracy_min": min(last.client_accuracy),
        "final_client_accuracy_max": max(last.client_accuracy),
        "payload_bytes": last.bytes_down // max(clients, 1),
        "bytes_up_per_round": last.bytes_up,
        "bytes_down_per_round": last.bytes_down,
        "total_bytes": last.cumulative_bytes,
        "rejected": sum(len(r.rejected) for r in records),
    }


def write_results(results: dict[str, list[RoundRecord]], settings: dict, out: Path, *,
                  seconds: dict[str, float] | None = None,
                  lrs: dict[str, float] | None = None) -> Path:
    """Write ``results.json`` (settings, a summary per method, every round); return its path.

    The file is replaced atomically (written next to it, then renamed), so an interrupted
    run leaves the previous complete file.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    clients = int(settings.get("clients", 1))
    summary = {}
    for m, recs in results.items():
        summary[m] = summarise(recs, clients)
        if lrs and m in lrs:
            summary[m]["lr"] = lrs[m]
        if seconds and m in seconds:
            summary[m]["seconds"] = round(seconds[m], 1)
    full = summary.get("full", {}).get("total_bytes")
    for m in summary:
        if full:
            summary[m]["bytes_vs_full"] = summary[m]["total_bytes"] / full
    body = {"settings": settings, "summary": summary,
            "methods": {m: [dataclasses.asdict(r) for r in recs] for m, recs in results.items()}}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(body, indent=2))
    tmp.replace(path)
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
