"""``deltatune train`` / ``generate`` / ``eval`` end to end on a tiny local model directory."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import deltatune as dt
from deltatune.cli import main
from tests.conftest import tiny_llama
from tests.tiny_tokenizer import char_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(d)
    char_tokenizer(chat=True).save_pretrained(d)
    return d


@pytest.fixture
def files(tmp_path):
    rows = [{"prompt": f"word {w}", "response": w[::-1]} for w in
            ["cat", "dog", "emu", "yak", "owl", "bee", "ant", "elk", "fox", "gnu"]]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in rows[:8]) + "\n")
    val = tmp_path / "val.jsonl"
    val.write_text("\n".join(json.dumps(r) for r in rows[8:]) + "\n")
    general = tmp_path / "general.jsonl"
    general.write_text("\n".join(json.dumps({"text": f"plain text number {i}."})
                                 for i in range(6)) + "\n")
    return train, val, general


def test_train_writes_delta_run_file_and_log(model_dir, files, tmp_path, capsys):
    train, val, general = files
    out = tmp_path / "run"
    code = main(["train", "--model", str(model_dir), "--data", str(train), "--eval-data",
                 str(val), "--out", str(out), "--r", "2", "--lora-alpha", "4",
                 "--target-modules", "q_proj,v_proj", "--epochs", "2", "--batch-size", "2",
                 "--lr", "0.01", "--generate-examples", "1", "--max-new-tokens", "3",
                 "--mix-general", str(general), "--mix-ratio", "0.2", "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "trainable:" in text and "forgetting guard: mixed 2 general-text" in text
    run = yaml.safe_load((out / "run.yaml").read_text())
    assert run["method"] == {"method": "lora", "r": 2, "lora_alpha": 4,
                             "target_modules": ["q_proj", "v_proj"]}
    assert run["train"]["epochs"] == 2 and run["train"]["lr"] == 0.01
    assert run["result"]["steps"] == 10  # (8 + 2 mixed) / 2 per step * 2 epochs
    assert set(run["result"]["final_eval"]) == {"loss", "perplexity", "tokens", "rouge_l"}
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "step" in r] == list(range(1, 11))
    # the saved delta loads and is the one trained (r=2 on q and v of 2 layers)
    dm = dt.load(tiny_llama(), out / "adapter")
    layers, r = 2, 2  # q_proj: 32 -> 32, v_proj: 32 -> 16 (2 kv heads of 8)
    assert sum(t.numel() for t in dm.delta_state_dict().values()) == \
        layers * r * ((32 + 32) + (32 + 16))
    # the written run file reproduces the run: resuming it finds the run complete
    code = main(["train", "--config", str(out / "run.yaml"), "--resume"])
    assert code == 0
    assert "resumed_from" in yaml.safe_load((out / "run.yaml").read_text())["result"]


def test_train_errors_are_clear(model_dir, files, tmp_path, capsys):
    train, _, _ = files
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", oops}\n')
    assert main(["train", "--model", str(model_dir), "--data", str(bad), "--out",
                 str(tmp_path / "x")]) == 2
    assert f"{bad} line 2: not valid JSON" in capsys.readouterr().err
    assert main(["train", "--model", str(model_dir), "--data", str(train), "--out",
                 str(tmp_path / "x"), "--r", "0"]) == 2
    assert "r" in capsys.readouterr().err
    assert main(["train", "--model", str(model_dir), "--data", str(train), "--out",
                 str(tmp_path / "x"), "--schedule", "steps"]) == 2
    assert "schedule must be one of" in capsys.readouterr().err


def test_generate_and_eval_with_forgetting(model_dir, files, tmp_path, capsys):
    train, val, general = files
    out = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(train), "--out", str(out),
                 "--val-fraction", "0", "--r", "2", "--epochs", "1", "--batch-size", "4",
                 "--lr", "0.05", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(model_dir), "--delta", str(out / "adapter"),
                 "--prompt", "word cat", "--max-new-tokens", "4", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["prompt"] == "word cat" and isinstance(line["output"], str)

    assert main(["eval", "--model", str(model_dir), "--delta", str(out / "adapter"), "--data",
                 str(val), "--forgetting", str(general), "--generate-examples", "0",
                 "--base-too", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    f = report["forgetting"]
    assert f["change"] == pytest.approx(f["after"] - f["before"])
    # before = the base model's perplexity on the general text, computed here by hand
    from deltatune.tasks import LanguageModeling

    lm = LanguageModeling(char_tokenizer(chat=True))
    rows = [json.loads(x) for x in general.read_text().splitlines()]
    ex = lm.encode_rows(rows)
    base = tiny_llama()
    total = count = 0
    with torch.no_grad():
        for e in ex:
            ids = torch.tensor([e["input_ids"]])
            logp = torch.log_softmax(base(input_ids=ids).logits[0, :-1], -1)
            total -= float(logp.gather(1, ids[0, 1:, None]).sum())
            count += ids.shape[1] - 1
    assert f["before"] == pytest.approx(float(torch.exp(torch.tensor(total / count))), rel=1e-4)
    assert report["base"]["loss"] != report["with_delta"]["loss"]


def test_flags_set_and_run_file_merge(tmp_path):
    from deltatune.cli import build_parser
    from deltatune.cli.train import build_run
    from deltatune.train.runfile import write_run_file

    run_file = write_run_file(tmp_path / "run.yaml", {
        "model": "m", "method": {"method": "lora", "r": 4, "lora_alpha": 8},
        "data": {"train": "t.jsonl"}, "train": {"epochs": 3, "output_dir": "o"}})
    args = build_parser().parse_args([
        "train", "--config", str(run_file), "--set", "r=16", "--set", "target_modules=all-linear",
        "--lora-dropout", "0.1", "--epochs", "1", "--gradient-checkpointing"])
    run = build_run(args)
    assert run["method"] == {"method": "lora", "r": 16, "lora_alpha": 8, "lora_dropout": 0.1,
                             "target_modules": "all-linear"}
    assert run["train"] == {"epochs": 1, "output_dir": "o", "gradient_checkpointing": True}


def test_builtin_data_set_names_are_read_as_data():
    from deltatune import data

    val = data.read("wordnet-definitions-demo", split="validation")
    assert len(val) == 300 and {"prompt", "response"} <= set(val[0])
    assert val.where(4) == "wordnet-definitions-demo[validation] row 5"


@pytest.fixture
def two_deltas(tmp_path):
    """Two saved LoRA deltas ("a", "b") on the tiny Llama, with random non-zero weights."""
    dirs = {}
    for seed, name in enumerate(["a", "b"]):
        dm = dt.attach(tiny_llama(), dt.LoraConfig(r=4, lora_alpha=8,
                                                   target_modules="all-linear"), name=name)
        gen = torch.Generator().manual_seed(seed + 10)
        with torch.no_grad():
            for p in dm.get_delta(name).parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        dirs[name] = dm.save_delta(tmp_path / name)
    return dirs


def _generate(model_dir, capsys, *extra) -> list[dict]:
    assert main(["generate", "--model", str(model_dir), "--max-new-tokens", "5", "--json",
                 *extra]) == 0
    return [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]


def test_generate_mixes_deltas_per_row_as_each_alone(model_dir, two_deltas, tmp_path, capsys):
    prompts = ["word cat", "a longer prompt here"]  # different lengths: left padding
    flags = [x for p in prompts for x in ("--prompt", p)]
    alone = {None: _generate(model_dir, capsys, *flags)}
    for name, directory in two_deltas.items():
        alone[name] = _generate(model_dir, capsys, "--delta", str(directory), *flags)
    assert alone["a"] != alone["b"] and alone["a"] != alone[None]
    # every prompt through every delta and the base, in mixed batches of 4 rows
    lines = _generate(model_dir, capsys, "--delta", str(two_deltas["a"]), "--delta",
                      str(two_deltas["b"]), "--each", "--base-too", "--batch-size", "4",
                      *flags)
    assert [(x["prompt"], x["delta"]) for x in lines] == [
        (p, d) for p in prompts for d in ("base", "a", "b")]
    for x in lines:
        want = alone[None if x["delta"] == "base" else x["delta"]]
        assert x["output"] == want[prompts.index(x["prompt"])]["output"]
    # a 'delta' column routes each row (empty: the base model), names given on the CLI
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"prompt": p, "delta": d}) for p, d in
                              [(prompts[0], "y"), (prompts[1], ""), (prompts[1], "x")]))
    lines = _generate(model_dir, capsys, "--delta", f"x={two_deltas['a']}", "--delta",
                      f"y={two_deltas['b']}", "--file", str(rows))
    assert [x["delta"] for x in lines] == ["y", "base", "x"]
    assert [x["output"] for x in lines] == [alone["b"][0]["output"], alone[None][1]["output"],
                                            alone["a"][1]["output"]]


def test_generate_with_several_deltas_says_which_row_uses_which(model_dir, two_deltas,
                                                                tmp_path, capsys):
    both = ["--delta", str(two_deltas["a"]), "--delta", str(two_deltas["b"])]
    base = ["generate", "--model", str(model_dir), "--prompt", "word cat"]
    assert main([*base, *both]) == 2
    assert "2 deltas are loaded (a, b): say which one each prompt uses" in \
        capsys.readouterr().err
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "word cat", "delta": "c"}) + "\n")
    assert main([*base[:3], "--file", str(rows), *both]) == 2
    assert "row 1: delta 'c' is not loaded (loaded: a, b)" in capsys.readouterr().err
    assert main([*base, "--delta", str(two_deltas["a"]), "--base-too"]) == 2
    assert "--base-too goes with --each" in capsys.readouterr().err
    assert main([*base, "--delta", f"a={two_deltas['a']}", "--delta",
                 f"a={two_deltas['b']}", "--each"]) == 2
    assert "two deltas are named 'a'" in capsys.readouterr().err


def test_generate_fast_equals_the_models_generate(model_dir, two_deltas, capsys):
    # five prompts of different lengths in chunks of 2 (the last one filled up), through
    # both deltas and the base: the static-cache decoder gives generate()'s tokens
    prompts = ["word cat", "a longer prompt here", "x", "word dog dog", "emu"]
    flags = [x for p in prompts for x in ("--prompt", p)]
    both = ["--delta", str(two_deltas["a"]), "--delta", str(two_deltas["b"]), "--each",
            "--base-too", "--batch-size", "4"]
    plain = _generate(model_dir, capsys, *both, *flags)
    assert _generate(model_dir, capsys, *both, *flags, "--fast") == plain
    one = _generate(model_dir, capsys, "--delta", str(two_deltas["a"]), "--batch-size", "2",
                    *flags)
    assert _generate(model_dir, capsys, "--delta", str(two_deltas["a"]), "--batch-size", "2",
                     "--fast", *flags) == one


def test_generate_samples_reproducibly_and_top_k_1_is_greedy(model_dir, two_deltas, capsys):
    flags = ["--delta", str(two_deltas["a"]), "--prompt", "word cat", "--prompt", "a b c"]
    greedy = _generate(model_dir, capsys, *flags)
    for fast in ([], ["--fast"]):
        assert _generate(model_dir, capsys, *flags, *fast, "--top-k", "1") == greedy
        first = _generate(model_dir, capsys, *flags, *fast, "--sample", "--seed", "3")
        assert _generate(model_dir, capsys, *flags, *fast, "--sample", "--seed", "3") == first
        hot = [_generate(model_dir, capsys, *flags, *fast, "--temperature", "5", "--seed",
                         str(seed)) for seed in range(4)]
        assert any(h != hot[0] for h in hot)  # a hot distribution: the seed matters
    assert main(["generate", "--model", str(model_dir), *flags, "--top-p", "2"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err


def test_eval_fast_gives_the_same_rouge(model_dir, files, two_deltas, capsys):
    _, val, general = files
    reports = []
    for fast in ([], ["--fast-generate"]):
        assert main(["eval", "--model", str(model_dir), "--delta", str(two_deltas["a"]),
                     "--data", str(val), "--max-new-tokens", "5", "--json", *fast]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    assert reports[0]["with_delta"]["rouge_l"] == reports[1]["with_delta"]["rouge_l"]
    assert reports[0] == reports[1]
    assert main(["eval", "--model", str(model_dir), "--data", str(general), "--task",
                 "causal-lm", "--fast-generate"]) == 2
    assert "option(s) fast_generate do not apply to task 'causal-lm'" in \
        capsys.readouterr().err


def test_train_fast_generate_is_recorded_and_gives_the_same_evaluation(model_dir, files,
                                                                      tmp_path):
    train, val, _ = files
    results = []
    for fast in ([], ["--fast-generate"]):
        out = tmp_path / f"run{len(fast)}"
        assert main(["train", "--model", str(model_dir), "--data", str(train), "--eval-data",
                     str(val), "--out", str(out), "--r", "2", "--epochs", "1",
                     "--batch-size", "4", "--lr", "0.05", "--max-new-tokens", "4",
                     "--no-progress", *fast]) == 0
        run = yaml.safe_load((out / "run.yaml").read_text())
        assert run["task_options"].get("fast_generate") is (True if fast else None)
        results.append(run["result"]["final_eval"])
    assert results[0] == results[1] and "rouge_l" in results[0]
