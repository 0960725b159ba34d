"""IPT and the ICL baseline: retrieval by hand, rendering, soft prompt, rank classification."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.core.errors import ConfigError, DataError
from deltatune.demonstrations import DemonstrationPool, icl_predict_choices
from deltatune.methods.ipt import ipt_inputs
from tests.conftest import tiny_llama
from tests.helpers import adam_losses, save_and_reload

WORDS = ["cat", "dog", "sat", "ran", "fast", "slow", "red", "blue", "big", "small", "Input:",
         "Output:", "yes", "no"]


def bag_of_words(texts):
    """A transparent embedding: word counts over WORDS (cosine = word overlap)."""
    out = torch.zeros(len(texts), len(WORDS))
    for i, t in enumerate(texts):
        for w in t.split():
            if w in WORDS:
                out[i, WORDS.index(w)] += 1
    return out


class Tok:
    """Word-level tokenizer over WORDS (ids 3..), no specials."""

    pad_token_id = 0

    def encode(self, text, add_special_tokens=True):
        return [WORDS.index(w) + 3 for w in text.split()]


POOL_IN = ["cat sat", "dog ran fast", "red big", "blue small"]
POOL_OUT = ["yes", "no", "yes", "no"]


def test_nearest_neighbours_by_cosine_exactly():
    pool = DemonstrationPool(POOL_IN, POOL_OUT, embed=bag_of_words)
    got = pool.nearest(["dog ran slow", "big red cat"], k=2)
    # by hand: "dog ran slow" shares 2 words with "dog ran fast", 0 with the rest...
    assert got[0][0] == 1
    # "big red cat": cos with "red big" = 2/sqrt(3*2), with "cat sat" = 1/sqrt(3*2)
    assert got[1] == [2, 0]
    # a pool example never demonstrates itself
    assert 0 not in pool.nearest(["cat sat"], k=3)[0]


def test_random_selection_is_seeded_and_skips_the_query():
    pool = DemonstrationPool(POOL_IN, POOL_OUT, embed=bag_of_words, seed=3)
    a = pool.random(["cat sat"], k=3)
    assert a == DemonstrationPool(POOL_IN, POOL_OUT, seed=3).random(["cat sat"], k=3)
    assert 0 not in a[0] and len(a[0]) == 3


def test_render_puts_demonstrations_before_the_query():
    pool = DemonstrationPool(POOL_IN, POOL_OUT, embed=bag_of_words)
    cfg = dt.IPTConfig(prompt_length=2, num_demonstrations=1)
    (text,) = ipt_inputs(cfg, pool, ["dog ran slow"])
    assert text == "Input: dog ran fast\nOutput: no\n\nInput: dog ran slow\nOutput:"
    assert pool.prompts(["cat"], 0) == ["Input: cat\nOutput:"]
    with pytest.raises(ConfigError, match="selection"):
        pool.prompts(["cat"], 1, "closest")
    with pytest.raises(DataError, match="outputs"):
        DemonstrationPool(["a"], [])


def test_minilm_retrieval_finds_the_topical_neighbour():
    pool = DemonstrationPool(["the weather is sunny and warm today", "stock markets fell sharply",
                              "the football match ended in a draw"], ["a", "b", "c"])
    assert pool.nearest(["rain and clouds are expected tomorrow"], k=1) == [[0]]


def test_ipt_is_a_soft_prompt_before_demonstrations_and_input(tmp_path):
    pool = DemonstrationPool(POOL_IN, POOL_OUT, embed=bag_of_words)
    cfg = dt.IPTConfig(prompt_length=3, init="random", num_demonstrations=1)
    (text,) = ipt_inputs(cfg, pool, ["dog ran slow"])
    ids = torch.tensor([Tok().encode(text)])
    dm = dt.attach(tiny_llama(), cfg)
    prompt = dm.get_delta("default").method.part(dm.get_delta("default")).prompt[0].detach()
    ours = dm(input_ids=ids).logits
    with dm.disabled():
        ref = dm.model(inputs_embeds=torch.cat(
            [prompt[None], dm.model.get_input_embeddings()(ids)], 1)).logits[:, 3:]
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    loaded = save_and_reload(dm, tmp_path / "ipt", tiny_llama)
    assert loaded.get_delta("default").config.method == "ipt"
    assert loaded.get_delta("default").config.num_demonstrations == 1
    torch.testing.assert_close(loaded(input_ids=ids).logits, ours)


def test_icl_baseline_ranks_choices_by_mean_log_probability():
    model = tiny_llama()
    pool = DemonstrationPool(POOL_IN, POOL_OUT, embed=bag_of_words)
    prompts = pool.prompts(["dog ran slow", "red small"], k=2)
    got = icl_predict_choices(model, Tok(), prompts, ["yes", "no"])
    tok = Tok()
    for i, p in enumerate(prompts):
        scores = []
        for c in ["yes", "no"]:
            ids = torch.tensor([tok.encode(p) + tok.encode(c)])
            logp = F.log_softmax(model(input_ids=ids).logits[0, -2], -1)
            scores.append(logp[tok.encode(c)[0]].item())
        assert got[i] == max(range(2), key=lambda j: scores[j])


def test_ipt_training_lowers_the_loss_and_trains_only_the_prompt():
    pool = DemonstrationPool(POOL_IN, POOL_OUT, embed=bag_of_words)
    cfg = dt.IPTConfig(prompt_length=4, init="random", num_demonstrations=1)
    texts = [t + " " + y for t, y in zip(ipt_inputs(cfg, pool, ["dog ran slow", "big red"]),
                                          ["no", "yes"], strict=True)]
    rows = [Tok().encode(t) for t in texts]
    n = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (n - len(r)) + r for r in rows])
    mask = (ids != 0).long()
    labels = ids.masked_fill(mask == 0, -100)
    dm = dt.attach(tiny_llama(), cfg)
    assert [n for n, p in dm.named_parameters() if p.requires_grad] == [
        "model.deltatune_model_deltas.default.prompt"]
    losses = adam_losses(dm, lambda: dm(input_ids=ids, attention_mask=mask, labels=labels).loss,
                         steps=20, lr=5e-2)
    assert losses[-1] < losses[0] - 0.05
