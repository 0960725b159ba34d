"""Prompt tuning: hand concatenation, padding, generate, inits, ensembling, peft parity."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.core.errors import ConfigError, HyperparameterError
from deltatune.methods.prompt import majority_vote
from tests.conftest import (
    VOCAB,
    randomize_deltas,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_roberta,
    tiny_t5,
)
from tests.helpers import adam_losses, save_and_reload

L = 4
ROWS = [[5, 9, 17, 33, 8, 41], [12, 70, 3]]


def _prompt(dm, name="default"):
    return dm.get_delta(name).method.part(dm.get_delta(name)).prompt


def _pad(rows, left, pad=0):
    n = max(len(r) for r in rows)
    fill = [[pad] * (n - len(r)) for r in rows]
    ids = torch.tensor([f + r if left else r + f for f, r in zip(fill, rows, strict=True)])
    mask = torch.tensor([[0] * len(f) + [1] * len(r) if left else [1] * len(r) + [0] * len(f)
                         for f, r in zip(fill, rows, strict=True)])
    return ids, mask


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2, tiny_bert, tiny_roberta, tiny_t5])
def test_equals_base_model_on_concatenated_embeddings(factory):
    dm = dt.attach(factory(), dt.PromptTuningConfig(prompt_length=L, init="random"))
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    extra = {"decoder_input_ids": ids[:, :3]} if factory is tiny_t5 else {}
    ours = dm(input_ids=ids, attention_mask=mask, **extra).logits
    prompt = _prompt(dm)[0].detach()
    embeds = torch.cat([prompt.expand(2, -1, -1), dm.model.get_input_embeddings()(ids)], 1)
    full_mask = torch.cat([torch.ones(2, L, dtype=torch.long), mask], 1)
    with dm.disabled():
        ref = dm.model(inputs_embeds=embeds, attention_mask=full_mask, **extra).logits
    if factory is not tiny_t5:
        ref = ref[:, L:] if ref.dim() == 3 else ref   # logits line up with input_ids
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_peft_parity(factory):
    peft = pytest.importorskip("peft")
    dm = dt.attach(factory(), dt.PromptTuningConfig(prompt_length=L, init="random"))
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=L)
    pm = peft.get_peft_model(factory(), cfg)
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.copy_(_prompt(dm)[0])
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    torch.testing.assert_close(dm(input_ids=ids, attention_mask=mask, labels=ids).loss,
                               pm(input_ids=ids, attention_mask=mask, labels=ids).loss)
    # peft keeps the prompt positions in the logits; ours line up with input_ids.
    torch.testing.assert_close(dm(input_ids=ids, attention_mask=mask).logits,
                               pm(input_ids=ids, attention_mask=mask).logits[:, L:])


@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_padded_forward_equals_unbatched(factory, left):
    dm = dt.attach(factory(), dt.PromptTuningConfig(prompt_length=L, init="random"))
    ids, mask = _pad(ROWS, left)
    batched = dm(input_ids=ids, attention_mask=mask).logits
    n = ids.shape[1]
    for i, row in enumerate(ROWS):
        single = dm(input_ids=torch.tensor([row])).logits[0]
        real = mask[i].bool()
        torch.testing.assert_close(batched[i][real], single, atol=1e-5, rtol=1e-5)
        assert batched.shape[1] == n


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_left_padded_generate_equals_unbatched(factory):
    dm = dt.attach(factory(), dt.PromptTuningConfig(prompt_length=L, init="random"))
    ids, mask = _pad(ROWS, left=True)
    batched = dm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                          pad_token_id=0)
    assert batched[:, :ids.shape[1]].tolist() == ids.tolist()   # ids put back in front
    for i, row in enumerate(ROWS):
        single = dm.generate(input_ids=torch.tensor([row]), max_new_tokens=5, do_sample=False,
                             pad_token_id=0)
        assert batched[i, -5:].tolist() == single[0, -5:].tolist()


def test_generate_equals_step_by_step_forward():
    dm = dt.attach(tiny_llama(), dt.PromptTuningConfig(prompt_length=L, init="random"))
    seq = torch.tensor([ROWS[0]])
    out = dm.generate(input_ids=seq, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for _ in range(5):
        seq = torch.cat([seq, dm(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert out.tolist() == seq.tolist()


@pytest.mark.parametrize("left", [True, False])
def test_t5_generate_with_padding_equals_unbatched(left):
    dm = dt.attach(tiny_t5(), dt.PromptTuningConfig(prompt_length=L, init="random"))
    ids, mask = _pad(ROWS, left)
    batched = dm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    for i, row in enumerate(ROWS):
        single = dm.generate(input_ids=torch.tensor([row]), max_new_tokens=4, do_sample=False)
        assert batched[i].tolist()[:single.shape[1]] == single[0].tolist()


def test_token_labels_get_minus_100_on_the_prompt():
    dm = dt.attach(tiny_bert(task="token-classification"),
                   dt.PromptTuningConfig(prompt_length=L, init="random"))
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    labels = torch.randint(0, 3, (2, 5), generator=torch.Generator().manual_seed(4))
    out = dm(input_ids=ids, labels=labels)
    assert out.logits.shape == (2, 5, 3)
    ref = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 3), labels.reshape(-1))
    torch.testing.assert_close(out.loss, ref)


def test_initialisations():
    model = tiny_llama()
    emb = model.get_input_embeddings().weight
    dm = dt.attach(model, dt.PromptTuningConfig(prompt_length=6, init="random"), name="r")
    assert _prompt(dm, "r").abs().max() <= 0.5
    dm.add("v", dt.PromptTuningConfig(prompt_length=6, init="vocab", vocab_top_k=10))
    for row in _prompt(dm, "v")[0]:
        assert any(torch.equal(row, emb[i]) for i in range(10))
    dm.add("l", dt.PromptTuningConfig(prompt_length=3, init="labels",
                                      label_token_ids=[[5, 6], [7]], vocab_ids=[40]))
    p = _prompt(dm, "l")[0]
    torch.testing.assert_close(p[0], (emb[5] + emb[6]) / 2)
    torch.testing.assert_close(p[1], emb[7])
    torch.testing.assert_close(p[2], emb[40])      # leftover slot: sampled vocabulary
    dm.add("t", dt.PromptTuningConfig(prompt_length=5, init="text", text_token_ids=[8, 9]))
    torch.testing.assert_close(_prompt(dm, "t")[0], emb[[8, 9, 8, 9, 8]])


def test_prompt_ensembling_runs_each_row_once_per_prompt():
    dm = dt.attach(tiny_gpt2(), dt.PromptTuningConfig(prompt_length=L, init="random",
                                                      num_prompts=3))
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(6))
    out = dm(input_ids=ids, labels=ids).logits
    assert out.shape[0] == 6
    prompts = _prompt(dm).detach()
    for i in range(2):
        for k in range(3):
            embeds = torch.cat([prompts[k:k + 1], dm.model.get_input_embeddings()(ids[i:i + 1])], 1)
            with dm.disabled():
                ref = dm.model(inputs_embeds=embeds).logits
            torch.testing.assert_close(out[i * 3 + k:i * 3 + k + 1], ref[:, L:], atol=1e-5,
                                       rtol=1e-5)
    gen = dm.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape[0] == 6 and gen[:, :5].tolist() == ids.repeat_interleave(3, 0).tolist()
    assert majority_vote(torch.tensor([1, 2, 2, 0, 0, 1]), 3) == [2, 0]
    assert majority_vote([[1, 2], [3], [1, 2]], 3) == [[1, 2]]


@pytest.mark.parametrize("factory", [tiny_llama, tiny_t5])
def test_save_load_roundtrip(tmp_path, factory):
    dm = dt.attach(factory(), dt.PromptTuningConfig(prompt_length=L, num_prompts=2))
    randomize_deltas(dm)
    ids = torch.tensor([ROWS[0]])
    extra = {"decoder_input_ids": ids[:, :2]} if factory is tiny_t5 else {}
    before = dm(input_ids=ids, **extra).logits
    loaded = save_and_reload(dm, tmp_path / "p", factory)
    assert set(dt.read_delta_directory(tmp_path / "p").tensors) == {"prompt"}
    torch.testing.assert_close(loaded(input_ids=ids, **extra).logits, before)


def test_only_the_prompt_trains_and_loss_falls():
    dm = dt.attach(tiny_llama(), dt.PromptTuningConfig(prompt_length=L, init="vocab"))
    assert [n for n, p in dm.named_parameters() if p.requires_grad] == [
        "model.deltatune_model_deltas.default.prompt"]
    ids = torch.randint(3, VOCAB, (4, 8), generator=torch.Generator().manual_seed(5))
    losses = adam_losses(dm, lambda: dm(input_ids=ids, labels=ids).loss, steps=25, lr=5e-2)
    assert losses[-1] < losses[0] - 0.05


def test_bad_inputs():
    with pytest.raises(HyperparameterError, match="label_token_ids"):
        dt.PromptTuningConfig(init="labels")
    with pytest.raises(HyperparameterError, match="text_token_ids"):
        dt.PromptTuningConfig(init="text")
    with pytest.raises(HyperparameterError, match="vocab_ids"):
        dt.attach(tiny_llama(), dt.PromptTuningConfig(init="vocab", vocab_ids=[VOCAB + 5]))
    dm = dt.attach(tiny_llama(), dt.PromptTuningConfig(prompt_length=L))
    ids = torch.tensor([ROWS[0]])
    with pytest.raises(ConfigError, match="attention_mask"):
        dm(input_ids=ids, attention_mask=torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ConfigError, match="exactly one"):
        dm(input_ids=ids, inputs_embeds=torch.zeros(1, 6, 32))
    with pytest.raises(ConfigError, match="batch, length"):
        dm(input_ids=ids[0])
