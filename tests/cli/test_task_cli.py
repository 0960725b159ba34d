"""``deltatune train`` / ``eval`` for every task, on tiny random models saved to a temp dir.

Each test trains through the CLI, evaluates through the CLI, and checks the reported
metrics against values computed here another way: predictions made by hand from a
fresh model with the saved delta loaded (so the delta reloads to the same outputs),
scored with plain Python, ``sacrebleu`` or ``math``. The training run's own final
evaluation (in ``run.yaml``, computed on the in-memory model) must equal the CLI
evaluation of the saved delta.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

import deltatune as dt
from deltatune.cli import main
from tests.conftest import tiny_bert, tiny_llama, tiny_t5
from tests.tiny_tokenizer import char_tokenizer

COMMON = ["--no-progress", "--seed", "0", "--max-grad-norm", "1.0"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_eval(capsys, *argv):
    capsys.readouterr()
    assert main(["eval", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    tiny_bert(task="base").save_pretrained(d)  # no head: train adds one
    char_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("t5")
    tiny_t5(eos_token_id=2).save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    return d


def ids_of(text):
    return char_tokenizer()(text, add_special_tokens=False)["input_ids"]


# -- sequence classification (new head) --
def sentiment_rows(n, offset=0):
    out = []
    for i in range(n):
        k = 2 + (i + offset) % 4
        out.append({"review": "a" * k + "b", "label": "neg"} if i % 2 else
                   {"review": "z" * k + "y", "label": "pos"})
    return out


def test_sequence_classification_head(bert_dir, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(12))
    val = write_jsonl(tmp_path / "val.jsonl", sentiment_rows(6, offset=1))
    out = tmp_path / "run"
    assert main(["train", "--task", "sequence-classification", "--model", str(bert_dir),
                 "--data", str(train), "--eval-data", str(val), "--column", "review=text",
                 "--out", str(out), "--r", "4", "--target-modules", "query,value",
                 "--epochs", "6", "--batch-size", "4", "--lr", "0.05", *COMMON]) == 0
    assert "new head classifier" in capsys.readouterr().out
    run = yaml.safe_load((out / "run.yaml").read_text())
    assert run["task"] == "sequence-classification"
    assert run["task_options"]["labels"] == ["neg", "pos"]
    assert run["method"]["modules_to_save"] == ["classifier"]
    report = run_eval(capsys, "--model", str(bert_dir), "--delta", str(out / "adapter"),
                      "--data", str(val), "--column", "review=text")
    assert report["task"] == "sequence-classification"  # from the run file
    got = report["with_delta"]
    # the saved delta gives what the in-memory model gave at the end of training
    final = run["result"]["final_eval"]
    assert got["loss"] == pytest.approx(final["loss"], rel=1e-5)
    assert got["accuracy"] == final["accuracy"]
    # by hand: a fresh model with the delta, one text at a time
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(bert_dir, num_labels=2)
    dm = dt.load(model, out / "adapter")
    labels = ["neg", "pos"]
    rows = sentiment_rows(6, offset=1)
    preds, nll = [], 0.0
    with torch.no_grad():
        for r in rows:
            logits = dm(input_ids=torch.tensor([ids_of(r["review"])])).logits[0]
            preds.append(labels[int(logits.argmax())])
            nll -= float(torch.log_softmax(logits, -1)[labels.index(r["label"])])
    gold = [r["label"] for r in rows]
    accuracy = sum(p == g for p, g in zip(preds, gold)) / len(gold)
    f1s = []
    for c in labels:
        tp = sum(p == g == c for p, g in zip(preds, gold))
        fp = sum(p == c != g for p, g in zip(preds, gold))
        fn = sum(g == c != p for p, g in zip(preds, gold))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    assert got["accuracy"] == pytest.approx(accuracy)
    assert got["macro_f1"] == pytest.approx(sum(f1s) / len(f1s))
    assert got["loss"] == pytest.approx(nll / len(rows), rel=1e-5)
    assert accuracy == 1.0  # it learned the toy task (z... is pos)


# -- token classification (BIO) --
def tagging_rows(n, offset=0):
    """Capitalised words are names: B-PER, and a following capitalised word I-PER."""
    words = ["Ann", "Lee", "saw", "the", "Bob", "dog", "ran", "Kim", "Ray", "at"]
    out = []
    for i in range(n):
        toks = [words[(i + offset + 3 * j) % len(words)] for j in range(5)]
        tags, prev = [], False
        for w in toks:
            name = w[0].isupper()
            tags.append(("I-PER" if prev else "B-PER") if name else "O")
            prev = name
        out.append({"words": toks, "tags": tags})
    return out


def spans(tags):
    out, start = set(), None
    for i, t in enumerate([*tags, "O"]):
        if start is not None and not t.startswith("I-"):
            out.add((start, i))
            start = None
        if t.startswith("B-") or (t.startswith("I-") and start is None):
            start = i
    return out


def test_token_classification_bio(bert_dir, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", tagging_rows(12))
    val = write_jsonl(tmp_path / "val.jsonl", tagging_rows(5, offset=1))
    out = tmp_path / "run"
    assert main(["train", "--task", "token-classification", "--model", str(bert_dir),
                 "--data", str(train), "--eval-data", str(val), "--column", "words=tokens",
                 "--out", str(out), "--r", "4", "--target-modules", "query,value",
                 "--epochs", "4", "--batch-size", "4", "--lr", "0.05", *COMMON]) == 0
    run = yaml.safe_load((out / "run.yaml").read_text())
    assert run["task_options"]["labels"] == ["O", "B-PER", "I-PER"]
    report = run_eval(capsys, "--model", str(bert_dir), "--delta", str(out / "adapter"),
                      "--data", str(val), "--column", "words=tokens")
    got = report["with_delta"]
    assert got["span_f1"] == pytest.approx(run["result"]["final_eval"]["span_f1"])
    assert got["loss"] == pytest.approx(run["result"]["final_eval"]["loss"], rel=1e-5)
    from transformers import BertForTokenClassification

    dm = dt.load(BertForTokenClassification.from_pretrained(bert_dir, num_labels=3),
                 out / "adapter")
    labels = ["O", "B-PER", "I-PER"]
    tp = n_pred = n_gold = correct = words = 0
    with torch.no_grad():
        for r in tagging_rows(5, offset=1):
            # each word's first character is its first sub-token (one char = one token)
            ids, firsts = [], []
            for w in r["words"]:
                firsts.append(len(ids))
                ids.extend(ids_of(w))
            pred_ids = dm(input_ids=torch.tensor([ids])).logits[0].argmax(-1).tolist()
            pred = [labels[pred_ids[i]] for i in firsts]
            correct += sum(p == g for p, g in zip(pred, r["tags"]))
            words += len(pred)
            ps, gs = spans(pred), spans(r["tags"])
            tp, n_pred, n_gold = tp + len(ps & gs), n_pred + len(ps), n_gold + len(gs)
    f1 = 2 * tp / (n_pred + n_gold) if n_pred + n_gold else 0.0
    assert got["span_f1"] == pytest.approx(f1)
    assert got["accuracy"] == pytest.approx(correct / words)


# -- seq2seq --
def s2s_target(word):
    return {"a": "x y z", "b": "z y x"}.get(word[0], "y x z")


def s2s_rows(words):
    return [{"question": w, "answer": s2s_target(w)} for w in words]


def rouge_l_by_hand(pred, ref):
    """LCS F1 over lower-cased alphanumeric tokens (rouge-score's default tokenizer)."""
    import re

    a, b = re.findall(r"[a-z0-9]+", pred.lower()), re.findall(r"[a-z0-9]+", ref.lower())
    if not a or not b:
        return 0.0
    lcs = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            lcs[i + 1][j + 1] = lcs[i][j] + 1 if x == y else max(lcs[i][j + 1], lcs[i + 1][j])
    n = lcs[-1][-1]
    return 0.0 if n == 0 else 2 * n / (len(a) + len(b))


def test_seq2seq(t5_dir, tmp_path, capsys):
    words = ["abc", "cab", "bca", "aab", "bba", "cca", "acb", "bac"]
    held_out = ["abb", "cba", "bcc"]
    train = write_jsonl(tmp_path / "train.jsonl", s2s_rows(words))
    val = write_jsonl(tmp_path / "val.jsonl", s2s_rows(held_out))
    out = tmp_path / "run"
    # full fine-tuning: a random tiny T5 learns this mapping within seconds only that way
    assert main(["train", "--task", "seq2seq", "--model", str(t5_dir), "--data", str(train),
                 "--eval-data", str(val), "--column", "question=source",
                 "--column", "answer=target", "--out", str(out), "--method", "full",
                 "--epochs", "15", "--batch-size", "4", "--lr", "0.01",
                 "--max-new-tokens", "6", *COMMON]) == 0
    report = run_eval(capsys, "--model", str(t5_dir), "--delta", str(out / "adapter"),
                      "--data", str(val), "--column", "question=source",
                      "--column", "answer=target")
    got = report["with_delta"]
    run = yaml.safe_load((out / "run.yaml").read_text())
    assert got["loss"] == pytest.approx(run["result"]["final_eval"]["loss"], rel=1e-5)
    assert got["rouge_l"] == pytest.approx(run["result"]["final_eval"]["rouge_l"])
    from transformers import T5ForConditionalGeneration

    dm = dt.load(T5ForConditionalGeneration.from_pretrained(t5_dir), out / "adapter")
    tok = char_tokenizer()
    nll, count, preds = 0.0, 0, []
    refs = [s2s_target(w) for w in held_out]
    with torch.no_grad():
        for src, ref in zip(held_out, refs):
            ids = torch.tensor([ids_of(src)])
            target = torch.tensor([[*ids_of(ref), tok.eos_token_id]])
            logp = torch.log_softmax(dm(input_ids=ids, labels=target).logits[0], -1)
            nll -= float(logp.gather(1, target[0, :, None]).sum())
            count += target.shape[1]
            gen = dm.generate(input_ids=ids, max_new_tokens=6, do_sample=False,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            preds.append(tok.decode(gen[0].tolist(), skip_special_tokens=True).strip())
    assert got["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert got["exact_match"] == pytest.approx(sum(p == r for p, r in zip(preds, refs)) / 3)
    rouge = sum(map(rouge_l_by_hand, preds, refs)) / 3
    assert got["rouge_l"] == pytest.approx(rouge)
    assert rouge > 0.3  # it learned part of the mapping
    import sacrebleu

    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)  # 0-100


# -- multiple choice (rank classification) --
def choice_rows(n, offset=0):
    out = []
    for i in range(n):
        k = (i + offset) % 3
        choices = ["xx", "yy", "zz"]
        out.append({"prompt": "pick " + "xyz"[k], "choices": choices, "label": k})
    return out


def test_multiple_choice_rank_classification(llama_dir, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", choice_rows(9))
    val = write_jsonl(tmp_path / "val.jsonl", choice_rows(6, offset=1))
    out = tmp_path / "run"
    assert main(["train", "--task", "multiple-choice", "--model", str(llama_dir), "--data",
                 str(train), "--eval-data", str(val), "--out", str(out), "--r", "2",
                 "--target-modules", "q_proj,v_proj", "--epochs", "2", "--batch-size", "3",
                 "--lr", "0.02", "--loss", "lm", *COMMON]) == 0
    report = run_eval(capsys, "--model", str(llama_dir), "--delta", str(out / "adapter"),
                      "--data", str(val))
    got = report["with_delta"]
    run = yaml.safe_load((out / "run.yaml").read_text())
    assert run["task_options"]["loss"] == "lm"
    assert got["loss"] == pytest.approx(run["result"]["final_eval"]["loss"], rel=1e-5)
    dm = dt.load(tiny_llama(), out / "adapter")
    correct, total_loss = 0, 0.0
    with torch.no_grad():
        for r in choice_rows(6, offset=1):
            head = ids_of(r["prompt"] + " ")
            scores = []
            for c in r["choices"]:
                tail = ids_of(c)
                ids = torch.tensor([head + tail])
                logp = torch.log_softmax(dm(input_ids=ids).logits[0, :-1], -1)
                picks = [float(logp[len(head) - 1 + t, tok]) for t, tok in enumerate(tail)]
                scores.append(sum(picks) / len(picks))
            correct += int(max(range(3), key=scores.__getitem__) == r["label"])
            total_loss -= scores[r["label"]]
    assert got["accuracy"] == pytest.approx(correct / 6)
    assert got["loss"] == pytest.approx(total_loss / 6, rel=1e-5)


# -- raw-text language modelling (perplexity) --
def test_raw_text_language_modelling_perplexity(llama_dir, tmp_path, capsys):
    texts = [{"body": "the cat sat on the mat " * (1 + i % 2)} for i in range(8)]
    train = write_jsonl(tmp_path / "train.jsonl", texts)
    val_rows = [{"body": "the mat sat on the cat"}, {"body": "a cat"}]
    val = write_jsonl(tmp_path / "val.jsonl", val_rows)
    out = tmp_path / "run"
    assert main(["train", "--task", "causal-lm", "--model", str(llama_dir), "--data", str(train),
                 "--eval-data", str(val), "--column", "body=text", "--out", str(out),
                 "--r", "2", "--epochs", "2", "--batch-size", "4", "--lr", "0.02",
                 "--max-length", "32", *COMMON]) == 0
    report = run_eval(capsys, "--model", str(llama_dir), "--delta", str(out / "adapter"),
                      "--data", str(val), "--column", "body=text", "--base-too")
    got = report["with_delta"]
    dm = dt.load(tiny_llama(), out / "adapter")
    tok = char_tokenizer()
    nll, count = 0.0, 0
    with torch.no_grad():
        for r in val_rows:
            ids = torch.tensor([[*ids_of(r["body"]), tok.eos_token_id]])
            logp = torch.log_softmax(dm(input_ids=ids).logits[0, :-1], -1)
            nll -= float(logp.gather(1, ids[0, 1:, None]).sum())
            count += ids.shape[1] - 1
    assert got["tokens"] == count
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert got["perplexity"] < report["base"]["perplexity"]  # it learned the text


# -- sequence classification through label words (verbaliser) --
def test_sequence_classification_verbaliser(llama_dir, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(8))
    out = tmp_path / "run"
    assert main(["train", "--task", "sequence-classification", "--model", str(llama_dir),
                 "--data", str(train), "--eval-data", str(train), "--column", "review=text",
                 "--verbalizer", "neg=n", "--verbalizer", "pos=p", "--template", "{text}:",
                 "--out", str(out), "--r", "2", "--epochs", "2", "--batch-size", "4",
                 "--lr", "0.02", *COMMON]) == 0
    run = yaml.safe_load((out / "run.yaml").read_text())
    assert run["task_options"]["verbalizer"] == {"neg": "n", "pos": "p"}
    assert "modules_to_save" not in run["method"]  # no new head
    report = run_eval(capsys, "--model", str(llama_dir), "--delta", str(out / "adapter"),
                      "--data", str(train), "--column", "review=text")
    got = report["with_delta"]
    dm = dt.load(tiny_llama(), out / "adapter")
    words = [ids_of("n")[0], ids_of("p")[0]]
    correct = 0
    with torch.no_grad():
        for r in sentiment_rows(8):
            logits = dm(input_ids=torch.tensor([ids_of(r["review"] + ":")])).logits[0, -1]
            correct += int(["neg", "pos"][int(logits[words].argmax())] == r["label"])
    assert got["accuracy"] == pytest.approx(correct / 8)


# -- errors --
def test_task_errors_are_clear(bert_dir, llama_dir, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(4))
    base = ["--model", str(bert_dir), "--data", str(train), "--out", str(tmp_path / "x")]
    assert main(["train", "--task", "sentiment", *base]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'sentiment'" in err and "token-classification" in err
    assert main(["eval", "--model", str(bert_dir), "--data", str(train), "--task", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    # a missing column names the file, the line and the columns it has
    assert main(["train", "--task", "sequence-classification", *base]) == 2
    err = capsys.readouterr().err
    assert f"{train} line 1: no column 'text'" in err
    assert "columns: review, label" in err and "--column YOURS=text" in err
    assert main(["eval", "--model", str(bert_dir), "--data", str(train), "--task",
                 "token-classification"]) == 2
    assert f"{train} line 1: no column 'tokens', 'tags'" in capsys.readouterr().err
    # an option of another task
    assert main(["train", "--task", "sequence-classification", "--column", "review=text",
                 "--max-new-tokens", "3", *base]) == 2
    assert "max_new_tokens do not apply to task 'sequence-classification'" in \
        capsys.readouterr().err
    # the forgetting guard only fits causal-LM training
    assert main(["train", "--task", "sequence-classification", "--column", "review=text",
                 "--mix-general", str(train), *base]) == 2
    assert "--mix-general mixes raw text into causal-LM training" in capsys.readouterr().err


# -- SFT packing from the command line --
def test_sft_packing_flag(llama_dir, tmp_path, capsys):
    rows = [{"prompt": f"w{i}", "response": "ab" * (1 + i % 3)} for i in range(10)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "run"
    assert main(["train", "--model", str(llama_dir), "--data", str(train), "--out", str(out),
                 "--val-fraction", "0", "--r", "2", "--epochs", "1", "--batch-size", "2",
                 "--max-length", "32", "--packing", *COMMON]) == 0
    assert "packed from 10 examples" in capsys.readouterr().out
    run = yaml.safe_load((out / "run.yaml").read_text())
    assert run["train"]["packing"] is True
    # "wN\n" + response + eos: 4 + 2k tokens (k = 1, 2, 3); 78 tokens fit in 3 rows of 32
    lengths = [4 + 2 * (1 + i % 3) for i in range(10)]
    assert sum(lengths) == 78 and run["result"]["packed_from"] == 10
    assert run["result"]["train_rows"] == math.ceil(78 / 32) == 3
    assert run["result"]["steps"] == 2
