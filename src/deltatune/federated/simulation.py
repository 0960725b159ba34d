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

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from deltatune.core.errors import ConfigError

if TYPE_CHECKING:
    from deltatune.federated.recorder import FederationResult, RoundRecord

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
             test_examples: int | None = None, max_length: int | None = None,
             cpus_per_client: float = 1.0,
             on_round: Callable[[list[RoundRecord]], None] | None = None) -> FederationResult:
    """Run ``rounds`` of FedAvg in Flower's simulation; return the global tensors and records.

    The records are those of the in-process loop (server accuracy on the task's test set,
    client accuracies, bytes); ``on_round`` gets them after every round.
    """
    if not available():
        raise ConfigError("Flower's simulation needs Ray: pip install 'flwr[simulation]'",
                          field="mode")
    from flwr.client import ClientApp
    from flwr.common import ConfigRecord, Context
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.simulation import run_simulation

    from deltatune.federated.flower import DeltaClient
    from deltatune.federated.payload import (
        from_bytes,
        global_tensors,
        load_tensors,
        local_tensors,
        to_bytes,
    )
    from deltatune.federated.recorder import FederationResult, RecordingFedAvg
    from deltatune.federated.run import client_shards, prepare
    from deltatune.federated.tasks import load_task

    task = load_task(task_name, examples=examples, test_examples=test_examples,
                     max_length=max_length, seed=seed)
    strategy = RecordingFedAvg(global_tensors(prepare(task.make_model(), method, r, seed), method),
                               prepare(task.make_model(), method, r), task.test, clients,
                               on_round=on_round)

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
    return FederationResult(strategy.reference, strategy.records, strategy.log)
