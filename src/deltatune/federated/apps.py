"""The Flower ``ServerApp`` and ``ClientApp`` of a deltatune federation.

Flower's simulation engine (:mod:`deltatune.federated.simulation`) and its deployment
runtime (:mod:`deltatune.federated.deployment`: a SuperLink, SuperNodes and ``flwr run``)
both run apps, not the legacy server and client loops. The apps here wrap the same
:class:`DeltaClient` and :class:`RecordingFedAvg` as the in-process loop, so every mode
records the same numbers for the same seeds.

Both engines build a fresh client object for every message, so what must outlive a round
(pFedPara's local W2 factors) is kept in the node's ``context.state`` as safetensors
bytes. A node learns its shard from its node config, ``partition-id``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from flwr.client import ClientApp
from flwr.common import ConfigRecord, Context
from flwr.server import ServerApp, ServerAppComponents, ServerConfig

from deltatune.federated.flower import DeltaClient

if TYPE_CHECKING:
    from deltatune.federated.recorder import RecordingFedAvg, RoundRecord
    from deltatune.federated.tasks import FederatedTask as Task

_LOCAL = "deltatune-local"  # the node state's record holding the local-only tensors
_UNSET = -1  # a run config (TOML) has no null: optional sizes travel as -1


@dataclass(frozen=True)
class FederationSpec:
    """Everything the server and every client must agree on, as one value."""

    method: str
    task: str = "toy"
    clients: int = 2
    rounds: int = 1
    local_epochs: int = 1
    non_iid: float | None = None
    lr: float = 3e-3
    r: int = 4
    batch_size: int = 16
    seed: int = 0
    examples: int | None = None
    test_examples: int | None = None
    max_length: int | None = None

    def load(self) -> Task:
        """Return the seeded task (model factory, train and test sets) both sides use."""
        from deltatune.federated.tasks import load_task

        return load_task(self.task, examples=self.examples, test_examples=self.test_examples,
                         max_length=self.max_length, seed=self.seed)

    def to_run_config(self) -> dict[str, Any]:
        """Return the spec as Flower run-config values (hyphenated keys, -1 for unset)."""
        return {name.replace("_", "-"): _UNSET if value is None else value
                for name, value in asdict(self).items()}

    @classmethod
    def from_run_config(cls, config: dict[str, Any]) -> FederationSpec:
        """Rebuild the spec from a run config written by :meth:`to_run_config`."""
        values = {}
        for f in fields(cls):
            value = config[f.name.replace("_", "-")]
            if f.default is None and value == _UNSET:  # the optional fields default to None
                value = None
            elif f.type == "int":  # annotations are strings here (postponed evaluation)
                value = int(value)
            values[f.name] = value
        return cls(**values)


def make_strategy(spec: FederationSpec, task: Task,
                  on_round: Callable[[list[RoundRecord]], None] | None = None
                  ) -> RecordingFedAvg:
    """Return the server's strategy: the initial global tensors are client 0's initial ones,
    as in the in-process loop."""
    from deltatune.federated.payload import global_tensors
    from deltatune.federated.recorder import RecordingFedAvg
    from deltatune.federated.run import prepare

    reference = global_tensors(prepare(task.make_model(), spec.method, spec.r, spec.seed),
                               spec.method)
    return RecordingFedAvg(reference, prepare(task.make_model(), spec.method, spec.r),
                           task.test, spec.clients, on_round=on_round)


def server_app(strategy_for: Callable[[Context], tuple[RecordingFedAvg, int]]) -> ServerApp:
    """Return a ServerApp running ``strategy_for(context)``'s (strategy, rounds)."""
    def server_fn(context: Context) -> ServerAppComponents:
        strategy, rounds = strategy_for(context)
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))
    return ServerApp(server_fn=server_fn)


class StatefulClient(DeltaClient):
    """A DeltaClient whose local-only tensors live in the node's ``context.state``."""

    def __init__(self, context: Context, *args: Any, **kwargs: Any) -> None:
        from deltatune.federated.payload import from_bytes, load_tensors

        super().__init__(*args, **kwargs)
        self.context = context
        saved = context.state.config_records.get(_LOCAL)
        if saved is not None:
            load_tensors(self.model, from_bytes(saved["tensors"]))

    def fit(self, parameters, config):
        """Train as :class:`DeltaClient` does, then keep the local-only tensors."""
        from deltatune.federated.payload import local_tensors, to_bytes

        out = super().fit(parameters, config)
        self.context.state.config_records[_LOCAL] = ConfigRecord(
            {"tensors": to_bytes(local_tensors(self.model, self.method))})
        return out


def client_app(spec_for: Callable[[Context], tuple[FederationSpec, Task]]) -> ClientApp:
    """Return a ClientApp whose node trains shard ``partition-id`` of ``spec_for(context)``."""
    from deltatune.federated.run import client_shards, prepare

    def client_fn(context: Context):
        spec, task = spec_for(context)
        cid = int(context.node_config["partition-id"])
        own_train, own_test = client_shards(task.train, spec.clients, spec.non_iid,
                                            spec.seed)[cid]
        model = prepare(task.make_model(), spec.method, spec.r, spec.seed + cid)
        return StatefulClient(context, str(cid), model, spec.method, own_train, own_test,
                              epochs=spec.local_epochs, lr=spec.lr, batch_size=spec.batch_size,
                              seed=spec.seed + cid).to_client()
    return ClientApp(client_fn=client_fn)


__all__ = ["FederationSpec", "StatefulClient", "client_app", "make_strategy", "server_app"]
