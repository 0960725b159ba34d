"""RELIABILITY.md row 23 (cross-version regression).

Every released version's artifacts under ``artifacts/<version>/`` (written once by
``make_artifacts.py``; safetensors + JSON, no pickles) are loaded with today's code on
every CI run, not behind a flag:

- deltas on the in-code Toy model and deltas of every registered method on a stored tiny
  Llama reproduce the stored outputs;
- adapters written by Hugging Face PEFT itself (every PEFT type deltatune imports) load
  through ``load_peft`` and reproduce the logits PEFT computed;
- a trainer checkpoint taken mid gradient-accumulation resumes, and the run ends with the
  delta tensors and loss/LR history of the uninterrupted run stored beside it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.core import io
from deltatune.core.registry import known_methods
from tests.reliability._methods import DERIVED
from tests.reliability._toy import toy
from tests.reliability.make_artifacts import _peft_cases, load_base, train_setup

ROOT = Path(__file__).with_name("artifacts")
CASES = sorted(p for p in ROOT.glob("*/*") if (p / "delta").is_dir() or
               (p / "case.json").is_file())
# Float32 on CPU: only the summation order of another CPU's kernels may differ.
RTOL, ATOL = 1e-5, 1e-5


def _kind(case: Path) -> str:
    return json.loads((case / "case.json").read_text())["kind"] if (
        case / "case.json").is_file() else "toy"


def _cases(*kinds: str) -> list[Path]:
    return [c for c in CASES if _kind(c) in kinds]


def _ids(case: Path) -> str:
    return f"{case.parent.name}/{case.name}"


def test_the_artifact_set_exists_for_this_version_and_covers_every_method():
    from deltatune.core.config import LIBRARY_VERSION
    from deltatune.interop.peft_format import MAPPINGS, _ensure_loaded

    _ensure_loaded()  # the PEFT mappings register on first use
    here = ROOT / LIBRARY_VERSION
    assert here.is_dir(), "run make_artifacts.py for this release"
    assert not any(ROOT.rglob("*.bin")) and not any(ROOT.rglob("*.pt")) and \
        not any(ROOT.rglob("*.pkl"))
    # A method or PEFT type added in this release gets its case before the release.
    assert {p.name.removeprefix("method-") for p in here.glob("method-*")} == \
        set(known_methods()) - DERIVED, "run make_artifacts.py to add the new method's case"
    peft_types = {p.name.removeprefix("peft-").upper() for p in here.glob("peft-*")}
    assert peft_types == set(MAPPINGS) == {t.upper() for t in _peft_cases()}
    assert (here / "trainer-checkpoint" / "case.json").is_file()


def test_every_case_directory_is_intact():
    # Each case was written atomically with a manifest: a damaged or half-edited case
    # (someone "updating" a released artifact) is caught here, not as an odd mismatch.
    for case in CASES:
        if (case / "manifest.json").is_file():
            io.verify_manifest(case)


@pytest.mark.parametrize("case", _cases("toy"), ids=_ids)
def test_toy_deltas_of_every_release_reproduce_outputs(case):
    expected, _ = io.load_tensors(case / "expected" / "expected.safetensors")
    dm = dt.load(toy(), case / "delta")
    with torch.no_grad():
        out = dm(expected["input_ids"])
    torch.testing.assert_close(out, expected["output"], rtol=RTOL, atol=1e-6)


def _inputs(expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in expected.items() if k != "output"}


@pytest.mark.parametrize("case", _cases("delta"), ids=_ids)
def test_method_deltas_of_every_release_reproduce_logits(case):
    meta = json.loads((case / "case.json").read_text())
    expected, _ = io.load_tensors(case / "expected" / "expected.safetensors")
    dm = dt.load(load_base(case.parent, meta["base"]), case / "delta")
    assert dm.get_delta(dm.delta_names[0]).config.method == meta["method"]
    with torch.no_grad():
        out = dm(**_inputs(expected)).logits
    torch.testing.assert_close(out, expected["output"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", _cases("peft"), ids=_ids)
def test_peft_written_adapters_load_and_reproduce_peft_logits(case):
    meta = json.loads((case / "case.json").read_text())
    expected, _ = io.load_tensors(case / "expected" / "expected.safetensors")
    dm = dt.load_peft(case / "peft", model=load_base(case.parent, meta["base"]))
    with torch.no_grad():
        out = dm(**_inputs(expected)).logits
    torch.testing.assert_close(out, expected["output"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", _cases("checkpoint"), ids=_ids)
def test_trainer_checkpoints_of_every_release_resume_to_the_stored_run(case, tmp_path):
    from deltatune.train import Trainer

    meta = json.loads((case / "case.json").read_text())
    out = tmp_path / "run"
    shutil.copytree(case / "checkpoint", out / "checkpoints" / meta["checkpoint"])
    torch.manual_seed(12345)  # the resumed run's starting RNG must not matter
    dm, task, rows, config = train_setup(case.parent, case, out)
    trainer = Trainer(dm, task, rows, None, config)
    result = trainer.fit(resume="auto")
    assert result.resumed_from == out / "checkpoints" / meta["checkpoint"]
    assert result.stop_reason == "completed" and result.steps == meta["steps"]
    expected, _ = io.load_tensors(case / "expected" / "expected.safetensors")
    got = trainer.model.delta_state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=RTOL, atol=1e-6, msg=key)
    history = json.loads((case / "expected" / "history.json").read_text())
    assert [h["step"] for h in result.history] == [h["step"] for h in history]
    assert [h["lr"] for h in result.history] == [h["lr"] for h in history]
    for got_h, want_h in zip(result.history, history, strict=True):
        assert got_h["loss"] == pytest.approx(want_h["loss"], rel=1e-5)
