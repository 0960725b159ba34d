"""compare(): the table and files agree with the records, runs resume, failures are kept."""

from __future__ import annotations

import csv
import json
import statistics

import pytest
import torch

from deltatune.core.errors import UnknownMethodError
from deltatune.lab import compare, runner
from deltatune.lab.methods import RunSpec
from deltatune.lab.results import format_table, table_rows


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    from deltatune.lab import tasks as lab_tasks
    from tests.lab.conftest import TinyClassification

    lab_tasks.register_task("tiny-cls", TinyClassification)
    out = tmp_path_factory.mktemp("cmp")
    specs = [RunSpec("lora", "lora"), RunSpec("lora-r2", "lora", {"r": 2})]
    return compare("tiny-cls", specs, seeds=[0, 1], out=out, progress=False, echo=None)


def test_records_and_parameter_counts(done):
    assert set(done.runs) == {"lora/seed0", "lora/seed1", "lora-r2/seed0", "lora-r2/seed1"}
    head = 32 * 2 + 2
    for key, rec in done.runs.items():
        r = 2 if key.startswith("lora-r2") else 8
        assert rec["status"] == "done", rec.get("error")
        assert rec["trainable_parameters"] == 2 * 2 * r * 64 + head
        assert rec["train_steps"] == 4 and rec["train_tokens"] == 4 * 4 * 10
        assert rec["latency_merged_ms"] is not None


def test_checkpoint_size_equals_the_saved_files(done):
    from pathlib import Path

    for rec in done.runs.values():
        files = [p for p in Path(rec["checkpoint_dir"]).rglob("*") if p.is_file()]
        assert rec["checkpoint_bytes"] == sum(p.stat().st_size for p in files) > 0


def test_summary_is_mean_and_std_over_seeds(done):
    row = next(r for r in done.summary if r["label"] == "lora")
    accs = [done.runs[f"lora/seed{s}"]["metrics"]["accuracy"] for s in (0, 1)]
    assert row["seeds"] == [0, 1]
    assert row["metric_mean"] == pytest.approx(statistics.fmean(accs))
    assert row["metric_std"] == pytest.approx(statistics.stdev(accs))
    lat = [done.runs[f"lora/seed{s}"]["latency_unmerged_ms"] for s in (0, 1)]
    assert row["latency_unmerged_ms"] == pytest.approx(statistics.fmean(lat))


def test_table_and_csv_show_the_recorded_numbers(done):
    rows = {r[0]: r for r in table_rows(done.summary)}
    row = next(r for r in done.summary if r["label"] == "lora-r2")
    assert rows["lora-r2"][1] == str(2 * 2 * 2 * 64 + 66)  # 578, below 1k: printed whole
    assert rows["lora-r2"][3].startswith(f"{row['metric_mean']:.4f} ± ")
    assert "lora-r2" in done.table and done.table == format_table(
        done.summary, done.table.splitlines()[0])
    with open(done.directory / "summary.csv") as f:
        by_label = {r["label"]: r for r in csv.DictReader(f)}
    assert float(by_label["lora-r2"]["metric_mean"]) == row["metric_mean"]
    assert float(by_label["lora-r2"]["checkpoint_bytes"]) == row["checkpoint_bytes"]
    with open(done.directory / "runs.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    saved = json.loads((done.directory / "results.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(done.runs))


