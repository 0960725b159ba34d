"""The apps ``flwr run`` starts on a SuperLink and its SuperNodes (the deployment runtime).

Everything comes from the run's config (:meth:`FederationSpec.to_run_config` plus
``out``): the ServerApp replaces ``records.json``, ``rounds.json`` and
``global.safetensors`` in ``out`` after every round, atomically, so the launcher
(:func:`deltatune.federated.deployment.federate_deployment`) can follow the rounds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flwr.common import Context

from deltatune.federated import apps
from deltatune.federated.apps import FederationSpec, make_strategy

_TASKS: dict[FederationSpec, object] = {}  # one load per spec and process


def _spec_and_task(context: Context):
    spec = FederationSpec.from_run_config(context.run_config)
    if spec not in _TASKS:
        _TASKS[spec] = spec.load()
    return spec, _TASKS[spec]


def _strategy(context: Context):
    from deltatune.federated.launch import write_atomic, write_json
    from deltatune.federated.payload import to_bytes

    spec, task = _spec_and_task(context)
    out = Path(str(context.run_config["out"]))
    out.mkdir(parents=True, exist_ok=True)

    def save(records) -> None:
        write_json(out / "rounds.json", strategy.log)
        write_atomic(out / "global.safetensors", to_bytes(strategy.reference))
        # last: the launcher reads the others once it sees this round's record
        write_json(out / "records.json", [dataclasses.asdict(r) for r in records])

    strategy = make_strategy(spec, task, on_round=save)
    return strategy, spec.rounds


server_app = apps.server_app(_strategy)
client_app = apps.client_app(_spec_and_task)
