"""Join the results.json of several `deltatune federate` runs into one results.json + PNG.

Used when the methods of one comparison ran as separate processes (one per core) with
the same settings apart from `--methods`/`--lr`: every method depends only on the seed,
so the joined file is what one process running them all would have written.

    python tools/join_federated_results.py OUT_DIR RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from deltatune.federated.report import format_table, plot_accuracy_vs_bytes, write_results
from deltatune.federated.run import RoundRecord

# Settings that may differ between the joined runs (they are per method).
PER_METHOD = ("methods", "lr")


def join(out: Path, runs: list[Path]) -> Path:
    """Merge the runs' methods into ``out/results.json`` and its plot; return the JSON path.

    Raises ``ValueError`` when two runs differ in a setting other than the per-method ones.
    """
    results: dict[str, list[RoundRecord]] = {}
    seconds: dict[str, float] = {}
    lrs: dict[str, float] = {}
    settings: dict | None = None
    for run in runs:
        body = json.loads((run / "results.json").read_text())
        shared = {k: v for k, v in body["settings"].items() if k not in PER_METHOD}
        if settings is None:
            settings = shared
        elif shared != settings:
            diff = sorted(k for k in set(shared) | set(settings)
                          if shared.get(k) != settings.get(k))
            raise ValueError(f"{run} was run with other settings ({', '.join(diff)}); "
                             f"only runs that differ in {PER_METHOD} can be joined")
        for method, records in body["methods"].items():
            results[method] = [RoundRecord(**r) for r in records]
            summary = body["summary"].get(method, {})
            if "seconds" in summary:
                seconds[method] = summary["seconds"]
            if "lr" in summary:
                lrs[method] = summary["lr"]
    assert settings is not None
    settings["methods"] = ",".join(results)
    path = write_results(results, settings, out, seconds=seconds, lrs=lrs)
    plot_accuracy_vs_bytes(results, out)
    print(format_table(results))
    return path


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    join(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]])
