"""tools/join_federated_results.py: methods of separate runs end up in one results.json."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from deltatune.federated.report import write_results
from deltatune.federated.run import RoundRecord

TOOL = Path(__file__).resolve().parents[2] / "tools" / "join_federated_results.py"


def _tool():
    spec = importlib.util.spec_from_file_location("join_federated_results", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(out: Path, method: str, acc: float, payload: int, **settings) -> Path:
    recs = [RoundRecord(round=i + 1, accuracy=acc + i / 100, mean_client_accuracy=acc,
                        client_accuracy=[acc, acc], bytes_up=2 * payload,
                        bytes_down=2 * payload, cumulative_bytes=4 * payload * (i + 1))
            for i in range(2)]
    base = {"clients": 2, "rounds": 2, "seed": 0, "methods": method, "lr": 1e-3}
    write_results({method: recs}, {**base, **settings}, out, lrs={method: 1e-3})
    return out


def test_join_keeps_every_round_and_recomputes_the_summary(tmp_path: Path) -> None:
    a = _run(tmp_path / "a", "full", 0.7, 1000)
    b = _run(tmp_path / "b", "lora", 0.6, 10)
    path = _tool().join(tmp_path / "out", [a, b])
    body = json.loads(path.read_text())
    assert list(body["methods"]) == ["full", "lora"]
    assert body["settings"]["methods"] == "full,lora"
    assert body["summary"]["lora"]["final_accuracy"] == pytest.approx(0.61)
    # bytes_vs_full is computed across the joined runs: (4*10*2) / (4*1000*2)
    assert body["summary"]["lora"]["bytes_vs_full"] == pytest.approx(0.01)
    assert (tmp_path / "out" / "accuracy_vs_bytes.png").stat().st_size > 0


def test_join_refuses_runs_with_other_settings(tmp_path: Path) -> None:
    a = _run(tmp_path / "a", "full", 0.7, 1000)
    b = _run(tmp_path / "b", "lora", 0.6, 10, rounds=3)
    with pytest.raises(ValueError, match="rounds"):
        _tool().join(tmp_path / "out", [a, b])
