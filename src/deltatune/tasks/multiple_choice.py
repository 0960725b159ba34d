"""Multiple choice by rank classification through a causal LM (T-Few style).

Rows: ``{"prompt": ..., "choices": ["...", ...], "label": index}`` (column names
configurable). Each choice is scored as the **length-normalised** log-probability of
its tokens after ``prompt + separator``:
``beta(choice) = (1/T) sum_t log p(choice_t | prompt, choice_<t)``; the prediction is
the choice with the highest ``beta`` (rank classification, T-Few arXiv:2205.05638).

Losses (``loss=``), per example, summed over the batch:

* ``"lm"``: ``L_LM = -(1/T) sum_t log p(y_t)`` of the correct choice;
* ``"t-few"``: ``L_LM + L_UL + L_LN`` where the unlikelihood term
  ``L_UL = -sum_{wrong n} (1/T_n) sum_t log(1 - p(y^n_t))`` pushes wrong choices down
  and ``L_LN = -log softmax(beta)[correct]`` is cross-entropy over the
  length-normalised choice scores.

Evaluation: ``loss`` (mean per example) and ``accuracy``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from deltatune import metrics
from deltatune.core.errors import ConfigError, DataError
from deltatune.tasks.base import IGNORE, Batch, Example, Row, Task, batched, pad_to, require

LOSSES = ("lm", "t-few")


class MultipleChoice(Task):
    """Score each answer choice with the LM; train the correct one up (and wrong ones down)."""

    name = "multiple-choice"
    default_metric = "accuracy"
    greater_is_better = True

    def __init__(self, tokenizer: Any, *, prompt_column: str = "prompt",
                 choices_column: str = "choices", label_column: str = "label",
                 separator: str = " ", loss: str = "t-few", max_length: int = 256) -> None:
        super().__init__()
        from deltatune.models import ensure_pad_token

        if loss not in LOSSES:
            raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}",
                              field="loss")
        ensure_pad_token(tokenizer)
        self.tokenizer = tokenizer
        self.prompt_column, self.choices_column = prompt_column, choices_column
        self.label_column = label_column
        self.separator, self.loss, self.max_length = separator, loss, max_length

    def describe(self) -> dict[str, Any]:
        """Settings written into the run file."""
        return {"task": self.name, "loss": self.loss, "separator": self.separator,
                "max_length": self.max_length}

    def encode(self, row: Row) -> Example | None:
        """One (ids, labels) sequence per choice; labels mark the choice tokens."""
        prompt = require(row, self.prompt_column)
        choices = require(row, self.choices_column, list)
        label = require(row, self.label_column, int)
        if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise DataError("'choices' must list at least two non-empty strings")
        if not 0 <= label < len(choices):
            raise DataError(f"label {label} is not an index into {len(choices)} choices")
        head = list(self.tokenizer(prompt + self.separator, add_special_tokens=False)
                    ["input_ids"])
        seqs = []
        for choice in choices:
            tail = list(self.tokenizer(choice, add_special_tokens=False)["input_ids"])
            ids = head + tail
            if len(ids) > self.max_length:  # keep the choice; cut the prompt's start
                self.stats.truncated += 1
                ids = ids[-self.max_length:]
            labels = [IGNORE] * (len(ids) - len(tail)) + tail
            seqs.append({"input_ids": ids, "labels": labels})
        return {"choices": seqs, "label": label}

    def collate(self, examples: Sequence[Example]) -> Batch:
        """All choices of all examples as one right-padded batch, plus grouping info."""
        seqs = [s for e in examples for s in e["choices"]]
        ids = [s["input_ids"] for s in seqs]
        return {"input_ids": pad_to(ids, int(self.tokenizer.pad_token_id)),
                "attention_mask": pad_to([[1] * len(i) for i in ids], 0),
                "labels": pad_to([s["labels"] for s in seqs], IGNORE),
                "n_choices": torch.tensor([len(e["choices"]) for e in examples]),
                "answer": torch.tensor([e["label"] for e in examples])}

    def token_logprobs(self, model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position log p of each choice token (0 elsewhere), and the choice-token mask."""
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:].to(logits.device)
        mask = labels != IGNORE
        logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        return logp * mask, mask

    def _per_example(self, model: Any, batch: Batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logp, mask = self.token_logprobs(model, batch)
        counts = batch["n_choices"].tolist()
        losses, betas = [], []
        for k, (lp, m) in enumerate(zip(logp.split(counts), mask.split(counts))):
            n_tok = m.sum(1).clamp(min=1)
            beta = lp.sum(1) / n_tok  # length-normalised log-probability per choice
            y = int(batch["answer"][k])
            loss = -beta[y]  # L_LM
            if self.loss == "t-few":
                p = lp.exp().clamp(max=1 - 1e-6)
                ul = -(torch.log1p(-p) * m).sum(1) / n_tok
                wrong = torch.ones_like(beta, dtype=torch.bool)
                wrong[y] = False
                loss = loss + ul[wrong].sum() - torch.log_softmax(beta, 0)[y]
            losses.append(loss)
            betas.append(beta)
        return torch.stack(losses), betas

    def loss_sum(self, model: Any, batch: Batch) -> tuple[torch.Tensor, int]:
        """Summed per-example loss, and the number of examples."""
        losses, _ = self._per_example(model, batch)
        return losses.sum(), len(losses)

    @torch.no_grad()
    def evaluate(self, model: Any, examples: Sequence[Example], *, batch_size: int = 8,
                 progress: bool = False) -> dict[str, float]:
        """``loss`` per example and rank-classification ``accuracy``."""
        device = next(model.parameters()).device
        preds, total = [], 0.0
        for chunk in batched(examples, batch_size):
            batch = {k: v.to(device) for k, v in self.collate(chunk).items()}
            losses, betas = self._per_example(model, batch)
            total += float(losses.sum())
            preds.extend(int(b.argmax()) for b in betas)
        gold = [e["label"] for e in examples]
        return {"loss": total / len(examples), "accuracy": metrics.accuracy(preds, gold)}
