"""Flower's simulation engine (Ray): the same client and strategy, the same numbers."""

from __future__ import annotations

import pytest
import torch

from deltatune.federated.payload import global_tensors
from deltatune.federated.run import run_federated
from deltatune.federated.tasks import load_task
from tests.federated.helpers import assert_same_records

# Ray comes with the `simulation` extra (and `dev`); without it there is nothing to test
pytest.importorskip("ray", reason="Flower's simulation needs Ray: pip install '.[simulation]'")


def test_simulation_matches_the_in_process_loop():
    from deltatune.federated.simulation import simulate

    # pFedPara over 2 rounds: round 2 only matches if each node's W2 survived round 1
    # in its context.state (simulation rebuilds the client object for every message)
    got, got_records, log = simulate("pfedpara", "toy", clients=2, rounds=2, examples=24,
                                     non_iid=1.0)
    task = load_task("toy", examples=24)
    records, fleet = run_federated("pfedpara", task.make_model, task.train, task.test,
                                   clients=2, rounds=2, non_iid=1.0, lr=3e-3, batch_size=16)
    want = global_tensors(fleet[0].model, "pfedpara")
    assert set(got) == set(want)
    for name in want:
        # Ray's workers run torch with one thread: float32 sums differ in the last bits
        assert torch.allclose(got[name], want[name], atol=1e-6), name
    assert [r["bytes_up"] for r in log] == [r.bytes_up for r in records]
    assert all(r["clients"] == 2 and r["failures"] == 0 and r["rejected"] == [] for r in log)
    # and the same records: server accuracy, every client's accuracy, bytes per round
    assert_same_records(got_records, records)
