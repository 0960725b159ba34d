"""Separate processes: a Flower server and clients over gRPC on localhost.

Checked against the in-process loop (same seeds -> the same averaged tensors) and against
the clients' own uploads when one client sends a wrong shape and another dies mid-round.
"""

from __future__ import annotations

import torch

from deltatune.federated.flower import pack
from deltatune.federated.payload import from_bytes, global_tensors
from deltatune.federated.process import federate_in_processes
from deltatune.federated.run import prepare, toy_model
from tests.federated.helpers import assert_matches_in_process_pfedpara


def test_two_client_processes_match_the_in_process_loop(tmp_path):
    got, got_records, log = federate_in_processes(
        "pfedpara", "toy", clients=2, rounds=2, examples=24, non_iid=1.0, out=tmp_path)
    assert [r["round"] for r in log] == [1, 2]
    assert all(r["clients"] == 2 and r["rejected"] == [] and r["failures"] == 0 for r in log)
    # each upload has exactly the size of a packed pFedPara payload (W1 + head)
    one = pack(global_tensors(prepare(toy_model(0), "pfedpara", 4), "pfedpara"))[0].nbytes
    assert log[0]["bytes_up"] == 2 * one
    # the same federation in one process, same seeds: the same averaged global tensors and
    # the same records (round 2 needs each client process to keep its own W2)
    assert_matches_in_process_pfedpara(got, got_records)


def test_wrong_shape_and_dropped_client_processes_are_rejected(tmp_path):
    # client 0 uploads a wrong shape, client 2 dies after training (no reply), client 1 is
    # fine: the round completes and the new global tensors are client 1's upload exactly
    got, records, log = federate_in_processes(
        "lora", "toy", clients=3, rounds=1, examples=30, out=tmp_path,
        faults={0: "wrong-shape", 2: "drop"})
    assert len(log) == 1 and log[0]["clients"] == 2 and log[0]["failures"] == 1
    reasons = log[0]["rejected"]
    assert len(reasons) == 2
    assert any(r.startswith("0: ") and "shape (3, 3)" in r for r in reasons)
    assert any("client failed" in r for r in reasons)
    sent = from_bytes((tmp_path / "upload-1.safetensors").read_bytes())
    assert set(got) == set(sent) and all(torch.equal(got[k], sent[k]) for k in sent)
    assert not (tmp_path / "upload-2.safetensors").exists()
    # the round is still recorded: the two surviving clients scored the new global tensors
    assert len(records) == 1 and len(records[0].rejected) == 2
    assert len(records[0].client_accuracy) == 2
