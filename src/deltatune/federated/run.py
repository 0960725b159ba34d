"""The federated loop: R rounds of Flower fit + evaluate, driven in-process.

The server side here calls the real Flower objects directly: each round, every
:class:`DeltaClient`'s ``fit`` (a ``flwr.client.NumPyClient``) gets the packed global
payload, the :class:`DeltaFedAvg` strategy's ``aggregate_fit`` receives genuine
``flwr.common.FitRes`` values, and each client's ``evaluate`` reports its accuracy. A client
that raises is passed to ``aggregate_fit`` as a failure, and the round completes with the
others. The same client and strategy also run as separate processes (:mod:`.process`),
in Flower's simulation engine (:mod:`.simulation`, needs Ray) and on its deployment
runtime (:mod:`.deployment`); all four give the same averaged tensors for the same seeds.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.common import (
    Code,
    EvaluateRes,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from torch import nn
from tqdm import tqdm

import deltatune as dt
from deltatune.federated.flower import DeltaClient
from deltatune.federated.partition import dirichlet_partition, iid_partition
from deltatune.federated.payload import METHODS, global_tensors
from deltatune.federated.recorder import RecordingFedAvg, RoundRecord

log = logging.getLogger("deltatune.federated")


def delta_config(method: str, r: int = 4) -> dt.core.config.DeltaConfig:
    """Return the deltatune config for a federated method name."""
    from deltatune.methods.full import FullConfig
    from deltatune.methods.loha import LoHaConfig
    from deltatune.methods.lora import LoraConfig

    if method not in METHODS:
        raise dt.core.errors.ConfigError(f"unknown federated method {method!r}; choose from "
                                         f"{', '.join(METHODS)}", field="methods")
    if method == "full":
        return FullConfig()
    if method == "lora":
        return LoraConfig(r=r)
    return LoHaConfig(r=r, mode=method)


def prepare(base: nn.Module, method: str, r: int = 4, seed: int | None = None) -> nn.Module:
    """Attach the method's delta to ``base``; return the model with the head trainable too.

    The head (``classifier``) of a freshly initialised classifier must learn, so for the
    delta methods it is unfrozen and travels with the global tensors. With ``seed`` the
    delta's initial values are drawn from that seed alone (a client's local pFedPara factors
    are then the same in every execution mode), without touching the global generator.
    """
    if seed is None:
        model = dt.attach(base, delta_config(method, r))
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = dt.attach(base, delta_config(method, r))
    for name, p in model.named_parameters():
        if ".classifier." in f".{name}":
            p.requires_grad_(True)
    return model


def toy_model(seed: int = 0, num_labels: int = 3) -> nn.Module:
    """Return a tiny random 2-layer BERT classifier (hidden 32, vocab 128)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, num_labels=num_labels))


