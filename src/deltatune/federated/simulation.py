"""Flower's simulation engine (``flwr.simulation.run_simulation``, Ray backend).

The same :class:`DeltaClient` and :class:`DeltaFedAvg` as the in-process loop and the
separate-process mode, run as a ``ServerApp`` and a ``ClientApp`` on Flower's simulated
SuperNodes. Needs ``flwr[simulation]`` (Ray); deltatune does not depend on it.

Simulation builds a fresh client object for every message, so what must outlive a round
(pFedPara's local W2 factors) is kept in the node's ``context.state`` as safetensors
bytes. Client updates depend only on (seed, round) (see :meth:`DeltaClient.fit`), so the
averaged tensors equal those of the other two modes with the same seeds.
"""

from __future__ import annotations

from typing import Any

import torch

from deltatune.core.errors import ConfigError

_LOCAL = "deltatune-local"


def available() -> bool:
    """Return True when Flower's simulation engine (Ray) can be imported."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def simulate(method: str, task_name: str = "toy", *, clients: int = 2, rounds: int = 1,
             local_epochs: int = 1, non_iid: float | None = None, lr: float = 3e-3,
             r: int = 4, batch_size: int = 16, seed: int = 0, examples: int | None = None,
             cpus_per_client: float = 1.0) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Run ``rounds`` of FedAvg in Flower's simulation; return the final global tensors.

    Also returns one record per round (bytes up, clients that replied, failures,
    rejections), as the process-mode server writes them.
    """
    if not available():
        raise ConfigError("Flower's simulation needs Ray: pip install 'flwr[simulation]'",
                          field="mode")
    from flwr.client import ClientApp
    from flwr.common import ConfigRecord, Context
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.simulation import run_simulation

    from deltatune.federated.flower import DeltaClient, DeltaFedAvg
    from deltatune.federated.payload import (
        from_bytes,
        global_tensors,
        load_tensors,
        local_tensors,
        to_bytes,
    )
    from deltatune.federated.run import client_shards, prepare
    from deltatune.federated.tasks import load_task

    log: list[dict] = []

    class Recording(DeltaFedAvg):
        def aggregate_fit(self, server_round, results, failures):
            new = super().aggregate_fit(server_round, results, failures)
            log.append({"round": server_round, "bytes_up": self.bytes_up,
                        "clients": len(results), "failures": len(failures),
                        "rejected": [f"{x.client}: {x.reason}" for x in self.rejections]})
            return new

    task = load_task(task_name, examples=examples, seed=seed)
    strategy = Recording(global_tensors(prepare(task.make_model(), method, r, seed), method),
                         min_fit_clients=clients, min_available_clients=clients,
                         fraction_evaluate=0.0)

    def server_fn(context: Context) -> ServerAppComponents:
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))

    class StatefulClient(DeltaClient):
        """A DeltaClient whose local-only tensors live in the node's ``context.state``."""

        def __init__(self, context: Context, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.context = context
            saved = context.state.config_records.get(_LOCAL)
            if saved is not None:
                load_tensors(self.model, from_bytes(saved["tensors"]))

        def fit(self, parameters, config):
            out = super().fit(parameters, config)
            self.context.state.config_records[_LOCAL] = ConfigRecord(
                {"tensors": to_bytes(local_tensors(self.model, self.method))})
            return out

    def client_fn(context: Context):
        cid = int(context.node_config["partition-id"])
        own_train, own_test = client_shards(task.train, clients, non_iid, seed)[cid]
        model = prepare(task.make_model(), method, r, seed + cid)
        return StatefulClient(context, str(cid), model, method, own_train, own_test,
                              epochs=local_epochs, lr=lr, batch_size=batch_size,
                              seed=seed + cid).to_client()

    run_simulation(server_app=ServerApp(server_fn=server_fn),
                   client_app=ClientApp(client_fn=client_fn), num_supernodes=clients,
                   backend_config={"client_resources": {"num_cpus": cpus_per_client,
                                                        "num_gpus": 0.0}})
    return strategy.reference, log
