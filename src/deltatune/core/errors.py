"""Typed errors. Every error a user can cause says what went wrong and what to do.

All inherit from :class:`DeltaTuneError`, so ``except DeltaTuneError`` catches anything
deltatune raises on purpose. Where a built-in exception family fits (bad values are
``ValueError``s, missing files ``FileNotFoundError``s) the error inherits from it too, so
code written against plain Python exceptions keeps working.
"""

from __future__ import annotations

from pathlib import Path


class DeltaTuneError(Exception):
    """Base class of every error deltatune raises on purpose."""


class ConfigError(DeltaTuneError, ValueError):
    """A delta configuration is invalid: unknown or mistyped field, value out of range."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class UnknownMethodError(ConfigError):
    """A method name that is not registered."""


class TargetError(DeltaTuneError, ValueError):
    """Target selection failed: a pattern matched nothing, or matched an unsupported module."""


class HyperparameterError(ConfigError):
    """A hyperparameter does not fit the actual layer it is applied to (e.g. rank > dims)."""


class DeltaStateError(DeltaTuneError, RuntimeError):
    """An operation does not fit the current state (unknown delta name, already merged...)."""


class AdapterFileCorrupt(DeltaTuneError, ValueError):
    """A saved file is damaged: truncated, flipped bytes, bad JSON, wrong checksum...

    Attributes ``path``, ``reason`` and ``hint`` are kept separately so tools can show them.
    """

    def __init__(self, path: str | Path, reason: str, hint: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        self.hint = hint or "re-save the delta from its source, or restore the file from a backup"
        super().__init__(f"{self.path}: {reason}. Fix: {self.hint}.")


class StrictLoadError(DeltaTuneError, ValueError):
    """Saved tensors do not match what the model expects (extra, missing, mis-shaped keys)."""

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report


class BaseModelMismatchError(DeltaTuneError, ValueError):
    """A delta was saved for a different base model than the one it is being loaded onto."""


class NonFiniteError(DeltaTuneError, FloatingPointError):
    """NaN or infinity found where it would silently destroy results."""


class MergeError(DeltaTuneError, RuntimeError):
    """A merge was refused or failed; the base weights were left untouched."""


class UnsafeFileError(DeltaTuneError, ValueError):
    """A file format that can execute code (pickle) was refused."""


class DataError(DeltaTuneError, ValueError):
    """Training or evaluation data is empty, malformed or inconsistent."""


class ModelNotAvailableError(DeltaTuneError, FileNotFoundError):
    """A built-in model whose package is not installed, or a path that holds no model."""