def toy_task(n: int, seed: int = 0, length: int = 16, num_labels: int = 3
             ) -> dict[str, torch.Tensor]:
    """Return a synthetic classification set: the label is the token band seen most often.

    Tokens 3..127 are cut into ``num_labels`` bands; each example draws 60% of its tokens
    from its label's band and the rest uniformly, so the task is learnable but not trivial.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_labels, (n,), generator=g)
    bands = torch.linspace(3, 128, num_labels + 1).long()
    lo, hi = bands[labels].unsqueeze(1), bands[labels + 1].unsqueeze(1)
    inband = lo + (torch.rand(n, length, generator=g) * (hi - lo)).long()
    uniform = torch.randint(3, 128, (n, length), generator=g)
    ids = torch.where(torch.rand(n, length, generator=g) < 0.6, inband, uniform)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _take(data: dict[str, torch.Tensor], idx: list[int]) -> dict[str, torch.Tensor]:
    index = torch.as_tensor(idx, dtype=torch.long)
    return {k: v[index] for k, v in data.items()}


def client_shards(train: dict[str, torch.Tensor], clients: int, non_iid: float | None,
                  seed: int) -> list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """Split ``train`` among clients; return each client's (train, test) shards.

    IID, or Dirichlet(``non_iid``) label skew; each client's share is shuffled (seeded) and
    cut 80/20 into its own training and test shard (a one-example share tests on that
    example). Every process of a federation computes the same split from the same seed.
    """
    labels = train["labels"].tolist()
    parts = (iid_partition(len(labels), clients, seed) if non_iid is None
             else dirichlet_partition(labels, clients, non_iid, seed))
    out = []
    for c, part in enumerate(parts):
        order = np.random.default_rng(seed + c).permutation(part)
        cut = max(1, int(0.8 * len(order)))
        out.append((_take(train, order[:cut].tolist()),
                    _take(train, order[cut:].tolist() or order[:1].tolist())))
    return out


def run_federated(method: str, make_model: Callable[[], nn.Module],
                  train: dict[str, torch.Tensor], test: dict[str, torch.Tensor], *,
                  clients: int = 4, rounds: int = 3, local_epochs: int = 1,
                  non_iid: float | None = None, lr: float = 3e-3, r: int = 4,
                  batch_size: int = 16, seed: int = 0, progress: bool = False,
                  faults: dict[int, Callable[[Any], Any]] | None = None,
                  on_round: Callable[[list[RoundRecord]], None] | None = None,
                  ) -> tuple[list[RoundRecord], list[DeltaClient]]:
    """Run FedAvg for ``rounds`` rounds; return the per-round records and the clients.

    ``train`` is split among clients (IID, or Dirichlet label skew when ``non_iid`` is an
    alpha); each client's shard is 80/20 train/test.
    ``accuracy`` is the server's model (base + averaged global tensors) on ``test``;
    ``mean_client_accuracy`` the example-weighted mean of the clients' accuracies on their
    own test shards after receiving the round's global tensors (pFedPara: with their own
    W2). Bytes down count the payload once per
    client. ``faults`` maps a client index to a function applied to its update (tests).
    ``on_round`` is called with the records so far after every round (to save progress).
    """
    base = make_model()
    fleet = []
    for c, (own_train, own_test) in enumerate(client_shards(train, clients, non_iid, seed)):
        fleet.append(DeltaClient(str(c), prepare(copy.deepcopy(base), method, r, seed + c),
                                 method,
                                 own_train, own_test, epochs=local_epochs, lr=lr,
                                 batch_size=batch_size, seed=seed + c))
    # the server's copy: base + global tensors (pFedPara: with W2 at its start value 0)
    server = prepare(copy.deepcopy(base), method, r)
    strategy = RecordingFedAvg(global_tensors(fleet[0].model, method), server, test,
                               len(fleet), on_round=on_round)
    current = parameters_to_ndarrays(strategy.initialize_parameters(None))
    ok = Status(code=Code.OK, message="")
    bar = tqdm(range(1, rounds + 1), desc=f"federate {method}", disable=not progress)
    for rnd in bar:
        results, failures = [], []
        for c, client in enumerate(fleet):
            try:
                arrays, n, metrics = client.fit(current, {"round": rnd})
                if faults and c in faults:
                    arrays = faults[c](arrays)
                results.append((None, FitRes(ok, ndarrays_to_parameters(arrays), n, metrics)))
            except Exception as exc:  # a dropped client: recorded, the round goes on
                exc.cid = client.cid  # type: ignore[attr-defined]
                failures.append(exc)
        new, _ = strategy.aggregate_fit(rnd, results, failures)
        if new is not None:
            current = parameters_to_ndarrays(new)
        evals = [(None, EvaluateRes(ok, *client.evaluate(current, {"round": rnd})))
                 for client in fleet]
        strategy.aggregate_evaluate(rnd, evals, [])
        bar.set_postfix(acc=f"{strategy.records[-1].accuracy:.3f}",
                        clients=f"{strategy.records[-1].mean_client_accuracy:.3f}")
    return strategy.records, fleet
