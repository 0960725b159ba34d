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
