"""Tiny lab tasks on random models with synthetic data whose labels are exact by rule."""

from __future__ import annotations

import pytest
import torch

from deltatune.lab import tasks as lab_tasks
from deltatune.lab.tasks import ClassificationTask, LabTask, Loaded, TaskSize
from tests.conftest import VOCAB, tiny_bert, tiny_llama

SIZE = TaskSize(train_examples=32, eval_examples=16, steps=4, batch_size=4, max_length=12,
                latency_batch=2, latency_repeats=2)


class TinyClassification(ClassificationTask):
    """Label 1 when token 7 occurs in the sequence (exact by construction)."""

    name = "tiny-cls"
    model_name = "tiny-bert"
    head_modules = ("classifier",)
    sizes = {"default": SIZE}  # noqa: RUF012 (a test fixture)

    def load(self, device):
        return Loaded(tiny_bert(num_labels=2).to(device), None, device)

    def _rows(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(8, VOCAB, (n, 10), generator=g)
        ids[: n // 2, 3] = 7
        return ids

    def _batch(self, ids):
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": (ids == 7).any(-1).long()}

    def train_batches(self, loaded, size, seed):
        ids = self._rows(size.train_examples, 0)
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
        ids = ids[order][: size.steps * size.batch_size]
        return [self._batch(ids[i:i + size.batch_size])
                for i in range(0, len(ids), size.batch_size)]

    @torch.no_grad()
    def evaluate(self, model, loaded, size):
        batch = self._batch(self._rows(size.eval_examples, 1))
        out = model(**batch)
        return {"accuracy": float((out.logits.argmax(-1) == batch["labels"]).float().mean()),
                "eval_loss": float(out.loss)}

    def latency_batch(self, loaded, size):
        b = self._batch(self._rows(size.latency_batch, 2))
        b.pop("labels")
        return b


class TinyLM(LabTask):
    """Next-token prediction on random sequences with a tiny Llama; metric: -loss."""

    name = "tiny-lm"
    model_name = "tiny-llama"
    metric = "neg_loss"
    sizes = {"default": SIZE}  # noqa: RUF012

    def load(self, device):
        return Loaded(tiny_llama().to(device), None, device)

    def _batch(self, n, seed):
        ids = torch.randint(3, VOCAB, (n, 8), generator=torch.Generator().manual_seed(seed))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def train_batches(self, loaded, size, seed):
        return [self._batch(size.batch_size, 100 * seed + i) for i in range(size.steps)]

    @torch.no_grad()
    def evaluate(self, model, loaded, size):
        return {"neg_loss": -float(model(**self._batch(8, 999)).loss)}

    def latency_batch(self, loaded, size):
        b = self._batch(2, 5)
        b.pop("labels")
        return b

    @torch.no_grad()
    def evaluate_icl(self, loaded, size, shots, seed):
        # demonstrations = `shots` extra sequences of 8 tokens before the query
        batch = self._batch(2, 7)
        batch["input_ids"] = batch["input_ids"].repeat(1, shots + 1)
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        batch.pop("labels")
        return {"neg_loss": -1.0}, batch


@pytest.fixture(autouse=True)
def tiny_tasks():
    lab_tasks.register_task("tiny-cls", TinyClassification)
    lab_tasks.register_task("tiny-lm", TinyLM)
    yield
    lab_tasks._TASKS.pop("tiny-cls", None)
    lab_tasks._TASKS.pop("tiny-lm", None)
