"""The T-Few training objective and rank classification (Liu et al., 2022, "Few-Shot
Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning",
arXiv:2205.05638, Section 3.2). Method-agnostic: it only needs a causal or
encoder-decoder language model (with or without deltas).

For a multiple-choice example with input x, correct answer y and wrong answers
y_hat^(1..N), each answer a token sequence:

    L_LM = -(1/T) sum_t log p(y_t | x, y_<t)
    L_UL = -[sum_n sum_t log(1 - p(y_hat^(n)_t | x, y_hat^(n)_<t))] / [sum_n T^(n)]
    beta(x, y) = (1/T) sum_t log p(y_t | x, y_<t)           (length-normalised)
    L_LN = -log( exp(beta(x, y)) / (exp(beta(x, y)) + sum_n exp(beta(x, y_hat^(n)))) )
    L = L_LM + L_UL + L_LN

each averaged over the examples of a batch. Rank classification predicts the answer with
the highest beta (the length-normalised log-probability).

The batch format (:class:`ChoiceBatch`): prompt ids (B, L) with their attention mask,
answer ids (B, C, T) with a mask whose ones come first in each row; a choice whose mask
is all zero is padding (an example with fewer than C answers), and ``labels`` (B,) gives
the index of the correct answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.errors import DataError


@dataclass
class ChoiceBatch:
    """Multiple-choice examples as token ids (see the module docstring for shapes)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    choice_ids: torch.Tensor
    choice_mask: torch.Tensor
    labels: torch.Tensor | None = None

    def check(self) -> None:
        """Raise :class:`DataError` naming the problem when shapes or masks are inconsistent."""
        B, L = self.input_ids.shape
        if self.attention_mask.shape != (B, L):
            raise DataError(f"attention_mask has shape {tuple(self.attention_mask.shape)}, "
                            f"input_ids {(B, L)}; they must match")
        if self.choice_ids.dim() != 3 or self.choice_ids.shape[0] != B:
            raise DataError(f"choice_ids must be (batch={B}, choices, tokens), got "
                            f"{tuple(self.choice_ids.shape)}")
        if self.choice_mask.shape != self.choice_ids.shape:
            raise DataError("choice_mask must have choice_ids' shape")
        m = self.choice_mask.long()
        # Ones first: a row may not have a 1 after a 0.
        if (m[..., 1:] > m[..., :-1]).any():
            raise DataError("choice_mask rows must be ones followed by zeros (answers "
                            "right-padded)")
        if (self.attention_mask.long().sum(1) == 0).any():
            raise DataError("an example has an empty prompt (attention_mask all zero)")
        if self.labels is not None:
            if self.labels.shape != (B,):
                raise DataError(f"labels must be (batch={B},), got {tuple(self.labels.shape)}")
            real = m.sum(-1) > 0
            if ((self.labels < 0) | (self.labels >= self.choice_ids.shape[1])).any() or \
                    not real.gather(1, self.labels.view(-1, 1).clamp(min=0)).all():
                raise DataError("a label points to a choice that does not exist (out of range "
                                "or an all-padding choice)")


@dataclass
class TFewLosses:
    """The three terms and their weighted sum (scalars, differentiable)."""

    loss: torch.Tensor
    lm: torch.Tensor
    ul: torch.Tensor
    ln: torch.Tensor


def _unwrap_config(model: nn.Module):
    return getattr(model, "config", None)


def choice_token_logprobs(model: nn.Module, batch: ChoiceBatch) -> torch.Tensor:
    """Return log p(answer token t | prompt, answer tokens < t) as (B, C, T), 0 at padding.

    Decoder-only models read ``prompt + answer`` (prompt padding removed); encoder-decoder
    models encode the prompt and decode the answer (teacher forcing).
    """
    batch.check()
    B, C, T = batch.choice_ids.shape
    config = _unwrap_config(model)
    if getattr(config, "is_encoder_decoder", False):
        return _encoder_decoder_logprobs(model, batch)
    device = batch.input_ids.device
    prompts = [batch.input_ids[b][batch.attention_mask[b].bool()] for b in range(B)]
    lengths = batch.choice_mask.long().sum(-1)  # (B, C)
    max_len = max(int(prompts[b].numel() + lengths[b].max()) for b in range(B))
    pad = int(getattr(config, "pad_token_id", None) or 0)
    ids = torch.full((B * C, max_len), pad, dtype=torch.long, device=device)
    mask = torch.zeros((B * C, max_len), dtype=torch.long, device=device)
    for b in range(B):
        p = prompts[b].numel()
        for c in range(C):
            n = int(lengths[b, c])
            row = b * C + c
            ids[row, :p] = prompts[b]
            ids[row, p:p + n] = batch.choice_ids[b, c, :n]
            mask[row, :p + n] = 1
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logp = F.log_softmax(logits, dim=-1)
    out = torch.zeros((B, C, T), dtype=logp.dtype, device=device)
    for b in range(B):
        p = prompts[b].numel()
        for c in range(C):
            n = int(lengths[b, c])
            if n == 0:
                continue
            row = b * C + c
            # The logit at position i predicts the token at position i + 1.
            positions = torch.arange(p - 1, p - 1 + n, device=device)
            out[b, c, :n] = logp[row, positions].gather(
                -1, batch.choice_ids[b, c, :n].view(-1, 1)).squeeze(-1)
    return out


