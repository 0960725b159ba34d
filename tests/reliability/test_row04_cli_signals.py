"""RELIABILITY.md row 4 through the real command line: ``deltatune train`` in a subprocess.

The signal comes from outside (this test process), as it does from Ctrl-C or a job
scheduler, at whatever point the run has reached once a checkpoint exists:

- one SIGINT or SIGTERM: exit code 130/143, every checkpoint complete, and stderr holds
  a resume command; running that printed command finishes the run with a delta file
  byte-identical to an uninterrupted run's (CPU);
- a second signal: the process stops at once, nothing half-written is taken for a
  checkpoint, and the printed command again resumes to the identical delta.

(``test_row02_05_trainer.py`` signals the library's trainer at exact points: forward,
backward, optimizer step and save.)
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from deltatune.train import list_checkpoints
from deltatune.train.checkpoint import check_checkpoint, find_resumable
from tests.conftest import tiny_llama
from tests.reliability._train_setup import ROWS
from tests.tiny_tokenizer import char_tokenizer

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX signals")

ROOT = Path(__file__).resolve().parents[2]
# 9 rows, batch 2, grad_accum 2 -> 3 optimizer steps per epoch; 4 epochs -> 12 steps,
# a checkpoint after each, so a signal sent once step 2 or 5 is saved lands mid-run.
FLAGS = ["--r", "2", "--lora-alpha", "4", "--lora-dropout", "0.1", "--target-modules",
         "q_proj,v_proj", "--epochs", "4", "--batch-size", "2", "--grad-accum", "2",
         "--lr", "0.005", "--schedule", "cosine", "--warmup-steps", "1", "--seed", "3",
         "--save-every", "1", "--keep-checkpoints", "50", "--val-fraction", "0",
         "--max-length", "40", "--no-progress"]
DELTA = Path("adapter") / "delta.safetensors"


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false")


def _deltatune(*args: str) -> list[str]:
    return [sys.executable, "-m", "deltatune", *args]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama directory, the training file, and an uninterrupted reference run."""
    root = tmp_path_factory.mktemp("row4-cli")
    model = root / "model"
    tiny_llama().save_pretrained(model)
    char_tokenizer().save_pretrained(model)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    ref = root / "reference"
    proc = subprocess.run(_deltatune("train", "--model", str(model), "--data", str(data),
                                     "--out", str(ref), *FLAGS),
                          capture_output=True, text=True, env=_env(), timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"model": model, "data": data, "reference": ref}


def _start(inputs: dict[str, Path], out: Path) -> tuple[subprocess.Popen, queue.Queue]:
    """Start ``deltatune train`` into ``out``; return it and a queue of its stderr lines."""
    proc = subprocess.Popen(_deltatune("train", "--model", str(inputs["model"]), "--data",
                                       str(inputs["data"]), "--out", str(out), *FLAGS),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    lines: queue.Queue = queue.Queue()

    def pump() -> None:  # read stderr as it comes (a full pipe would block the child)
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before {what}"
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.005)


def _finish(proc: subprocess.Popen, lines: queue.Queue) -> tuple[int, str]:
    code = proc.wait(timeout=300)
    proc.stdout.read()
    text = []
    while (line := lines.get(timeout=60)) is not None:
        text.append(line)
    return code, "".join(text)


def _resume_with_printed_command(stderr: str, out: Path) -> subprocess.CompletedProcess:
    """Run exactly the command the interrupted run printed (as ``python -m deltatune``)."""
    printed = [ln for ln in stderr.splitlines() if ln.startswith("resume with: ")]
    assert len(printed) == 1, stderr[-3000:]
    argv = shlex.split(printed[0].removeprefix("resume with: "))
    assert argv[:2] == ["deltatune", "train"] and argv[-1] == "--resume"
    assert argv[argv.index("--config") + 1] == str(out / "run.yaml")
    return subprocess.run(_deltatune(*argv[1:]), capture_output=True, text=True, env=_env(),
                          timeout=300, check=False)


def _all_checkpoints_complete(out: Path) -> list[Path]:
    paths = list_checkpoints(out)
    for p in paths:
        check_checkpoint(p)  # manifest present, every file's size and sha256 match
    return paths


@pytest.mark.parametrize(("sig", "after"), [("SIGINT", 2), ("SIGTERM", 5)])
def test_row4_cli_signal_checkpoints_and_the_printed_command_resumes_bit_exact(
        inputs, tmp_path, sig, after):
    out = tmp_path / "run"
    proc, lines = _start(inputs, out)
    saved = out / "checkpoints" / f"step-{after:08d}"
    _wait_for(saved.exists, proc, saved.name)
    proc.send_signal(getattr(signal, sig))
    code, stderr = _finish(proc, lines)

    assert code == 128 + getattr(signal, sig), stderr[-3000:]
    assert f"{sig} received: finishing this micro-batch" in stderr
    named = Path(stderr.split("interrupted; checkpoint: ")[1].splitlines()[0])
    paths = _all_checkpoints_complete(out)
    assert named == paths[-1] == find_resumable(out)[0]
    assert len(paths) >= after and not (out / DELTA).exists()  # the run did not finish

    resumed = _resume_with_printed_command(stderr, out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / DELTA).read_bytes() == (inputs["reference"] / DELTA).read_bytes()
    # loss, lr, grad norm and item count of every step, as logged
    assert (out / "log.jsonl").read_text() == (inputs["reference"] / "log.jsonl").read_text()


def test_row4_cli_second_signal_stops_at_once_and_the_last_checkpoint_resumes(inputs,
                                                                              tmp_path):
    out = tmp_path / "run"
    proc, lines = _start(inputs, out)
    _wait_for((out / "checkpoints" / "step-00000003").exists, proc, "step-00000003")
    proc.send_signal(signal.SIGTERM)
    seen: list[str] = []

    def first_handled() -> bool:
        while not lines.empty():
            seen.append(lines.get())
        return any("SIGTERM received" in (ln or "") for ln in seen)

    _wait_for(first_handled, proc, "the first SIGTERM to be handled", timeout=60)
    proc.send_signal(signal.SIGTERM)  # the second one, while the first is being honoured
    code, rest = _finish(proc, lines)
    stderr = "".join(ln for ln in seen if ln) + rest

    if "second SIGTERM: stopped at once, nothing more written" in stderr:
        # The usual case: the trainer was still finishing the step or writing the checkpoint.
        assert code == 143, stderr[-3000:]
        last = Path(stderr.split("last complete checkpoint: ")[-1].splitlines()[0])
    else:
        # The first checkpoint was already written and the trainer had returned: the
        # restored default action ends the process at once, killed by SIGTERM.
        assert code in (143, -signal.SIGTERM), stderr[-3000:]
        last = find_resumable(out)[0]
    paths = _all_checkpoints_complete(out)
    assert last == paths[-1] == find_resumable(out)[0]
    assert not (out / DELTA).exists()

    if "second SIGTERM" in stderr:
        resumed = _resume_with_printed_command(stderr, out)
    else:
        resumed = subprocess.run(_deltatune("train", "--config", str(out / "run.yaml"),
                                            "--resume"), capture_output=True, text=True,
                                 env=_env(), timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / DELTA).read_bytes() == (inputs["reference"] / DELTA).read_bytes()
