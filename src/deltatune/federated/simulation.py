"""Flower's simulation engine (``flwr.simulation.run_simulation``, Ray backend).

The same :class:`DeltaClient` and :class:`DeltaFedAvg` as the in-process loop and the
separate-process mode, run as a ``ServerApp`` and a ``ClientApp`` on Flower's simulated
SuperNodes. Needs ``flwr[simulation]`` (Ray); deltatune does not depend on it.

The apps are :mod:`deltatune.federated.apps`' (shared with the deployment runtime). Client
updates depend only on (seed, round) (see :meth:`DeltaClient.fit`), so the averaged
tensors equal those of the other modes with the same seeds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from deltatune.core.errors import ConfigError

if TYPE_CHECKING:
    from deltatune.federated.recorder import FederationResult, RoundRecord


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
    from flwr.simulation import run_simulation

    from deltatune.federated.apps import FederationSpec, client_app, make_strategy, server_app
    from deltatune.federated.recorder import FederationResult

    spec = FederationSpec(method=method, task=task_name, clients=clients, rounds=rounds,
                          local_epochs=local_epochs, non_iid=non_iid, lr=lr, r=r,
                          batch_size=batch_size, seed=seed, examples=examples,
                          test_examples=test_examples, max_length=max_length)
    task = spec.load()
    strategy = make_strategy(spec, task, on_round)
    run_simulation(server_app=server_app(lambda context: (strategy, rounds)),
                   client_app=client_app(lambda context: (spec, task)), num_supernodes=clients,
                   backend_config={"client_resources": {"num_cpus": cpus_per_client,
                                                        "num_gpus": 0.0}})
    return FederationResult(strategy.reference, strategy.records, strategy.log)
