"""Prompt tuning (Lester, Al-Rfou & Constant, 2021, arXiv:2104.08691).

A soft prompt P (l x e, l prompt tokens of the embedding width e) is prepended to the
embedded input; the model is frozen and only P trains:

    model([P; embed(x)])          (for T5: the encoder's input; the decoder is unchanged)

Initialisations (section 3 of the paper, compared in its Figure 3(b)):
* ``random``: uniform in [-0.5, 0.5];
* ``vocab``: embeddings of tokens drawn from the ``vocab_top_k`` (5000) most common
  tokens; we take the first ``vocab_top_k`` ids (SentencePiece and BPE vocabularies are
  ordered roughly by frequency), or the ids in ``vocab_ids``;
* ``labels``: each prompt token takes the embedding of one class label's string
  (multi-token labels are averaged); slots left over fall back to ``vocab``;
* ``text``: the embeddings of a text's tokens, repeated to fill the prompt (as ``peft``).

Prompt ensembling (section 7): ``num_prompts`` = N prompts of the same task live in one
delta; each input row is run N times in the batch, once per prompt (rows i*N .. i*N+N-1),
and :func:`majority_vote` turns the N predictions into one.

Saved: ``prompt`` (N x l x e). Not mergeable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from deltatune.core.config import DeltaConfig, param
from deltatune.core.errors import ConfigError, HyperparameterError
from deltatune.core.model_delta import InputEdit, ModelDelta, ModelDeltaMethod


@dataclasses.dataclass(kw_only=True)
class PromptTuningConfig(DeltaConfig):
    """Prompt-tuning hyperparameters (the paper's main runs: 100 tokens, label init)."""

    method = "prompt"

    prompt_length: int = param(20, min=1, help="number of soft prompt tokens (l)")
    init: Literal["random", "vocab", "labels", "text"] = param(
        "vocab", help="random uniform, sampled vocabulary, class-label strings, or a text")
    init_range: float = param(0.5, gt=0, help="random init: uniform in [-r, r]")
    vocab_top_k: int = param(5000, min=1, help="vocab init: sample from the first k ids")
    vocab_ids: list[int] | None = param(None, help="vocab init: sample from these ids instead")
    label_token_ids: list[list[int]] | None = param(
        None, help="labels init: token ids of each class label's string")
    text_token_ids: list[int] | None = param(None, help="text init: token ids of the text")
    num_prompts: int = param(1, min=1, help="prompt ensembling: N prompts, one batch")
    seed: int = param(0, help="seed of the random and vocab initialisations")

    def check(self) -> None:
        super().check()
        if self.init == "labels" and not self.label_token_ids:
            raise HyperparameterError("init='labels' needs label_token_ids: the token ids of "
                                      "each class label, e.g. [[tok('positive')], ...]",
                                      field="label_token_ids")
        if self.init == "labels" and any(not ids for ids in self.label_token_ids or []):
            raise HyperparameterError("a class label in label_token_ids has no tokens",
                                      field="label_token_ids")
        if self.init == "text" and not self.text_token_ids:
            raise HyperparameterError("init='text' needs text_token_ids", field="text_token_ids")


def _vocab_rows(embedding: torch.Tensor, n: int, config: PromptTuningConfig,
                generator: torch.Generator) -> torch.Tensor:
    pool = (torch.tensor(config.vocab_ids) if config.vocab_ids
            else torch.arange(min(config.vocab_top_k, embedding.shape[0])))
    if pool.numel() == 0 or int(pool.max()) >= embedding.shape[0] or int(pool.min()) < 0:
        raise HyperparameterError(f"vocab_ids must be ids in [0, {embedding.shape[0]})",
                                  field="vocab_ids")
    picks = pool[torch.randint(len(pool), (n,), generator=generator)]
    return embedding[picks.to(embedding.device)].float().cpu()


def initial_prompt(embedding: torch.Tensor, config: PromptTuningConfig) -> torch.Tensor:
    """Return the initial prompts (num_prompts, prompt_length, e) as the config asks.

    ``embedding`` is the model's input embedding matrix (vocab x e).
    """
    vocab, width = embedding.shape
    gen = torch.Generator().manual_seed(config.seed)
    emb = embedding.detach()
    prompts = []
    for _ in range(config.num_prompts):
        n = config.prompt_length
        if config.init == "random":
            rows = (torch.rand(n, width, generator=gen) * 2 - 1) * config.init_range
        elif config.init == "vocab":
            rows = _vocab_rows(emb, n, config, gen)
        elif config.init == "labels":
            labels = config.label_token_ids or []
            for ids in labels:
                if max(ids) >= vocab or min(ids) < 0:
                    raise HyperparameterError(f"label token ids {ids} outside [0, {vocab})",
                                              field="label_token_ids")
            means = [emb[torch.tensor(ids, device=emb.device)].float().mean(0).cpu()
                     for ids in labels[:n]]
            rest = _vocab_rows(emb, n - len(means), config, gen) if n > len(means) else None
            rows = torch.stack(means) if rest is None else torch.cat([torch.stack(means), rest])
        else:
            ids = list(config.text_token_ids or [])
            if max(ids) >= vocab or min(ids) < 0:
                raise HyperparameterError(f"text token ids outside [0, {vocab})",
                                          field="text_token_ids")
            ids = (ids * (n // len(ids) + 1))[:n]
            rows = emb[torch.tensor(ids, device=emb.device)].float().cpu()
        prompts.append(rows)
    return torch.stack(prompts)


class SoftPrompt(ModelDelta):
    """N soft prompts (N x l x e) prepended to the input embeddings (reusable).

    With N > 1 every row is repeated N times and copy k gets prompt k. ``row_prompts``,
    when set by a subclass, gives per-row prompts instead (batch x l x e).
    """

    edits_inputs = True

    def __init__(self, prompts: torch.Tensor) -> None:
        super().__init__()
        self.prompt = nn.Parameter(prompts.clone())

    def prompts_for(self, edit: InputEdit) -> torch.Tensor:
        """Return the prompts to prepend: (1 or batch, l, e)."""
        n = self.prompt.shape[0]
        if n == 1:
            return self.prompt
        edit.repeat_rows(n)
        return self.prompt.repeat(edit.batch // n, 1, 1)

    def edit_inputs(self, edit: InputEdit) -> None:
        edit.prepend(self.prompts_for(edit))


def majority_vote(predictions: torch.Tensor | Sequence, num_prompts: int) -> list:
    """Combine ensemble predictions: rows i*N .. i*N+N-1 vote; ties go to the first seen.

    ``predictions`` holds one prediction per expanded row (class ids, or generated
    sequences as tensors/lists). Returns one prediction per original row.
    """
    items = predictions.tolist() if isinstance(predictions, torch.Tensor) else list(predictions)
    if len(items) % num_prompts:
        raise ConfigError(f"{len(items)} predictions are not a multiple of num_prompts="
                          f"{num_prompts}")
    out = []
    for start in range(0, len(items), num_prompts):
        group = [tuple(x) if isinstance(x, list) else x for x in items[start:start + num_prompts]]
        counts: dict = {}
        for x in group:
            counts[x] = counts.get(x, 0) + 1
        best = max(counts.values())
        winner = next(x for x in group if counts[x] == best)
        out.append(list(winner) if isinstance(winner, tuple) else winner)
    return out


class PromptTuning(ModelDeltaMethod):
    """Prompt tuning: a trainable soft prompt in front of the input embeddings."""

    name = "prompt"
    config_cls = PromptTuningConfig
    summary = "soft prompt prepended to the input embeddings (Lester et al. 2021)"

    def build(self, model: nn.Module, config: DeltaConfig) -> ModelDelta:
        assert isinstance(config, PromptTuningConfig)
        return SoftPrompt(initial_prompt(model.get_input_embeddings().weight, config))
