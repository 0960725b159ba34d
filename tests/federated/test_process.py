"""Separate processes: a Flower server and 2 clients over gRPC on localhost, 1 round."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from deltatune.federated.flower import pack
from deltatune.federated.payload import global_tensors
from deltatune.federated.run import prepare, toy_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_and_two_client_processes(tmp_path):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    common = ["--port", str(port), "--clients", "2", "--rounds", "1", "--method", "pfedpara",
              "--examples", "24", "--out", str(tmp_path)]
    cmd = [sys.executable, "-m", "deltatune.federated.process"]
    server = subprocess.Popen([*cmd, "server", *common], env=env)
    time.sleep(3)
    clients = [subprocess.Popen([*cmd, "client", "--cid", str(c), *common], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for c in range(2)]
    try:
        assert server.wait(timeout=90) == 0
        for c in clients:
            c.wait(timeout=30)
    finally:
        for proc in (server, *clients):
            if proc.poll() is None:
                proc.kill()
    log = json.loads((tmp_path / "rounds.json").read_text())
    assert [r["round"] for r in log] == [1] and log[0]["clients"] == 2
    assert log[0]["rejected"] == []
    # each upload has exactly the size of a packed pFedPara payload (W1 + head)
    one = pack(global_tensors(prepare(toy_model(0), "pfedpara", 4), "pfedpara"))[0].nbytes
    assert log[0]["bytes_up"] == 2 * one
