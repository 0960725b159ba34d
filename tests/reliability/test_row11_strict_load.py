"""RELIABILITY.md row 11 (bad input: strict load).

Strict by default: a file with extra keys, missing keys, a shape mismatch or a dtype
mismatch raises ``StrictLoadError`` naming each key with expected vs found, before the
model changes. ``strict=False`` loads what fits and returns a structured ``LoadReport``
(kept on the delta as ``info["load_report"]``). The manifest is rewritten in each case
(as a buggy tool would), so the key checks themselves are what is tested. PEFT ignores
extra keys silently and only warns about missing ones.
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.core.errors import StrictLoadError
from deltatune.core.layers import DeltaLayer
from deltatune.core.model import DeltaModel, LoadReport
from tests.reliability._files import rewrite_tensors, saved_toy_delta
from tests.reliability._toy import lora, state_hash, toy

EDITS = {
    "extra": (lambda t: {**t, "proj.lora_C": torch.zeros(2, 16)},
              r"extra keys.*\n  proj\.lora_C"),
    "missing": (lambda t: {k: v for k, v in t.items() if k != "conv.lora_B"},
                r"missing keys.*\n  conv\.lora_B"),
    "shape": (lambda t: {**t, "out.lora_A": torch.zeros(3, 8)},
              r"out\.lora_A: file has shape \[3, 8\], the delta expects \[2, 8\]"),
    "dtype": (lambda t: {**t, "emb.lora_B": t["emb.lora_B"].to(torch.int32)},
              r"emb\.lora_B: file has dtype torch\.int32, the delta expects torch\.float32"),
}


@pytest.mark.parametrize("kind", sorted(EDITS))
def test_strict_load_names_each_bad_key_and_changes_nothing(tmp_path, kind):
    edit, phrase = EDITS[kind]
    directory = saved_toy_delta(tmp_path / "d")
    rewrite_tensors(directory, edit)
    model = toy()
    before = state_hash(model)
    with pytest.raises(StrictLoadError, match=phrase) as info:
        dt.load(model, directory)
    assert "strict=False" in str(info.value)
    assert isinstance(info.value.report, LoadReport) and not info.value.report.clean
    assert state_hash(model) == before
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())


def test_strict_failure_keeps_existing_deltas_active(tmp_path):
    directory = saved_toy_delta(tmp_path / "d")
    rewrite_tensors(directory, EDITS["extra"][0])
    dm = DeltaModel(toy())
    dm.add("keep", lora())
    with pytest.raises(StrictLoadError):
        dm.load_delta(directory, name="new")
    assert dm.delta_names == ["keep"] and dm.active == ["keep"]


def test_non_strict_returns_a_structured_report(tmp_path):
    directory = saved_toy_delta(tmp_path / "d")
    rewrite_tensors(directory, lambda t: {
        **{k: v for k, v in t.items() if k != "conv.lora_B"},
        "proj.lora_C": torch.zeros(2), "out.lora_A": torch.zeros(3, 8),
        "proj.lora_A": t["proj.lora_A"].half()})
    dm = dt.load(toy(), directory, strict=False)
    report = dm.get_delta("d").info["load_report"]
    assert report.extra == ["proj.lora_C"]
    assert report.missing == ["conv.lora_B"]
    assert [m.split(":")[0] for m in report.mismatched] == ["out.lora_A"]
    assert report.casts == ["proj.lora_A: torch.float16 -> torch.float32"]
    text = report.describe()
    assert "proj.lora_C" in text and "conv.lora_B" in text and "out.lora_A" in text
    # What fitted was loaded; what did not keeps its initial value.
    saved = dt.read_delta_directory(directory, ).tensors
    assert torch.equal(dm.delta_state_dict()["emb.lora_A"], saved["emb.lora_A"])
    assert torch.count_nonzero(dm.delta_state_dict()["conv.lora_B"]) == 0


def test_a_clean_load_reports_clean(tmp_path):
    directory = saved_toy_delta(tmp_path / "d")
    dm = dt.load(toy(), directory)
    assert dm.get_delta("d").info["load_report"].clean
