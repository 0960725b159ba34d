"""``deltatune federate``: table, results.json and PNG; byte counts consistent."""

from __future__ import annotations

import json

from deltatune.cli import main
from deltatune.federated.recorder import RoundRecord
from tests.federated.helpers import assert_same_records


def test_federate_cli_writes_results(tmp_path, capsys):
    code = main(["federate", "--task", "toy", "--methods", "lora,pfedpara", "--clients", "2",
                 "--rounds", "2", "--examples", "24", "--non-iid", "1.0", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "cum KiB" in out and "pfedpara" in out
    body = json.loads((tmp_path / "results.json").read_text())
    for recs in body["methods"].values():
        assert [r["round"] for r in recs] == [1, 2]
        assert recs[1]["cumulative_bytes"] == sum(r["bytes_up"] + r["bytes_down"] for r in recs)
    # pFedPara sends X1, Y1 only: LoRA's A, B shapes (transposed), so both payloads
    # match up to the safetensors header (the names differ)
    lora, pfed = body["methods"]["lora"][0], body["methods"]["pfedpara"][0]
    assert abs(lora["bytes_up"] - pfed["bytes_up"]) < 200
    assert (tmp_path / "accuracy_vs_bytes.png").read_bytes()[:4] == b"\x89PNG"


def test_federate_cli_rejects_unknown_method(capsys):
    assert main(["federate", "--methods", "lora,fedsgd"]) == 2
    assert "fedsgd" in capsys.readouterr().err


def test_federate_cli_resumes_finished_methods_and_summarises(tmp_path, capsys):
    args = ["federate", "--task", "toy", "--methods", "full,lora", "--clients", "2",
            "--rounds", "1", "--examples", "24", "--out", str(tmp_path)]
    assert main(args) == 0
    first = json.loads((tmp_path / "results.json").read_text())
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "full: reusing" in out and "lora: reusing" in out
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["methods"] == first["methods"]
    summary = first["summary"]
    for method, recs in first["methods"].items():
        s = summary[method]
        assert s["total_bytes"] == recs[-1]["cumulative_bytes"]
        assert s["payload_bytes"] * 2 == recs[-1]["bytes_down"]
        assert s["final_accuracy"] == recs[-1]["accuracy"]
        assert s["final_client_accuracy_min"] == min(recs[-1]["client_accuracy"])
    assert summary["full"]["bytes_vs_full"] == 1.0
    assert summary["lora"]["bytes_vs_full"] == (summary["lora"]["total_bytes"]
                                                / summary["full"]["total_bytes"])
    # other settings: nothing is reused
    capsys.readouterr()
    assert main([*args[:-2], "--seed", "1", "--out", str(tmp_path)]) == 0
    assert "reusing" not in capsys.readouterr().out


def test_federate_cli_process_mode_matches_in_process(tmp_path, capsys):
    args = ["federate", "--task", "toy", "--methods", "pfedpara", "--clients", "2",
            "--rounds", "2", "--examples", "24", "--non-iid", "1.0", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "loop")]) == 0
    assert main([*args, "--mode", "process", "--out", str(tmp_path / "procs")]) == 0
    loop = json.loads((tmp_path / "loop" / "results.json").read_text())
    procs = json.loads((tmp_path / "procs" / "results.json").read_text())
    assert_same_records([RoundRecord(**r) for r in procs["methods"]["pfedpara"]],
                        [RoundRecord(**r) for r in loop["methods"]["pfedpara"]])
    # every process left its log beside the results
    logs = sorted(p.name for p in (tmp_path / "procs" / "processes" / "pfedpara").glob("*.log"))
    assert logs == ["client-0.log", "client-1.log", "server.log"]


def test_federate_cli_deployment_mode_runs_the_deployment_launcher(tmp_path, monkeypatch):
    # the launcher itself is checked against the in-process loop in test_deployment.py;
    # here: the CLI hands it the settings and keeps its folder under OUT/deployment/
    from deltatune.federated import deployment
    from deltatune.federated.recorder import FederationResult

    seen = {}

    def fake(method, task, **kw):
        seen.update(method=method, task=task, **kw)
        record = RoundRecord(1, 0.5, 0.5, [0.5, 0.5], 10, 20, 30)
        kw["on_round"]([record])
        return FederationResult({}, [record], [])

    monkeypatch.setattr(deployment, "federate_deployment", fake)
    assert main(["federate", "--task", "toy", "--methods", "lora", "--clients", "2",
                 "--rounds", "1", "--examples", "24", "--no-progress", "--mode", "deployment",
                 "--out", str(tmp_path)]) == 0
    assert seen["method"] == "lora" and seen["task"] == "toy" and seen["clients"] == 2
    assert seen["examples"] == 24 and seen["out"] == tmp_path / "deployment" / "lora"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [RoundRecord(**r) for r in saved["methods"]["lora"]] == [
        RoundRecord(1, 0.5, 0.5, [0.5, 0.5], 10, 20, 30)]
