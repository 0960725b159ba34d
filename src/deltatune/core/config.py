"""Configuration base class: typed dataclasses with strict validation and a JSON round trip.

Each method declares one ``@dataclass`` subclass of :class:`DeltaConfig`. Field types
come from the annotations and are checked exactly (``r="8"`` is an error, not 8); extra
constraints live in the field's metadata, declared with :func:`param`. Loading a dict
with a field the class does not know is an error that lists the known fields, because a
dropped field can silently change what a delta computes.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, get_args, get_origin

from deltatune.core.errors import ConfigError

LIBRARY_VERSION = "0.1.0"
# Bumped when a saved config's meaning changes in a way older versions cannot read.
SCHEMA_VERSION = 1

# Keys written next to the fields; they describe the file, not the delta.
ENVELOPE_KEYS = ("method", "schema_version", "min_library_version", "library_version")

C = TypeVar("C", bound="DeltaConfig")
_MISSING = dataclasses.MISSING


def param(
    default: Any = _MISSING,
    *,
    default_factory: Any = _MISSING,
    min: float | None = None,
    max: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
    help: str = "",
) -> Any:
    """Declare a config field with range constraints and a help text.

    Returns a ``dataclasses.field`` whose metadata the validator reads.
    """
    metadata = {"min": min, "max": max, "gt": gt, "lt": lt, "help": help}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _describe(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_describe(a) for a in get_args(annotation))
    if origin is not None:
        inner = ", ".join(_describe(a) for a in get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _conforms(value: Any, annotation: Any) -> bool:
    """True when ``value`` has exactly the annotated type (bool is not an int here)."""
    if annotation is Any:
        return True
    origin = get_origin(annotation)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation in (str, bool):
        return type(value) is annotation
    if origin in (list, tuple):
        (item,) = get_args(annotation)[:1] or (Any,)
        return isinstance(value, (list, tuple)) and all(_conforms(v, item) for v in value)
    if origin is dict:
        key_type, value_type = get_args(annotation)
        return isinstance(value, dict) and all(
            _conforms(k, key_type) and _conforms(v, value_type) for k, v in value.items()
        )
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


@dataclasses.dataclass(kw_only=True)
class DeltaConfig:
    """Base of every method's configuration.

    ``modules_to_save`` names extra base modules (a task head, say) that are trained
    fully and saved with the delta.
    """

    method: ClassVar[str] = ""

    modules_to_save: list[str] = param(
        default_factory=list, help="extra modules trained in full and saved with the delta"
    )

    def __post_init__(self) -> None:
        self.validate()

    # -- validation -------------------------------------------------------------------
    def validate(self) -> None:
        """Check every field's type and range; raise :class:`ConfigError` naming the field."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            annotation = hints[f.name]
            if not _conforms(value, annotation):
                raise ConfigError(
                    f"{type(self).__name__}.{f.name} = {value!r} has the wrong type: expected "
                    f"{_describe(annotation)}, got {type(value).__name__}.",
                    field=f.name,
                )
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._check_range(f, value)
            # Normalise tuples to lists so JSON round trips are the identity.
            if isinstance(value, tuple):
                object.__setattr__(self, f.name, list(value))
        self.check()

    def _check_range(self, f: dataclasses.Field, value: float) -> None:
        meta = f.metadata
        bounds = [
            ("min", lambda v, b: v >= b, ">="),
            ("max", lambda v, b: v <= b, "<="),
            ("gt", lambda v, b: v > b, ">"),
            ("lt", lambda v, b: v < b, "<"),
        ]
        for key, ok, symbol in bounds:
            bound = meta.get(key)
            if bound is not None and not ok(value, bound):
                raise ConfigError(
                    f"{type(self).__name__}.{f.name} = {value!r} is out of range: it must be "
                    f"{symbol} {bound}.",
                    field=f.name,
                )

    def check(self) -> None:
        """Cross-field checks of a subclass; the default has none."""

    # -- serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready dict: envelope keys (method, versions) and every field."""
        out: dict[str, Any] = {
            "method": self.method,
            "schema_version": SCHEMA_VERSION,
            "min_library_version": LIBRARY_VERSION,
        }
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json(self) -> str:
        """Return the config as deterministic, indented JSON text."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def field_names(cls) -> list[str]:
        """Return the names of the fields this config accepts."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build a config from a dict; unknown fields and newer schemas are errors.

        Returns the validated config.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"a {cls.__name__} must be a JSON object, got {type(data).__name__}")
        method = data.get("method", cls.method)
        if method != cls.method:
            raise ConfigError(
                f"config says method {method!r} but is being read as {cls.method!r}",
                field="method",
            )
        check_versions(data)
        known = cls.field_names()
        values = {k: v for k, v in data.items() if k not in ENVELOPE_KEYS}
        unknown = sorted(set(values) - set(known))
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, known, n=1)
                hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(
                f"unknown field(s) for method {cls.method!r}: {', '.join(hints)}. "
                f"Known fields: {', '.join(known)}. Remove the field or upgrade deltatune.",
                field=unknown[0],
            )
        try:
            return cls(**values)
        except TypeError as exc:  # a required field is missing
            raise ConfigError(f"{cls.__name__}: {exc}") from None

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        """Parse JSON text into a config (see :meth:`from_dict`)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def replace(self: C, **changes: Any) -> C:
        """Return a copy with some fields changed, validated again."""
        return dataclasses.replace(self, **changes)

    def save(self, path: str | Path) -> None:
        """Write the config as JSON to ``path``."""
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in str(text).split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_versions(data: dict[str, Any]) -> None:
    """Refuse a config written for a newer schema or a newer library than this one."""
    schema = data.get("schema_version", SCHEMA_VERSION)
    if not isinstance(schema, int) or isinstance(schema, bool):
        raise ConfigError(f"schema_version must be an integer, got {schema!r}",
                          field="schema_version")
    if schema > SCHEMA_VERSION:
        raise ConfigError(
            f"this config uses schema version {schema}, newer than the {SCHEMA_VERSION} this "
            f"deltatune ({LIBRARY_VERSION}) reads; upgrade deltatune to load it.",
            field="schema_version",
        )
    needed = data.get("min_library_version")
    if needed is not None and _version_tuple(needed) > _version_tuple(LIBRARY_VERSION):
        raise ConfigError(
            f"this config needs deltatune >= {needed}; this is {LIBRARY_VERSION}. Upgrade "
            f"deltatune to load it.",
            field="min_library_version",
        )


@dataclasses.dataclass(kw_only=True)
class TargetedConfig(DeltaConfig):
    """Config of a delta attached to selected modules (see :mod:`deltatune.core.targets`).

    ``target_modules``: a list of module names or name suffixes (``"q_proj"`` matches
    ``model.layers.0.self_attn.q_proj``; an entry starting with ``re:`` is a regular
    expression matched against the full name), a single regular expression string, or
    ``"all-linear"``. ``None`` takes the method's default for the architecture.
    ``layers`` keeps only modules in those transformer layers (0-based).
    """

    target_modules: list[str] | str | None = param(
        None, help="module names, suffixes, 're:' regexes, a regex string, or 'all-linear'"
    )
    exclude_modules: list[str] | None = param(None, help="names or suffixes to leave out")
    layers: list[int] | None = param(None, help="keep only these layer indices (0-based)")

    def check(self) -> None:
        super().check()
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ConfigError("target_modules is an empty list; name at least one module "
                              "or use None for the method's default", field="target_modules")
        if self.layers is not None and any(i < 0 for i in self.layers):
            raise ConfigError(f"layers must be >= 0, got {self.layers}", field="layers")
