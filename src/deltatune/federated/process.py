"""Separate-process mode: a Flower server and clients talking gRPC on localhost.

``python -m deltatune.federated.process server --port P --clients N ...`` runs
``flwr.server.start_server`` with :class:`DeltaFedAvg` and writes ``rounds.json`` and the
final global payload ``global.safetensors``; ``... client --port P --cid C ...`` runs
``flwr.client.start_client`` with a :class:`DeltaClient` holding shard C of the same seeded
task and split (``--task toy``, ``sentiment`` or ``tweets``), and writes each upload it
sends to ``upload-C.safetensors``. Uses Flower's legacy (deprecated in 1.x, still shipped
in 1.42) start functions.

``--fault`` makes a client misbehave, for the rejection tests: ``wrong-shape`` uploads a
payload with one tensor of the wrong shape; ``drop`` trains, then kills its own process
mid-round (``os._exit``) before replying, so the server sees the connection vanish.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

FAULTS = ("none", "wrong-shape", "drop")


def _task(args: argparse.Namespace):
    from deltatune.federated.tasks import load_task

    return load_task(args.task, examples=args.examples, test_examples=args.test_examples,
                     max_length=args.max_length, seed=args.seed)


def serve(args: argparse.Namespace) -> None:
    """Run the Flower server for ``args.rounds`` rounds; write ``rounds.json`` to --out."""
    import flwr.server as fs

    from deltatune.federated.flower import DeltaFedAvg
    from deltatune.federated.payload import global_tensors, to_bytes
    from deltatune.federated.run import prepare

    log: list[dict] = []
    out = Path(args.out)

    class Recording(DeltaFedAvg):
        def aggregate_fit(self, server_round, results, failures):
            new = super().aggregate_fit(server_round, results, failures)
            log.append({"round": server_round, "bytes_up": self.bytes_up,
                        "clients": len(results), "failures": len(failures),
                        "rejected": [f"{r.client}: {r.reason}" for r in self.rejections]})
            return new

    task = _task(args)
    # the initial global tensors are client 0's initial ones, as in the in-process loop
    ref = global_tensors(prepare(task.make_model(), args.method, args.rank, args.seed),
                         args.method)
    strategy = Recording(ref, min_fit_clients=args.clients, min_available_clients=args.clients,
                         fraction_evaluate=0.0)
    fs.start_server(server_address=f"127.0.0.1:{args.port}", strategy=strategy,
                    config=fs.ServerConfig(num_rounds=args.rounds))
    out.mkdir(parents=True, exist_ok=True)
    (out / "rounds.json").write_text(json.dumps(log, indent=2))
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
