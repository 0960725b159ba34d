"""RELIABILITY.md row 13 (fuzz: corrupted files), property-based part (Hypothesis).

Random mutations (truncation, byte flips, insertions, overwritten header length,
random header JSON) of a valid safetensors file, of a delta config and of a manifest
never escape as a raw exception: the readers either return a valid result or raise a
deltatune error (``AdapterFileCorrupt`` for broken bytes; ``ConfigError`` for a config
that parses but says something invalid). Derandomised in CI (see conftest.py).
"""

from __future__ import annotations

import contextlib
import json
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import given
from hypothesis import strategies as st

import deltatune as dt
from deltatune.core import io
from deltatune.core.errors import AdapterFileCorrupt, DeltaTuneError
from tests.reliability._files import saved_toy_delta
from tests.reliability._toy import toy

_DIR = Path(tempfile.mkdtemp(prefix="dt-r13-prop-"))
PRISTINE = saved_toy_delta(_DIR / "pristine")
WEIGHTS = (PRISTINE / "delta.safetensors").read_bytes()
CONFIG = (PRISTINE / "delta_config.json").read_bytes()
MANIFEST = (PRISTINE / "manifest.json").read_bytes()


@st.composite
def mutated(draw, raw: bytes) -> bytes:
    """Apply 1-3 random structural mutations to ``raw``."""
    data = bytearray(raw)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "header-len",
                                     "overwrite"]))
        n = len(data)
        if kind == "truncate":
            data = data[:draw(st.integers(0, max(n - 1, 0)))]
        elif kind == "flip" and n:
            i = draw(st.integers(0, n - 1))
            data[i] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            i = draw(st.integers(0, n))
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and n:
            i = draw(st.integers(0, n - 1))
            del data[i:i + draw(st.integers(1, 8))]
        elif kind == "header-len" and n >= 8:
            data[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
        elif kind == "overwrite" and n:
            i = draw(st.integers(0, n - 1))
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[i:i + len(chunk)] = chunk
    return bytes(data)


def _json_values():
    scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(
        max_size=8)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)


def _tmp_file(name: str, raw: bytes) -> Path:
    path = Path(tempfile.mkdtemp(dir=_DIR)) / name
    path.write_bytes(raw)
    return path


@given(mutated(WEIGHTS))
def test_mutated_safetensors_is_loaded_or_one_typed_error(raw):
    path = _tmp_file("w.safetensors", raw)
    try:
        tensors, metadata = io.load_tensors(path)
    except AdapterFileCorrupt as exc:
        assert exc.path == str(path)
        return
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    assert all(isinstance(v, str) for v in metadata.values())


@given(st.dictionaries(st.text(max_size=10), _json_values(), max_size=5))
def test_random_safetensors_header_is_loaded_or_one_typed_error(header):
    text = json.dumps(header).encode()
    path = _tmp_file("w.safetensors", struct.pack("<Q", len(text)) + text + b"\0" * 16)
    with contextlib.suppress(AdapterFileCorrupt):
        io.load_tensors(path)


@given(mutated(CONFIG) | mutated(MANIFEST) | st.binary(max_size=64))
def test_mutated_json_is_read_or_one_typed_error(raw):
    path = _tmp_file("c.json", raw)
    try:
        assert isinstance(io.read_json(path), dict)
    except AdapterFileCorrupt as exc:
        assert exc.path == str(path)


def _load_with(name: str, raw: bytes, *, fix_manifest: bool) -> None:
    directory = Path(tempfile.mkdtemp(dir=_DIR)) / "d"
    directory.mkdir()
    for f in ("delta.safetensors", "delta_config.json", "manifest.json", "README.md"):
        (directory / f).write_bytes((PRISTINE / f).read_bytes())
    (directory / name).write_bytes(raw)
    if fix_manifest:
        io.write_manifest(directory)
    dt.load(toy(), directory)


@given(st.sampled_from(["delta.safetensors", "delta_config.json", "manifest.json"]),
       st.data())
def test_mutated_delta_directory_is_refused_with_adapter_file_corrupt(name, data):
    raw = (PRISTINE / name).read_bytes()
    new = data.draw(mutated(raw))
    try:
        _load_with(name, new, fix_manifest=False)
    except AdapterFileCorrupt:
        return
    # Only a no-op mutation (or trailing whitespace in JSON) may load.
    assert new.rstrip() == raw.rstrip() or name == "manifest.json"


@given(st.sampled_from(["delta.safetensors", "delta_config.json"]), st.data())
def test_mutation_behind_a_rewritten_manifest_never_escapes_untyped(name, data):
    new = data.draw(mutated((PRISTINE / name).read_bytes()))
    with contextlib.suppress(DeltaTuneError):
        _load_with(name, new, fix_manifest=True)


@given(st.sampled_from(sorted(json.loads(CONFIG))), _json_values())
def test_config_payload_of_any_json_shape_never_escapes_untyped(key, value):
    """A hostile delta_config.json that is valid JSON: any field of any type."""
    payload = json.loads(CONFIG)
    for target in (key, "config", "base_model"):
        bad = dict(payload, **{target: value})
        with contextlib.suppress(DeltaTuneError):
            _load_with("delta_config.json", json.dumps(bad).encode(), fix_manifest=True)
