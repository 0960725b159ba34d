"""Separate-process mode: a Flower server and clients talking gRPC on localhost.

``python -m deltatune.federated.process server --port P --clients N ...`` runs
``flwr.server.start_server`` with :class:`RecordingFedAvg`; it writes ``records.json`` and
``rounds.json`` after every round and the final global payload ``global.safetensors``.
``... client --port P --cid C ...`` runs ``flwr.client.start_client`` with a
:class:`DeltaClient` holding shard C of the same seeded task and split (``--task toy``,
``sentiment`` or ``tweets``), and writes each upload it sends to ``upload-C.safetensors``.
Uses Flower's legacy start functions (deprecated in 1.x, still shipped in 1.42).
``deltatune federate --mode process`` starts the server and the clients itself.

``--fault`` makes a client misbehave, for the rejection tests: ``wrong-shape`` uploads a
payload with one tensor of the wrong shape; ``drop`` trains, then kills its own process
mid-round (``os._exit``) before replying, so the server sees the connection vanish.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deltatune.federated.launch import (
    follow_rounds,
    free_port,
    read_result,
    tail,
    wait_listening,
    write_json,
)

if TYPE_CHECKING:
    from deltatune.federated.recorder import FederationResult

FAULTS = ("none", "wrong-shape", "drop")


def _task(args: argparse.Namespace):
    from deltatune.federated.tasks import load_task

    return load_task(args.task, examples=args.examples, test_examples=args.test_examples,
                     max_length=args.max_length, seed=args.seed)


def serve(args: argparse.Namespace) -> None:
    """Run the Flower server for ``args.rounds`` rounds, recording each round in --out.

    After every round ``records.json`` (the :class:`RoundRecord` list, as the in-process
    loop keeps it) and ``rounds.json`` (replies, failures, rejection reasons) are replaced
    atomically, so a caller can follow progress; at the end the final global payload is
    written to ``global.safetensors``.
    """
    import dataclasses

    import flwr.server as fs

    from deltatune.federated.payload import global_tensors, to_bytes
    from deltatune.federated.recorder import RecordingFedAvg
    from deltatune.federated.run import prepare

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = _task(args)

    def save(records) -> None:
        write_json(out / "records.json", [dataclasses.asdict(r) for r in records])
        write_json(out / "rounds.json", strategy.log)

    # the initial global tensors are client 0's initial ones, as in the in-process loop
    ref = global_tensors(prepare(task.make_model(), args.method, args.rank, args.seed),
                         args.method)
    strategy = RecordingFedAvg(ref, prepare(task.make_model(), args.method, args.rank),
                               task.test, args.clients, on_round=save)
    fs.start_server(server_address=f"127.0.0.1:{args.port}", strategy=strategy,
                    config=fs.ServerConfig(num_rounds=args.rounds))
    write_json(out / "rounds.json", strategy.log)
    (out / "global.safetensors").write_bytes(to_bytes(strategy.reference))


def client(args: argparse.Namespace) -> None:
    """Connect one :class:`DeltaClient` (shard ``--cid``) to the server until it finishes."""
    import flwr.client as fc
    import numpy as np
    import torch

    from deltatune.federated.flower import DeltaClient, pack, unpack
    from deltatune.federated.run import client_shards, prepare

    task = _task(args)
    train, test = client_shards(task.train, args.clients, args.non_iid, args.seed)[args.cid]
    out = Path(args.out)
    fault = args.fault

    class Client(DeltaClient):
        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]):
            arrays, n, metrics = super().fit(parameters, config)
            if fault == "drop":
                os._exit(3)  # gone mid-round, without a reply
            if fault == "wrong-shape":
                tensors = unpack(arrays)
                tensors[next(iter(tensors))] = torch.zeros(3, 3)
                arrays = pack(tensors)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"upload-{self.cid}.safetensors").write_bytes(arrays[0].tobytes())
            return arrays, n, metrics

    model = prepare(task.make_model(), args.method, args.rank, args.seed + args.cid)
    delta_client = Client(str(args.cid), model, args.method, train, test,
                          epochs=args.local_epochs, lr=args.lr, batch_size=args.batch_size,
                          seed=args.seed + args.cid)
    fc.start_client(server_address=f"127.0.0.1:{args.port}", client=delta_client.to_client(),
                    insecure=True)


def federate_in_processes(method: str, task: str = "toy", *, clients: int = 2, rounds: int = 1,
                          out: Path, local_epochs: int = 1, non_iid: float | None = None,
                          lr: float = 3e-3, r: int = 4, batch_size: int = 16, seed: int = 0,
                          examples: int | None = None, test_examples: int | None = None,
                          max_length: int | None = None, faults: dict[int, str] | None = None,
                          progress: bool = False, on_round: Callable | None = None,
                          timeout: float = 24 * 3600.0) -> FederationResult:
    """Run one federation as a server process and ``clients`` client processes (gRPC).

    Starts ``python -m deltatune.federated.process server`` on a free localhost port, waits
    until it listens, starts the clients (``faults`` maps a client id to a ``--fault``),
    follows ``records.json`` round by round (progress bar, ``on_round``) and returns the
    final global tensors, the records and the raw per-round log. Logs of every process go
    to ``out`` (``server.log``, ``client-C.log``). Raises ``RuntimeError`` with the server
    log's tail when the server fails.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("records.json", "rounds.json", "global.safetensors"):
        (out / stale).unlink(missing_ok=True)
    port = free_port()
    common = ["--port", str(port), "--task", task, "--method", method,
              "--clients", str(clients), "--rounds", str(rounds),
              "--local-epochs", str(local_epochs), "--rank", str(r), "--lr", repr(lr),
              "--batch-size", str(batch_size), "--seed", str(seed), "--out", str(out)]
    for flag, value in (("--non-iid", non_iid), ("--examples", examples),
                        ("--test-examples", test_examples), ("--max-length", max_length)):
        if value is not None:
            common += [flag, str(value)]
    cmd = [sys.executable, "-m", "deltatune.federated.process"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH")) if p)}
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        server_log = out / "server.log"
        logs.append(server_log.open("w"))
        server = subprocess.Popen([*cmd, "server", *common], env=env, stdout=logs[-1],
                                  stderr=subprocess.STDOUT)
        procs.append(server)
        wait_listening(port, server, server_log)
        for c in range(clients):
            logs.append((out / f"client-{c}.log").open("w"))
            fault = (faults or {}).get(c, "none")
            procs.append(subprocess.Popen([*cmd, "client", "--cid", str(c), "--fault", fault,
                                           *common], env=env, stdout=logs[-1],
                                          stderr=subprocess.STDOUT))
        follow_rounds(server, out, rounds, f"federate {method} (processes)", progress,
                      on_round, timeout)
        if server.returncode != 0:
            raise RuntimeError(f"the federated server failed (exit code {server.returncode}); "
                               f"its log:\n{tail(server_log)}")
        for proc in procs[1:]:
            proc.wait(timeout=60)
        return read_result(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for f in logs:
            f.close()


def main(argv: list[str] | None = None) -> None:
    """Parse ``server``/``client`` and the shared settings, then run that role."""
    p = argparse.ArgumentParser(prog="python -m deltatune.federated.process")
    p.add_argument("role", choices=["server", "client"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cid", type=int, default=0)
    p.add_argument("--task", default="toy", choices=["toy", "sentiment", "tweets"])
    p.add_argument("--method", default="lora")
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--non-iid", type=float, default=None)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--examples", type=int, default=40)
    p.add_argument("--test-examples", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fault", default="none", choices=FAULTS,
                   help="client only, for tests: misbehave this way")
    p.add_argument("--out", default="lab-runs/federate-process")
    args = p.parse_args(argv)
    (serve if args.role == "server" else client)(args)


if __name__ == "__main__":
    main()
