"""RELIABILITY.md row 23 (cross-version regression).

Every released version's artifacts under ``artifacts/<version>/`` (written once by
``make_artifacts.py``: tiny safetensors deltas on the in-code Toy model, plus expected
outputs, no pickles) are loaded with today's code on every CI run, not behind a flag,
and must reproduce the stored outputs. (Trainer checkpoints are not in the set yet.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.core import io
from tests.reliability._toy import toy

ROOT = Path(__file__).with_name("artifacts")
CASES = sorted(p for p in ROOT.glob("*/*") if (p / "delta").is_dir())


def test_the_artifact_set_exists_for_this_version():
    from deltatune.core.config import LIBRARY_VERSION

    assert (ROOT / LIBRARY_VERSION).is_dir(), "run make_artifacts.py for this release"
    assert not any(ROOT.rglob("*.bin")) and not any(ROOT.rglob("*.pt"))


@pytest.mark.parametrize("case", CASES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_saved_deltas_of_every_release_load_and_reproduce_outputs(case):
    expected, _ = io.load_tensors(case / "expected" / "expected.safetensors")
    dm = dt.load(toy(), case / "delta")
    with torch.no_grad():
        out = dm(expected["input_ids"])
    # Float32 on CPU: only the summation order of another CPU's kernels may differ.
    torch.testing.assert_close(out, expected["output"], rtol=1e-5, atol=1e-6)
