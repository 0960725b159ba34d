"""RELIABILITY.md row 13 (fuzz: corrupted files), coverage-guided part (atheris).

Runs ``fuzz_loaders.py`` for a bounded number of inputs (a few seconds), seeded with
the files of a real saved delta, and fails if any input makes a reader raise anything
but a deltatune error. atheris ships wheels for Linux/macOS x86-64 CPython; where it
cannot be installed the test is skipped with that reason (the Hypothesis suite in
``test_row13_properties.py`` checks the same property everywhere).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reliability._files import saved_toy_delta

pytest.importorskip("atheris", reason="atheris has no wheel for this platform/Python")

ROOT = Path(__file__).resolve().parents[2]
TARGET = Path(__file__).with_name("fuzz_loaders.py")


def test_atheris_finds_no_untyped_error_in_the_readers(tmp_path):
    delta = saved_toy_delta(tmp_path / "d")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    # Seeds: the first byte selects the reader (0 safetensors, 1 JSON, 2 config structure).
    (corpus / "weights").write_bytes(b"\0" + (delta / "delta.safetensors").read_bytes())
    (corpus / "manifest").write_bytes(b"\1" + (delta / "manifest.json").read_bytes())
    (corpus / "config").write_bytes(b"\2" + (delta / "delta_config.json").read_bytes())
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    # libFuzzer reads the peak RSS from getrusage, and Linux keeps that high-water mark
    # across fork + exec: after a test in this worker held a large model, the fresh fuzzer
    # process would start "above" the default 2 GB limit and report an out-of-memory
    # without having allocated anything. So the limit is 2 GB above what is inherited;
    # one allocation over 2 GB is still caught by -malloc_limit_mb.
    inherited_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    proc = subprocess.run(
        [sys.executable, str(TARGET), str(corpus), "-atheris_runs=3000", "-max_len=4096",
         "-seed=1", "-timeout=20", f"-rss_limit_mb={inherited_mb + 2048}",
         "-malloc_limit_mb=2048"],
        capture_output=True, text=True, env=env, timeout=300, check=False)
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    assert "Done 3000 in" in log, log
