"""Row 1 worker: save a delta over an existing one in forked children and SIGKILL them.

Run as ``python _kill_worker.py DIR N SEED``. The parent imports everything once, saves
version "old" into DIR/delta, then forks N children. Each child saves "old" or "new"
over the directory and is killed with SIGKILL either by itself, at a save stage chosen
through ``io.FAULT_HOOK`` (between files and mid-write), or by the parent after a random
delay. Half the children use the two-rename fallback instead of the atomic exchange.
After every kill the parent reads the directory back and classifies it as the complete
old version, the complete new version, or broken. Prints one JSON line of counts.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from deltatune.core import io
from deltatune.core.model import DeltaModel, read_delta_directory
from tests.reliability._toy import fill, lora, toy


def build(alpha: float, seed: int) -> DeltaModel:
    dm = DeltaModel(toy())
    dm.add("d", lora(r=2, alpha=alpha))
    fill(dm, seed=seed)
    return dm


def classify(target: Path, versions: dict[str, tuple[float, dict]]) -> str:
    try:
        saved = read_delta_directory(target)
    except Exception as exc:  # any failure to read is a torn directory
        return f"broken: {type(exc).__name__}: {exc}"
    for label, (alpha, tensors) in versions.items():
        same_tensors = set(saved.tensors) == set(tensors) and all(
            torch.equal(saved.tensors[k], tensors[k]) for k in tensors)
        if same_tensors and saved.config.lora_alpha == alpha:
            return label
    return f"broken: mixed (alpha {saved.config.lora_alpha})"


def main() -> None:
    root, n, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    rng = random.Random(seed)
    models = {"old": build(4.0, 11), "new": build(16.0, 22)}
    versions = {k: (m.get_delta("d").config.lora_alpha, m.delta_state_dict())
                for k, m in models.items()}
    target = root / "delta"
    models["old"].save_delta(target)

    stages: list[str] = []
    models["new"].save_delta(root / "probe")
    io.FAULT_HOOK = stages.append
    models["new"].save_delta(root / "probe")  # over an existing directory: the exchange
    io.FAULT_HOOK = None
    real_exchange = io._exchange
    io._exchange = lambda a, b: False
    io.FAULT_HOOK = stages.append
    models["new"].save_delta(root / "probe")
    io.FAULT_HOOK = None
    io._exchange = real_exchange
    stages = sorted(set(stages))

    # The random kills are spread over one save's duration: the median of a few timed
    # saves, so that one slow save on a busy machine (CI runs tests in parallel) does not
    # stretch the window until most kills land after the child has finished.
    timings = []
    for _ in range(5):
        t0 = time.perf_counter()
        models["new"].save_delta(root / "timing")
        timings.append(time.perf_counter() - t0)
    save_s = sorted(timings)[len(timings) // 2]

    counts: dict[str, int] = {}
    killed_at: dict[str, int] = {}
    failures: list[str] = []
    leftovers = stale_seen = 0
    for i in range(n):
        # Each stage is hit while saving "new" over "old" and "old" over "new", with
        # the exchange and with the fallback; random-time kills alternate the same way.
        cycle = i // len(stages)
        which = "new" if cycle % 2 == 0 else "old"
        fallback = (cycle // 2) % 2 == 1
        stage = stages[i % len(stages)] if i < n // 2 else None
        if stage is None:
            which, fallback = ("new" if i % 2 == 0 else "old"), (i // 2) % 2 == 1
        pid = os.fork()
        if pid == 0:  # the child: save, maybe kill itself at `stage`
            if fallback:
                io._exchange = lambda a, b: False
            if stage is not None:
                def hook(s: str, stage: str = stage) -> None:
                    if s == stage:
                        os.kill(os.getpid(), signal.SIGKILL)
                io.FAULT_HOOK = hook
            try:
                models[which].save_delta(target)
            finally:
                os._exit(0)
        if stage is None:
            time.sleep(rng.uniform(0.0, save_s))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            key = stage or "random-time"
            killed_at[key] = killed_at.get(key, 0) + 1
        stale_seen += sum(p.name.startswith("delta.") for p in root.iterdir())
        outcome = classify(target, versions)
        if outcome.startswith("broken"):
            failures.append(f"iteration {i} (stage {stage}, fallback {fallback}): {outcome}")
        counts[outcome if not outcome.startswith("broken") else "broken"] = (
            counts.get(outcome if not outcome.startswith("broken") else "broken", 0) + 1)
        siblings = [p.name for p in root.iterdir() if p.name.startswith("delta.")]
        leftovers += len(siblings)
    print(json.dumps({"iterations": n, "counts": counts, "stages": stages,
                      "killed_at": killed_at, "failures": failures[:10],
                      "leftover_temp_dirs": leftovers, "stale_temp_dirs_seen": stale_seen,
                      "save_seconds": save_s}))


if __name__ == "__main__":
    main()
