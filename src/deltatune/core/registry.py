"""The method registry: method name -> the class that attaches it (and its config class).

Adding a method is one new file under ``deltatune/methods/`` that defines a config
and a :class:`DeltaMethod` subclass, plus one line in ``deltatune/methods/__init__.py``
that registers it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from deltatune.core.config import DeltaConfig
from deltatune.core.errors import DeltaStateError, UnknownMethodError

if TYPE_CHECKING:
    from collections.abc import Iterator


@dataclass
class AttachedDelta:
    """One named delta living in a model.

    ``parts`` maps a location (a module path in the wrapped model, ``""`` for the model
    itself) to the ``nn.Module`` that holds this delta's tensors there. Saved tensor keys
    are ``f"{location}.{tensor_name}"`` and never contain the delta's name, so renaming a
    delta does not change its files.
    """

    name: str
    config: DeltaConfig
    method: DeltaMethod
    parts: dict[str, nn.Module]
    trainable: bool = True
    merged: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    def named_tensors(self) -> Iterator[tuple[str, Any]]:
        """Yield (saved key, tensor) for every parameter and persistent buffer of the delta."""
        for location, part in self.parts.items():
            for key, tensor in part.state_dict(keep_vars=True).items():
                yield (f"{location}.{key}" if location else key), tensor

    def parameters(self) -> list[nn.Parameter]:
        """Return this delta's parameters (deduplicated, in a stable order)."""
        seen: dict[int, nn.Parameter] = {}
        for part in self.parts.values():
            for p in part.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())


class DeltaMethod:
    """How a method attaches its tensors to a model and takes them away again.

    Subclasses set ``name`` and ``config_cls`` and implement :meth:`attach`. The class
    flags declare the method's contract; the test-suite enforces them for every
    registered method.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[DeltaConfig]] = DeltaConfig
    # Output equals the base model's bit for bit right after attach.
    identity_at_init: ClassVar[bool] = True
    # merge()/unmerge() fold the delta into the base weights.
    mergeable: ClassVar[bool] = False
    # A batch may route each row through a different delta of this method.
    supports_per_row: ClassVar[bool] = False
    # One-line description for `deltatune methods` and docs.
    summary: ClassVar[str] = ""
    # The delta's tensors are the base model's own parameters (full fine-tuning): they
    # count as base parameters, not as extra ones.
    trains_base: ClassVar[bool] = False

    def attach(self, model: nn.Module, name: str, config: DeltaConfig) -> dict[str, nn.Module]:
        """Create the delta's tensors inside ``model``; return location -> module holding them."""
        raise NotImplementedError

    def detach(self, model: nn.Module, delta: AttachedDelta) -> None:
        """Remove every trace of ``delta`` from ``model``."""
        raise NotImplementedError

    def set_active(self, model: nn.Module, delta: AttachedDelta, active: bool) -> None:
        """Switch the delta on or off in the forward pass."""
        raise NotImplementedError

    def set_disabled(self, model: nn.Module, delta: AttachedDelta, disabled: bool) -> None:
        """Bypass the delta while ``disabled`` (for the ``disabled()`` context)."""
        self.set_active(model, delta, not disabled)

    def extra_loss(self, model: nn.Module, delta: AttachedDelta) -> Any:
        """Return a regulariser added to the training loss (a scalar tensor), or None."""
        return None

    def training_callbacks(self, model: nn.Module, delta: AttachedDelta) -> list[Any]:
        """Return the :class:`~deltatune.core.callbacks.StepCallback` objects training needs."""
        return []

    def saved_tensors(self, model: nn.Module, delta: AttachedDelta) -> dict[str, Any]:
        """Return the tensors a save writes, by saved key (default: every delta tensor)."""
        return dict(delta.named_tensors())

    def load_saved_tensors(self, model: nn.Module, delta: AttachedDelta,
                           tensors: dict[str, Any]) -> None:
        """Copy saved tensors (already checked against :meth:`saved_tensors`) into the delta."""
        import torch

        targets = self.saved_tensors(model, delta)
        with torch.no_grad():
            for key, value in tensors.items():
                targets[key].copy_(value.to(targets[key].device, targets[key].dtype))

    def saved_config(self, delta: AttachedDelta) -> DeltaConfig:
        """Return the config written next to the saved tensors (default: the delta's own)."""
        return delta.config

    def merge(self, model: nn.Module, delta: AttachedDelta, *, check: bool,
              keep_original: bool, allow_lossy: bool = False) -> None:
        """Fold the delta into the base weights (``allow_lossy``: also quantized ones)."""
        raise DeltaStateError(f"method {self.name!r} cannot be merged into the base weights: "
                              f"its delta is not a change of existing weights")

    def release(self, model: nn.Module, delta: AttachedDelta) -> None:
        """Drop what the method added to ``model`` outside the layers it wraps (hooks...),
        keeping the merged weights; called by ``merge_and_unload``. Default: nothing."""

    def unmerge(self, model: nn.Module, delta: AttachedDelta) -> None:
        """Take a merged delta back out of the base weights."""
        raise DeltaStateError(f"method {self.name!r} has nothing merged")


_REGISTRY: dict[str, type[DeltaMethod]] = {}


def register(method_cls: type[DeltaMethod]) -> type[DeltaMethod]:
    """Register a method class under its ``name``; returns the class (usable as decorator)."""
    name = method_cls.name
    if not name:
        raise ValueError(f"{method_cls.__name__} has no name")
    if name in _REGISTRY and _REGISTRY[name] is not method_cls:
        raise ValueError(f"method {name!r} is registered twice")
    if method_cls.config_cls.method != name:
        raise ValueError(f"{method_cls.__name__}.config_cls.method must be {name!r}")
    _REGISTRY[name] = method_cls
    return method_cls


def _ensure_loaded() -> None:
    # Importing the package runs its registry lines.
    import deltatune.methods  # noqa: F401


def known_methods() -> list[str]:
    """Return the sorted names of all registered methods."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def get_method(name: str) -> DeltaMethod:
    """Return a fresh instance of the method registered as ``name``."""
    _ensure_loaded()
    try:
        return _REGISTRY[name]()
    except KeyError:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownMethodError(
            f"unknown method {name!r}.{hint} Known methods: {', '.join(sorted(_REGISTRY))}.",
            field="method",
        ) from None


def config_class(name: str) -> type[DeltaConfig]:
    """Return the config class of method ``name``."""
    return type(get_method(name)).config_cls


def config_from_dict(data: dict[str, Any]) -> DeltaConfig:
    """Build the right config class from a dict carrying a ``method`` key."""
    if not isinstance(data, dict) or "method" not in data:
        raise UnknownMethodError("a delta config needs a 'method' key naming the method; known "
                                 f"methods: {', '.join(known_methods())}", field="method")
    return config_class(data["method"]).from_dict(data)
