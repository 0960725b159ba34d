"""Comparison of round records between the federated run modes."""

from __future__ import annotations

import math

from deltatune.federated.recorder import RoundRecord


def assert_same_records(got: list[RoundRecord], want: list[RoundRecord]) -> None:
    """Assert two runs recorded the same rounds: bytes exactly, accuracies to float noise.

    Accuracies are fractions of a few examples; the modes' float32 sums differ in the last
    bits (Ray's one-thread workers), which moves an accuracy only if a logit pair is tied.
    """
    assert [r.round for r in got] == [r.round for r in want]
    for g, w in zip(got, want):
        assert (g.bytes_up, g.bytes_down, g.cumulative_bytes) == (
            w.bytes_up, w.bytes_down, w.cumulative_bytes), g.round
        assert math.isclose(g.accuracy, w.accuracy, abs_tol=1e-9), g.round
        assert math.isclose(g.mean_client_accuracy, w.mean_client_accuracy, abs_tol=1e-9)
        assert g.client_accuracy == w.client_accuracy, g.round
        assert len(g.rejected) == len(w.rejected), g.round


def assert_matches_in_process_pfedpara(got: dict, got_records: list[RoundRecord]) -> list:
    """Assert a 2-client, 2-round pFedPara federation on ``toy`` (24 examples, Dirichlet 1.0)
    ended with the in-process loop's global tensors (atol 1e-6) and records; return the
    in-process records.

    atol: Ray's one-thread workers sum float32 in another order than the two-thread loop.
    """
    import torch

    from deltatune.federated.payload import global_tensors
    from deltatune.federated.run import run_federated
    from deltatune.federated.tasks import load_task

    task = load_task("toy", examples=24)
    records, fleet = run_federated("pfedpara", task.make_model, task.train, task.test,
                                   clients=2, rounds=2, non_iid=1.0, lr=3e-3, batch_size=16)
    want = global_tensors(fleet[0].model, "pfedpara")
    assert set(got) == set(want)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6), name
    assert_same_records(got_records, records)
    return records
