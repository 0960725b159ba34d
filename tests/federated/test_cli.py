"""``deltatune federate``: table, results.json and PNG; byte counts consistent."""

from __future__ import annotations

import json

from deltatune.cli import main


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
