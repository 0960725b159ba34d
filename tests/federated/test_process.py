"""Separate processes: a Flower server and clients over gRPC on localhost.

Checked against the in-process loop (same seeds -> the same averaged tensors) and against
the clients' own uploads when one client sends a wrong shape and another dies mid-round.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from deltatune.federated.flower import pack
from deltatune.federated.payload import from_bytes, global_tensors
from deltatune.federated.run import prepare, run_federated, toy_model
from deltatune.federated.tasks import load_task

CMD = [sys.executable, "-m", "deltatune.federated.process"]
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, server: subprocess.Popen, limit: float = 120.0) -> None:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        assert server.poll() is None, "the server exited before listening"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"server not listening on {port} after {limit} s")


def _federate(tmp_path: Path, common: list[str], faults: dict[int, str], clients: int) -> None:
    port = _free_port()
    common = ["--port", str(port), *common, "--out", str(tmp_path)]
    server = subprocess.Popen([*CMD, "server", *common], env=ENV)
    procs = [server]
    try:
        _wait_listening(port, server)
        procs += [subprocess.Popen([*CMD, "client", "--cid", str(c), "--fault",
                                    faults.get(c, "none"), *common], env=ENV,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                  for c in range(clients)]
        assert server.wait(timeout=300) == 0
        for c in procs[1:]:
            c.wait(timeout=60)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def test_two_client_processes_match_the_in_process_loop(tmp_path):
    _federate(tmp_path, ["--clients", "2", "--rounds", "1", "--method", "pfedpara",
                         "--examples", "24", "--non-iid", "1.0"], {}, 2)
    log = json.loads((tmp_path / "rounds.json").read_text())
    assert [r["round"] for r in log] == [1] and log[0]["clients"] == 2
    assert log[0]["rejected"] == [] and log[0]["failures"] == 0
    # each upload has exactly the size of a packed pFedPara payload (W1 + head)
    one = pack(global_tensors(prepare(toy_model(0), "pfedpara", 4), "pfedpara"))[0].nbytes
    assert log[0]["bytes_up"] == 2 * one
    # the same federation in one process, same seeds: the same averaged global tensors
    task = load_task("toy", examples=24)
    records, fleet = run_federated("pfedpara", task.make_model, task.train, task.test,
                                   clients=2, rounds=1, non_iid=1.0, lr=3e-3, batch_size=16)
    want = global_tensors(fleet[0].model, "pfedpara")
    got = from_bytes((tmp_path / "global.safetensors").read_bytes())
    assert set(got) == set(want)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6), name
    assert records[0].bytes_up == log[0]["bytes_up"]


def test_wrong_shape_and_dropped_client_processes_are_rejected(tmp_path):
    # client 0 uploads a wrong shape, client 2 dies after training (no reply), client 1 is
    # fine: the round completes and the new global tensors are client 1's upload exactly
    _federate(tmp_path, ["--clients", "3", "--rounds", "1", "--method", "lora",
                         "--examples", "30"], {0: "wrong-shape", 2: "drop"}, 3)
    log = json.loads((tmp_path / "rounds.json").read_text())
    assert len(log) == 1 and log[0]["clients"] == 2 and log[0]["failures"] == 1
    reasons = log[0]["rejected"]
    assert len(reasons) == 2
    assert any(r.startswith("0: ") and "shape (3, 3)" in r for r in reasons)
    assert any("client failed" in r for r in reasons)
    got = from_bytes((tmp_path / "global.safetensors").read_bytes())
    sent = from_bytes((tmp_path / "upload-1.safetensors").read_bytes())
    assert set(got) == set(sent) and all(torch.equal(got[k], sent[k]) for k in sent)
    assert not (tmp_path / "upload-2.safetensors").exists()
