"""Files: atomic directory saves with a manifest, and strict readers for JSON and safetensors.

A saved directory is written whole into a sibling temporary directory, every file is
fsynced, ``manifest.json`` (size and sha256 of every file) is written last, and only
then does the directory replace the old one, by an atomic exchange of the two
directory entries where the kernel offers it (``renameat2(RENAME_EXCHANGE)``). A reader
therefore sees the complete old directory or the complete new one; a directory whose
files disagree with its manifest is reported as corrupt, never half-used.

Nothing here unpickles: tensors are safetensors, everything else JSON.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import shutil
import struct
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load_bytes
from safetensors.torch import save as st_save_bytes

from deltatune.core.errors import AdapterFileCorrupt, UnsafeFileError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
MAX_HEADER_BYTES = 100 * 1024 * 1024
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

# Called with a stage name at each step of a save; tests use it to inject faults.
FAULT_HOOK: Callable[[str], None] | None = None


def _fault(stage: str) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(stage)


def sha256_file(path: str | Path) -> str:
    """Return the hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_durably(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it before returning."""
    path = Path(path)
    with open(path, "wb") as f:
        half = len(data) // 2
        f.write(data[:half])
        _fault(f"mid-write:{path.name}")
        f.write(data[half:])
        f.flush()
        os.fsync(f.fileno())
    _fault(f"written:{path.name}")


def write_json(path: str | Path, data: Any) -> None:
    """Write deterministic JSON (sorted keys) durably."""
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    write_bytes_durably(path, text.encode("utf-8"))


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> None:
    """Write tensors as safetensors (keys sorted, so equal inputs give equal bytes)."""
    ordered = {k: tensors[k].detach().to("cpu").contiguous() for k in sorted(tensors)}
    write_bytes_durably(path, _canonical_header(st_save_bytes(ordered, metadata=metadata)))


def _canonical_header(raw: bytes) -> bytes:
    """Return ``raw`` safetensors bytes with the JSON header keys sorted.

    safetensors writes ``__metadata__`` from a hash map, so its key order (and so the
    file's bytes) can change from one save to the next; sorting makes equal inputs give
    equal files (reliability row 10). The tensor data and its offsets are unchanged.
    """
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(text)) + text + raw[8 + n:]


# -- atomic directories ---------------------------------------------------------------
_libc = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directory entries; False when the platform cannot."""
    global _libc
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    renameat2 = getattr(_libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    res = renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)),
                    rename_exchange)
    if res != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EINVAL, errno.EPERM, errno.ENOTSUP):
            return False
        raise OSError(err, os.strerror(err), str(b))
    return True


