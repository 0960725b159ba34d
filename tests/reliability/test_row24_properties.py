"""RELIABILITY.md row 24 (property-based, Hypothesis; derandomised in CI, see conftest.py).

Random tiny architectures (Toy with drawn widths), ranks, alphas, dtypes, delta names
(including names that are prefixes of others or look like tensor keys, e.g. ``lora_A``)
and multi-delta combinations. For every drawn case rows 7-10 hold: merged ~ unmerged
and unmerge bitwise, disabled == base bitwise, only delta tensors are trainable, and
save -> load -> save is byte-identical with a name-independent tensor file. The saved
key mapping is a bijection onto the delta's tensors, and config JSON round trips are
the identity.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from hypothesis import given
from hypothesis import strategies as st

import deltatune as dt
from deltatune.core.registry import config_from_dict
from tests.reliability._toy import TOY_TARGETS, fill, state_hash, toy, toy_ids
from tests.reliability.tolerances import merge_rtol, relative_error

NAMES = st.sampled_from(["a", "ab", "abc", "lora_A", "lora_B", "default", "base", "model",
                         "x-1", "_", "A" * 64, "weight", "emb"])


@st.composite
def cases(draw):
    dims = dict(vocab=draw(st.integers(4, 24)), dim=draw(st.integers(2, 12)),
                hidden=draw(st.integers(2, 12)), inner=draw(st.integers(2, 12)),
                classes=draw(st.integers(2, 6)))
    names = draw(st.lists(NAMES, min_size=1, max_size=3, unique=True))
    deltas = []
    for name in names:
        targets = draw(st.lists(st.sampled_from(TOY_TARGETS), min_size=1, max_size=4,
                                unique=True))
        pairs = {"emb": (dims["vocab"], dims["dim"]), "proj": (dims["dim"], dims["hidden"]),
                 "conv": (dims["hidden"], dims["inner"]), "out": (dims["inner"], dims["classes"])}
        limit = min(min(pairs[t]) for t in targets)
        r = draw(st.integers(1, limit))
        deltas.append((name, dt.LoraConfig(
            r=r, lora_alpha=draw(st.floats(0.5, 16, allow_nan=False)),
            use_rslora=draw(st.booleans()), target_modules=targets)))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16]))
    return dims, deltas, dtype, draw(st.integers(0, 2**16))


def _build(dims, deltas, dtype, seed):
    dm = dt.DeltaModel(toy(dtype=dtype, **dims))
    for i, (name, config) in enumerate(deltas):
        dm.add(name, config)
        fill(dm, name, seed=seed + i, std=0.1)
    return dm


@given(cases())
def test_invariants_hold_for_random_architectures_and_delta_sets(case):
    dims, deltas, dtype, seed = case
    ids = toy_ids(batch=2, length=3, seed=seed % 97, vocab=dims["vocab"])
    base_model = toy(dtype=dtype, **dims)
    with torch.no_grad():
        base = base_model(ids)
    dm = _build(dims, deltas, dtype, seed)
    names = [n for n, _ in deltas]
    dm.activate(*names)
    base_hash = state_hash(dm.model)
    with torch.no_grad():
        unmerged = dm(ids)
        # Row 8: disabled is the base, bit for bit.
        with dm.disabled():
            assert torch.equal(dm(ids), base)
        # Row 7: merge ~ unmerged; unmerge restores bitwise.
        dm.merge()
        assert relative_error(dm(ids), unmerged) <= 4 * merge_rtol("lora", dtype)
        with dm.disabled():
            assert torch.equal(dm(ids), base)
        dm.unmerge()
    assert state_hash(dm.model) == base_hash
    # Row 9: exactly the active deltas' tensors are trainable.
    assert {id(p) for p in dm.trainable_parameters()} == dm.delta_parameter_ids()
    # Row 10 + bijection: each delta's keys map one-to-one onto its tensors.
    tmp = Path(tempfile.mkdtemp())
    for name in names:
        tensors = dm.delta_state_dict(name)
        params = list(dm.get_delta(name).parameters())
        assert len(tensors) == len(params)
        assert len({t.data_ptr() for t in tensors.values()}) == len(tensors)
        # Keys come from module paths and tensor names only, never from the delta's name.
        targets = dict(deltas)[name].target_modules
        assert set(tensors) == {f"{t}.lora_{ab}" for t in targets for ab in "AB"}
        dm.save_delta(tmp / name, name)
        back = dt.load(toy(dtype=dtype, **dims), tmp / name, name="renamed")
        back.save_delta(tmp / f"{name}-again")
        assert (tmp / name / "delta.safetensors").read_bytes() == \
            (tmp / f"{name}-again" / "delta.safetensors").read_bytes()
        loaded = back.delta_state_dict()
        assert loaded.keys() == tensors.keys()
        assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


@given(st.builds(
    dt.LoraConfig,
    r=st.integers(1, 64), lora_alpha=st.floats(0.01, 1e3, allow_nan=False),
    lora_dropout=st.floats(0, 0.99), use_rslora=st.booleans(),
    init=st.sampled_from(["kaiming", "gaussian"]),
    target_modules=st.none() | st.just("all-linear") | st.lists(
        st.text("abcdefgh_.", min_size=1, max_size=8), min_size=1, max_size=4),
    layers=st.none() | st.lists(st.integers(0, 40), max_size=3),
    rank_pattern=st.dictionaries(st.text("abc_", min_size=1, max_size=5), st.integers(1, 8),
                                 max_size=2)))
def test_config_json_round_trip_is_the_identity(config):
    text = config.to_json()
    again = config_from_dict(json.loads(text))
    assert again == config and again.to_json() == text