def _encoder_decoder_logprobs(model: nn.Module, batch: ChoiceBatch) -> torch.Tensor:
    B, C, T = batch.choice_ids.shape
    labels = batch.choice_ids.reshape(B * C, T).masked_fill(
        ~batch.choice_mask.reshape(B * C, T).bool(), -100)
    # DeltaModel passes the attribute through to the wrapped model.
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if prepare is None:
        raise DataError(f"{type(model).__name__} cannot build decoder inputs from labels; use "
                        f"a T5/BART-style encoder-decoder model")
    decoder_input_ids = prepare(labels=labels)
    input_ids, attention_mask = _right_padded(batch.input_ids, batch.attention_mask,
                                              int(getattr(_unwrap_config(model),
                                                          "pad_token_id", None) or 0))
    logits = model(input_ids=input_ids.repeat_interleave(C, 0),
                   attention_mask=attention_mask.repeat_interleave(C, 0),
                   decoder_input_ids=decoder_input_ids).logits.float()
    logp = F.log_softmax(logits, dim=-1)
    token = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token * batch.choice_mask.reshape(B * C, T)).reshape(B, C, T)


def _right_padded(ids: torch.Tensor, mask: torch.Tensor, pad: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Move every prompt's tokens to the left, so absolute positions start at 0."""
    out_ids, out_mask = torch.full_like(ids, pad), torch.zeros_like(mask)
    for b in range(ids.shape[0]):
        tokens = ids[b][mask[b].bool()]
        out_ids[b, :tokens.numel()] = tokens
        out_mask[b, :tokens.numel()] = 1
    return out_ids, out_mask


def length_normalised(token_logprobs: torch.Tensor, choice_mask: torch.Tensor) -> torch.Tensor:
    """Return beta (B, C): mean log-probability per answer token; -inf for padding choices."""
    mask = choice_mask.to(token_logprobs.dtype)
    n = mask.sum(-1)
    beta = (token_logprobs * mask).sum(-1) / n.clamp(min=1)
    return beta.masked_fill(n == 0, float("-inf"))


def tfew_losses(token_logprobs: torch.Tensor, choice_mask: torch.Tensor, labels: torch.Tensor,
                *, lm_weight: float = 1.0, ul_weight: float = 1.0, ln_weight: float = 1.0
                ) -> TFewLosses:
    """Return L_LM, L_UL, L_LN and their weighted sum from per-token log-probabilities.

    ``token_logprobs`` is (B, C, T) as from :func:`choice_token_logprobs`.
    """
    B, C, _ = token_logprobs.shape
    mask = choice_mask.to(token_logprobs.dtype)
    rows = torch.arange(B, device=token_logprobs.device)
    correct = torch.zeros((B, C), dtype=torch.bool, device=token_logprobs.device)
    correct[rows, labels] = True
    # L_LM: mean negative log-likelihood of the correct answer's tokens, per example.
    lm = -(length_normalised(token_logprobs, choice_mask)[rows, labels]).mean()
    # L_UL: -log(1 - p) over every token of every wrong answer, normalised by their count.
    # log(1 - p) = log(-expm1(log p)); the clamp keeps p = 1 finite.
    log_not = torch.log(-torch.expm1(token_logprobs.clamp(max=-1e-6)))
    wrong = mask * (~correct).unsqueeze(-1).to(mask.dtype)
    per_example = -(log_not * wrong).sum((1, 2)) / wrong.sum((1, 2)).clamp(min=1)
    ul = per_example.mean()
    # L_LN: cross entropy over the length-normalised answer scores.
    ln = F.cross_entropy(length_normalised(token_logprobs, choice_mask), labels)
    total = lm_weight * lm + ul_weight * ul + ln_weight * ln
    return TFewLosses(loss=total, lm=lm, ul=ul, ln=ln)


def rank_classify(token_logprobs: torch.Tensor, choice_mask: torch.Tensor) -> torch.Tensor:
    """Return the predicted answer index (B,): the highest length-normalised log-probability."""
    return length_normalised(token_logprobs, choice_mask).argmax(-1)


class TFewObjective:
    """L = L_LM + L_UL + L_LN on a :class:`ChoiceBatch`, and rank classification.

        objective = TFewObjective()
        losses = objective(dm, batch); losses.loss.backward()
        predictions = objective.predict(dm, batch)
    """

    def __init__(self, lm_weight: float = 1.0, ul_weight: float = 1.0,
                 ln_weight: float = 1.0) -> None:
        self.weights = {"lm_weight": lm_weight, "ul_weight": ul_weight, "ln_weight": ln_weight}

    def __call__(self, model: nn.Module, batch: ChoiceBatch) -> TFewLosses:
        """Return the losses of ``model`` on ``batch`` (``batch.labels`` is required)."""
        if batch.labels is None:
            raise DataError("the T-Few loss needs batch.labels (index of the correct answer)")
        logprobs = choice_token_logprobs(model, batch)
        return tfew_losses(logprobs, batch.choice_mask, batch.labels, **self.weights)

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: ChoiceBatch) -> torch.Tensor:
        """Return the rank-classification prediction (B,) of ``model`` on ``batch``."""
        return rank_classify(choice_token_logprobs(model, batch), batch.choice_mask)
