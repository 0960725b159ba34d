"""Flower glue: a ``NumPyClient`` that trains a delta locally and a FedAvg ``Strategy``.

The payload crosses Flower as ONE uint8 array holding the safetensors bytes of the
travelling tensors (see :mod:`deltatune.federated.payload`), so the bytes Flower carries are
exactly the bytes counted. Local-only tensors (pFedPara's W2) live in the client's model
and are never put in a payload.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from flwr.client import NumPyClient
from flwr.common import FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg
from torch import nn

from deltatune.federated.aggregate import Rejection, fedavg
from deltatune.federated.payload import from_bytes, global_tensors, load_tensors, to_bytes

log = logging.getLogger("deltatune.federated")


def pack(tensors: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """Return the Flower payload for ``tensors``: one uint8 array of safetensors bytes."""
    return [np.frombuffer(to_bytes(tensors), dtype=np.uint8)]


def unpack(arrays: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack`; return the tensors (raises on a malformed payload)."""
    if len(arrays) != 1 or arrays[0].dtype != np.uint8:
        raise ValueError(f"expected one uint8 safetensors array, got {len(arrays)} arrays")
    return from_bytes(arrays[0].tobytes())


def payload_size(arrays: list[np.ndarray]) -> int:
    """Return the number of payload bytes in a packed Flower payload."""
    return sum(int(a.nbytes) for a in arrays)


def trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return ``batch`` cut to its longest row (right padding only; no-op without a mask).

    Texts are padded to a fixed length once; cutting the all-padding columns of a batch
    saves time and changes no logit, since padded positions are masked out and come last.
    """
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return batch
    width = max(1, int(mask.sum(1).max()))
    return {k: v[:, :width] if v.dim() == 2 and v.shape[1] == mask.shape[1] else v
            for k, v in batch.items()}


def _batches(data: dict[str, torch.Tensor], size: int, gen: torch.Generator | None):
    n = len(data["labels"])
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    for start in range(0, n, size):
        idx = order[start:start + size]
        yield trim({k: v[idx] for k, v in data.items()})


@torch.no_grad()
def accuracy(model: nn.Module, data: dict[str, torch.Tensor], batch_size: int = 64
             ) -> tuple[float, float]:
    """Return (mean loss, accuracy) of a sequence classifier on ``data``."""
    model.eval()
    loss_sum, correct, n = 0.0, 0, len(data["labels"])
    for batch in _batches(data, batch_size, None):
        out = model(**batch)
        loss_sum += float(out.loss) * len(batch["labels"])
        correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
    return loss_sum / n, correct / n


class DeltaClient(NumPyClient):
    """One federated client: its own model (global + local tensors) and data shard."""

    def __init__(self, cid: str, model: nn.Module, method: str,
                 train: dict[str, torch.Tensor], test: dict[str, torch.Tensor], *,
                 epochs: int = 1, lr: float = 3e-3, batch_size: int = 16, seed: int = 0):
        self.cid, self.model, self.method = cid, model, method
        self.train, self.test = train, test
        self.epochs, self.lr, self.batch_size, self.seed = epochs, lr, batch_size, seed

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        """Return this client's travelling tensors, packed."""
        return pack(global_tensors(self.model, self.method))

    def _receive(self, parameters: list[np.ndarray]) -> None:
        if parameters and payload_size(parameters):
            load_tensors(self.model, unpack(parameters))

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]
            ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """Load the global tensors, train ``epochs`` local epochs (AdamW); return the update.

        The batch order and dropout are drawn from ``(seed, config["round"])`` alone, so a
        client computes the same update whether it runs in-process, in its own process or
        in Flower's simulation, and whatever ran before it in the same interpreter.
        """
        self._receive(parameters)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        loss_sum, steps = 0.0, 0
        round_seed = self.seed * 100_003 + int(config.get("round", 0))
        gen = torch.Generator().manual_seed(round_seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(round_seed)  # dropout
            for _ in range(self.epochs):
                for batch in _batches(self.train, self.batch_size, gen):
                    loss = self.model(**batch).loss
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    loss_sum, steps = loss_sum + float(loss.detach()), steps + 1
        out = self.get_parameters({})
        return out, len(self.train["labels"]), {"cid": self.cid,
                                                "train_loss": loss_sum / max(steps, 1)}

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]
                 ) -> tuple[float, int, dict[str, Any]]:
        """Load the global tensors (keeping the local ones); return loss, n, accuracy."""
        self._receive(parameters)
        loss, acc = accuracy(self.model, self.test)
        return loss, len(self.test["labels"]), {"accuracy": acc, "cid": self.cid}


def _round_config(server_round: int) -> dict[str, Any]:
    return {"round": server_round}


class DeltaFedAvg(FedAvg):
    """FedAvg over safetensors payloads, validated against the global tensors first.

    Invalid updates (wrong names, shapes, dtype, non-finite) and failed clients are
    rejected with a logged reason; the others are averaged weighted by example counts.
    ``rejections`` and ``bytes_up`` hold the last round's record.
    """

    def __init__(self, reference: dict[str, torch.Tensor], **kwargs: Any) -> None:
        # every fit gets its round number (clients draw their batch order and dropout from it)
        kwargs.setdefault("on_fit_config_fn", _round_config)
        super().__init__(initial_parameters=ndarrays_to_parameters(pack(reference)),
                         accept_failures=True, **kwargs)
        self.reference = reference
        self.rejections: list[Rejection] = []
        self.bytes_up = 0

    def aggregate_fit(self, server_round: int, results: list[tuple[Any, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Any]]:
        """Validate and average the round's updates; return the new global payload."""
        updates, self.rejections, self.bytes_up = [], [], 0
        for i, (_, res) in enumerate(results):
            cid = str(res.metrics.get("cid", i))
            arrays = parameters_to_ndarrays(res.parameters)
            self.bytes_up += payload_size(arrays)
            try:
                updates.append((cid, unpack(arrays), res.num_examples))
            except Exception as exc:  # a payload that does not even parse is a rejection
                log.warning("rejected update from client %s: unreadable payload (%s)", cid, exc)
                self.rejections.append(Rejection(cid, f"unreadable payload ({exc})"))
        for failure in failures:
            log.warning("client failed this round: %r", failure)
            self.rejections.append(Rejection(getattr(failure, "cid", "?"),
                                             f"client failed: {failure!r}"))
        avg, rejected = fedavg(updates, self.reference)
        self.rejections += rejected
        if avg is None:
            return None, {"accepted": 0}
        self.reference = avg
        return ndarrays_to_parameters(pack(avg)), {"accepted": len(updates) - len(rejected)}
