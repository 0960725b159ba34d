"""RELIABILITY.md row 15 (security: config injection).

A saved delta's JSON cannot import modules, enable remote code, name a base model to
fetch, or escape its directory: every such key is an unknown key (refused, listing the
known ones), a delta name is a plain identifier, manifest paths and symbolic links
must stay inside the directory, and loading a hostile config imports nothing. The
whole attack surface is enumerated here up front rather than fixed one issue at a time.
"""

from __future__ import annotations

import json
import sys

import pytest

import deltatune as dt
from deltatune.core import io
from deltatune.core.errors import AdapterFileCorrupt, ConfigError, DeltaTuneError
from deltatune.core.layers import DeltaLayer
from deltatune.core.model import check_delta_name
from tests.reliability._files import saved_toy_delta
from tests.reliability._toy import state_hash, toy

HOSTILE_TOP_LEVEL = {
    "auto_mapping": {"base_model_class": "AutoModel", "parent_library": "os"},
    "trust_remote_code": True,
    "tokenizer_kwargs": {"trust_remote_code": True},
    "base_model_name_or_path": "attacker/evil-model",
    "revision": "main",
    "code": "__import__('os').system('touch pwned')",
}
HOSTILE_CONFIG_FIELDS = {
    "auto_mapping": {"parent_library": "os"},
    "trust_remote_code": True,
    "base_model_name_or_path": "attacker/evil-model",
    "module": "subprocess",
    "target_modules_fn": "os.system",
}


def _edit(directory, edit) -> None:
    path = directory / "delta_config.json"
    payload = json.loads(path.read_text())
    edit(payload)
    path.write_text(json.dumps(payload))
    io.write_manifest(directory)


@pytest.mark.parametrize("key", sorted(HOSTILE_TOP_LEVEL))
def test_hostile_top_level_keys_are_refused(tmp_path, key):
    directory = saved_toy_delta(tmp_path / "d")
    _edit(directory, lambda p: p.update({key: HOSTILE_TOP_LEVEL[key]}))
    model = toy()
    before = state_hash(model)
    with pytest.raises(ConfigError, match=rf"unknown top-level key\(s\) '{key}'"):
        dt.load(model, directory)
    assert state_hash(model) == before


@pytest.mark.parametrize("key", sorted(HOSTILE_CONFIG_FIELDS))
def test_hostile_config_fields_are_refused(tmp_path, key):
    directory = saved_toy_delta(tmp_path / "d")
    _edit(directory, lambda p: p["config"].update({key: HOSTILE_CONFIG_FIELDS[key]}))
    with pytest.raises(ConfigError, match=rf"unknown field\(s\) for method 'lora': '{key}'"):
        dt.load(toy(), directory)


@pytest.mark.parametrize("method", ["os.system", "subprocess:run", "builtins.eval",
                                    "deltatune.core.io"])
def test_a_method_name_is_never_imported(tmp_path, method):
    directory = saved_toy_delta(tmp_path / "d")
    _edit(directory, lambda p: p["config"].update({"method": method}))
    modules_before = set(sys.modules)
    with pytest.raises(DeltaTuneError, match="unknown method"):
        dt.load(toy(), directory)
    assert set(sys.modules) - modules_before == set()


@pytest.mark.parametrize("name", ["../evil", "..", "a/b", "/abs", "x\\y", "", ".hidden",
                                  "a" * 65, "name\n", "c:x", "ok name"])
def test_delta_names_cannot_be_paths(tmp_path, name):
    with pytest.raises(ConfigError, match="is not allowed"):
        check_delta_name(name)
    if not name:
        return  # name="" on load means "the saved name", like None
    directory = saved_toy_delta(tmp_path / "d")
    with pytest.raises(ConfigError, match="is not allowed"):
        dt.load(toy(), directory, name=name)
    # A name inside the file is held to the same rule.
    _edit(directory, lambda p: p.update({"name": name}))
    model = toy()
    with pytest.raises(ConfigError, match="is not allowed"):
        dt.load(model, directory)
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())


def test_manifest_paths_cannot_leave_the_directory(tmp_path):
    directory = saved_toy_delta(tmp_path / "d")
    (tmp_path / "secret.txt").write_text("secret")
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"]["../secret.txt"] = {"size": 6, "sha256": io.sha256_file(
        tmp_path / "secret.txt")}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(AdapterFileCorrupt, match="outside the directory"):
        dt.load(toy(), directory)


def test_a_symlinked_file_cannot_point_outside(tmp_path):
    directory = saved_toy_delta(tmp_path / "d")
    outside = tmp_path / "elsewhere.safetensors"
    (directory / "delta.safetensors").rename(outside)
    (directory / "delta.safetensors").symlink_to(outside)
    with pytest.raises(AdapterFileCorrupt, match="symbolic link to a file outside"):
        dt.load(toy(), directory)


def test_load_takes_the_base_model_from_the_caller_only(tmp_path):
    """No deltatune loader fetches a base model named by the delta's files."""
    import inspect

    from deltatune.core import model as model_module

    source = inspect.getsource(model_module)
    assert "from_pretrained" not in source and "trust_remote_code" not in source
