"""RELIABILITY.md row 12 (bad input: wrong base model).

A saved delta records its base model's fingerprint (type, architecture numbers,
per-target shapes, sampled weight values). Loading onto a same-shaped sibling (other
weights), a differently shaped model or another architecture raises
``BaseModelMismatchError`` before any module is wrapped or any weight touched;
``check_base='shapes'`` / ``'off'`` override. PEFT checks shapes only.
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.core.errors import BaseModelMismatchError
from deltatune.core.layers import DeltaLayer
from tests.conftest import tiny_llama
from tests.reliability._files import saved_toy_delta
from tests.reliability._toy import state_hash, toy


def _untouched(model, before) -> bool:
    return state_hash(model) == before and not any(
        isinstance(m, DeltaLayer) for m in model.modules())


def test_same_shapes_other_weights_is_refused(tmp_path):
    directory = saved_toy_delta(tmp_path / "d", seed=0)
    sibling = toy(seed=1)
    before = state_hash(sibling)
    with pytest.raises(BaseModelMismatchError, match=r"has the expected shape but different "
                       r"weights.*sibling fine-tune.*check_base='shapes'"):
        dt.load(sibling, directory)
    assert _untouched(sibling, before)


def test_a_change_in_any_single_targeted_layer_is_refused(tmp_path):
    directory = saved_toy_delta(tmp_path / "d", seed=0)
    for layer in ("emb", "proj", "conv", "out"):
        model = toy(seed=0)
        with torch.no_grad():  # a fine-tune of one layer changes all of its values
            getattr(model, layer).weight.add_(0.01)
        with pytest.raises(BaseModelMismatchError, match=f"'{layer}'"):
            dt.load(model, directory)


def test_other_shapes_are_refused_naming_module_and_shapes(tmp_path):
    directory = saved_toy_delta(tmp_path / "d")
    wider = toy(hidden=10)
    before = state_hash(wider)
    with pytest.raises(BaseModelMismatchError, match=r"module 'conv' has weight shape \[10, 8\]"
                       r", the delta expects \[12, 8\]"):
        dt.load(wider, directory, check_base="shapes")
    assert _untouched(wider, before)


def test_other_architecture_config_is_refused(tmp_path):
    dm = dt.attach(tiny_llama(), dt.LoraConfig(r=2))
    dm.save_delta(tmp_path / "d")
    other = tiny_llama(num_attention_heads=8, num_key_value_heads=4)  # same weight shapes
    with pytest.raises(BaseModelMismatchError, match=r"base model config (\w+) = \d+, but the "
                       r"delta was saved for \1 = \d+"):
        dt.load(other, tmp_path / "d")


def test_overrides_load_onto_a_sibling(tmp_path):
    directory = saved_toy_delta(tmp_path / "d")
    for level in ("shapes", "off"):
        dm = dt.load(toy(seed=1), directory, check_base=level)
        assert dm.delta_names == ["d"]


def test_same_base_in_bf16_still_matches(tmp_path):
    directory = saved_toy_delta(tmp_path / "d")
    dm = dt.load(toy(dtype=torch.bfloat16), directory)
    assert dm.delta_names == ["d"]
