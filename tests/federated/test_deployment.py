"""Flower's deployment runtime (SuperLink, SuperNodes, flwr run): the same numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.federated.helpers import assert_matches_in_process_pfedpara


def test_deployment_matches_the_in_process_loop(tmp_path):
    from deltatune.federated.deployment import federate_deployment

    # pFedPara over 2 rounds: round 2 only matches if each SuperNode's W2 survived round 1
    # in its context.state (the ClientApp is rebuilt for every message)
    got, got_records, log = federate_deployment("pfedpara", "toy", clients=2, rounds=2,
                                                examples=24, non_iid=1.0, out=tmp_path,
                                                timeout=600)
    records = assert_matches_in_process_pfedpara(got, got_records)
    assert [r["bytes_up"] for r in log] == [r.bytes_up for r in records]
    assert all(r["clients"] == 2 and r["failures"] == 0 and r["rejected"] == [] for r in log)
    # every process's log is kept, and none of them outlives the federation
    for name in ("superlink.log", "supernode-0.log", "supernode-1.log", "run.log"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert _processes_of(tmp_path) == []


def _processes_of(out: Path) -> list[str]:
    """Command lines of running processes whose environment's FLWR_HOME lies in ``out``:
    everything the launcher started, and whatever those started (Linux /proc)."""
    marker = f"FLWR_HOME={out.resolve()}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (proc / "environ").read_bytes():
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:  # it ended meanwhile, or is not ours
            continue
    return found


def test_a_failing_server_app_raises_its_error_and_stops_every_process(tmp_path):
    from deltatune.federated.deployment import federate_deployment

    # the CLI checks method names first; here the ServerApp itself raises on one
    with pytest.raises(RuntimeError, match="unknown federated method 'nosuchmethod'"):
        federate_deployment("nosuchmethod", "toy", clients=2, rounds=1, examples=24,
                            out=tmp_path, timeout=300)
    assert _processes_of(tmp_path) == []


def test_the_app_carries_the_settings_through_the_run_config(tmp_path):
    from deltatune.federated.apps import FederationSpec
    from deltatune.federated.deployment import write_app

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")

    spec = FederationSpec("lora", "toy", clients=3, rounds=2, non_iid=0.5, lr=1e-3,
                          examples=None, max_length=32)
    write_app(tmp_path, spec, tmp_path / "out")
    app = tomllib.loads((tmp_path / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    config = app["config"]
    assert config["out"] == str(tmp_path / "out") and config["examples"] == -1
    assert FederationSpec.from_run_config(config) == spec
    assert app["components"]["serverapp"] == "deltatune.federated.deployment_app:server_app"
