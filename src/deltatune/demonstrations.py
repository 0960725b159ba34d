"""In-context demonstrations: a pool of solved examples, chosen per input, rendered as text.

Used by instruction prompt tuning (soft prompt + retrieved demonstrations + input, see
:mod:`deltatune.methods.ipt`) and by the in-context learning baseline (the same
prompts, no training at all, see :func:`icl_predict_choices`).

Retrieval is exact nearest neighbours by cosine similarity of sentence embeddings
(``minilm-l6`` by default: mean-pooled, L2-normalised MiniLM vectors, so a dot product
is the cosine); ``random`` picks demonstrations uniformly with a seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from deltatune.core.errors import ConfigError, DataError

Embed = Callable[[Sequence[str]], torch.Tensor]


class DemonstrationPool:
    """Solved examples (input text, output text) to show before a query.

    ``template`` renders one demonstration, ``query_template`` the query (its output is
    what the model must produce); both use ``{input}`` and ``{output}``.
    ``embed`` maps texts to row vectors (default: ``deltatune.models.sentence_embeddings``).
    """

    def __init__(self, inputs: Sequence[str], outputs: Sequence[str], *,
                 embed: Embed | None = None,
                 template: str = "Input: {input}\nOutput: {output}\n\n",
                 query_template: str = "Input: {input}\nOutput:", seed: int = 0) -> None:
        if len(inputs) != len(outputs):
            raise DataError(f"the pool has {len(inputs)} inputs but {len(outputs)} outputs")
        if not inputs:
            raise DataError("the demonstration pool is empty")
        self.inputs, self.outputs = list(inputs), list(outputs)
        self.template, self.query_template = template, query_template
        self._embed = embed
        self._vectors: torch.Tensor | None = None
        self.seed = seed

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Return normalised embeddings (len(texts), dim) of ``texts``."""
        if self._embed is None:
            from deltatune.models import sentence_embeddings

            self._embed = sentence_embeddings
        vectors = self._embed(list(texts)).float()
        return torch.nn.functional.normalize(vectors, dim=-1)

    @property
    def vectors(self) -> torch.Tensor:
        """Embeddings of the pool's inputs (computed once)."""
        if self._vectors is None:
            self._vectors = self.embed(self.inputs)
        return self._vectors

    def nearest(self, queries: Sequence[str], k: int, *, exclude_same: bool = True
                ) -> list[list[int]]:
        """Return, per query, the indices of the ``k`` most similar pool inputs, best first.

        Exact search (all cosine similarities). ``exclude_same`` skips pool entries whose
        input equals the query, so a training example never demonstrates itself.
        """
        self._check_k(k)
        sims = self.embed(queries) @ self.vectors.T           # (queries, pool)
        if exclude_same:
            for qi, q in enumerate(queries):
                for pi, text in enumerate(self.inputs):
                    if text == q:
                        sims[qi, pi] = float("-inf")
        picks = torch.topk(sims, k=min(k, sims.shape[1]), dim=1).indices
        return [[int(i) for i, s in zip(row, sims[r, row], strict=True) if s > float("-inf")]
                for r, row in enumerate(picks)]

    def random(self, queries: Sequence[str], k: int, *, exclude_same: bool = True
               ) -> list[list[int]]:
        """Return ``k`` pool indices per query drawn uniformly without replacement (seeded)."""
        self._check_k(k)
        gen = torch.Generator().manual_seed(self.seed)
        out = []
        for q in queries:
            order = torch.randperm(len(self.inputs), generator=gen).tolist()
            out.append([i for i in order if not (exclude_same and self.inputs[i] == q)][:k])
        return out

    def _check_k(self, k: int) -> None:
        if k < 0:
            raise ConfigError(f"the number of demonstrations must be >= 0, got {k}")

    def render(self, query: str, indices: Sequence[int]) -> str:
        """Return the demonstrations ``indices`` followed by the query, as one text."""
        demos = "".join(self.template.format(input=self.inputs[i], output=self.outputs[i])
                        for i in indices)
        return demos + self.query_template.format(input=query, output="")

    def prompts(self, queries: Sequence[str], k: int,
                selection: Literal["retrieved", "random"] = "retrieved") -> list[str]:
        """Return one prompt text per query with ``k`` demonstrations chosen by ``selection``."""
        if selection not in ("retrieved", "random"):
            raise ConfigError(f"selection must be 'retrieved' or 'random', got {selection!r}")
        if k == 0:
            return [self.render(q, []) for q in queries]
        chosen = (self.nearest(queries, k) if selection == "retrieved"
                  else self.random(queries, k))
        return [self.render(q, idx) for q, idx in zip(queries, chosen, strict=True)]


@torch.no_grad()
def icl_predict_choices(model: Any, tokenizer: Any, prompts: Sequence[str],
                        choices: Sequence[str]) -> list[int]:
    """In-context learning baseline: pick, per prompt, the choice of highest mean log-prob.

    Rank classification as in T-Few (length-normalised log-probability of each answer
    given the prompt); no parameter changes. Returns the index of the chosen answer.
    """
    from deltatune.objectives.tfew import ChoiceBatch, choice_token_logprobs, rank_classify

    if not choices:
        raise DataError("icl_predict_choices needs at least one answer choice")
    enc = [tokenizer.encode(p) for p in prompts]
    ans = [tokenizer.encode(" " + c.strip(), add_special_tokens=False) for c in choices]
    if any(not a for a in ans):
        raise DataError("an answer choice encodes to no tokens")
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    n, t = max(len(e) for e in enc), max(len(a) for a in ans)
    ids = torch.full((len(enc), n), pad, dtype=torch.long)
    mask = torch.zeros((len(enc), n), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, n - len(e):] = torch.tensor(e)
        mask[i, n - len(e):] = 1
    choice_ids = torch.full((len(enc), len(ans), t), pad, dtype=torch.long)
    choice_mask = torch.zeros_like(choice_ids)
    for c, a in enumerate(ans):
        choice_ids[:, c, :len(a)] = torch.tensor(a)
        choice_mask[:, c, :len(a)] = 1
    device = next(model.parameters()).device
    batch = ChoiceBatch(ids.to(device), mask.to(device), choice_ids.to(device),
                        choice_mask.to(device))
    return rank_classify(choice_token_logprobs(model, batch), batch.choice_mask).tolist()
