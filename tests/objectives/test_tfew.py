"""T-Few objective: each term against a hand computation; token log-probs against
one-sequence-at-a-time scoring; rank classification; training with IA3 lowers the loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.core.errors import DataError
from deltatune.objectives import (
    ChoiceBatch,
    TFewObjective,
    choice_token_logprobs,
    rank_classify,
    tfew_losses,
)
from tests.conftest import tiny_bart, tiny_gpt2, tiny_llama, tiny_t5


def make_batch(seed=0):
    """Two examples: 3 answers (lengths 2, 3, 1) and 2 answers (+1 padding choice)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 128, (2, 5), generator=g)
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # left padding
    choice_ids = torch.randint(3, 128, (2, 3, 3), generator=g)
    choice_mask = torch.tensor([[[1, 1, 0], [1, 1, 1], [1, 0, 0]],
                                [[1, 1, 1], [1, 0, 0], [0, 0, 0]]])
    choice_ids = choice_ids * choice_mask
    return ChoiceBatch(input_ids, attention_mask, choice_ids, choice_mask,
                       labels=torch.tensor([1, 0]))


def test_each_term_on_known_probabilities():
    # Example 0: 2 answers, correct = 0 with tokens p = (0.5, 0.25); wrong: p = (0.8,).
    p = torch.tensor([[[0.5, 0.25], [0.8, 1.0]]], dtype=torch.float64)
    mask = torch.tensor([[[1, 1], [1, 0]]])
    out = tfew_losses(p.log() * mask, mask, torch.tensor([0]))
    beta_c = (math.log(0.5) + math.log(0.25)) / 2
    beta_w = math.log(0.8)
    assert out.lm.item() == pytest.approx(-beta_c)
    assert out.ul.item() == pytest.approx(-math.log(1 - 0.8))
    assert out.ln.item() == pytest.approx(-beta_c + math.log(math.exp(beta_c) + math.exp(beta_w)))
    assert out.loss.item() == pytest.approx(out.lm.item() + out.ul.item() + out.ln.item())
    weighted = tfew_losses(p.log() * mask, mask, torch.tensor([0]), ul_weight=0.0,
                           ln_weight=2.0)
    assert weighted.loss.item() == pytest.approx(out.lm.item() + 2 * out.ln.item())


def test_rank_classification_uses_length_normalised_scores():
    # Answer 0: one token p=0.3 (sum -1.20, mean -1.20); answer 1: three tokens p=0.6 each
    # (sum -1.53, mean -0.51). Sum picks 0, the length-normalised score picks 1.
    p = torch.tensor([[[0.3, 1, 1], [0.6, 0.6, 0.6]]], dtype=torch.float64)
    mask = torch.tensor([[[1, 0, 0], [1, 1, 1]]])
    logp = p.log() * mask
    assert logp.sum(-1).argmax(-1).item() == 0
    assert rank_classify(logp, mask).tolist() == [1]


def _hand_logprobs(model, batch, encoder_decoder):
    """Score every (prompt, answer) pair alone, without padding, in float64 at the end."""
    B, C, T = batch.choice_ids.shape
    out = torch.zeros(B, C, T, dtype=torch.float64)
    for b in range(B):
        prompt = batch.input_ids[b][batch.attention_mask[b].bool()]
        for c in range(C):
            n = int(batch.choice_mask[b, c].sum())
            if n == 0:
                continue
            answer = batch.choice_ids[b, c, :n]
            with torch.no_grad():
                if encoder_decoder:
                    start = torch.tensor([model.config.decoder_start_token_id])
                    dec = torch.cat([start, answer[:-1]])
                    logits = model(input_ids=prompt[None], decoder_input_ids=dec[None]).logits[0]
                else:
                    seq = torch.cat([prompt, answer])
                    logits = model(input_ids=seq[None]).logits[0, len(prompt) - 1:-1]
            logp = logits.double().log_softmax(-1)
            out[b, c, :n] = logp[torch.arange(n), answer]
    return out


def _hand_losses(logp, batch):
    lm, ul, ln = [], [], []
    for b in range(logp.shape[0]):
        y = int(batch.labels[b])
        real = [c for c in range(logp.shape[1]) if batch.choice_mask[b, c].sum() > 0]
        betas = {}
        wrong_sum, wrong_count = 0.0, 0
        for c in real:
            n = int(batch.choice_mask[b, c].sum())
            tokens = [logp[b, c, t].item() for t in range(n)]
            betas[c] = sum(tokens) / n
            if c != y:
                wrong_sum += sum(math.log(1 - math.exp(v)) for v in tokens)
                wrong_count += n
        lm.append(-betas[y])
        ul.append(-wrong_sum / wrong_count)
        ln.append(-betas[y] + math.log(sum(math.exp(v) for v in betas.values())))
    return [sum(v) / len(v) for v in (lm, ul, ln)]


@pytest.mark.parametrize(("factory", "encdec"), [(tiny_gpt2, False), (tiny_llama, False),
                                                 (tiny_t5, True), (tiny_bart, True)])
def test_token_logprobs_and_losses_match_scoring_by_hand(factory, encdec):
    model, batch = factory(), make_batch()
    with torch.no_grad():
        ours = choice_token_logprobs(model, batch)
    hand = _hand_logprobs(model, batch, encdec)
    assert torch.allclose(ours.double(), hand, atol=1e-5)
    losses = tfew_losses(ours.double(), batch.choice_mask, batch.labels)
    lm, ul, ln = _hand_losses(hand, batch)
    assert losses.lm.item() == pytest.approx(lm, rel=1e-5)
    assert losses.ul.item() == pytest.approx(ul, rel=1e-5)
    assert losses.ln.item() == pytest.approx(ln, rel=1e-5)


def test_ia3_with_tfew_trains_and_only_the_vectors_change():
    dm = dt.attach(tiny_t5(), dt.IA3Config())
    batch = make_batch(seed=4)
    objective = TFewObjective()
    opt = torch.optim.Adam(dm.trainable_parameters(), lr=0.1)
    dm.train()
    first = None
    for _ in range(15):
        losses = objective(dm, batch)
        losses.loss.backward()
        opt.step()
        opt.zero_grad()
        first = first if first is not None else losses.loss.item()
    dm.eval()
    final = objective(dm, batch)
    assert final.loss.item() < first - 0.5
    assert objective.predict(dm, batch).tolist() == batch.labels.tolist()


def test_bad_batches_are_clear_errors():
    batch = make_batch()
    bad = ChoiceBatch(batch.input_ids, batch.attention_mask, batch.choice_ids,
                      torch.tensor([[[0, 1, 1]] * 3, [[1, 1, 1]] * 3]), batch.labels)
    with pytest.raises(DataError, match="ones followed by zeros"):
        choice_token_logprobs(tiny_gpt2(), bad)
    pad_label = ChoiceBatch(batch.input_ids, batch.attention_mask, batch.choice_ids,
                            batch.choice_mask, torch.tensor([0, 2]))
    with pytest.raises(DataError, match="does not exist"):
        TFewObjective()(tiny_gpt2(), pad_label)
    with pytest.raises(DataError, match="labels"):
        TFewObjective()(tiny_gpt2(), ChoiceBatch(batch.input_ids, batch.attention_mask,
                                                 batch.choice_ids, batch.choice_mask))
    assert F.softmax(torch.zeros(2), 0).sum() == 1
