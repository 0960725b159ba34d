"""RELIABILITY.md row 13 (fuzz: corrupted files), systematic part.

Every damage to each of the three files of a saved delta (weights, config, manifest)
gives one typed ``AdapterFileCorrupt`` naming the damaged path and a reason, through
the public loader: truncation at every structural offset class, flipped bytes in the
header and in the data, an empty file, a directory in place of the file, a symlink
loop, a huge header length, invalid UTF-8 and invalid JSON. Data bit flips are caught
by the manifest's sha256. The Hypothesis and atheris parts are in
``test_row13_24_properties.py`` and ``test_row13_atheris.py``.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

import deltatune as dt
from deltatune.core import io
from deltatune.core.errors import AdapterFileCorrupt
from tests.reliability._files import saved_toy_delta
from tests.reliability._toy import toy

FILES = ("delta.safetensors", "delta_config.json", "manifest.json")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return saved_toy_delta(tmp_path_factory.mktemp("pristine") / "d")


def _copy(pristine: Path, tmp_path: Path) -> Path:
    target = tmp_path / "d"
    shutil.copytree(pristine, target)
    return target


def _header_len(raw: bytes) -> int:
    return struct.unpack("<Q", raw[:8])[0]


def _truncations(raw: bytes, name: str) -> dict[str, int]:
    """Offset classes: inside a length prefix, inside/at the end of a header, mid data."""
    cuts = {"zero": 0, "one byte": 1, "half": len(raw) // 2,
            # The last meaningful byte (a JSON file's closing brace, the last data byte).
            "last byte": len(raw.rstrip()) - 1}
    if name.endswith(".safetensors"):
        h = _header_len(raw) if len(raw) >= 8 else 0
        cuts.update({"inside length prefix": 4, "after length prefix": 8,
                     "inside header": 8 + h // 2, "end of header": 8 + h,
                     "first data byte": 8 + h + 1})
    return cuts


# A stand-in with the structure of a safetensors file, to list the offset classes.
_LABELS = {name: list(_truncations(struct.pack("<Q", 2) + b"{}xx", name)) for name in FILES}


def _damages() -> list[tuple[str, str]]:
    out = []
    for name in FILES:
        out += [(name, f"truncate:{label}") for label in _LABELS[name]]
        out += [(name, kind) for kind in ("flip-header", "flip-data", "empty", "directory",
                                          "symlink-loop", "invalid-utf8", "invalid-json",
                                          "missing")]
        if name.endswith(".safetensors"):
            out.append((name, "huge-header-length"))
    return out


def _apply(path: Path, damage: str) -> None:
    raw = path.read_bytes()
    if damage.startswith("truncate:"):
        label = damage.split(":", 1)[1]
        path.write_bytes(raw[:_truncations(raw, path.name)[label]])
    elif damage in ("flip-header", "flip-data"):
        if path.suffix == ".safetensors":
            start = 8 + _header_len(raw)
            pos = 8 + _header_len(raw) // 3 if damage == "flip-header" else (start + len(raw)) // 2
        else:
            pos = 1 if damage == "flip-header" else len(raw) // 2
        data = bytearray(raw)
        data[pos] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "directory":
        path.unlink()
        path.mkdir()
    elif damage == "symlink-loop":
        path.unlink()
        path.symlink_to(path)
    elif damage == "invalid-utf8":
        path.write_bytes(raw[:8] + b"\xff\xfe\xfd" + raw[11:])
    elif damage == "invalid-json":
        path.write_bytes(raw[:8] + b"{\"x\": [}" + raw[16:])
    elif damage == "missing":
        path.unlink()
    elif damage == "huge-header-length":
        path.write_bytes(struct.pack("<Q", (1 << 63) + 12345) + raw[8:])
    else:  # pragma: no cover
        raise AssertionError(damage)


@pytest.mark.parametrize(("name", "damage"), _damages())
def test_every_damage_is_one_typed_error_naming_the_file(pristine, tmp_path, name, damage):
    directory = _copy(pristine, tmp_path)
    _apply(directory / name, damage)
    with pytest.raises(AdapterFileCorrupt) as info:
        dt.load(toy(), directory)
    err = info.value
    assert err.reason and err.hint
    # The error names the damaged file (or, for the manifest, the file it now disagrees with).
    assert str(directory) in err.path
    assert str(directory) in str(err) and "Fix:" in str(err)


@pytest.mark.parametrize("name", ["delta.safetensors", "delta_config.json"])
def test_damage_with_a_rewritten_manifest_is_still_one_typed_error(pristine, tmp_path, name):
    """A tool that 'fixes' the manifest after damage: the strict readers still catch it."""
    for damage in ("truncate:half", "invalid-utf8", "invalid-json", "empty"):
        directory = _copy(pristine, tmp_path / damage.replace(":", "_"))
        _apply(directory / name, damage)
        io.write_manifest(directory)
        with pytest.raises(AdapterFileCorrupt, match=name.replace(".", r"\.")):
            dt.load(toy(), directory)


def test_a_directory_given_as_a_file_and_a_file_given_as_the_directory(pristine, tmp_path):
    with pytest.raises(AdapterFileCorrupt, match="expected a delta directory, found a file"):
        dt.load(toy(), pristine / "delta.safetensors")


def test_manifest_structure_errors(pristine, tmp_path):
    cases = {
        "no-files": {"manifest_version": 1},
        "bad-entry": {"manifest_version": 1, "files": {"delta.safetensors": 5}},
        "escape": {"manifest_version": 1, "files": {"../x": {"size": 1, "sha256": "0"}}},
        "wrong-size-type": {"manifest_version": 1,
                            "files": {"delta.safetensors": {"size": "12", "sha256": "0"}}},
    }
    for label, manifest in cases.items():
        directory = _copy(pristine, tmp_path / label)
        (directory / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(AdapterFileCorrupt, match="manifest|size"):
            dt.load(toy(), directory)
