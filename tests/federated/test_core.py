"""Partitions, payload bytes, validation and FedAvg against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import deltatune as dt
from deltatune.federated.aggregate import fedavg, validate
from deltatune.federated.partition import dirichlet_partition, iid_partition
from deltatune.federated.payload import from_bytes, global_tensors, local_tensors, to_bytes
from deltatune.methods.loha import LoHaConfig
from tests.conftest import tiny_bert


def _covers(parts, n):
    flat = [i for p in parts for i in p]
    return sorted(flat) == list(range(n))


def test_iid_partition_disjoint_balanced_seeded():
    parts = iid_partition(103, 4, seed=1)
    assert _covers(parts, 103)
    assert {len(p) for p in parts} == {25, 26}
    assert parts == iid_partition(103, 4, seed=1) != iid_partition(103, 4, seed=2)


def test_dirichlet_skew_grows_as_alpha_shrinks():
    labels = np.repeat(np.arange(4), 100)

    def skew(alpha):
        parts = dirichlet_partition(labels, 5, alpha, seed=0)
        assert _covers(parts, 400) and min(map(len, parts)) >= 1
        # mean share of a client's most common label: 0.25 when IID, 1.0 when one label each
        return np.mean([np.bincount(labels[p], minlength=4).max() / len(p) for p in parts])

    assert skew(0.05) > 0.8 > 0.4 > skew(1000.0)
    assert dirichlet_partition(labels, 5, 0.5, 3) == dirichlet_partition(labels, 5, 0.5, 3)


def test_payload_bytes_and_pfedpara_split():
    dm = dt.attach(tiny_bert(), LoHaConfig(r=2, mode="pfedpara"))
    glob, local = global_tensors(dm, "pfedpara"), local_tensors(dm, "pfedpara")
    assert glob and local
    assert {k.rpartition(".")[2] for k in glob} == {"hada_X1", "hada_Y1"}
    assert {k.rpartition(".")[2] for k in local} == {"hada_X2", "hada_Y2"}
    fed = global_tensors(dm, "fedpara")
    assert set(fed) == set(glob) | set(local)
    data = to_bytes(glob)
    back = from_bytes(data)
    assert all(torch.equal(back[k], glob[k]) for k in glob)
    # raw values + a small header: the count is the serialised length, not numel * 4
    raw = sum(t.numel() * 4 for t in glob.values())
    assert raw < len(data) < raw + 4096
    assert len(to_bytes(fed)) > len(data)


def test_fedavg_is_example_weighted_mean_and_rejects_bad():
    g = torch.Generator().manual_seed(0)
    ref = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    c1 = {k: torch.randn(v.shape, generator=g) for k, v in ref.items()}
    c2 = {k: torch.randn(v.shape, generator=g) for k, v in ref.items()}
    bad_shape = {"a": torch.zeros(3, 2), "b": torch.zeros(4)}
    bad_nan = {"a": torch.full((2, 3), float("nan")), "b": torch.zeros(4)}
    bad_names = {"a": torch.zeros(2, 3)}
    bad_dtype = {"a": torch.zeros(2, 3, dtype=torch.float64), "b": torch.zeros(4)}
    out, rejected = fedavg([("1", c1, 10), ("2", c2, 30), ("3", bad_shape, 5),
                            ("4", bad_nan, 5), ("5", bad_names, 5), ("6", bad_dtype, 5)], ref)
    for k in ref:
        assert torch.allclose(out[k], 0.25 * c1[k] + 0.75 * c2[k], atol=1e-6)
    assert [r.client for r in rejected] == ["3", "4", "5", "6"]
    assert "shape (3, 2)" in rejected[0].reason and "non-finite" in rejected[1].reason
    assert "missing ['b']" in rejected[2].reason and "dtype" in rejected[3].reason
    assert validate(c1, ref) is None
    none, only = fedavg([("x", bad_shape, 3)], ref)
    assert none is None and only[0].reason == rejected[0].reason


def test_iid_rejects_too_many_clients():
    with pytest.raises(dt.core.errors.ConfigError):
        iid_partition(3, 4)
