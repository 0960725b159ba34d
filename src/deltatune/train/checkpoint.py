"""Training checkpoints: atomic, checksummed, pickle-free, complete enough for exact resume.

A checkpoint is a directory ``<output_dir>/checkpoints/step-00000012`` (or
``step-00000012-micro-3`` when it was taken in the middle of a gradient-accumulation
window, after 3 of its micro-batches) holding:

=========================  ===============================================================
``trainable.safetensors``  every trainable parameter, by its name in the model
``grads.safetensors``      accumulated gradients (only mid-window checkpoints)
``optimizer.json/.st``     the optimizer's ``state_dict`` (structure in JSON, tensors in
                           ``optimizer.safetensors``)
``rng.json/.safetensors``  Python, NumPy, torch CPU and CUDA generator states
``callbacks.json/.st``     the method callbacks' ``state_dict`` (AdaLoRA's budget, ...)
``trainer_state.json``     step, micro-batch, config, data fingerprint, loss/eval history,
                           best metric, early-stopping counter, skipped steps, grad scaler
``manifest.json``          size and sha256 of every file above, written last
=========================  ===============================================================

It is written with :func:`deltatune.core.io.atomic_directory`: a reader sees a complete
checkpoint or none. :func:`find_resumable` checks manifests newest first and skips torn
checkpoints, saying why. Nothing is pickled: any state is split into JSON (structure,
numbers, strings) and safetensors (tensors) by :func:`encode_state`.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deltatune.core import io
from deltatune.core.errors import AdapterFileCorrupt, DeltaTuneError

logger = logging.getLogger("deltatune.train")

FORMAT_NAME = "deltatune.checkpoint"
FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
GRADS_FILE = "grads.safetensors"
PARTS = ("optimizer", "rng", "callbacks")  # each a .json + .safetensors pair
_NAME = re.compile(r"^step-(\d{8})(?:-micro-(\d+))?$")


class ResumeError(DeltaTuneError, RuntimeError):
    """A checkpoint cannot be resumed: missing state, changed settings or different data."""


# -- pickle-free state encoding -----------------------------------------------------------------
def encode_state(obj: Any, tensors: dict[str, torch.Tensor], path: str = "s") -> Any:
    """Return a JSON-able copy of ``obj`` with tensors moved into ``tensors``.

    Tensors become ``{"__tensor__": key}``; tuples ``{"__tuple__": [...]}``; dicts whose
    keys are not all strings ``{"__items__": [[key, value], ...]}``; NumPy arrays
    ``{"__ndarray__": [...], "dtype": ...}``. Anything else that JSON cannot hold is an
    error naming where it was found.
    """
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not ({"__tensor__", "__tuple__", "__items__",
                                                          "__ndarray__"} & set(obj)):
            return {k: encode_state(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__items__": [[encode_state(k, tensors, f"{path}.k{i}"),
                               encode_state(v, tensors, f"{path}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_state(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path} in a checkpoint (only "
                    f"tensors, arrays, numbers, strings, lists, tuples and dicts)")


def decode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_state`."""
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        key = obj["__tensor__"]
        if key not in tensors:
            raise KeyError(f"tensor {key!r} is missing from the checkpoint")
        return tensors[key]
    if "__tuple__" in obj:
        return tuple(decode_state(v, tensors) for v in obj["__tuple__"])
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    if "__items__" in obj:
        return {decode_state(k, tensors): decode_state(v, tensors) for k, v in obj["__items__"]}
    return {k: decode_state(v, tensors) for k, v in obj.items()}


def _write_part(directory: Path, name: str, state: Any) -> None:
    tensors: dict[str, torch.Tensor] = {}
    encoded = encode_state(state, tensors)
    io.save_tensors(directory / f"{name}.safetensors", tensors)
    io.write_json(directory / f"{name}.json", {"state": encoded})


def _read_part(directory: Path, name: str) -> Any:
    tensors, _ = io.load_tensors(directory / f"{name}.safetensors")
    encoded = io.read_json(directory / f"{name}.json", what=f"{name} state")
    try:
        return decode_state(encoded["state"], tensors)
    except KeyError as exc:
        raise AdapterFileCorrupt(directory / f"{name}.json", str(exc)) from None


