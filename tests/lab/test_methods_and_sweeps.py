"""Method-name resolution, sweep specs at equal budget, the sweep runner and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from deltatune.cli import main
from deltatune.core.errors import ConfigError, UnknownMethodError
from deltatune.lab import compare, methods, sweeps
from deltatune.lab.methods import RunSpec, build_config, parse_methods
from deltatune.lab.tasks import Loaded
from tests.conftest import tiny_bert, tiny_llama
from tests.lab.conftest import SIZE


def test_parse_methods_and_unavailable_lab_methods(monkeypatch):
    assert [s.method for s in parse_methods("lora, icl")] == ["lora", "icl"]
    monkeypatch.setattr(methods, "registered", lambda: ["lora"])
    with pytest.raises(UnknownMethodError) as err:
        parse_methods("lora,houlsby,nope")
    text = str(err.value)
    assert "'houlsby' is part of the lab's comparison but is not available" in text
    assert "unknown method 'nope'" in text
    with pytest.raises(Exception, match="listed twice"):
        parse_methods("lora,lora")


def test_head_goes_to_modules_to_save_and_overrides_apply():
    cfg = build_config(RunSpec("x", "lora", {"r": 3}), ("classifier",))
    assert cfg.r == 3 and cfg.modules_to_save == ["classifier"]
    assert RunSpec("x", "lora").learning_rate() == methods.DEFAULT_LR["lora"]
    assert RunSpec("x", "lora", lr=0.5).learning_rate() == 0.5


def test_lora_target_variants_have_equal_budget():
    model = tiny_bert()
    specs = sweeps._lora_targets(Loaded(model, None, torch.device("cpu")), SIZE)
    budget = sweeps.lora_parameters(model, ["attention.self.query", "attention.self.value"], 8)
    assert budget == 2 * 2 * 8 * (32 + 32)  # by hand: 2 layers x 2 matrices
    for s in specs:
        got = sweeps.lora_parameters(model, s.overrides["target_modules"], s.overrides["r"])
        assert got == budget, s.label  # square 32x32 matrices: every set divides exactly


def test_lora_targets_budget_with_gqa_shapes():
    model = tiny_llama()  # q: 32->32, v: 32->16 (2 of 4 heads)
    assert sweeps.lora_parameters(model, ["self_attn.v_proj"], 1) == 2 * (32 + 16)
    r = sweeps.rank_for_budget(model, ["self_attn.v_proj"], 2 * 8 * (64 + 48))
    assert r == round(2 * 8 * 112 / 96)


def test_sweep_needing_missing_methods_is_refused(monkeypatch):
    monkeypatch.setattr(sweeps, "registered", lambda: ["lora"])
    with pytest.raises(UnknownMethodError, match="needs method"):
        sweeps.run_sweep("krona-init", task="tiny-cls", echo=None)


def test_run_sweep_writes_sweep_plot(tmp_path):
    res = sweeps.run_sweep("lora-rank", task="tiny-cls", out=tmp_path, only=["lora-r1",
                           "lora-r4"], progress=False, echo=None)
    assert sorted(res.runs) == ["lora-r1/seed0", "lora-r4/seed0"]
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "sweep.json").is_file()


def test_sweep_learning_rate_by_method_and_by_label(tmp_path):
    res = sweeps.run_sweep("lora-rank", task="tiny-cls", out=tmp_path, only=["lora-r1",
                           "lora-r4"], lr={"lora": 5e-3, "lora-r4": 2e-3}, progress=False,
                           echo=None)
    assert res.runs["lora-r1/seed0"]["spec"]["lr"] == 5e-3  # by method
    assert res.runs["lora-r4/seed0"]["spec"]["lr"] == 2e-3  # the label wins


def test_cli_compare_and_sweep_list(tmp_path, capsys):
    assert main(["compare", "--task", "tiny-cls", "--methods", "lora", "--out",
                 str(tmp_path), "--no-plots", "--lr", "lora=1e-2"]) == 0
    out = capsys.readouterr().out
    assert "lora" in out and "results.json" in out
    assert main(["sweep", "--list"]) == 0
    assert "lora-targets" in capsys.readouterr().out
    assert main(["compare", "--task", "tiny-cls", "--methods", "nope", "--out",
                 str(tmp_path)]) == 2


def test_sweep_variants_use_the_landed_config_fields():
    """Every variant of every sweep builds a valid config of its method (or is ICL)."""
    loaded = Loaded(tiny_bert(num_labels=2), None, torch.device("cpu"))
    have = set(methods.registered())
    for sweep in sweeps.SWEEPS.values():
        for spec in sweep.variants(loaded, SIZE):
            if spec.method == methods.ICL or methods.resolve(spec.method) not in have:
                continue
            cfg = build_config(spec, ("classifier",))
            for key, value in spec.overrides.items():
                assert getattr(cfg, key) == value, (sweep.name, spec.label, key)


def test_adalora_sweep_records_ranks_and_heatmap(tmp_path):
    res = sweeps.run_sweep("adalora-ranks", task="tiny-cls", out=tmp_path, progress=False,
                           echo=None)
    rec = res.runs["adalora/seed0"]
    assert rec["status"] == "done", rec.get("error")
    ranks = rec["adalora_final_ranks"]
    # 2 layers x 6 matrices, each keeping at most init_r = 12
    assert len(ranks) == 12 and all(0 <= r <= 12 for r in ranks.values())
    assert (tmp_path / "adalora_ranks.png").read_bytes()[:4] == b"\x89PNG"


def test_definition_rouge_takes_the_best_sense():
    from deltatune.lab.tasks import DefinitionTask

    rows = [{"response": "a musician who plays the trumpet",
             "references": ["a musician who plays the trumpet", "a large bird"]},
            {"response": "a victory"}]
    # row 1: exact match of one sense = 1; row 2: "a big victory" vs "a victory":
    # LCS 2, precision 2/3, recall 1 -> F1 0.8
    assert DefinitionTask.rouge_l(["a large bird", "a big victory"], rows) == \
        pytest.approx((1.0 + 0.8) / 2)


def test_numeric_sweeps_plot_every_numeric_variant_on_the_x_axis():
    """x values come from a field the variants really set (prefix length, LoRA rank)."""
    loaded = Loaded(tiny_bert(num_labels=2), None, torch.device("cpu"))
    prefix = sweeps.SWEEPS["prefix-length"]
    xs = prefix.x_values(prefix.variants(loaded, SIZE))
    # embedding-only and infix are reference lines, not points of the length curve
    assert xs == {"prefix-1": 1.0, "prefix-5": 5.0, "prefix-10": 10.0, "prefix-20": 20.0,
                  "prefix-50": 50.0}
    rank = sweeps.SWEEPS["lora-rank"]
    assert rank.x_values(rank.variants(loaded, SIZE))["lora-r64"] == 64.0


def test_steps_replace_the_budget_and_rerun_changed_runs(tmp_path, capsys):
    """--steps trains that many optimizer steps, in compare and in sweeps."""
    res = sweeps.run_sweep("adalora-ranks", task="tiny-cls", out=tmp_path, steps=8,
                           progress=False, echo=None)
    rec = res.runs["adalora/seed0"]
    assert rec["status"] == "done", rec.get("error")
    # 8 steps x 4 rows x 10 tokens (SIZE has 4 steps; the tiny pool holds 8 batches)
    assert rec["train_steps"] == 8 and rec["train_tokens"] == 8 * 4 * 10
    assert "8 steps" in res.table.splitlines()[0]
    # the CLI flag reaches compare(); a changed budget is a new run, the same one is reused
    assert main(["compare", "--task", "tiny-cls", "--methods", "lora", "--out",
                 str(tmp_path / "c"), "--no-plots", "--steps", "6"]) == 0
    saved = json.loads((tmp_path / "c" / "results.json").read_text())["runs"]
    assert saved["lora/seed0"]["train_steps"] == 6
    again = compare("tiny-cls", "lora", out=tmp_path / "c", steps=6, progress=False,
                    echo=None, plots_too=False)
    assert again.skipped == ["lora/seed0"]
    other = compare("tiny-cls", "lora", out=tmp_path / "c", steps=3, progress=False,
                    echo=None, plots_too=False)
    assert other.skipped == [] and other.runs["lora/seed0"]["train_steps"] == 3
    with pytest.raises(ConfigError, match="positive integer"):
        compare("tiny-cls", "lora", out=tmp_path / "d", steps=0, progress=False, echo=None)
