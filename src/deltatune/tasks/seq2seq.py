"""Sequence-to-sequence (encoder-decoder: T5, BART): translation, summarisation, QA.

Rows: ``{"source": ..., "target": ...}`` (column names configurable). The source is
tokenized with the tokenizer's special tokens (truncated to ``max_length``); the target
gets eos appended when the tokenizer does not add one. The loss is the summed
cross-entropy of the decoder's logits against the target tokens (the model builds the
decoder inputs by shifting the labels right, its own convention). Evaluation: mean
target-token ``loss`` and ``perplexity``; with ``generate_examples`` also ROUGE-L,
sacreBLEU and exact match of greedy generations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from deltatune import metrics
from deltatune.tasks.base import IGNORE, Batch, Example, Row, Task, batched, pad_to, require


class Seq2Seq(Task):
    """Teacher-forced training of an encoder-decoder; greedy generation for metrics."""

    name = "seq2seq"

    def __init__(self, tokenizer: Any, *, source_column: str = "source",
                 target_column: str = "target", max_length: int = 512,
                 max_target_length: int = 128, max_new_tokens: int = 64,
                 generate_examples: int | None = None) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.source_column, self.target_column = source_column, target_column
        self.max_length, self.max_target_length = max_length, max_target_length
        self.max_new_tokens = max_new_tokens
        self.generate_examples = generate_examples

    def describe(self) -> dict[str, Any]:
        """Settings written into the run file."""
        return {"task": self.name, "max_length": self.max_length,
                "max_target_length": self.max_target_length,
                "max_new_tokens": self.max_new_tokens}

    def encode(self, row: Row) -> Example | None:
        """Source ids, target ids (ending in eos) and the reference text."""
        source = require(row, self.source_column)
        target = require(row, self.target_column)
        src = list(self.tokenizer(source, truncation=True, max_length=self.max_length)
                   ["input_ids"])
        tgt = list(self.tokenizer(target, add_special_tokens=False)["input_ids"])
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not tgt or tgt[-1] != eos):
            tgt.append(int(eos))
        if len(tgt) > self.max_target_length:
            self.stats.truncated += 1
            tgt = tgt[:self.max_target_length]
        refs = row.get("references")
        return {"input_ids": src, "labels": tgt,
                "references": refs if isinstance(refs, list) and refs else [target]}

    def count_items(self, example: Example) -> int:
        """Target tokens."""
        return len(example["labels"])

    def collate(self, examples: Sequence[Example]) -> Batch:
        """Right-padded source ids and mask; target labels padded with -100."""
        pad = self.tokenizer.pad_token_id or 0
        ids = [e["input_ids"] for e in examples]
        return {"input_ids": pad_to(ids, pad),
                "attention_mask": pad_to([[1] * len(i) for i in ids], 0),
                "labels": pad_to([e["labels"] for e in examples], IGNORE)}

    def loss_sum(self, model: Any, batch: Batch) -> tuple[torch.Tensor, int]:
        """Summed cross-entropy of the target tokens, and their number."""
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"])
        logits = out.logits.float()
        labels = batch["labels"].to(logits.device)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
        return loss, int((labels != IGNORE).sum())

    @torch.no_grad()
    def generate(self, model: Any, examples: Sequence[Example], *, batch_size: int = 8,
                 max_new_tokens: int | None = None) -> list[str]:
        """Greedy decodes of each example's source."""
        device = next(model.parameters()).device
        pad = self.tokenizer.pad_token_id or 0
        outs: list[str] = []
        for chunk in batched(examples, batch_size):
            ids = [e["input_ids"] for e in chunk]
            gen = model.generate(input_ids=pad_to(ids, pad).to(device),
                                 attention_mask=pad_to([[1] * len(i) for i in ids], 0).to(device),
                                 do_sample=False, max_new_tokens=max_new_tokens or
                                 self.max_new_tokens, eos_token_id=self.tokenizer.eos_token_id,
                                 pad_token_id=pad)
            outs.extend(self.tokenizer.decode(g.tolist(), skip_special_tokens=True).strip()
                        for g in gen)
        return outs

    @torch.no_grad()
    def evaluate(self, model: Any, examples: Sequence[Example], *, batch_size: int = 8,
                 progress: bool = False) -> dict[str, float]:
        """``loss``, ``perplexity``; ``rouge_l``, ``bleu``, ``exact_match`` of generations."""
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for chunk in batched(examples, batch_size):
            batch = {k: v.to(device) for k, v in self.collate(chunk).items()}
            loss, n = self.loss_sum(model, batch)
            total, count = total + float(loss), count + n
        result = {"loss": total / max(count, 1), "perplexity": metrics.perplexity(total, count)}
        n_gen = len(examples) if self.generate_examples is None else self.generate_examples
        if n_gen > 0:
            subset = list(examples[:n_gen])
            preds = self.generate(model, subset, batch_size=batch_size)
            refs = [e["references"] for e in subset]
            result.update(rouge_l=metrics.rouge_l(preds, refs), bleu=metrics.bleu(preds, refs),
                          exact_match=metrics.exact_match(preds, refs))
        return result
