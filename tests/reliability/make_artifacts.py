"""Write this release's regression artifacts (RELIABILITY.md row 23).

    PYTHONPATH=src python tests/reliability/make_artifacts.py

For each case: a delta saved on the seeded Toy model (tests/reliability/_toy.py, built
in code, so no base weights are stored) and ``expected.safetensors`` with the input ids
and the adapted model's outputs. Everything is safetensors + JSON; nothing is pickled.
Existing versions are never rewritten: each release adds its own directory, and
``test_row23_regression.py`` loads every one of them on every CI run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deltatune as dt
from deltatune.core import io
from deltatune.core.config import LIBRARY_VERSION
from tests.reliability._toy import fill, toy, toy_ids

ROOT = Path(__file__).with_name("artifacts")

CASES = {
    "lora": lambda: dt.LoraConfig(r=2, lora_alpha=4.0, target_modules=["emb", "proj", "conv",
                                                                          "out"]),
    "lora_rslora_pattern": lambda: dt.LoraConfig(r=4, lora_alpha=8.0, use_rslora=True,
                                                 target_modules=["proj", "conv", "out"],
                                                 rank_pattern={"out": 2}),
    "loha": lambda: dt.get_method("loha").config_cls(r=2, target_modules=["proj", "conv"]),
}


def main() -> None:
    """Write artifacts/<version>/<case>/ for every case (refusing to overwrite)."""
    target = ROOT / LIBRARY_VERSION
    if target.exists():
        raise SystemExit(f"{target} exists; artifacts of a released version are immutable")
    for case, make in CASES.items():
        dm = dt.DeltaModel(toy())
        dm.add(case, make())
        fill(dm, seed=5, std=0.2)
        ids = toy_ids(batch=2, length=6, seed=7)
        with torch.no_grad():
            out = dm(ids)
        dm.save_delta(target / case / "delta")
        with io.atomic_directory(target / case / "expected") as tmp:
            io.save_tensors(tmp / "expected.safetensors", {"input_ids": ids, "output": out})
        print(f"wrote {target / case}")


if __name__ == "__main__":
    main()
