"""The data sets ``deltatune federate`` runs on: real text classification, or a toy task.

- ``sentiment``: Rotten Tomatoes critic snippets (negative/positive) with the MiniLM-L6
  encoder and a new 2-way head, the lab's ``sentiment`` task (same rows, same tokenizer).
- ``tweets``: the 3-class ``tweets-sentiment`` set (negative/neutral/positive) with the
  same encoder; three classes make the Dirichlet label skew harsher than two.
- ``toy``: a synthetic 3-class token task on a tiny random BERT (seconds, for tests).

Every set is label-balanced before it is split among clients, so any label skew a client
sees comes from the Dirichlet split alone. Texts are tokenised once to a fixed length;
:func:`deltatune.federated.flower.trim` cuts each batch to its longest row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from deltatune.core.errors import ConfigError

Data = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class TaskDefaults:
    """The sizes a task runs at unless the user overrides them (fit for 2 CPU cores)."""

    clients: int
    rounds: int
    examples: int
    test_examples: int
    max_length: int
    batch_size: int = 16


# Real tasks: 8 clients x 60 rows (48 to train, 12 to test), 6 rounds of 1 local epoch,
# 32 tokens (the median snippet has 26), 160 server test rows. One round of full
# fine-tuning at these sizes took ~4 min on two CPU cores shared with other jobs; the
# lab's sentiment size (1,000 rows, length 48) is ~2x that.
DEFAULTS: dict[str, TaskDefaults] = {
    "sentiment": TaskDefaults(clients=8, rounds=6, examples=480, test_examples=160,
                              max_length=32),
    "tweets": TaskDefaults(clients=8, rounds=6, examples=600, test_examples=180,
                           max_length=40),
    "toy": TaskDefaults(clients=4, rounds=3, examples=800, test_examples=200, max_length=16),
}
TASKS = tuple(DEFAULTS)
# The built data set each real task reads, and its label names in index order.
_SOURCES = {"sentiment": ("rotten-tomatoes", ("negative", "positive")),
            "tweets": ("tweets-sentiment", ("negative", "neutral", "positive"))}


@dataclasses.dataclass
class FederatedTask:
    """A model factory and the tokenised training pool and server test set of one task."""

    name: str
    make_model: Callable[[], nn.Module]
    train: Data
    test: Data
    label_names: tuple[str, ...]
    description: str


def _encode(tokenizer, rows: list[dict], labels: tuple[str, ...], max_length: int) -> Data:
    enc = tokenizer([r["text"] for r in rows], padding="max_length", truncation=True,
                    max_length=max_length, return_tensors="pt")
    data = {k: v for k, v in enc.items()}
    data["labels"] = torch.tensor([labels.index(r["label"]) for r in rows])
    return data


def load_task(name: str, *, examples: int | None = None, test_examples: int | None = None,
              max_length: int | None = None, seed: int = 0) -> FederatedTask:
    """Return the task ``name`` at the given sizes (``None``: the task's default).

    Real tasks read the built data set (building it on first use), take a label-balanced
    pool of ``examples`` training rows and ``test_examples`` rows of the test split (held-out
    movies for ``sentiment``), both fixed by seed 0 as in the lab, and load MiniLM-L6 with
    a head initialised from ``seed``.
    """
    if name not in DEFAULTS:
        raise ConfigError(f"unknown federated task {name!r}; choose from {', '.join(TASKS)}",
                          field="task")
    d = DEFAULTS[name]
    examples = d.examples if examples is None else examples
    test_examples = d.test_examples if test_examples is None else test_examples
    max_length = d.max_length if max_length is None else max_length
    if min(examples, test_examples, max_length) < 1:
        raise ConfigError("--examples, --test-examples and --max-length must be >= 1",
                          field="examples")
    if name == "toy":
        from deltatune.federated.run import toy_model, toy_task

        return FederatedTask(name, lambda: toy_model(seed),
                             toy_task(examples, seed=seed, length=max_length),
                             toy_task(test_examples, seed=seed + 1000, length=max_length),
                             ("band 0", "band 1", "band 2"),
                             "synthetic 3-class token task, tiny random 2-layer BERT")
    from deltatune import datasets, models
    from deltatune.lab.tasks import _balanced

    dataset, labels = _SOURCES[name]
    train_rows = _balanced(datasets.load(dataset, "train"), examples, "label", 0)
    test_rows = _balanced(datasets.load(dataset, "test"), test_examples, "label", 0)
    _, tokenizer = models.load("minilm-l6", task="base")

    def make_model() -> nn.Module:
        torch.manual_seed(seed)  # the new head's initialisation
        model, _ = models.load("minilm-l6", task="sequence-classification",
                               num_labels=len(labels))
        return model

    return FederatedTask(name, make_model, _encode(tokenizer, train_rows, labels, max_length),
                         _encode(tokenizer, test_rows, labels, max_length), labels,
                         f"{dataset} ({'/'.join(labels)}), MiniLM-L6 + new {len(labels)}-way "
                         f"head, length {max_length}")
