"""DDP on CPU: 2 processes under torchrun (gloo) give the same delta as 1 process with the
same global batch (the loss is normalised by the items of the whole step on all processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltatune.core import io

WORKER = Path(__file__).with_name("ddp_worker.py")


def launch(out: Path, procs: int, batch: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={procs}", str(WORKER), str(out), str(batch)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(tmp_path):
    launch(tmp_path / "one", 1, 4)
    launch(tmp_path / "two", 2, 2)
    one, _ = io.load_tensors(tmp_path / "one" / "delta.safetensors")
    two, _ = io.load_tensors(tmp_path / "two" / "delta.safetensors")
    assert one.keys() == two.keys()
    assert any(float(t.abs().max()) > 0 for k, t in one.items() if "lora_B" in k)  # it trained
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=0, atol=2e-6)
    l1 = [float(x) for x in (tmp_path / "one" / "losses.txt").read_text().split()]
    l2 = [float(x) for x in (tmp_path / "two" / "losses.txt").read_text().split()]
    assert l1 == pytest.approx(l2, rel=1e-5) and len(l1) == 6
