"""Separate-process mode: a Flower server and clients talking gRPC on localhost.

``python -m deltatune.federated.process server --port P --clients N ...`` runs
``flwr.server.start_server`` with :class:`DeltaFedAvg` and writes ``rounds.json``;
``... client --port P --cid C ...`` runs ``flwr.client.start_client`` with a
:class:`DeltaClient` holding shard C of the same seeded toy data set and split. Uses
Flower's legacy (deprecated in 1.x, still shipped in 1.42) start functions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _shard(args: argparse.Namespace, cid: int):
    import numpy as np

    from deltatune.federated.partition import dirichlet_partition, iid_partition
    from deltatune.federated.run import _take, toy_task

    data = toy_task(args.examples, seed=args.seed)
    labels = data["labels"].tolist()
    parts = (iid_partition(len(labels), args.clients, args.seed) if args.non_iid is None
             else dirichlet_partition(labels, args.clients, args.non_iid, args.seed))
    order = np.random.default_rng(args.seed + cid).permutation(parts[cid])
    cut = max(1, int(0.8 * len(order)))
    return _take(data, order[:cut].tolist()), _take(data, order[cut:].tolist() or
                                                     order[:1].tolist())


def serve(args: argparse.Namespace) -> None:
    """Run the Flower server for ``args.rounds`` rounds; write ``rounds.json`` to --out."""
    import flwr.server as fs

    from deltatune.federated.flower import DeltaFedAvg
    from deltatune.federated.payload import global_tensors
    from deltatune.federated.run import prepare, toy_model

    log: list[dict] = []

    class Recording(DeltaFedAvg):
        def aggregate_fit(self, server_round, results, failures):
            out = super().aggregate_fit(server_round, results, failures)
            log.append({"round": server_round, "bytes_up": self.bytes_up,
                        "clients": len(results),
                        "rejected": [f"{r.client}: {r.reason}" for r in self.rejections]})
            return out

    ref = global_tensors(prepare(toy_model(args.seed), args.method, args.rank), args.method)
    strategy = Recording(ref, min_fit_clients=args.clients, min_available_clients=args.clients,
                         fraction_evaluate=0.0)
    fs.start_server(server_address=f"127.0.0.1:{args.port}", strategy=strategy,
                    config=fs.ServerConfig(num_rounds=args.rounds))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "rounds.json").write_text(json.dumps(log, indent=2))


def client(args: argparse.Namespace) -> None:
    """Connect one :class:`DeltaClient` (shard ``--cid``) to the server until it finishes."""
    import flwr.client as fc

    from deltatune.federated.flower import DeltaClient
    from deltatune.federated.run import prepare, toy_model

    train, test = _shard(args, args.cid)
    model = prepare(toy_model(args.seed), args.method, args.rank)
    delta_client = DeltaClient(str(args.cid), model, args.method, train, test,
                               epochs=args.local_epochs, lr=args.lr, seed=args.seed + args.cid)
    fc.start_client(server_address=f"127.0.0.1:{args.port}", client=delta_client.to_client(),
                    insecure=True)


def main(argv: list[str] | None = None) -> None:
    """Parse ``server``/``client`` and the shared settings, then run that role."""
    p = argparse.ArgumentParser(prog="python -m deltatune.federated.process")
    p.add_argument("role", choices=["server", "client"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cid", type=int, default=0)
    p.add_argument("--method", default="lora")
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--non-iid", type=float, default=None)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--examples", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="lab-runs/federate-process")
    args = p.parse_args(argv)
    (serve if args.role == "server" else client)(args)


if __name__ == "__main__":
    main()
