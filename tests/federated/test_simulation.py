"""Flower's simulation engine (Ray): the same client and strategy, the same numbers."""

from __future__ import annotations

import pytest

from tests.federated.helpers import assert_matches_in_process_pfedpara

# Ray comes with the `simulation` extra (and `dev`); without it there is nothing to test
pytest.importorskip("ray", reason="Flower's simulation needs Ray: pip install '.[simulation]'")


def test_simulation_matches_the_in_process_loop():
    from deltatune.federated.simulation import simulate

    # pFedPara over 2 rounds: round 2 only matches if each node's W2 survived round 1
    # in its context.state (simulation rebuilds the client object for every message)
    got, got_records, log = simulate("pfedpara", "toy", clients=2, rounds=2, examples=24,
                                     non_iid=1.0)
    # same global tensors and records (server accuracy, every client's accuracy, bytes)
    records = assert_matches_in_process_pfedpara(got, got_records)
    assert [r["bytes_up"] for r in log] == [r.bytes_up for r in records]
    assert all(r["clients"] == 2 and r["failures"] == 0 and r["rejected"] == [] for r in log)
