"""Language modelling on raw text: loss on every token (perplexity, forgetting guard).

Rows are ``{"text": ...}`` (column configurable). Each text is tokenized, ``eos`` is
appended, and the result is cut into blocks of at most ``max_length`` tokens; every
block is one example with every token supervised (a long document becomes several
examples, nothing is dropped). With ``pack=True`` all texts are first concatenated
(eos between them) and cut into full blocks, which wastes no padding.

Used as a task of its own (continued pre-training, perplexity evaluation) and by the
forgetting guard: general text mixed into fine-tuning batches, and the perplexity on
held-out general text before and after fine-tuning.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from deltatune.core.errors import DataError
from deltatune.tasks.base import Encoded, Example, Row, require
from deltatune.tasks.causal_lm import CausalLMBase


class LanguageModeling(CausalLMBase):
    """Next-token prediction on every token of raw text."""

    name = "causal-lm"

    def __init__(self, tokenizer: Any, *, max_length: int = 512, model: Any | None = None,
                 text_column: str = "text", pack: bool = False) -> None:
        super().__init__(tokenizer, max_length=max_length, model=model, max_truncated=1.0)
        self.text_column = text_column
        self.pack = pack

    def describe(self) -> dict[str, Any]:
        """Settings written into the run file."""
        return {"task": self.name, "max_length": self.max_length, "pack": self.pack,
                "text_column": self.text_column}

    def _ids(self, row: Row) -> list[int]:
        text = require(row, self.text_column)
        eos = self.tokenizer.eos_token_id
        return self._tokens(text) + ([int(eos)] if eos is not None else [])

    def encode(self, row: Row) -> Example | None:
        """First block of the row (``encode_rows`` keeps every block)."""
        blocks = self._blocks(self._ids(row))
        return blocks[0] if blocks else None

    def _blocks(self, ids: list[int]) -> list[Example]:
        out = []
        for start in range(0, len(ids), self.max_length):
            block = ids[start:start + self.max_length]
            if len(block) >= 2:  # one token predicts nothing
                out.append({"input_ids": block, "labels": list(block)})
        return out

    def encode_rows(self, rows: Iterable[Row], source: str = "data") -> list[Example]:
        """Every block of every row (or of the packed stream); errors name the row."""
        if isinstance(rows, Encoded):
            return rows
        locate = getattr(rows, "where", None)
        source = getattr(rows, "source", None) or source
        self.stats.rows = 0
        stream: list[int] = []
        out: list[Example] = []
        for i, row in enumerate(rows):
            self.stats.rows += 1
            try:
                ids = self._ids(row)
            except DataError as exc:
                where = locate(i) if callable(locate) else f"{source} row {i + 1}"
                raise DataError(f"{where}: {exc}") from None
            if self.pack:
                stream.extend(ids)
            else:
                blocks = self._blocks(ids)
                self.stats.truncated += len(blocks) > 1
                out.extend(blocks)
        if self.pack:
            out = self._blocks(stream)
        if not out:
            raise DataError(f"{source}: no text to model (every row is empty)")
        return Encoded(out)
