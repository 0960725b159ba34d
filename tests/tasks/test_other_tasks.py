"""Classification (head and verbaliser), BIO tagging, seq2seq and multiple choice: encodings
and losses against hand computations on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deltatune import metrics
from deltatune.core.errors import ConfigError, DataError
from deltatune.tasks import (
    IGNORE,
    MultipleChoice,
    Seq2Seq,
    SequenceClassification,
    TokenClassification,
)
from tests.conftest import tiny_bert, tiny_llama, tiny_t5
from tests.tiny_tokenizer import char_tokenizer, ids


def test_head_classification_labels_loss_and_metrics():
    task = SequenceClassification(char_tokenizer())
    exs = task.encode_rows([{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"},
                            {"text": "meh", "label": "mid"}])
    assert task.labels == ["mid", "neg", "pos"]
    assert [e["label"] for e in exs] == [2, 1, 0]
    assert exs[0]["input_ids"] == ids("good")
    model = tiny_bert().double()
    batch = task.collate(exs)
    loss, n = task.loss_sum(model, batch)
    expected = 0.0
    for e in exs:
        logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0]
        expected -= float(torch.log_softmax(logits, -1)[e["label"]].detach())
    assert n == 3 and float(loss) == pytest.approx(expected, rel=1e-6)
    out = task.evaluate(model, exs)
    preds = [int(model(input_ids=torch.tensor([e["input_ids"]])).logits.argmax())
             for e in exs]
    assert out["accuracy"] == metrics.accuracy(preds, [2, 1, 0])
    assert out["loss"] == pytest.approx(expected / 3, rel=1e-6)
    with pytest.raises(DataError, match="label 'odd' is not one of"):
        task.encode_rows([{"text": "x", "label": "odd"}])


def test_verbaliser_scores_are_the_lm_logits_of_the_label_words():
    task = SequenceClassification(char_tokenizer(), verbalizer={"pos": "y", "neg": "n"},
                                  template="{text} ?")
    assert task.labels == ["pos", "neg"] and task.label_ids == ids("yn")
    exs = task.encode_rows([{"text": "fine", "label": "pos"}, {"text": "awful x", "label": 1}])
    model = tiny_llama().double()
    batch = task.collate(exs)  # right-padded: the short row's last token is not the last column
    scores = task.logits(model, batch)
    for row, e in zip(scores, exs):
        full = model(input_ids=torch.tensor([e["input_ids"]])).logits[0, -1]
        assert torch.allclose(row, full[ids("yn")].float(), atol=1e-10)
    loss, _ = task.loss_sum(model, batch)
    assert float(loss) == pytest.approx(float(F.cross_entropy(scores, torch.tensor([0, 1]),
                                                              reduction="sum")))
    with pytest.raises(ConfigError, match="same token"):
        SequenceClassification(char_tokenizer(), verbalizer={"a": "yes", "b": "yo"})


def test_bio_labels_sit_on_the_first_sub_token_of_each_word():
    task = TokenClassification(char_tokenizer(), labels=["O", "B-X", "I-X"])
    ex = task.encode({"tokens": ["ab", "c", "de"], "tags": ["B-X", "I-X", "O"]})
    assert ex["input_ids"] == ids("ab") + ids("c") + ids("de")
    assert ex["labels"] == [1, IGNORE, 2, 0, IGNORE]
    assert task.count_items(ex) == 3
    with pytest.raises(DataError, match="2 tokens but 1 tags"):
        task.encode({"tokens": ["a", "b"], "tags": ["O"]})


def test_token_classification_metrics_match_hand_decoding():
    task = TokenClassification(char_tokenizer())
    rows = [{"tokens": ["ab", "c"], "tags": ["B-X", "O"]},
            {"tokens": ["d", "ef", "g"], "tags": ["B-Y", "I-Y", "O"]}]
    exs = task.encode_rows(rows)
    assert task.labels == ["O", "B-X", "B-Y", "I-Y"]
    model = tiny_bert(task="token-classification", num_labels=4)
    out = task.evaluate(model, exs)
    preds = []
    for e in exs:
        arg = model(input_ids=torch.tensor([e["input_ids"]])).logits[0].argmax(-1).tolist()
        preds.append([task.labels[a] for a, y in zip(arg, e["labels"]) if y != IGNORE])
    gold = [r["tags"] for r in rows]
    assert out["span_f1"] == metrics.span_f1(preds, gold)
    assert out["accuracy"] == metrics.accuracy([t for p in preds for t in p],
                                               [t for g in gold for t in g])


def test_seq2seq_loss_is_teacher_forced_cross_entropy():
    tok = char_tokenizer()
    task = Seq2Seq(tok, generate_examples=0)
    exs = task.encode_rows([{"source": "abc", "target": "xy"}, {"source": "d", "target": "z"}])
    assert exs[0]["labels"] == [*ids("xy"), tok.eos_token_id]
    model = tiny_t5().double()
    loss, n = task.loss_sum(model, task.collate(exs))
    expected = 0.0
    for e in exs:
        labels = torch.tensor([e["labels"]])
        dec = torch.cat([torch.zeros(1, 1, dtype=torch.long), labels[:, :-1]], 1)  # start id 0
        logits = model(input_ids=torch.tensor([e["input_ids"]]), decoder_input_ids=dec).logits
        expected -= float(torch.log_softmax(logits[0], -1).gather(1, labels[0, :, None]).sum())
    assert n == 5 and float(loss) == pytest.approx(expected, rel=1e-6)
    out = Seq2Seq(tok, generate_examples=2, max_new_tokens=3).evaluate(model, exs)
    assert out["perplexity"] == pytest.approx(math.exp(expected / 5), rel=1e-6)
    assert {"rouge_l", "bleu", "exact_match"} <= set(out)


def test_multiple_choice_rank_scores_and_t_few_loss_by_hand():
    task = MultipleChoice(char_tokenizer(), loss="t-few")
    row = {"prompt": "q", "choices": ["ab", "c", "de"], "label": 2}
    ex = task.encode(row)
    assert ex["choices"][1]["input_ids"] == ids("q c")
    assert ex["choices"][1]["labels"] == [IGNORE, IGNORE, *ids("c")]
    model = tiny_llama().double()
    betas, token_lps = [], []
    for seq in ex["choices"]:
        x = torch.tensor([seq["input_ids"]])
        logp = torch.log_softmax(model(input_ids=x).logits[0, :-1], -1)
        lps = [float(logp[t, seq["input_ids"][t + 1]]) for t in range(len(seq["input_ids"]) - 1)
               if seq["labels"][t + 1] != IGNORE]
        token_lps.append(lps)
        betas.append(sum(lps) / len(lps))
    y = 2
    l_lm = -betas[y]
    l_ul = -sum(sum(math.log1p(-math.exp(lp)) for lp in token_lps[n]) / len(token_lps[n])
                for n in range(3) if n != y)
    l_ln = -(betas[y] - math.log(sum(math.exp(b) for b in betas)))
    loss, n = task.loss_sum(model, task.collate([ex]))
    assert n == 1 and float(loss) == pytest.approx(l_lm + l_ul + l_ln, rel=1e-6)
    lm_only = MultipleChoice(char_tokenizer(), loss="lm")
    assert float(lm_only.loss_sum(model, lm_only.collate([ex]))[0]) == pytest.approx(l_lm)
    out = task.evaluate(model, [ex, task.encode({**row, "label": 0})])
    best = max(range(3), key=lambda k: betas[k])
    assert out["accuracy"] == ((best == 2) + (best == 0)) / 2
