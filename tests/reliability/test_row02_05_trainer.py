"""RELIABILITY.md rows 2, 3, 4 and 5: the trainer's resume, signal and non-finite promises.

Row 2 (resume selection): the newest checkpoint torn three ways (truncated weights,
missing optimizer state, a manifest hash that no longer matches) -> ``resume="auto"``
resumes the newest complete one and says which it skipped and why; checkpoints that
exist but are all torn are an error unless ``allow_partial_resume``.
Row 3 (exact resume, CPU): interrupted mid gradient-accumulation and at an epoch
boundary with shuffled data and dropout, the resumed run ends with bit-identical delta
tensors, optimizer moments, loss/LR/grad-norm history and torch RNG state. (The
trainer has no DataLoader workers: the data order is a pure function of seed and
epoch, so ``num_workers`` does not apply.)
Row 4 (signals, in subprocesses): SIGINT/SIGTERM during the forward pass, the backward
pass, the optimizer step and a checkpoint save -> a complete checkpoint and exit code
130/143; a second signal stops at once and the last good checkpoint stays complete.
Row 5 (non-finite): NaN loss, NaN/inf gradient, NaN parameter and an fp16 overflow halt
within the step, naming the step and what was not finite; no checkpoint holding NaN is
written; the last good checkpoint stays resumable.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltatune.core import io
from deltatune.core.errors import NonFiniteError
from deltatune.train import Trainer, TrainerCallback, list_checkpoints
from deltatune.train.checkpoint import ResumeError, check_checkpoint, find_resumable
from tests.reliability._train_setup import ROWS, setup

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_signal_worker.py")


class StopAt(TrainerCallback):
    def __init__(self, step: int, micro: int) -> None:
        self.at = (step, micro)

    def on_micro_step(self, trainer) -> None:
        if (trainer.step, trainer.micro) == self.at:
            trainer.request_stop()


def _state(trainer) -> dict:
    opt = trainer.optimizer.state_dict()["state"]
    return {"delta": {k: v.clone() for k, v in trainer.model.delta_state_dict().items()}
            if hasattr(trainer.model, "delta_state_dict") else None,
            "moments": {(i, k): v.clone() for i, s in opt.items() for k, v in s.items()
                        if torch.is_tensor(v)},
            "rng": torch.get_rng_state().clone()}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    dm, task, cfg = setup(out)
    trainer = Trainer(dm, task, ROWS, None, cfg)
    result = trainer.fit()
    return result, _state(trainer)


# -- row 3 -------------------------------------------------------------------------------------
# 9 rows, batch 2 -> 5 micro-batches per epoch -> 3 windows per epoch (the last has 1).
# StopAt(step, micro) stops after that many micro-batches of optimizer step `step` + 1.
@pytest.mark.parametrize("stop", [(1, 1), (2, 1)], ids=["mid-accumulation", "epoch-boundary"])
def test_row3_resume_is_bitwise_identical(tmp_path, straight, stop):
    ref, ref_state = straight
    dm, task, cfg = setup(tmp_path, save_every=None)
    first = Trainer(dm, task, ROWS, None, cfg, callbacks=[StopAt(*stop)]).fit()
    assert first.stop_reason == "stopped" and first.steps < ref.steps
    torch.manual_seed(999)  # the resumed process's RNG starts elsewhere
    dm2, task2, cfg2 = setup(tmp_path, seed=1, save_every=None)
    trainer = Trainer(dm2, task2, ROWS, None, cfg2)
    resumed = trainer.fit(resume="auto")
    assert resumed.resumed_from == first.checkpoint
    got = _state(trainer)
    for key, value in ref_state["delta"].items():
        assert torch.equal(got["delta"][key], value), key
    assert got["moments"].keys() == ref_state["moments"].keys()
    assert all(torch.equal(got["moments"][k], v) for k, v in ref_state["moments"].items())
    assert resumed.history == ref.history  # loss, lr (the schedule is restored), grad norm
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in ref.history]
    assert torch.equal(got["rng"], ref_state["rng"])


# -- row 2 -------------------------------------------------------------------------------------
def _tear(path: Path, how: str) -> str:
    if how == "truncated-weights":
        f = path / "trainable.safetensors"
        f.write_bytes(f.read_bytes()[:-9])
        return "trainable.safetensors"
    if how == "missing-optimizer":
        (path / "optimizer.safetensors").unlink()
        return "optimizer.safetensors"
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["trainer_state.json"]["sha256"] = "0" * 64
    (path / "manifest.json").write_text(json.dumps(manifest))
    return "trainer_state.json"


@pytest.mark.parametrize("how", ["truncated-weights", "missing-optimizer", "bad-manifest-hash"])
def test_row2_auto_resume_skips_a_torn_newest_checkpoint_and_says_why(tmp_path, how):
    dm, task, cfg = setup(tmp_path, epochs=1)
    Trainer(dm, task, ROWS, None, cfg, callbacks=[StopAt(1, 2)]).fit()
    paths = list_checkpoints(tmp_path)
    assert [p.name for p in paths] == ["step-00000001", "step-00000002"]
    culprit = _tear(paths[-1], how)
    dm2, task2, cfg2 = setup(tmp_path, epochs=1)
    result = Trainer(dm2, task2, ROWS, None, cfg2).fit(resume="auto")
    assert result.resumed_from == paths[0]
    assert any(n.startswith("skipped step-00000002") and culprit in n for n in result.notes), \
        result.notes
    assert result.stop_reason == "completed"


def test_row2_all_checkpoints_torn_is_an_error_unless_partial_is_allowed(tmp_path):
    dm, task, cfg = setup(tmp_path, epochs=1)
    Trainer(dm, task, ROWS, None, cfg, callbacks=[StopAt(0, 2)]).fit()
    for p in list_checkpoints(tmp_path):
        _tear(p, "truncated-weights")
    dm2, task2, cfg2 = setup(tmp_path, epochs=1)
    with pytest.raises(ResumeError, match=r"no complete checkpoint to resume.*skipped "
                       r"step-00000001.*allow_partial_resume=True"):
        Trainer(dm2, task2, ROWS, None, cfg2).fit(resume="auto")
    dm3, task3, cfg3 = setup(tmp_path, epochs=1, allow_partial_resume=True)
    result = Trainer(dm3, task3, ROWS, None, cfg3).fit(resume="auto")
    assert result.resumed_from is None and result.stop_reason == "completed"


# -- row 4 -------------------------------------------------------------------------------------
def _worker(out: Path, where: str, sig: str, count: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run([sys.executable, str(WORKER), str(out), where, sig, str(count)],
                          capture_output=True, text=True, env=env, timeout=400, check=False)


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name != "posix", reason="POSIX only")
@pytest.mark.parametrize(("where", "sig"), [("forward", "SIGINT"), ("backward", "SIGTERM"),
                                            ("optimizer", "SIGINT"), ("save", "SIGTERM")])
def test_row4_a_signal_writes_a_complete_checkpoint_and_exits_128_plus_n(tmp_path, where, sig):
    proc = _worker(tmp_path, where, sig, 1)
    code = 128 + getattr(signal, sig)
    assert proc.returncode == code, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    checkpoint = Path(report["checkpoint"])
    check_checkpoint(checkpoint)  # complete: manifest and every part
    assert find_resumable(tmp_path)[0] == checkpoint
    # Every checkpoint left behind is complete (none torn by the signal).
    for p in list_checkpoints(tmp_path):
        check_checkpoint(p)


@pytest.mark.skipif(os.name != "posix", reason="POSIX only")
def test_row4_a_second_signal_stops_at_once_and_the_last_good_checkpoint_stays(tmp_path):
    proc = _worker(tmp_path, "forward", "SIGINT", 2)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "second SIGINT: stopping now; nothing written; last complete checkpoint: " \
        in proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["immediate"] is True and report["step"] == 2  # stopped inside step 3
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names[-1] == "step-00000002"  # nothing newer was started
    assert Path(report["checkpoint"]).name == "step-00000002"
    for p in list_checkpoints(tmp_path):
        check_checkpoint(p)
    dm, task, cfg = setup(tmp_path)
    result = Trainer(dm, task, ROWS, None, cfg).fit(resume="auto")
    assert result.resumed_from.name == "step-00000002" and result.stop_reason == "completed"


# -- row 5 -------------------------------------------------------------------------------------
class Inject(TrainerCallback):
    """Put a non-finite value into the run at optimizer step 3 (after two good steps)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.name = None

    def on_micro_step(self, trainer) -> None:
        if trainer.step != 2 or trainer.micro != 1:
            return
        name, p = next((n, p) for n, p in trainer._trainable() if "lora_B" in n)
        self.name = name
        with torch.no_grad():
            if self.what == "param":
                p.view(-1)[0] = float("nan")
            elif self.what == "grad":
                p.grad.view(-1)[0] = float("inf")