def test_plots_are_png_files(done):
    for name in ("metric_vs_params.png", "memory.png", "speed.png"):
        data = (done.directory / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_resume_skips_finished_runs_and_reruns_changed_ones(done, monkeypatch):
    calls = []
    real = runner.run_once

    def counting(task, spec, seed, *a, **kw):
        calls.append((spec.label, seed))
        return real(task, spec, seed, *a, **kw)

    monkeypatch.setattr(runner, "run_once", counting)
    specs = [RunSpec("lora", "lora"), RunSpec("lora-r2", "lora", {"r": 2}, lr=2e-3)]
    again = compare("tiny-cls", specs, seeds=[0, 1], out=done.directory, progress=False,
                    echo=None, plots_too=False)
    # lora is unchanged: both seeds reused; lora-r2 changed its lr: trained again
    assert sorted(again.skipped) == ["lora/seed0", "lora/seed1"]
    assert calls == [("lora-r2", 0), ("lora-r2", 1)]
    assert again.runs["lora/seed0"] == done.runs["lora/seed0"]


def test_failed_run_is_recorded_and_others_continue(tmp_path):
    res = compare("tiny-cls", [RunSpec("icl", "icl"), RunSpec("lora", "lora")], seeds=[0],
                  out=tmp_path, progress=False, echo=None, plots_too=False)
    assert res.runs["icl/seed0"]["status"] == "failed"
    assert "in-context" in res.runs["icl/seed0"]["error"]
    assert res.runs["lora/seed0"]["status"] == "done"
    assert "icl failed" in res.table
    # a failed run is tried again on the next call
    again = compare("tiny-cls", [RunSpec("icl", "icl")], seeds=[0], out=tmp_path,
                    progress=False, echo=None, plots_too=False)
    assert again.skipped == []


def test_unknown_methods_are_refused_before_any_training(tmp_path):
    with pytest.raises(UnknownMethodError, match="Did you mean 'lora'"):
        compare("tiny-cls", "lora,lorra", out=tmp_path, progress=False, echo=None)
    assert not (tmp_path / "results.json").exists()


def test_causal_lm_task_runs(tmp_path):
    res = compare("tiny-lm", "lora", seeds=[3], out=tmp_path, progress=False, echo=None,
                  plots_too=False)
    rec = res.runs["lora/seed3"]
    assert rec["status"] == "done" and rec["metrics"]["neg_loss"] < 0
    assert rec["train_tokens"] == 4 * 4 * 8


def test_icl_row_trains_nothing_and_times_the_long_prompt(tmp_path):
    res = compare("tiny-lm", [RunSpec("icl-3", "icl", shots=3)], seeds=[0], out=tmp_path,
                  progress=False, echo=None, plots_too=False)
    rec = res.runs["icl-3/seed0"]
    assert rec["status"] == "done", rec.get("error")
    assert rec["trainable_parameters"] == 0 and rec["checkpoint_bytes"] == 0
    assert rec["prompt_tokens"] == 2 * 8 * 4  # 2 rows x (3 demonstrations + query) x 8
    assert rec["latency_unmerged_ms"] > 0 and rec["metrics"]["neg_loss"] == -1.0


def test_another_model_is_a_new_run_and_is_named(tmp_path, monkeypatch):
    from deltatune.lab import tasks as lab_tasks
    from deltatune.lab.runner import run_identity
    from tests.lab.conftest import TinyClassification

    task = lab_tasks.get_task("tiny-cls")
    size = task.size("default")
    spec = RunSpec("lora", "lora")
    own = run_identity(task, size, spec, 0, torch.device("cpu"))
    assert "model" not in own  # the default model: fingerprints of older results hold
    other = lab_tasks.get_task("tiny-cls", model="tiny-bert-wide")
    assert other.model_name == "tiny-bert-wide" and task.model_name == "tiny-bert"
    assert run_identity(other, size, spec, 0, torch.device("cpu")) == {
        **own, "model": "tiny-bert-wide"}
    # through compare: the swapped model is the one loaded and the one reported
    loaded_names = []
    real_load = TinyClassification.load

    def load(self, device):
        loaded_names.append(self.model_name)
        return real_load(self, device)

    monkeypatch.setattr(TinyClassification, "load", load)
    res = compare("tiny-cls", "lora", out=tmp_path, model="tiny-bert-wide", progress=False,
                  plots_too=False, echo=None)
    assert set(loaded_names) == {"tiny-bert-wide"}
    assert "tiny-bert-wide" in res.table
    again = compare("tiny-cls", "lora", out=tmp_path, progress=False, plots_too=False,
                    echo=None)
    assert again.skipped == []  # the default model's run is another run (and replaces it)
    assert compare("tiny-cls", "lora", out=tmp_path, progress=False, plots_too=False,
                   echo=None).skipped == ["lora/seed0"]
