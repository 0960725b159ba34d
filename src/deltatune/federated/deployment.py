"""Flower's deployment runtime on localhost: a SuperLink, one SuperNode per client, and
``flwr run``.

This is how Flower runs federations since its legacy ``start_server`` / ``start_client``
(the ``process`` mode) were deprecated. The launcher writes a Flower App (a
``pyproject.toml`` naming :mod:`deltatune.federated.deployment_app`'s apps, the run's
settings as its config) and a Flower configuration with one SuperLink connection into
``out``, starts ``flower-superlink`` and ``clients`` ``flower-supernode`` processes (node
config ``partition-id=C``), submits the app with ``flwr run --stream`` and follows the
rounds the ServerApp records. Every process's log stays in ``out``. The SuperLink installs
no dependencies at run time: the apps run in this Python environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from deltatune.core.errors import ConfigError
from deltatune.federated.apps import FederationSpec
from deltatune.federated.launch import (
    follow_rounds,
    free_port,
    read_result,
    tail,
    wait_listening,
)

if TYPE_CHECKING:
    from deltatune.federated.recorder import FederationResult

_CONNECTION = "deltatune"


def _toml_value(value: object) -> str:
    # TOML and JSON agree on strings, integers, floats and booleans
    return json.dumps(value)


def write_app(app_dir: Path, spec: FederationSpec, out: Path) -> None:
    """Write the Flower App that ``flwr run`` bundles: its components are deltatune's apps,
    its config the run's settings (``spec``) and the folder the ServerApp writes to."""
    app_dir.mkdir(parents=True, exist_ok=True)
    config = {**spec.to_run_config(), "out": str(out)}
    lines = ['[build-system]', 'requires = ["hatchling"]', 'build-backend = "hatchling.build"',
             '', '[project]', 'name = "deltatune-federation"', 'version = "1.0.0"',
             'dependencies = []', '', '[tool.hatch.build.targets.wheel]', 'packages = ["."]',
             '', '[tool.flwr.app]', 'publisher = "deltatune"', '',
             '[tool.flwr.app.components]',
             'serverapp = "deltatune.federated.deployment_app:server_app"',
             'clientapp = "deltatune.federated.deployment_app:client_app"', '',
             '[tool.flwr.app.config]',
             *(f'{key} = {_toml_value(value)}' for key, value in config.items())]
    (app_dir / "pyproject.toml").write_text("\n".join(lines) + "\n")


def _flower_tool(name: str) -> str:
    """The path of Flower's ``name`` command in this environment."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise ConfigError(f"Flower's {name} command was not found beside this Python or on "
                          f"PATH; install flwr (pip install 'deltatune[federated]')",
                          field="mode")
    return found


def federate_deployment(method: str, task: str = "toy", *, clients: int = 2, rounds: int = 1,
                        out: Path, local_epochs: int = 1, non_iid: float | None = None,
                        lr: float = 3e-3, r: int = 4, batch_size: int = 16, seed: int = 0,
                        examples: int | None = None, test_examples: int | None = None,
                        max_length: int | None = None, progress: bool = False,
                        on_round: Callable | None = None,
                        timeout: float = 24 * 3600.0) -> FederationResult:
    """Run one federation on Flower's deployment runtime on localhost; return the final
    global tensors, the round records (as the in-process loop records them) and the raw
    per-round log.

    Logs: ``superlink.log``, ``supernode-C.log`` and ``run.log`` (``flwr run``'s stream) in
    ``out``. Raises ``RuntimeError`` with the tail of the failing process's log.
    """
    spec = FederationSpec(method=method, task=task, clients=clients, rounds=rounds,
                          local_epochs=local_epochs, non_iid=non_iid, lr=lr, r=r,
                          batch_size=batch_size, seed=seed, examples=examples,
                          test_examples=test_examples, max_length=max_length)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("records.json", "rounds.json", "global.safetensors"):
        (out / stale).unlink(missing_ok=True)
    app_dir, home = out / "flower-app", out / "flower-home"
    write_app(app_dir, spec, out)
    home.mkdir(exist_ok=True)
    link_port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{_CONNECTION}"\n\n[superlink.{_CONNECTION}]\n'
        f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
    # the apps import deltatune from this source tree, installed or not
    src = str(Path(__file__).parents[2])
    # the SuperLink and SuperNodes start Flower's other commands (flower-superexec,
    # flwr-serverapp, flwr-clientapp) by name: this environment's come first
    path = os.pathsep.join(p for p in (str(Path(_flower_tool("flwr")).parent),
                                       os.environ.get("PATH")) if p)
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": path, "PYTHONPATH": os.pathsep.join(
        p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    procs: list[subprocess.Popen] = []
    logs = []

    def start(cmd: list[str], log: str, cwd: Path | None = None) -> subprocess.Popen:
        logs.append((out / log).open("w"))
        # its own session: the SuperLink's and SuperNodes' app processes stop with it
        procs.append(subprocess.Popen(cmd, env=env, cwd=cwd, stdout=logs[-1],
                                      stderr=subprocess.STDOUT, start_new_session=True))
        return procs[-1]
    try:
        link = start([_flower_tool("flower-superlink"), "--insecure",
                      "--disable-runtime-dependency-installation", "--port", str(link_port)],
                     "superlink.log")
        wait_listening(link_port, link, out / "superlink.log")
        for c in range(clients):
            start([_flower_tool("flower-supernode"), "--insecure", "--superlink",
                   f"127.0.0.1:{link_port}", "--port", str(free_port()), "--node-config",
                   f"partition-id={c}"], f"supernode-{c}.log")
        run = start([_flower_tool("flwr"), "run", ".", _CONNECTION, "--stream"], "run.log",
                    cwd=app_dir)
        follow_rounds(run, out, rounds, f"federate {method} (deployment)", progress,
                      on_round, timeout)
        if run.returncode != 0 or not (out / "global.safetensors").exists():
            raise RuntimeError(f"flwr run failed (exit code {run.returncode}); its log:\n"
                               f"{tail(out / 'run.log')}\nthe SuperLink's:\n"
                               f"{tail(out / 'superlink.log')}")
        return read_result(out)
    finally:
        _stop_sessions(procs)
        for f in logs:
            f.close()


def _stop_sessions(procs: list[subprocess.Popen], grace: float = 20.0) -> None:
    """Stop each process and everything in its session (the app processes the SuperLink
    and SuperNodes started): SIGTERM, then SIGKILL to what is left after ``grace`` s."""
    for proc in reversed(procs):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    end = time.monotonic() + grace
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, end - time.monotonic()))
    for proc in procs:
        while time.monotonic() < end:
            try:
                os.killpg(proc.pid, 0)  # anyone left in the session?
            except ProcessLookupError:
                break
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


__all__ = ["federate_deployment", "write_app"]