def _overflow_hook(trainer_box: dict, what: str):
    def hook(_module, _inputs, output):
        trainer = trainer_box["t"]
        if trainer.step != 2:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        # "fp16-overflow": a value past 65504 becomes inf when cast to half.
        bad = hidden * float("nan") if what == "loss" else (hidden * 1e6).half().float()
        return (bad, *output[1:]) if isinstance(output, tuple) else bad
    return hook


@pytest.mark.parametrize("what", ["loss", "grad", "param", "fp16-overflow"])
def test_row5_nonfinite_halts_naming_step_and_cause_and_writes_no_bad_checkpoint(tmp_path,
                                                                                 what):
    dm, task, cfg = setup(tmp_path, epochs=1)
    box: dict = {}
    callbacks = []
    if what in ("grad", "param"):
        callbacks.append(Inject(what))
    else:
        dm.model.model.layers[1].register_forward_hook(_overflow_hook(box, what))
    trainer = Trainer(dm, task, ROWS, None, cfg, callbacks=callbacks)
    box["t"] = trainer
    with pytest.raises(NonFiniteError) as err:
        trainer.fit()
    msg = str(err.value)
    assert "optimizer step 3" in msg, msg
    phrase = {"loss": "the loss is nan", "fp16-overflow": "the loss is",
              "grad": "the gradient of", "param": "first non-finite parameter"}[what]
    assert phrase in msg, msg
    if callbacks:
        assert callbacks[0].name in msg
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step-00000001", "step-00000002"]
    for p in list_checkpoints(tmp_path):
        check_checkpoint(p)
        tensors, _ = io.load_tensors(p / "trainable.safetensors")
        assert all(torch.isfinite(t).all() for t in tensors.values())
    assert find_resumable(tmp_path)[0].name == "step-00000002"
