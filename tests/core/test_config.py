"""Config validation and JSON round trips (strict fields, typed errors)."""

from __future__ import annotations

import json

import pytest

import deltatune as dt
from deltatune.core.config import SCHEMA_VERSION
from deltatune.core.errors import ConfigError, UnknownMethodError


def test_round_trip_is_identity():
    cfg = dt.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"], layers=[0],
                        rank_pattern={"v_proj": 2})
    again = dt.config_from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    assert again.to_json() == cfg.to_json()


@pytest.mark.parametrize(("field", "value", "phrase"), [
    ("r", "8", "expected int"),
    ("r", 8.0, "expected int"),
    ("r", True, "expected int"),
    ("r", 0, ">= 1"),
    ("lora_dropout", 1.5, "< 1.0"),
    ("lora_alpha", -1.0, "> 0"),
    ("init", "xavier", "'kaiming' | 'gaussian'"),
    ("target_modules", 3, "list[str] | str | None"),
])
def test_bad_values_name_the_field(field, value, phrase):
    with pytest.raises(ConfigError, match=phrase) as info:
        dt.LoraConfig(**{field: value})
    assert info.value.field == field
    assert field in str(info.value)


def test_unknown_field_is_an_error_with_suggestion():
    data = dt.LoraConfig().to_dict()
    data["lora_alpah"] = 16
    with pytest.raises(ConfigError,
                       match=r"unknown field.*'lora_alpah'.*did you mean 'lora_alpha'"):
        dt.config_from_dict(data)


def test_unknown_method_lists_known_ones():
    with pytest.raises(UnknownMethodError, match=r"unknown method 'lroa'.*Did you mean 'lora'.*"
                                                 r"Known methods: .*lora"):
        dt.config_from_dict({"method": "lroa"})
    with pytest.raises(UnknownMethodError, match="needs a 'method' key"):
        dt.config_from_dict({"r": 8})


def test_newer_schema_and_library_are_refused():
    data = dt.LoraConfig().to_dict()
    with pytest.raises(ConfigError, match="upgrade deltatune"):
        dt.config_from_dict({**data, "schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(ConfigError, match="needs deltatune >= 99.0"):
        dt.config_from_dict({**data, "min_library_version": "99.0"})


def test_float_fields_accept_ints_and_tuples_become_lists():
    cfg = dt.LoraConfig(lora_alpha=16, target_modules=("q_proj", "v_proj"))
    assert cfg.lora_alpha == 16 and cfg.target_modules == ["q_proj", "v_proj"]


def test_empty_target_list_is_an_error():
    with pytest.raises(ConfigError, match="empty list"):
        dt.LoraConfig(target_modules=[])
