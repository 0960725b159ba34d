"""Token classification (sequence labelling) with BIO tags: NER, chunking.

Rows: ``{"tokens": ["John", "lives", "here"], "tags": ["B-PER", "O", "O"]}`` (column
names configurable). Words are tokenized with ``is_split_into_words=True`` (a fast
tokenizer is needed for ``word_ids``); the label of a word sits on its **first**
sub-token and the other sub-tokens get -100, so every word counts once in the loss
and in the metrics. A word cut off by ``max_length`` is predicted as ``O`` and the
example is counted as truncated.

The model is an ``...ForTokenClassification`` (a per-token head, as in P-tuning v2 for
sequence labelling). Evaluation: ``loss`` (mean per word), ``accuracy`` per word and
``span_f1`` (exact entity spans, CoNLL convention).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from deltatune import metrics
from deltatune.core.errors import DataError
from deltatune.tasks.base import (
    IGNORE,
    Batch,
    Encoded,
    Example,
    Row,
    Task,
    batched,
    pad_to,
    require,
)


class TokenClassification(Task):
    """Tag every word with a BIO label through a per-token head."""

    name = "token-classification"
    default_metric = "span_f1"
    greater_is_better = True

    def __init__(self, tokenizer: Any, *, labels: Sequence[str] | None = None,
                 tokens_column: str = "tokens", tags_column: str = "tags",
                 max_length: int = 256) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.labels = list(labels) if labels is not None else None
        self.tokens_column, self.tags_column = tokens_column, tags_column
        self.max_length = max_length

    def describe(self) -> dict[str, Any]:
        """Settings written into the run file."""
        return {"task": self.name, "labels": self.labels, "max_length": self.max_length}

    @staticmethod
    def tag_set(rows: Any, tags_column: str = "tags") -> list[str]:
        """``O`` then the other distinct tags of ``rows``, sorted: the head's class order."""
        found = {t for r in rows if isinstance(r, dict)
                 for t in (r.get(tags_column) or []) if isinstance(t, str)}
        return ["O", *sorted(found - {"O"})]

    def encode_rows(self, rows: Any, source: str = "data") -> list[Example]:
        """Fix the tag set from these rows when none was given ('O' first), then encode."""
        if self.labels is None and not isinstance(rows, Encoded):
            self.labels = self.tag_set(rows, self.tags_column)
        return super().encode_rows(rows, source)

    def encode(self, row: Row) -> Example | None:
        """Sub-token ids with the word's tag id on its first sub-token, -100 elsewhere."""
        words = require(row, self.tokens_column, list)
        tags = require(row, self.tags_column, list)
        if len(words) != len(tags):
            raise DataError(f"{len(words)} tokens but {len(tags)} tags")
        if not words:
            return None
        assert self.labels is not None
        unknown = sorted({t for t in tags if t not in self.labels})
        if unknown:
            raise DataError(f"tag(s) {unknown} not in the label set {self.labels}")
        enc = self.tokenizer(words, is_split_into_words=True, truncation=True,
                             max_length=self.max_length)
        word_ids = enc.word_ids()
        labels, seen = [], set()
        for w in word_ids:
            if w is None or w in seen:
                labels.append(IGNORE)
            else:
                seen.add(w)
                labels.append(self.labels.index(tags[w]))
        if len(seen) < len(words):
            self.stats.truncated += 1
        return {"input_ids": list(enc["input_ids"]), "labels": labels,
                "word_tags": list(tags)}

    def count_items(self, example: Example) -> int:
        """Words labelled in the example."""
        return sum(1 for y in example["labels"] if y != IGNORE)

    def collate(self, examples: Sequence[Example]) -> Batch:
        """Right-padded ids, mask and per-token labels."""
        pad = self.tokenizer.pad_token_id or 0
        ids = [e["input_ids"] for e in examples]
        return {"input_ids": pad_to(ids, pad),
                "attention_mask": pad_to([[1] * len(i) for i in ids], 0),
                "labels": pad_to([e["labels"] for e in examples], IGNORE)}

    def loss_sum(self, model: Any, batch: Batch) -> tuple[torch.Tensor, int]:
        """Summed cross-entropy over labelled sub-tokens, and their number."""
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"].to(logits.device)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
        return loss, int((labels != IGNORE).sum())

    @torch.no_grad()
    def predict(self, model: Any, examples: Sequence[Example], *, batch_size: int = 8
                ) -> tuple[list[list[str]], float, int]:
        """Predicted tags per word (``O`` past truncation), summed loss, labelled count."""
        assert self.labels is not None
        device = next(model.parameters()).device
        out: list[list[str]] = []
        total, count = 0.0, 0
        for chunk in batched(examples, batch_size):
            batch = {k: v.to(device) for k, v in self.collate(chunk).items()}
            loss, n = self.loss_sum(model, batch)
            total += float(loss)
            count += n
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
            for row, ex in zip(logits.argmax(-1).tolist(), chunk):
                tags = [self.labels[p] for p, y in zip(row, ex["labels"]) if y != IGNORE]
                out.append(tags + ["O"] * (len(ex["word_tags"]) - len(tags)))
        return out, total, count

    def evaluate(self, model: Any, examples: Sequence[Example], *, batch_size: int = 8,
                 progress: bool = False) -> dict[str, float]:
        """``loss`` per word, word ``accuracy`` and entity ``span_f1``."""
        preds, total, count = self.predict(model, examples, batch_size=batch_size)
        gold = [e["word_tags"] for e in examples]
        flat_p = [t for p in preds for t in p]
        flat_g = [t for g in gold for t in g]
        return {"loss": total / max(count, 1), "accuracy": metrics.accuracy(flat_p, flat_g),
                "span_f1": metrics.span_f1(preds, gold)}
