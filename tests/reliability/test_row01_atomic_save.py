"""RELIABILITY.md row 1 (fault injection: save).

A save killed with SIGKILL at any point leaves the directory holding the complete old
or the complete new delta, never a mix, and the temporary directories of killed
writers are collected. The kills run in forked children of one worker process (so 200
kills cost seconds, not 200 interpreter starts); half are placed by ``io.FAULT_HOOK``
at every stage of a save (mid-write of each file, between files, before the manifest,
around the swap), half land at a random time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deltatune.core import io
from deltatune.core.errors import AdapterFileCorrupt
from deltatune.core.model import DeltaModel, read_delta_directory
from tests.reliability._toy import fill, lora, toy

WORKER = Path(__file__).with_name("_kill_worker.py")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_sigkill_at_any_point_leaves_old_or_new_200_times(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, str(WORKER), str(tmp_path), "200", "0"],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["failures"] == [] and "broken" not in result["counts"], result
    # Both outcomes occur, so the check can tell them apart.
    assert result["counts"].get("old", 0) > 0 and result["counts"].get("new", 0) > 0
    # Every stage of a save (both swap strategies) was hit by at least one kill.
    expected_stages = {"before-manifest", "before-swap", "after-swap", "between-renames",
                       "mid-write:delta.safetensors", "mid-write:delta_config.json",
                       "mid-write:manifest.json", "written:delta.safetensors",
                       "written:delta_config.json"}
    assert expected_stages <= set(result["killed_at"]), result["killed_at"]
    assert result["killed_at"].get("random-time", 0) >= 25
    # Killed writers left temporary directories, and reading collected all of them.
    assert result["stale_temp_dirs_seen"] > 0
    assert result["leftover_temp_dirs"] == 0


def test_the_check_detects_a_mixed_pair(tmp_path):
    """What a non-atomic writer leaves (new weights, old config) is refused, not loaded."""
    old, new = DeltaModel(toy()), DeltaModel(toy())
    old.add("d", lora(alpha=4.0))
    new.add("d", lora(alpha=16.0))
    fill(old, seed=1)
    fill(new, seed=2)
    old.save_delta(tmp_path / "a")
    new.save_delta(tmp_path / "b")
    (tmp_path / "a" / "delta.safetensors").write_bytes(
        (tmp_path / "b" / "delta.safetensors").read_bytes())
    with pytest.raises(AdapterFileCorrupt, match=r"delta\.safetensors.*sha256 differs"):
        read_delta_directory(tmp_path / "a")


def test_stale_temp_dirs_are_collected_by_the_next_save(tmp_path):
    dm = DeltaModel(toy())
    dm.add("d", lora())
    dm.save_delta(tmp_path / "d")
    dead = tmp_path / "d.tmp-999999999-deadbeef"  # a pid that cannot be alive
    dead.mkdir()
    (dead / "delta.safetensors").write_bytes(b"partial")
    dm.save_delta(tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_exception_mid_save_keeps_the_old_directory_bytes(tmp_path, monkeypatch):
    dm = DeltaModel(toy())
    dm.add("d", lora())
    fill(dm, seed=5)
    dm.save_delta(tmp_path / "d")
    before = {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()}
    fill(dm, seed=6)

    def hook(stage: str) -> None:
        if stage == "written:delta_config.json":
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(io, "FAULT_HOOK", hook)
    with pytest.raises(OSError):
        dm.save_delta(tmp_path / "d")
    assert {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()} == before
    read_delta_directory(tmp_path / "d")  # still complete and valid
