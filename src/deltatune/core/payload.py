"""Structure check of a saved delta's ``delta_config.json`` before anything reads it.

The file is JSON a user may have edited or been handed, so every value used later is
checked for its type here: a hostile or damaged file is one :class:`AdapterFileCorrupt`
naming the key, never an ``AttributeError`` deep inside loading. Unknown top-level keys
are refused too (a key a newer format added may change what the delta means); a
module that adds a key to what ``save_delta`` writes adds it to :data:`PAYLOAD_KEYS`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deltatune.core.errors import AdapterFileCorrupt, ConfigError

# Top-level key -> accepted JSON types (None: any JSON value).
PAYLOAD_KEYS: dict[str, tuple[type, ...] | None] = {
    "format": (str,),
    "format_version": (int,),
    "library_version": (str,),
    "name": (str, type(None)),
    "config": (dict,),
    "dtype": (str, list, type(None)),
    "base_model": (dict,),
    "parameters": (int,),
    "base_parameters": (int,),
    "card": (dict,),
}
# Keys of the ``base_model`` fingerprint -> accepted types.
FINGERPRINT_KEYS: dict[str, tuple[type, ...]] = {
    "model_type": (str,),
    "class": (str,),
    "architecture": (dict,),
    "architecture_sha256": (str,),
    "target_shapes": (dict,),
    "weight_dtype": (str,),
    "weight_samples": (dict,),
}


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_payload(path: str | Path, payload: dict[str, Any], *, format_name: str,
                  format_version: int) -> None:
    """Raise if ``payload`` (a parsed delta_config.json) is not structurally valid.

    :class:`AdapterFileCorrupt` for wrong types and malformed fingerprints,
    :class:`ConfigError` for unknown keys and a newer format version. Returns None.
    """
    fmt = payload.get("format")
    if fmt != format_name or not isinstance(payload.get("config"), dict):
        raise AdapterFileCorrupt(path, f"not a deltatune delta config (format {fmt!r})")
    version = payload.get("format_version", format_version)
    if not _is_int(version):
        raise AdapterFileCorrupt(path, f"format_version must be an integer, got {version!r}")
    if version > format_version:
        raise ConfigError(f"{path}: written in delta format version {version}, newer than the "
                          f"{format_version} this deltatune reads; upgrade deltatune to load it.",
                          field="format_version")
    unknown = sorted(set(payload) - set(PAYLOAD_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(map(repr, unknown))}; "
                          f"known keys: {', '.join(PAYLOAD_KEYS)}. A key this version does not "
                          f"know may change the delta's meaning, so it is not ignored; upgrade "
                          f"deltatune or remove the key.", field=unknown[0])
    for key, types in PAYLOAD_KEYS.items():
        if key in payload and types is not None and (
                not isinstance(payload[key], types) or isinstance(payload[key], bool)):
            raise AdapterFileCorrupt(path, f"key {key!r} must be "
                                     f"{' or '.join(_kind_name(t) for t in types)}, found "
                                     f"{_kind(payload[key])}")
    _check_fingerprint(path, payload.get("base_model") or {})


def _kind_name(t: type) -> str:
    return {dict: "an object", list: "a list", str: "a string", int: "an integer",
            type(None): "null"}.get(t, t.__name__)


def _check_fingerprint(path: str | Path, base: dict[str, Any]) -> None:
    for key, types in FINGERPRINT_KEYS.items():
        if key in base and not isinstance(base[key], types):
            raise AdapterFileCorrupt(path, f"base_model.{key} must be {_kind_name(types[0])}, "
                                     f"found {_kind(base[key])}")
    for name, shape in (base.get("target_shapes") or {}).items():
        if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
            raise AdapterFileCorrupt(path, f"base_model.target_shapes[{name!r}] must be a list "
                                     f"of non-negative integers, found {shape!r}")
    for name, values in (base.get("weight_samples") or {}).items():
        if not (isinstance(values, list) and all(_is_number(v) for v in values)):
            raise AdapterFileCorrupt(path, f"base_model.weight_samples[{name!r}] must be a list "
                                     f"of numbers")
    for key, value in (base.get("architecture") or {}).items():
        if not isinstance(value, (int, float, str, bool)):
            raise AdapterFileCorrupt(path, f"base_model.architecture[{key!r}] must be a number, "
                                     f"string or boolean, found {_kind(value)}")
