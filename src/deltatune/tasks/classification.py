"""Sequence classification: a classification head, or a verbaliser through a causal LM.

Rows: ``{"text": ..., "label": ...}`` and optionally ``{"text_pair": ...}`` (column names
configurable). Labels may be ints (class indices) or strings; ``labels`` fixes the
class names and their order (otherwise the sorted distinct labels of the first rows
encoded, i.e. the training data).

* **Head** (``verbalizer=None``): the model is an ``...ForSequenceClassification``;
  the loss is the summed cross-entropy of its logits.
* **Verbaliser** (``verbalizer={"positive": " great", "negative": " terrible"}``): the
  model is a causal LM; the text is rendered with ``template`` (``{text}`` and
  ``{text_pair}`` placeholders) and the class scores are the LM's logits, at the last
  prompt token, of the first token of each label word (as in PET / LM-BFF, restricted
  to the label words). The loss is the cross-entropy over those scores, so no new
  head is trained: a delta on the LM learns to pick the right word.

Evaluation: ``loss``, ``accuracy`` and ``macro_f1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from deltatune import metrics
from deltatune.core.errors import ConfigError, DataError
from deltatune.tasks.base import Batch, Encoded, Example, Row, Task, batched, pad_to, require


class SequenceClassification(Task):
    """Classify whole texts (with a head, or with label words through a causal LM)."""

    name = "sequence-classification"
    default_metric = "accuracy"
    greater_is_better = True

    def __init__(self, tokenizer: Any, *, labels: Sequence[Any] | None = None,
                 verbalizer: dict[Any, str] | None = None, template: str = "{text}",
                 text_column: str = "text", pair_column: str = "text_pair",
                 label_column: str = "label", max_length: int = 256) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.labels = list(labels) if labels is not None else None
        self.verbalizer = dict(verbalizer) if verbalizer else None
        self.template = template
        self.text_column, self.pair_column = text_column, pair_column
        self.label_column = label_column
        self.max_length = max_length
        self.label_ids: list[int] | None = None
        if self.verbalizer:
            from deltatune.models import ensure_pad_token

            ensure_pad_token(tokenizer)
            if self.labels is None:
                self.labels = list(self.verbalizer)
            missing = [lab for lab in self.labels if lab not in self.verbalizer]
            if missing:
                raise ConfigError(f"the verbalizer has no word for label(s) {missing}",
                                  field="verbalizer")
            self.label_ids = []
            for lab in self.labels:
                toks = tokenizer(self.verbalizer[lab], add_special_tokens=False)["input_ids"]
                if not toks:
                    raise ConfigError(f"label word {self.verbalizer[lab]!r} is empty after "
                                      f"tokenization", field="verbalizer")
                self.label_ids.append(int(toks[0]))
            if len(set(self.label_ids)) != len(self.label_ids):
                raise ConfigError("two label words start with the same token; choose words "
                                  "whose first tokens differ", field="verbalizer")

    def describe(self) -> dict[str, Any]:
        """Settings written into the run file."""
        return {"task": self.name, "labels": self.labels, "verbalizer": self.verbalizer,
                "template": self.template, "max_length": self.max_length}

    @staticmethod
    def label_set(rows: Any, label_column: str = "label") -> list[Any]:
        """The distinct labels of ``rows``, sorted (ints and strings apart): the class order."""
        found = {r.get(label_column) for r in rows if isinstance(r, dict)}
        found.discard(None)
        return sorted(found, key=lambda v: (str(type(v)), v))

    def encode_rows(self, rows: Any, source: str = "data") -> list[Example]:
        """Fix the label set from these rows when none was given, then encode."""
        if self.labels is None and not isinstance(rows, Encoded):
            self.labels = self.label_set(rows, self.label_column)
        return super().encode_rows(rows, source)

    def label_index(self, value: Any) -> int:
        """Index of a label value (a class name, or an int index)."""
        assert self.labels is not None
        if value in self.labels:
            return self.labels.index(value)
        if isinstance(value, int) and not isinstance(value, bool) and \
                0 <= value < len(self.labels) and not isinstance(self.labels[0], int):
            return value
        raise DataError(f"label {value!r} is not one of {self.labels}")

    def encode(self, row: Row) -> Example | None:
        """Token ids (truncated to max_length) and the label index."""
        text = require(row, self.text_column)
        pair = row.get(self.pair_column)
        label = self.label_index(require(row, self.label_column, (str, int)))
        if self.verbalizer:
            prompt = self.template.format(text=text, text_pair=pair or "")
            ids = list(self.tokenizer(prompt)["input_ids"])
            if len(ids) > self.max_length:  # keep the end: the label word follows it
                self.stats.truncated += 1
                ids = ids[-self.max_length:]
        else:
            enc = self.tokenizer(text, pair, truncation=True, max_length=self.max_length)
            ids = list(enc["input_ids"])
        return {"input_ids": ids, "label": label}

    def collate(self, examples: Sequence[Example]) -> Batch:
        """Right-padded ids, attention mask and labels."""
        pad = self.tokenizer.pad_token_id or 0
        ids = [e["input_ids"] for e in examples]
        return {"input_ids": pad_to(ids, pad), "attention_mask": pad_to([[1] * len(i)
                                                                         for i in ids], 0),
                "labels": torch.tensor([e["label"] for e in examples])}

    def logits(self, model: Any, batch: Batch) -> torch.Tensor:
        """Class scores (batch, classes) from the head or from the label words."""
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        if not self.verbalizer:
            return out.logits.float()
        last = batch["attention_mask"].sum(1) - 1  # right padding: last real token
        rows = torch.arange(len(last), device=last.device)
        return out.logits[rows, last][:, self.label_ids].float()

    def loss_sum(self, model: Any, batch: Batch) -> tuple[torch.Tensor, int]:
        """Summed cross-entropy over the batch, and the batch size."""
        logits = self.logits(model, batch)
        labels = batch["labels"].to(logits.device)
        return F.cross_entropy(logits, labels, reduction="sum"), len(labels)

    @torch.no_grad()
    def predict(self, model: Any, examples: Sequence[Example], *, batch_size: int = 8
                ) -> tuple[list[int], float]:
        """Predicted class indices and the summed loss."""
        device = next(model.parameters()).device
        preds: list[int] = []
        total = 0.0
        for chunk in batched(examples, batch_size):
            batch = {k: v.to(device) for k, v in self.collate(chunk).items()}
            logits = self.logits(model, batch)
            total += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
            preds.extend(logits.argmax(-1).tolist())
        return preds, total

    def evaluate(self, model: Any, examples: Sequence[Example], *, batch_size: int = 8,
                 progress: bool = False) -> dict[str, float]:
        """``loss`` (mean), ``accuracy`` and ``macro_f1``."""
        preds, total = self.predict(model, examples, batch_size=batch_size)
        gold = [e["label"] for e in examples]
        return {"loss": total / len(examples), "accuracy": metrics.accuracy(preds, gold),
                "macro_f1": metrics.macro_f1(preds, gold)}
