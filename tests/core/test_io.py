"""Atomic directories, manifests and the strict file readers."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from deltatune.core import io
from deltatune.core.errors import AdapterFileCorrupt, UnsafeFileError


def _write(path, tensors):
    with io.atomic_directory(path) as tmp:
        io.save_tensors(tmp / "w.safetensors", tensors)
        io.write_json(tmp / "c.json", {"n": len(tensors)})


def test_atomic_directory_replaces_whole_and_writes_manifest_last(tmp_path):
    target = tmp_path / "d"
    _write(target, {"a": torch.ones(3)})
    _write(target, {"a": torch.zeros(3), "b": torch.ones(2)})
    manifest = io.verify_manifest(target)
    assert sorted(manifest["files"]) == ["c.json", "w.safetensors"]
    tensors, _ = io.load_tensors(target / "w.safetensors")
    assert sorted(tensors) == ["a", "b"]
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_failure_inside_leaves_old_directory(tmp_path):
    target = tmp_path / "d"
    _write(target, {"a": torch.ones(3)})
    before = (target / "w.safetensors").read_bytes()
    with pytest.raises(RuntimeError), io.atomic_directory(target) as tmp:
        io.save_tensors(tmp / "w.safetensors", {"a": torch.zeros(3)})
        raise RuntimeError("disk full")
    assert (target / "w.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_fault_between_steps_never_mixes(tmp_path, monkeypatch):
    target = tmp_path / "d"
    _write(target, {"a": torch.ones(3)})
    for stage in ("mid-write:w.safetensors", "written:c.json", "before-manifest", "before-swap"):
        def hook(s, stage=stage):
            if s == stage:
                raise KeyboardInterrupt(stage)
        monkeypatch.setattr(io, "FAULT_HOOK", hook)
        with pytest.raises(KeyboardInterrupt):
            _write(target, {"a": torch.zeros(3)})
        monkeypatch.setattr(io, "FAULT_HOOK", None)
        io.verify_manifest(target)
        assert torch.equal(io.load_tensors(target / "w.safetensors")[0]["a"], torch.ones(3))


def test_identical_inputs_give_identical_bytes(tmp_path):
    _write(tmp_path / "a", {"x": torch.arange(4.0), "y": torch.ones(2)})
    _write(tmp_path / "b", {"y": torch.ones(2), "x": torch.arange(4.0)})
    for name in ("w.safetensors", "c.json", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_flipped_data_byte_is_caught_by_the_manifest(tmp_path):
    _write(tmp_path / "d", {"a": torch.ones(64)})
    path = tmp_path / "d" / "w.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(AdapterFileCorrupt, match="sha256 differs"):
        io.verify_manifest(tmp_path / "d")


@pytest.mark.parametrize("damage", ["empty", "short", "huge_header", "bad_json", "truncated"])
def test_safetensors_damage_is_one_typed_error(tmp_path, damage):
    path = tmp_path / "w.safetensors"
    io.save_tensors(path, {"a": torch.ones(8)})
    raw = path.read_bytes()
    if damage == "empty":
        raw = b""
    elif damage == "short":
        raw = raw[:5]
    elif damage == "huge_header":
        raw = struct.pack("<Q", 1 << 60) + raw[8:]
    elif damage == "bad_json":
        raw = raw[:8] + b"{" * (len(raw[8:]) - 1) + b"x"
    elif damage == "truncated":
        raw = raw[:-4]
    path.write_bytes(raw)
    with pytest.raises(AdapterFileCorrupt) as info:
        io.load_tensors(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(("content", "phrase"), [
    (b"", "empty"), (b"\xff\xfe", "not valid UTF-8"), (b"{\"a\": ", "not valid JSON"),
    (b"[1, 2]", "must hold a JSON object"),
])
def test_json_damage_is_one_typed_error(tmp_path, content, phrase):
    path = tmp_path / "c.json"
    path.write_bytes(content)
    with pytest.raises(AdapterFileCorrupt, match=phrase):
        io.read_json(path)


def test_directory_instead_of_file_and_symlink_loop(tmp_path):
    (tmp_path / "c.json").mkdir()
    with pytest.raises(AdapterFileCorrupt, match="not a regular file"):
        io.read_json(tmp_path / "c.json")
    loop = tmp_path / "loop.json"
    loop.symlink_to(loop)
    with pytest.raises(AdapterFileCorrupt, match="cannot read"):
        io.read_json(loop)


def test_pickle_files_are_refused(tmp_path):
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(UnsafeFileError, match="never unpickles"):
        io.refuse_pickles(tmp_path)
    with pytest.raises(UnsafeFileError, match="pickle-format"):
        io.read_json(tmp_path / "adapter_model.bin")


def test_stale_temp_dirs_of_dead_writers_are_collected(tmp_path):
    target = tmp_path / "d"
    _write(target, {"a": torch.ones(1)})
    stale = tmp_path / "d.tmp-999999999-deadbeef"
    stale.mkdir()
    (stale / "junk").write_text("x")
    assert io.collect_stale(target) == [stale]
    assert not stale.exists()


def test_missing_final_is_recovered_from_old(tmp_path):
    target = tmp_path / "d"
    _write(target, {"a": torch.ones(1)})
    old = tmp_path / "d.old-999999999-deadbeef"
    target.rename(old)
    io.collect_stale(target)
    assert target.exists() and not old.exists()
    assert json.loads((target / "c.json").read_text()) == {"n": 1}
