"""The term-spans and sentiment-lm lab tasks, on tiny random models and a character tokenizer.

The encodings are checked position by position, and the metrics against references
computed another way (a model whose logits we set; one unpadded forward per prompt).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deltatune import metrics
from deltatune.lab import compare
from deltatune.lab.methods import MANUAL, RunSpec, parse_methods
from deltatune.lab.tasks import (
    DefinitionTask,
    Loaded,
    PromptSentimentTask,
    TaskSize,
    TermSpanTask,
)
from deltatune.tasks.base import IGNORE
from tests.conftest import tiny_bert, tiny_llama
from tests.tiny_tokenizer import char_tokenizer

SIZE = TaskSize(train_examples=4, eval_examples=4, steps=2, batch_size=2, max_length=40,
                latency_batch=2, latency_repeats=1)
SPAN_ROWS = [
    {"query": "dog", "tokens": ["the", "dog", "barked"], "tags": ["O", "B-NOUN", "O"]},
    {"query": "give up", "tokens": ["give", "up", "now"], "tags": ["B-VERB", "I-VERB", "O"]},
    {"query": "fast", "tokens": ["run", "fast"], "tags": ["O", "B-ADV"]},
    {"query": "red", "tokens": ["red", "red", "sky"], "tags": ["B-ADJ", "B-ADJ", "O"]},
]


class TinyTermSpans(TermSpanTask):
    name = "tiny-spans"
    sizes = {"default": SIZE}  # noqa: RUF012 (a test fixture)

    def rows(self, split):
        return [dict(r) for r in SPAN_ROWS]

    def load(self, device):
        return Loaded(tiny_bert(task="token-classification", num_labels=9).to(device),
                      char_tokenizer(), device)


def test_term_spans_labels_sit_on_each_sentence_words_first_subtoken():
    task = TinyTermSpans()
    loaded = task.load(torch.device("cpu"))
    batch, firsts = task.encode(loaded, SPAN_ROWS[:2], 40)
    tok = loaded.tokenizer
    for i, row in enumerate(SPAN_ROWS[:2]):
        ids = batch["input_ids"][i].tolist()
        # the first sub-token (a character here) of each sentence word, in order
        assert [tok.convert_ids_to_tokens(ids[j]) for j in firsts[i]] == \
            [w[0] for w in row["tokens"]]
        want = {j: task.label_names.index(t) for j, t in zip(firsts[i], row["tags"])}
        got = {j: y for j, y in enumerate(batch["labels"][i].tolist()) if y != IGNORE}
        assert got == want  # the query and the other characters are never scored


class _Oracle(nn.Module):
    """Logits putting all mass on the gold tag at given positions, 'O' elsewhere."""

    def __init__(self, gold):
        super().__init__()
        self.gold = gold
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        logits = torch.zeros(*input_ids.shape, 9)
        logits[..., 0] = 1.0
        for (i, j), y in self.gold.items():
            logits[i, j] = 0.0
            logits[i, j, y] = 5.0
        loss = nn.functional.cross_entropy(logits.reshape(-1, 9), labels.reshape(-1),
                                           ignore_index=IGNORE)
        return type("Out", (), {"logits": logits, "loss": loss})()


def test_term_spans_metric_is_span_f1_of_the_predicted_tags():
    task = TinyTermSpans()
    loaded = task.load(torch.device("cpu"))
    batch, _ = task.encode(loaded, SPAN_ROWS, 40)
    labels = batch["labels"]
    perfect = {(i, j): int(y) for (i, j), y in zip(
        (labels != IGNORE).nonzero().tolist(), labels[labels != IGNORE].tolist())}
    assert task.evaluate(_Oracle(perfect), loaded, SIZE)["span_f1"] == 1.0
    # drop the prediction of the second row's I-VERB: that span becomes B-VERB alone (wrong)
    j = [p for (i, p) in perfect if i == 1][1]
    wrong = dict(perfect)
    wrong[(1, j)] = 0
    got = task.evaluate(_Oracle(wrong), loaded, SIZE)
    pred = [r["tags"] for r in SPAN_ROWS]
    pred[1] = ["B-VERB", "O", "O"]
    assert got["span_f1"] == pytest.approx(metrics.span_f1(pred, [r["tags"] for r in SPAN_ROWS]))
    assert got["span_f1"] == pytest.approx(2 * (4 / 5) * (4 / 5) / (8 / 5))


def test_term_spans_truncated_words_are_predicted_outside():
    task = TinyTermSpans()
    loaded = task.load(torch.device("cpu"))
    # the char tokenizer adds no special tokens: 7 positions hold "dog" and part of the sentence
    _, firsts = task.encode(loaded, SPAN_ROWS[:1], 7)
    assert len(firsts[0]) < 3
    preds, _ = task.predict(loaded.model, loaded, SPAN_ROWS[:1], 7)
    assert len(preds[0]) == 3 and preds[0][len(firsts[0]):] == ["O"] * (3 - len(firsts[0]))


def test_term_spans_compare_trains_full_lora_and_ptuning_v2(tmp_path):
    res = compare(TinyTermSpans(), "full,lora,ptuning-v2", out=tmp_path, progress=False,
                  plots_too=False, echo=None)
    for key, rec in res.runs.items():
        assert rec["status"] == "done", (key, rec.get("error"))
        assert 0.0 <= rec["metrics"]["span_f1"] <= 1.0
    head = 32 * 9 + 9
    assert res.runs["lora/seed0"]["trainable_parameters"] == 2 * 2 * 8 * 64 + head


SENT_ROWS = [{"text": t, "label": lab} for t, lab in [
    ("a fine film", "positive"), ("dull and long", "negative"), ("great fun", "positive"),
    ("a mess", "negative"), ("lovely", "positive"), ("boring", "negative")]]


class TinyPromptSentiment(PromptSentimentTask):
    name = "tiny-sent-lm"
    sizes = {"default": SIZE}  # noqa: RUF012
    verbalizer = {"negative": "N", "positive": "P"}  # noqa: RUF012 (one char each)

    def rows(self, split):
        return list(SENT_ROWS)

    def load(self, device):
        return Loaded(tiny_llama().to(device), char_tokenizer(), device)


def test_prompt_sentiment_scores_only_the_label_word():
    task = TinyPromptSentiment()
    loaded = task.load(torch.device("cpu"))
    tok = loaded.tokenizer
    batch = task._encode_train(loaded, SENT_ROWS[:2], 40)
    for i, row in enumerate(SENT_ROWS[:2]):
        n = int(batch["attention_mask"][i].sum())
        ids = batch["input_ids"][i, :n].tolist()
        assert tok.decode(ids[:-1]) == f"Review: {row['text']}\nSentiment:"
        word = tok.convert_tokens_to_ids(task.verbalizer[row["label"]])
        assert ids[-1] == word
        assert batch["labels"][i].tolist() == [IGNORE] * (n - 1) + [word] + \
            [IGNORE] * (batch["labels"].shape[1] - n)


def test_prompt_sentiment_accuracy_matches_unpadded_forward_passes():
    task = TinyPromptSentiment()
    loaded = task.load(torch.device("cpu"))
    tok, model = loaded.tokenizer, loaded.model
    words = task.label_token_ids(tok)
    rows = task._eval_rows(SIZE)
    correct = 0
    with torch.no_grad():
        for row in rows:
            ids = tok(f"Review: {row['text']}\nSentiment:", add_special_tokens=False)["input_ids"]
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1, words]
            correct += int(logits.argmax()) == task.label_names.index(row["label"])
    got = task.evaluate(model, loaded, SIZE)
    assert got["accuracy"] == pytest.approx(correct / len(rows))
    manual, _ = task.evaluate_icl(loaded, SIZE, 0, seed=0)
    assert manual["accuracy"] == got["accuracy"]  # manual = the untrained template


def test_manual_is_zero_shot_and_ptuning_gets_the_prefix_placement(tmp_path):
    (spec,) = parse_methods(MANUAL)
    assert spec == RunSpec(MANUAL, "icl", shots=0) and not spec.trains
    res = compare(TinyPromptSentiment(), "manual,ptuning", out=tmp_path, progress=False,
                  plots_too=False, echo=None)
    man, pt = res.runs["manual/seed0"], res.runs["ptuning/seed0"]
    assert man["status"] == pt["status"] == "done", pt.get("error")
    assert man["trainable_parameters"] == 0 and man["metrics"]["shots"] == 0.0
    assert pt["config"]["placement"] == "prefix" and pt["trainable_parameters"] > 0


DEF_ROWS = [{"prompt": "Define ab.", "response": "cd e"}, {"prompt": "Define f.", "response": "gh"},
            {"prompt": "Define ij.", "response": "k"}, {"prompt": "Define l.", "response": "mn o"}]


class TinyDefinitions(DefinitionTask):
    name = "tiny-defs"
    sizes = {"default": SIZE}  # noqa: RUF012
    max_new_tokens = 3

    def rows(self, split):
        return [dict(r) for r in DEF_ROWS]

    def load(self, device):
        loaded = Loaded(tiny_llama().to(device), char_tokenizer(), device)
        if loaded.tokenizer.pad_token_id is None:
            loaded.tokenizer.pad_token = loaded.tokenizer.eos_token
        return loaded


def test_definitions_infix_sits_before_the_answer_and_runs_in_compare(tmp_path):
    """The prefix sweep's infix variant: y (the answer) sees the infix, x (the prompt) not."""
    from deltatune.core.model import DeltaModel
    from deltatune.methods.prefix import PrefixTuningConfig

    task = TinyDefinitions()
    loaded = task.load(torch.device("cpu"))
    base = task._encode_sft(loaded, DEF_ROWS[:2], 40)
    assert "infix_position" not in base  # other methods get no extra argument
    loaded.infix = True
    batch = task._encode_sft(loaded, DEF_ROWS[:2], 40)
    tok = loaded.tokenizer
    lengths = [len(tok(task.prompt_text(r), add_special_tokens=False)["input_ids"])
               for r in DEF_ROWS[:2]]
    assert batch["infix_position"].tolist() == lengths
    with torch.no_grad():
        ref = loaded.model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
        dm = DeltaModel(loaded.model)
        dm.add("x", PrefixTuningConfig(prefix_length=3, mode="infix", reparameterize=False))
        out = dm(**{k: v for k, v in batch.items() if k != "labels"}).logits
        with dm.disabled():  # the argument is the delta's, never the wrapped model's
            off = dm(**{k: v for k, v in batch.items() if k != "labels"}).logits
    for i, n in enumerate(lengths):
        assert torch.allclose(out[i, :n], ref[i, :n], atol=1e-5)  # the prompt: unchanged
        assert not torch.allclose(out[i, n:], ref[i, n:], atol=1e-3)  # the answer sees it
    assert torch.allclose(off, ref, atol=1e-6)
    res = compare(task, [RunSpec("infix-3", "prefix", {"prefix_length": 3, "mode": "infix"})],
                  out=tmp_path, progress=False, plots_too=False, echo=None)
    rec = res.runs["infix-3/seed0"]
    assert rec["status"] == "done", rec.get("error")
    assert 0.0 <= rec["metrics"]["rougeL"] <= 1.0
