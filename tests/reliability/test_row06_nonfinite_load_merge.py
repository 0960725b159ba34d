"""RELIABILITY.md row 6 (bad input: non-finite weights on load and merge).

A saved delta holding NaN/inf is refused on load (``NonFiniteError``, opt-out with
``allow_nonfinite=True``); ``merge()`` and ``merge_and_unload()`` with default arguments
refuse to write NaN/inf into the base and also compare merged with unmerged outputs on
a probe batch; on any refusal the base weights are bit-identical to before and no
layer stays merged. PEFT loads such files silently and merges NaN into the base.
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.core.errors import MergeError, NonFiniteError
from deltatune.core.layers import DeltaLayer
from deltatune.core.model import DeltaModel
from deltatune.methods.lora import LoraDelta
from tests.reliability._files import nan_at, rewrite_tensors, saved_toy_delta
from tests.reliability._toy import fill, lora, state_hash, toy, toy_ids


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_load_refuses_nonfinite_tensors_and_leaves_the_model_alone(tmp_path, value):
    directory = saved_toy_delta(tmp_path / "d")
    rewrite_tensors(directory, lambda t: {**t, "proj.lora_B": nan_at(t["proj.lora_B"], value)})
    model = toy()
    before = state_hash(model)
    with pytest.raises(NonFiniteError, match=r"delta\.safetensors.*'proj\.lora_B'.*NaN/inf"
                       r".*allow_nonfinite=True"):
        dt.load(model, directory)
    assert state_hash(model) == before
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())


def test_nonfinite_load_opt_out_loads_the_values(tmp_path):
    directory = saved_toy_delta(tmp_path / "d")
    rewrite_tensors(directory, lambda t: {**t, "proj.lora_B": nan_at(t["proj.lora_B"])})
    dm = dt.load(toy(), directory, allow_nonfinite=True)
    assert torch.isnan(dm.delta_state_dict()["proj.lora_B"]).any()


def _nan_delta() -> DeltaModel:
    dm = DeltaModel(toy())
    dm.add("d", lora())
    fill(dm)
    with torch.no_grad():
        # The last layer in merge order, so earlier layers merge first and must be undone.
        dm.get_delta("d").parts["out"].lora_B.view(-1)[0] = float("nan")
    return dm


def test_default_merge_refuses_nan_and_leaves_every_base_weight_bitwise():
    dm = _nan_delta()
    before = state_hash(dm.model)
    with pytest.raises(NonFiniteError, match=r"merging delta 'd' would write NaN/inf.*nothing "
                       r"was changed"):
        dm.merge()
    assert state_hash(dm.model) == before
    assert not dm.get_delta("d").merged
    assert all(not m.merged for m in dm.model.modules() if isinstance(m, DeltaLayer))


def test_default_merge_and_unload_refuses_nan():
    dm = _nan_delta()
    before = state_hash(dm.model)
    with pytest.raises(NonFiniteError):
        dm.merge_and_unload()
    assert state_hash(dm.model) == before
    assert dm.delta_names == ["d"]


def test_merge_checks_outputs_on_a_probe_batch(monkeypatch):
    """A merge whose weights do not reproduce the unmerged outputs is refused."""
    dm = DeltaModel(toy())
    dm.add("d", lora())
    fill(dm)
    real = LoraDelta.merge_into

    def wrong(self, weight, bias):  # folds the update in twice: finite, but wrong
        w, b = real(self, weight, bias)
        return w + self.delta_weight(), b

    monkeypatch.setattr(LoraDelta, "merge_into", wrong)
    before = state_hash(dm.model)
    with pytest.raises(MergeError, match=r"differs from the unmerged output.*nothing was "
                       r"changed"):
        dm.merge()
    assert state_hash(dm.model) == before


def test_a_good_merge_matches_unmerged_outputs():
    dm = DeltaModel(toy())
    dm.add("d", lora())
    fill(dm)
    ids = toy_ids()
    with torch.no_grad():
        unmerged = dm(ids)
        dm.merge()
        merged = dm(ids)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


def test_save_refuses_nonfinite_and_writes_nothing(tmp_path):
    dm = _nan_delta()
    with pytest.raises(NonFiniteError, match="refusing to save"):
        dm.save_delta(tmp_path / "d")
    assert list(tmp_path.iterdir()) == []
