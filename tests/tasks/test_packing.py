"""SFT packing: a packed row gives each example exactly the logits and losses it gets alone."""

from __future__ import annotations

import math

import pytest
import torch

import deltatune as dt
from deltatune.core.errors import ConfigError
from deltatune.tasks import IGNORE, CausalLMSFT, LanguageModeling, SequenceClassification
from deltatune.tasks import packing as packing_mod
from deltatune.tasks.packing import block_causal_mask, pack_examples
from deltatune.train import TrainConfig, Trainer
from tests.conftest import randomize_deltas, tiny_llama
from tests.tiny_tokenizer import char_tokenizer

# prompt + "\n" + response + eos: lengths 4 + len(word)
WORDS = ["a", "bb", "ccc", "dddd", "eeeee", "ff", "g", "hhhhhhh", "ii", "jjj"]
ROWS = [{"prompt": f"p{i:02d}", "response": w} for i, w in enumerate(WORDS)]


def sft(max_length=16):
    return CausalLMSFT(char_tokenizer(), chat_template=False, max_length=max_length,
                       generate_examples=0)


def model(impl="sdpa", delta=True):
    m = tiny_llama()
    m.set_attn_implementation(impl)
    if not delta:
        return m
    dm = dt.attach(m, dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "up_proj"]))
    randomize_deltas(dm, std=0.3)
    return dm.eval()


def token_losses(logits, labels):
    """Per-position loss of predicting labels[t + 1] from logits[t] (None where ignored)."""
    logp = torch.log_softmax(logits.double(), -1)
    out = []
    for t in range(len(labels) - 1):
        y = labels[t + 1]
        out.append(None if y == IGNORE else -float(logp[t, y]))
    return out


def test_rows_are_best_fit_and_keep_every_example():
    task = sft()
    exs = task.encode_rows(ROWS)
    lengths = [len(e["input_ids"]) for e in exs]
    assert lengths == [4 + 1 + len(w) for w in WORDS]  # "pNN\n" + word + eos
    rows = task.pack_examples(exs)
    # 80 tokens in rows of 16; the 12-token example shares its row with nothing (every
    # other example has > 4 tokens), the other 68 tokens need ceil(68 / 16) = 5 rows:
    # 6 rows is the optimum, and best-fit decreasing reaches it
    assert sum(lengths) == 80 and len(rows) == 1 + math.ceil(68 / 16) == 6
    assert all(len(r["input_ids"]) <= 16 for r in rows)
    assert all(sum(r["segments"]) == len(r["input_ids"]) == len(r["labels"]) for r in rows)
    # every example sits in exactly one row, intact; its first label is masked
    pieces = []
    for r in rows:
        start = 0
        for n in r["segments"]:
            pieces.append((tuple(r["input_ids"][start:start + n]),
                           tuple(r["labels"][start:start + n])))
            assert r["labels"][start] == IGNORE
            start += n
    expected = [(tuple(e["input_ids"]), (IGNORE, *e["labels"][1:])) for e in exs]
    assert sorted(pieces) == sorted(expected)
    # the supervised tokens (the trainer's item count) are unchanged
    assert sum(map(task.count_items, rows)) == sum(map(task.count_items, exs))


def test_best_fit_decreasing_by_hand():
    exs = [{"input_ids": [5] * n, "labels": [5] * n} for n in (6, 6, 6, 4, 4, 4, 2, 2, 2)]
    rows = pack_examples(exs, 12)
    # 6+6 | 6+4+2 | 4+4+2+2 : three full rows
    assert [r["segments"] for r in rows] == [[6, 6], [6, 4, 2], [4, 4, 2, 2]]
    with pytest.raises(ConfigError, match="more than the packing length 5"):
        pack_examples(exs, 5)


def test_block_causal_mask_by_hand():
    seg = torch.tensor([[1, 1, 2, 2, 2, 0]])
    allowed = block_causal_mask(seg, boolean=True)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [0, 0, 1, 0, 0, 0],
                             [0, 0, 1, 1, 0, 0],
                             [0, 0, 1, 1, 1, 0],
                             [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(allowed, expected)
    additive = block_causal_mask(seg, boolean=False)[0, 0]
    assert torch.equal(additive == 0, expected)
    assert float(additive.min()) == torch.finfo(torch.float32).min


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("delta", [True, False])
def test_packed_row_equals_each_example_alone(impl, delta):
    task = sft()
    exs = task.encode_rows(ROWS)
    rows = task.pack_examples(exs)
    m = model(impl, delta)
    batch = task.collate(rows)
    # position ids restart per example; padding is segment 0
    first = rows[0]["segments"]
    assert batch["position_ids"][0, :first[0]].tolist() == list(range(first[0]))
    assert batch["position_ids"][0, first[0]] == 0
    from deltatune.tasks.packing import packed_forward_inputs

    kwargs, flat = packed_forward_inputs(m, batch)
    assert not flat and kwargs["attention_mask"].dtype == (torch.bool if impl == "sdpa"
                                                           else torch.float32)
    with torch.no_grad():
        packed = m(**kwargs).logits
    by_ids = {tuple(e["input_ids"]): e for e in exs}
    checked = 0
    for b, r in enumerate(rows):
        start = 0
        for n in r["segments"]:
            ex = by_ids[tuple(r["input_ids"][start:start + n])]
            with torch.no_grad():
                alone = m(input_ids=torch.tensor([ex["input_ids"]])).logits[0]
            got = packed[b, start:start + n]
            torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)
            want = token_losses(alone, ex["labels"])
            have = token_losses(got, [IGNORE, *ex["labels"][1:]])
            assert [x is None for x in want] == [x is None for x in have]
            assert [x for x in have if x is not None] == pytest.approx(
                [x for x in want if x is not None], abs=1e-5)
            start += n
            checked += 1
    assert checked == len(exs)
    # the summed loss and the item count equal those of the unpacked batch
    with torch.no_grad():
        loss_p, n_p = task.loss_sum(m, batch)
        loss_u, n_u = task.loss_sum(m, task.collate(exs))
    assert n_p == n_u and float(loss_p) == pytest.approx(float(loss_u), abs=1e-4)


def test_flattened_position_only_path_used_for_flash_attention(monkeypatch):
    """flash/flex attention get no mask: one flattened sequence with restarting positions.
    On CPU the model runs SDPA, whose packed-sequence detection reads the same ids."""
    task = sft()
    exs = task.encode_rows(ROWS)
    rows = task.pack_examples(exs)
    m = model("sdpa")
    monkeypatch.setattr(packing_mod, "attention_implementation", lambda _m: "flash_attention_2")
    batch = task.collate(rows)
    kwargs, flat = packing_mod.packed_forward_inputs(m, batch)
    assert flat and set(kwargs) == {"input_ids", "position_ids", "use_cache"}
    assert kwargs["input_ids"].shape == (1, batch["input_ids"].numel())
    with torch.no_grad():
        logits = m(**kwargs).logits[0]
        start = 0
        for r in rows:  # every example's logits equal those it gets alone
            for n in r["segments"]:
                ids = kwargs["input_ids"][0, start:start + n]
                alone = m(input_ids=ids[None]).logits[0]
                torch.testing.assert_close(logits[start:start + n], alone, rtol=0, atol=1e-5)
                start += n
            start += batch["input_ids"].shape[1] - sum(r["segments"])  # padding
        loss_p, n_p = task.loss_sum(m, batch)
        loss_u, n_u = task.loss_sum(m, task.collate(exs))
    assert n_p == n_u and float(loss_p) == pytest.approx(float(loss_u), abs=1e-4)


def test_packed_gradient_equals_unpacked_gradient():
    task = sft()
    exs = task.encode_rows(ROWS)
    grads = []
    for batch in (task.collate(task.pack_examples(exs)), task.collate(exs)):
        m = model("sdpa")
        m.train()
        loss, _ = task.loss_sum(m, batch)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=1e-5)
    assert any(float(g.abs().max()) > 1e-3 for g in grads[0].values())


def test_prefix_delta_sees_its_prefix_in_every_packed_example():
    task = sft()
    exs = task.encode_rows(ROWS[:4])
    m = tiny_llama()
    dm = dt.attach(m, dt.PrefixTuningConfig(prefix_length=3, reparameterize=False))
    randomize_deltas(dm, std=0.3)
    dm.eval()
    rows = task.pack_examples(exs)
    batch = task.collate(rows)
    with torch.no_grad():
        loss_p, n_p = task.loss_sum(dm, batch)
        loss_u, n_u = task.loss_sum(dm, task.collate(exs))
    assert n_p == n_u and float(loss_p) == pytest.approx(float(loss_u), abs=1e-4)


def test_trainer_packs_rows_and_refuses_what_cannot_be_packed(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path), batch_size=2, progress=False, packing=True,
                      max_steps=1)
    trainer = Trainer(model("sdpa"), sft(), ROWS, None, cfg)
    assert trainer.packed_from == 10 and len(trainer.train_examples) == 6
    assert trainer.steps_per_epoch == 3  # 6 rows / 2 per step
    unpacked = Trainer(model("sdpa"), sft(), ROWS, None, cfg.replace(packing=False))
    assert unpacked.steps_per_epoch == 5
    # raw-text LM blocks pack too
    lm = LanguageModeling(char_tokenizer(), max_length=16)
    t2 = Trainer(model("sdpa"), lm, [{"text": "x" * 5}] * 6, None, cfg)
    assert len(t2.train_examples) == 3  # six blocks of 6 tokens (eos), two per row of 16
    with pytest.raises(ConfigError, match="packing applies to causal-LM tasks"):
        Trainer(model("sdpa"), SequenceClassification(char_tokenizer()),
                [{"text": "a", "label": "x"}], None, cfg)
    prompt = dt.attach(tiny_llama(), dt.PromptTuningConfig(prompt_length=2, init="random"))
    with pytest.raises(ConfigError, match="edits the inputs"):
        Trainer(prompt, sft(), ROWS, None, cfg)


def test_packed_training_run_learns_and_resume_refuses_a_packing_change(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path), batch_size=2, epochs=3, lr=1e-2,
                      progress=False, packing=True, save_every=1)
    result = Trainer(model("sdpa"), sft(), ROWS, None, cfg).fit()
    assert len(result.history) == 9  # 6 rows, 2 per step, 3 epochs
    assert result.summary()["train_rows"] == 6 and result.summary()["packed_from"] == 10
    # mean loss per token over each epoch (every epoch sees every example once)
    epochs = [result.history[i:i + 3] for i in (0, 3, 6)]
    mean = [sum(h["loss"] * h["items"] for h in e) / sum(h["items"] for h in e)
            for e in epochs]
    assert mean[2] < mean[1] < mean[0]
    # the items of each step are the supervised tokens of the examples in its rows
    assert sum(h["items"] for h in result.history[:3]) == \
        sum(map(sft().count_items, sft().encode_rows(ROWS)))
    from deltatune.train.checkpoint import ResumeError

    with pytest.raises(ResumeError, match="packing"):
        Trainer(model("sdpa"), sft(), ROWS, None, cfg.replace(packing=False)).fit(
            resume=str(result.checkpoint))