# -- random generators ---------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Return the state of every global random generator training touches."""
    import random

    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generators saved by :func:`rng_state`."""
    import random

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- locating checkpoints --------------------------------------------------------------------
def checkpoint_name(step: int, micro: int = 0) -> str:
    """Directory name of a checkpoint after ``step`` optimizer steps + ``micro`` micro-batches."""
    return f"step-{step:08d}" + (f"-micro-{micro}" if micro else "")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Return checkpoint directories under ``output_dir``, oldest first (by step, micro)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir():
            found.append(((int(m.group(1)), int(m.group(2) or 0)), p))
    return [p for _, p in sorted(found)]


def check_checkpoint(path: str | Path, *, partial: bool = False) -> dict[str, Any]:
    """Verify a checkpoint (manifest, every part present); return its trainer state.

    Raises :class:`AdapterFileCorrupt` naming the defect. With ``partial`` the optional
    parts (optimizer, random generators, callbacks) may be missing, but every file that
    is present must match the manifest, and the parameters, the trainer state and (for
    a mid-step checkpoint) the gradients must be there.
    """
    path = Path(path)
    if partial:
        manifest = io.read_json(path / io.MANIFEST, what="manifest")
        for rel, entry in (manifest.get("files") or {}).items():
            f = path / rel
            if not f.is_file():
                continue
            if f.stat().st_size != entry.get("size") or io.sha256_file(f) != entry.get("sha256"):
                raise AdapterFileCorrupt(f, "size or sha256 differs from the manifest")
    else:
        io.verify_manifest(path)
    state = io.read_json(path / STATE_FILE, what="trainer state")
    if state.get("format") != FORMAT_NAME:
        raise AdapterFileCorrupt(path / STATE_FILE, f"not a deltatune checkpoint (format "
                                 f"{state.get('format')!r})")
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterFileCorrupt(path / STATE_FILE, f"written by a newer deltatune (format "
                                 f"version {state['format_version']})", "upgrade deltatune")
    needed = [TRAINABLE_FILE] + ([] if partial else
                                 [f"{p}.{ext}" for p in PARTS for ext in ("json", "safetensors")])
    if state.get("micro", 0):
        needed.append(GRADS_FILE)
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        raise AdapterFileCorrupt(path, f"missing {', '.join(missing)}",
                                 "resume from an earlier checkpoint")
    return state


def missing_parts(path: str | Path) -> list[str]:
    """Names of the optional parts (optimizer, rng, callbacks) absent from a checkpoint."""
    path = Path(path)
    return [p for p in PARTS if not all((path / f"{p}.{ext}").is_file()
                                        for ext in ("json", "safetensors"))]


def find_resumable(output_dir: str | Path) -> tuple[Path | None, list[str]]:
    """Return (newest complete checkpoint or None, notes on the torn ones that were skipped)."""
    skipped: list[str] = []
    for path in reversed(list_checkpoints(output_dir)):
        try:
            check_checkpoint(path)
        except AdapterFileCorrupt as exc:
            why = f"{Path(exc.path).name}: {exc.reason}"
            skipped.append(f"skipped {path.name} ({why})")
            logger.warning("skipping torn checkpoint %s (%s)", path, why)
            continue
        return path, skipped
    return None, skipped


# -- writing and reading ------------------------------------------------------------------------
@dataclass
class CheckpointData:
    """Everything a checkpoint holds, in memory."""

    state: dict[str, Any]
    trainable: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor] | None
    optimizer: Any
    rng: dict[str, Any]
    callbacks: list[Any]


def write_checkpoint(path: str | Path, data: CheckpointData) -> Path:
    """Write ``data`` atomically at ``path``; refuse (write nothing) if a tensor is non-finite.

    Returns ``path``.
    """
    from deltatune.core.errors import NonFiniteError

    path = Path(path)
    for what, group in (("parameter", data.trainable), ("gradient", data.grads or {})):
        for name, t in group.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise NonFiniteError(f"{what} {name!r} holds NaN/inf; refusing to write "
                                     f"checkpoint {path.name}. Nothing was written.")
    state = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **data.state}
    with io.atomic_directory(path) as tmp:
        io.save_tensors(tmp / TRAINABLE_FILE, data.trainable)
        if data.grads is not None:
            io.save_tensors(tmp / GRADS_FILE, data.grads)
        _write_part(tmp, "optimizer", data.optimizer)
        _write_part(tmp, "rng", data.rng)
        _write_part(tmp, "callbacks", data.callbacks)
        io.write_json(tmp / STATE_FILE, state)
    return path


def read_checkpoint(path: str | Path, *, partial: bool = False) -> CheckpointData:
    """Verify and read a checkpoint written by :func:`write_checkpoint`.

    With ``partial``, missing optional parts come back as None (see
    :func:`check_checkpoint`).
    """
    path = Path(path)
    state = check_checkpoint(path, partial=partial)
    absent = set(missing_parts(path)) if partial else set()
    trainable, _ = io.load_tensors(path / TRAINABLE_FILE)
    grads = io.load_tensors(path / GRADS_FILE)[0] if state.get("micro", 0) else None

    def part(name: str) -> Any:
        return None if name in absent else _read_part(path, name)

    return CheckpointData(state=state, trainable=trainable, grads=grads,
                          optimizer=part("optimizer"), rng=part("rng"),
                          callbacks=part("callbacks"))


def prune(output_dir: str | Path, keep: int, protect: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (never ``protect``); return the deleted."""
    paths = list_checkpoints(output_dir)
    doomed = [p for p in paths[:-keep] if protect is None or p != protect] if keep else paths
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed
