"""bench/multi_gpu.py on CPU: 2 gloo processes vs 1 process, same global batch.

The multi-GPU benchmark cannot run here (no GPUs); this checks the script itself: it
trains under torchrun, records consistent numbers, and its ``--compare`` step finds the
2-process delta equal to the 1-process one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deltatune.core import io

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "multi_gpu.py"
FLAGS = ["--shape", "tiny", "--strategy", "ddp", "--steps", "2", "--warmup", "1",
         "--global-batch", "4", "--seq", "16"]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_multi_gpu_bench_runs_under_gloo_and_its_deltas_agree(tmp_path):
    out = str(tmp_path)
    _run([sys.executable, str(SCRIPT), *FLAGS, "--out", out])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          str(SCRIPT), *FLAGS, "--out", out])
    one = json.loads((tmp_path / "ddp-1gpu.json").read_text())
    two = json.loads((tmp_path / "ddp-2gpu.json").read_text())
    assert (one["gpus"], two["gpus"]) == (1, 2) and two["per_gpu_batch"] == 2
    for r in (one, two):
        assert r["tokens_per_s"] == pytest.approx(4 * 16 / r["step_s"])
        assert r["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_s"] / r["gpus"])
        assert r["steps_timed"] == 2
    a, _ = io.load_tensors(tmp_path / "ddp-1gpu.delta.safetensors")
    b, _ = io.load_tensors(tmp_path / "ddp-2gpu.delta.safetensors")
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2  # 2 layers x 7 linears x (A, B)
    done = _run([sys.executable, str(SCRIPT), "--out", out, "--compare",
                 str(tmp_path / "ddp-1gpu.delta.safetensors"),
                 str(tmp_path / "ddp-2gpu.delta.safetensors")])
    assert "deltas agree" in done.stdout and "ddp          2" in done.stdout
