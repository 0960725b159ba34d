"""RELIABILITY.md row 14 (bad input: config schema).

Unknown method -> ``UnknownMethodError`` listing the known methods (with a suggestion);
unknown field -> ``ConfigError`` naming it and listing the known fields, never dropped;
a config from a newer schema or library -> error asking for an upgrade; wrong types and
out-of-range values -> ``ConfigError`` whose ``field`` names the field; a missing
required field is named. Configs carry ``schema_version`` and ``min_library_version``.
PEFT raises a bare ``KeyError`` for unknown methods and drops unknown fields with a
warning.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

import deltatune as dt
from deltatune.core.config import LIBRARY_VERSION, SCHEMA_VERSION, DeltaConfig, param
from deltatune.core.errors import ConfigError, UnknownMethodError
from deltatune.core.registry import config_from_dict, known_methods
from tests.reliability._files import saved_toy_delta
from tests.reliability._toy import toy


def test_unknown_method_lists_the_known_ones_and_suggests():
    with pytest.raises(UnknownMethodError, match=r"unknown method 'lorra'\. Did you mean "
                       r"'lora'\? Known methods: .*lora") as info:
        config_from_dict({"method": "lorra", "r": 8})
    assert info.value.field == "method"
    for name in known_methods():
        assert name in str(info.value)


def test_unknown_method_in_a_saved_file_keeps_its_type_and_names_the_file(tmp_path):
    directory = saved_toy_delta(tmp_path / "d")
    payload = json.loads((directory / "delta_config.json").read_text())
    payload["config"]["method"] = "not_a_method"
    (directory / "delta_config.json").write_text(json.dumps(payload))
    dt.core.io.write_manifest(directory)
    with pytest.raises(UnknownMethodError, match=r"delta_config\.json: unknown method "
                       r"'not_a_method'"):
        dt.load(toy(), directory)


@pytest.mark.parametrize("field", ["use_dora", "lora_dropuot", "layers_to_transform"])
def test_unknown_field_is_an_error_naming_it_never_dropped(field):
    with pytest.raises(ConfigError, match=rf"unknown field\(s\) for method 'lora': '{field}'"
                       r".*Known fields: .*lora_alpha") as info:
        dt.LoraConfig.from_dict({"method": "lora", "r": 4, field: True})
    assert info.value.field == field


def test_a_typo_gets_a_suggestion():
    with pytest.raises(ConfigError, match=r"'lora_dropuot' \(did you mean 'lora_dropout'\?\)"):
        dt.LoraConfig.from_dict({"method": "lora", "lora_dropuot": 0.1})


def test_newer_schema_or_library_is_refused():
    with pytest.raises(ConfigError, match=r"schema version 99.*upgrade deltatune"):
        dt.LoraConfig.from_dict({"method": "lora", "schema_version": 99})
    with pytest.raises(ConfigError, match=r"needs deltatune >= 99\.0"):
        dt.LoraConfig.from_dict({"method": "lora", "min_library_version": "99.0"})
    with pytest.raises(ConfigError, match="schema_version must be an integer"):
        dt.LoraConfig.from_dict({"method": "lora", "schema_version": "1"})


def test_newer_delta_format_is_refused(tmp_path):
    directory = saved_toy_delta(tmp_path / "d")
    payload = json.loads((directory / "delta_config.json").read_text())
    payload["format_version"] = 2
    (directory / "delta_config.json").write_text(json.dumps(payload))
    dt.core.io.write_manifest(directory)
    with pytest.raises(ConfigError, match=r"delta format version 2, newer than the 1"):
        dt.load(toy(), directory)


@pytest.mark.parametrize(("values", "field", "phrase"), [
    ({"r": "8"}, "r", r"LoraConfig\.r = '8' has the wrong type: expected int, got str"),
    ({"r": 8.0}, "r", "wrong type"),
    ({"r": True}, "r", "wrong type"),
    ({"r": 0}, "r", r"r = 0 is out of range: it must be >= 1"),
    ({"r": -3}, "r", "out of range"),
    ({"lora_dropout": 1.5}, "lora_dropout", r"lora_dropout = 1\.5 is out of range: it must be "
                                            r"< 1"),
    ({"lora_dropout": -0.1}, "lora_dropout", "out of range"),
    ({"lora_alpha": 0}, "lora_alpha", r"lora_alpha = 0 is out of range: it must be > 0"),
    ({"use_rslora": "yes"}, "use_rslora", "expected bool"),
    ({"init": "xavier"}, "init", r"expected 'kaiming' \| 'gaussian'"),
    ({"target_modules": 5}, "target_modules", "wrong type"),
    ({"target_modules": []}, "target_modules", "empty list"),
    ({"layers": [-1]}, "layers", "must be >= 0"),
    ({"rank_pattern": {"q_proj": "4"}}, "rank_pattern", "wrong type"),
])
def test_wrong_types_and_ranges_name_the_field(values, field, phrase):
    for build in (lambda: dt.LoraConfig(**values),
                  lambda: dt.LoraConfig.from_dict({"method": "lora", **values})):
        with pytest.raises(ConfigError, match=phrase) as info:
            build()
        assert info.value.field == field


@dataclasses.dataclass(kw_only=True)
class _NeedsWidth(DeltaConfig):
    method = "needs_width_probe"
    width: int = param(min=1, help="a required field (no default)")


def test_missing_required_field_is_named():
    with pytest.raises(ConfigError, match=r"_NeedsWidth: .*missing .*'width'"):
        _NeedsWidth.from_dict({"method": "needs_width_probe"})
    assert _NeedsWidth.from_dict({"method": "needs_width_probe", "width": 2}).width == 2


def test_configs_carry_schema_and_library_versions():
    data = dt.LoraConfig(r=4).to_dict()
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["min_library_version"] == LIBRARY_VERSION
    assert data["method"] == "lora"


def test_a_method_mismatch_is_refused():
    with pytest.raises(ConfigError, match="config says method 'other' but is being read as "
                       "'lora'"):
        dt.LoraConfig.from_dict({"method": "other"})