def _temp_name(final: Path, tag: str) -> Path:
    return final.with_name(f"{final.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def collect_stale(final: str | Path) -> list[Path]:
    """Remove temporary siblings of ``final`` left by dead writers; return what was removed.

    If ``final`` itself is missing (a writer died between the two renames of the
    fallback path), the newest complete ``.old-`` sibling is put back first.
    """
    final = Path(final)
    removed: list[Path] = []
    if not final.parent.exists():
        return removed
    siblings = sorted(final.parent.glob(f"{final.name}.*-*-*"), key=lambda p: p.stat().st_mtime)
    for sib in siblings:
        tag, _, rest = sib.name[len(final.name) + 1:].partition("-")
        pid_text = rest.split("-")[0]
        if tag not in ("tmp", "old") or not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        if tag == "old" and not final.exists() and (sib / MANIFEST).exists():
            os.replace(sib, final)
            continue
        shutil.rmtree(sib, ignore_errors=True)
        removed.append(sib)
    return removed


_SPACE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _du(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


@contextmanager
def atomic_directory(final: str | Path, *, expected_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it replaces ``final`` atomically.

    The manifest is written last, after every file is on disk. On an exception the
    temporary directory is removed and ``final`` is untouched. A full disk or a
    read-only file system is reported with the space the save needs
    (``expected_bytes`` when the caller knows it).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    collect_stale(final)
    tmp = _temp_name(final, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        _fault("before-manifest")
        write_manifest(tmp)
        _fsync_path(tmp)
        _fault("before-swap")
        if final.exists():
            if _exchange(tmp, final):
                _fsync_path(final.parent)
                _fault("after-swap")
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                old = _temp_name(final, "old")
                os.replace(final, old)
                _fault("between-renames")
                os.replace(tmp, final)
                _fsync_path(final.parent)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
            _fsync_path(final.parent)
    except OSError as exc:
        written = _du(tmp) if tmp.exists() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno not in _SPACE_ERRORS:
            raise
        need = max(expected_bytes or 0, written)
        kept = f"the previous {final.name} is intact" if final.exists() else "nothing was saved"
        what = "read-only" if exc.errno == errno.EROFS else "out of space"
        raise OSError(exc.errno, f"{exc.strerror}: saving {final} failed ({what}); it needs "
                      f"about {need:,} bytes ({need / 2**20:.1f} MiB) free in {final.parent}; "
                      f"{kept}. Free space or choose another directory") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- manifest ---------------------------------------------------------------------------
def _files_under(root: Path) -> list[str]:
    out = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for fn in filenames:
            rel = os.path.relpath(os.path.join(dirpath, fn), root)
            if rel != MANIFEST:
                out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def write_manifest(root: str | Path) -> dict[str, Any]:
    """Write ``manifest.json`` listing size and sha256 of every other file; return it."""
    root = Path(root)
    files = {rel: {"size": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)}
             for rel in _files_under(root)}
    manifest = {"manifest_version": MANIFEST_VERSION, "files": files}
    write_json(root / MANIFEST, manifest)
    return manifest


def verify_manifest(root: str | Path) -> dict[str, Any]:
    """Check every file against ``manifest.json``; return the manifest.

    Raises :class:`AdapterFileCorrupt` for a missing manifest, a missing or extra-sized
    file, or a checksum mismatch (a flipped bit anywhere).
    """
    root = Path(root)
    manifest = read_json(root / MANIFEST, what="manifest")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise AdapterFileCorrupt(root / MANIFEST, "the manifest has no 'files' table")
    for rel, entry in files.items():
        path = root / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise AdapterFileCorrupt(root / MANIFEST, f"manifest names a path outside the "
                                     f"directory: {rel!r}")
        if not isinstance(entry, dict) or "size" not in entry or "sha256" not in entry:
            raise AdapterFileCorrupt(root / MANIFEST, f"bad manifest entry for {rel!r}")
        if path.is_symlink() and not _inside(path, root):
            raise AdapterFileCorrupt(path, "is a symbolic link to a file outside the "
                                     "directory", "replace the link by the file itself")
        if not path.is_file():
            raise AdapterFileCorrupt(path, "listed in the manifest but missing",
                                     "the save was interrupted; use an earlier copy")
        size = path.stat().st_size
        if size != entry["size"]:
            raise AdapterFileCorrupt(path, f"size is {size} bytes, the manifest says "
                                     f"{entry['size']} (truncated or overwritten)")
        if sha256_file(path) != entry["sha256"]:
            raise AdapterFileCorrupt(path, "sha256 differs from the manifest (the bytes were "
                                     "changed after saving)")
    return manifest


def _inside(path: Path, root: Path) -> bool:
    """True when ``path`` (links followed) lies inside directory ``root``."""
    try:
        path.resolve().relative_to(root.resolve())
    except (ValueError, OSError, RuntimeError):  # outside, or a link loop
        return False
    return True


# -- strict readers -------------------------------------------------------------------------
def _check_regular_file(path: Path, what: str) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise AdapterFileCorrupt(path, f"the {what} file is missing") from None
    except OSError as exc:  # ELOOP for a symlink loop, EACCES...
        raise AdapterFileCorrupt(path, f"cannot read the {what} file: {exc.strerror}") from None
    if not os.path.isfile(path) or (st.st_mode & 0o170000) != 0o100000:
        raise AdapterFileCorrupt(path, f"the {what} path is not a regular file")
    if path.suffix in PICKLE_SUFFIXES:
        raise UnsafeFileError(f"{path}: refusing a pickle-format file; deltatune reads only "
                              f"safetensors and JSON. Convert it with a trusted tool first.")


def read_json(path: str | Path, *, what: str = "JSON") -> dict[str, Any]:
    """Read a JSON object from ``path``; any defect is an :class:`AdapterFileCorrupt`."""
    path = Path(path)
    _check_regular_file(path, what)
    raw = path.read_bytes()
    if not raw:
        raise AdapterFileCorrupt(path, f"the {what} file is empty (0 bytes)")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise AdapterFileCorrupt(path, f"the {what} file is not valid UTF-8 ({exc.reason} at "
                                 f"byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise AdapterFileCorrupt(path, f"the {what} file is not valid JSON ({exc.msg}, line "
                                 f"{exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise AdapterFileCorrupt(path, f"the {what} file nests too deeply") from None
    if not isinstance(data, dict):
        raise AdapterFileCorrupt(path, f"the {what} file must hold a JSON object, not "
                                 f"{type(data).__name__}")
    return data


def _check_safetensors_header(path: Path, raw: bytes) -> dict[str, Any]:
    if len(raw) < 8:
        raise AdapterFileCorrupt(path, f"too short for safetensors ({len(raw)} bytes)")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if header_len > MAX_HEADER_BYTES or header_len > len(raw) - 8:
        raise AdapterFileCorrupt(path, f"header length {header_len} exceeds the file "
                                 f"({len(raw)} bytes): truncated or corrupted")
    try:
        header = json.loads(raw[8:8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFileCorrupt(path, f"safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise AdapterFileCorrupt(path, "safetensors header is not a JSON object")
    data_len = len(raw) - 8 - header_len
    end_max = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict) or not isinstance(info.get("data_offsets"), list):
            raise AdapterFileCorrupt(path, f"tensor {key!r} has a malformed header entry")
        start, end = info["data_offsets"]
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
            raise AdapterFileCorrupt(path, f"tensor {key!r} has invalid offsets")
        end_max = max(end_max, end)
    if end_max != data_len:
        raise AdapterFileCorrupt(path, f"tensor data ends at byte {end_max} but the file holds "
                                 f"{data_len} data bytes: truncated or padded")
    return header


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file strictly; return (tensors, metadata).

    Every structural defect becomes :class:`AdapterFileCorrupt` naming the file.
    """
    path = Path(path)
    _check_regular_file(path, "weights")
    raw = path.read_bytes()
    header = _check_safetensors_header(path, raw)
    try:
        tensors = st_load_bytes(raw)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterFileCorrupt(path, f"safetensors could not decode it ({exc})") from None
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise AdapterFileCorrupt(path, "safetensors metadata is not a JSON object")
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def refuse_pickles(directory: str | Path) -> None:
    """Raise :class:`UnsafeFileError` if ``directory`` holds only pickle-format weights."""
    directory = Path(directory)
    pickles = sorted(p.name for p in directory.glob("*") if p.suffix in PICKLE_SUFFIXES)
    has_safe = any(directory.glob("*.safetensors"))
    if pickles and not has_safe:
        raise UnsafeFileError(
            f"{directory} holds only pickle-format weights ({', '.join(pickles)}); deltatune "
            f"never unpickles a user's file. Convert them to safetensors with a trusted tool.")


def refuse_pickle_files(directory: str | Path) -> None:
    """Raise :class:`UnsafeFileError` if ``directory`` holds any pickle-format file.

    Used for directories deltatune wrote itself (deltas, checkpoints), which never
    contain one: a ``.bin``/``.pt`` there was planted or left by another tool, and is
    refused rather than silently skipped.
    """
    directory = Path(directory)
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeFileError(
            f"{directory} holds pickle-format file(s) ({', '.join(pickles)}) that deltatune "
            f"never writes and never unpickles; they can run code when loaded. Remove them "
            f"(or convert them to safetensors with a trusted tool) and load again.")
