"""What a federated round measured, recorded the same way in all four run modes.

:class:`RecordingFedAvg` is the :class:`DeltaFedAvg` strategy plus the server-side
measurements: after ``aggregate_fit`` it loads the new global tensors into the server's
model and scores it on the held-out test set; after ``aggregate_evaluate`` it adds the
clients' accuracies on their own test shards and appends one :class:`RoundRecord`. The
in-process loop calls the two hooks itself; Flower's server calls them in the separate-
process, simulation and deployment modes, so every mode writes the same records for the
same seeds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from flwr.common import EvaluateIns, FitIns, Parameters
from torch import nn

from deltatune.federated.flower import DeltaFedAvg, accuracy, pack, payload_size
from deltatune.federated.payload import load_tensors


@dataclass
class RoundRecord:
    """What one round measured."""

    round: int
    accuracy: float
    mean_client_accuracy: float
    client_accuracy: list[float]
    bytes_up: int
    bytes_down: int
    cumulative_bytes: int
    rejected: list[str] = field(default_factory=list)


class FederationResult(NamedTuple):
    """What a separate-process or simulated federation returns."""

    global_tensors: dict[str, torch.Tensor]  # the final averaged travelling tensors
    records: list[RoundRecord]  # one per round, as the in-process loop records them
    log: list[dict[str, Any]]  # raw per-round counts: replies, failures, rejections


class RecordingFedAvg(DeltaFedAvg):
    """FedAvg over delta payloads that keeps one :class:`RoundRecord` per round.

    ``server_model`` is the base model with the method's deltas (their global tensors are
    overwritten every round); ``test`` the server's held-out set; ``clients`` the number of
    clients the federation was started with (bytes down count one payload per client).
    ``on_round`` is called with all records so far after every round. ``log`` keeps the
    raw per-round counts (clients that replied, failures, rejection reasons).

    A client process that died is not waited for: only round 1 waits until all
    ``clients`` have connected; later rounds train and evaluate whoever is connected.
    """

    def __init__(self, reference: dict[str, torch.Tensor], server_model: nn.Module,
                 test: dict[str, torch.Tensor], clients: int, *,
                 on_round: Callable[[list[RoundRecord]], None] | None = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("min_fit_clients", clients)
        kwargs.setdefault("min_available_clients", clients)
        kwargs.setdefault("fraction_evaluate", 1.0)
        kwargs.setdefault("min_evaluate_clients", 1)
        super().__init__(reference, **kwargs)
        self.server_model, self.test, self.clients = server_model, test, clients
        self.on_round = on_round
        self.records: list[RoundRecord] = []
        self.log: list[dict[str, Any]] = []
        self._pending: dict[str, Any] = {}
        self._total_bytes = 0

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any
                      ) -> list[tuple[Any, FitIns]]:
        """Round 1: wait for every client (Flower's sampling); later: all still connected."""
        if server_round == 1:
            return super().configure_fit(server_round, parameters, client_manager)
        config = self.on_fit_config_fn(server_round) if self.on_fit_config_fn else {}
        return [(c, FitIns(parameters, config)) for c in client_manager.all().values()]

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: Any) -> list[tuple[Any, EvaluateIns]]:
        """Ask every connected client to score the new global tensors on its own shard."""
        return [(c, EvaluateIns(parameters, {"round": server_round}))
                for c in client_manager.all().values()]

    def aggregate_fit(self, server_round: int, results: list[tuple[Any, Any]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Any]]:
        """Average the updates, then score the server's model with the new global tensors."""
        # this round's download is the global payload the clients were sent
        down = payload_size(pack(self.reference)) * self.clients
        new, metrics = super().aggregate_fit(server_round, results, failures)
        self._total_bytes += self.bytes_up + down
        load_tensors(self.server_model, self.reference)
        self._pending = {
            "round": server_round, "accuracy": accuracy(self.server_model, self.test)[1],
            "bytes_up": self.bytes_up, "bytes_down": down,
            "cumulative_bytes": self._total_bytes,
            "rejected": [f"client {x.client}: {x.reason}" for x in self.rejections]}
        self.log.append({"round": server_round, "bytes_up": self.bytes_up,
                         "clients": len(results), "failures": len(failures),
                         "rejected": [f"{x.client}: {x.reason}" for x in self.rejections]})
        return new, metrics

    def aggregate_evaluate(self, server_round: int, results: list[tuple[Any, Any]],
                           failures: list[Any]) -> tuple[float | None, dict[str, Any]]:
        """Record the round: the clients' accuracies (by client id) and the pending counts."""
        scored = sorted((int(res.metrics["cid"]), res.num_examples, float(res.metrics["accuracy"]))
                        for _, res in results)
        n_all = sum(n for _, n, _ in scored)
        mean = sum(n * acc for _, n, acc in scored) / n_all if n_all else float("nan")
        self.records.append(RoundRecord(
            self._pending["round"], self._pending["accuracy"], mean,
            [acc for _, _, acc in scored], self._pending["bytes_up"],
            self._pending["bytes_down"], self._pending["cumulative_bytes"],
            self._pending["rejected"]))
        if self.on_round is not None:
            self.on_round(self.records)
        return super().aggregate_evaluate(server_round, results, failures)


__all__ = ["FederationResult", "RecordingFedAvg", "RoundRecord"]
