"""What the launchers of separate-process federations share (``process`` and
``deployment`` modes): free ports, waiting for a server, following the rounds a server
records in its output folder, and reading the result back.

A server replaces ``records.json`` (the :class:`RoundRecord` list), ``rounds.json`` (the
raw per-round log) and ``global.safetensors`` in its folder, each atomically.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deltatune.federated.recorder import FederationResult


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def write_json(path: Path, body: Any) -> None:
    """Replace ``path`` with ``body`` as JSON atomically."""
    write_atomic(path, json.dumps(body, indent=2).encode())


def free_port() -> int:
    """Return a TCP port on localhost that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, server: subprocess.Popen, log_path: Path,
                   limit: float = 300.0) -> None:
    """Return once something listens on ``port``; raise ``RuntimeError`` with the tail of
    ``server``'s log if it exits first, or after ``limit`` seconds."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if server.poll() is not None:
            raise RuntimeError(f"the federated server exited (code {server.returncode}) "
                               f"before listening; its log:\n{tail(log_path)}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise RuntimeError(f"the federated server was not listening on port {port} after "
                       f"{limit:.0f} s; its log: {log_path}")


def tail(path: Path, lines: int = 20) -> str:
    """Return the last ``lines`` lines of the log at ``path``, or "(no log)"."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def read_records(path: Path) -> list:
    """Return the round records in ``path`` (empty until the server first writes it)."""
    from deltatune.federated.recorder import RoundRecord

    try:
        return [RoundRecord(**r) for r in json.loads(path.read_text())]
    except (OSError, ValueError):  # not written yet (the server replaces it atomically)
        return []


def follow_rounds(proc: subprocess.Popen, out: Path, rounds: int, desc: str, progress: bool,
                  on_round: Callable | None, timeout: float) -> None:
    """Until ``proc`` exits, follow the ``records.json`` its server replaces in ``out`` after
    every round: a progress bar, and ``on_round`` with the records so far. Raises
    ``RuntimeError`` after ``timeout`` seconds."""
    from tqdm import tqdm

    bar = tqdm(total=rounds, desc=desc, disable=not progress)
    seen: list = []
    end = time.monotonic() + timeout
    while True:
        finished = proc.poll() is not None
        records = read_records(out / "records.json")
        if len(records) > len(seen):
            bar.update(len(records) - len(seen))
            bar.set_postfix(acc=f"{records[-1].accuracy:.3f}")
            seen = records
            if on_round is not None:
                on_round(records)
        if finished:
            break
        if time.monotonic() > end:
            raise RuntimeError(f"the federation did not finish in {timeout:.0f} s; logs in "
                               f"{out}")
        time.sleep(0.2)
    bar.close()


def read_result(out: Path) -> FederationResult:
    """Return the federation a server wrote to ``out``: final global tensors, records and
    the raw per-round log."""
    from deltatune.federated.payload import from_bytes
    from deltatune.federated.recorder import FederationResult

    rounds_log = json.loads((out / "rounds.json").read_text())
    tensors = from_bytes((out / "global.safetensors").read_bytes())
    return FederationResult(tensors, read_records(out / "records.json"), rounds_log)
