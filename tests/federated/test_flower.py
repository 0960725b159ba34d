"""The Flower client + strategy on tiny BERT: 2 clients x 1 round, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deltatune.federated.flower import pack, payload_size, unpack
from deltatune.federated.payload import global_tensors, local_tensors
from deltatune.federated.run import run_federated, toy_task
from tests.conftest import tiny_bert


def _data():
    return toy_task(40, seed=0), toy_task(12, seed=1)


@pytest.mark.parametrize("method", ["lora", "pfedpara"])
def test_two_clients_one_round_is_weighted_fedavg(method):
    train, test = _data()
    # reference: record what each client uploads (through the fault hook, unchanged)
    uploads: dict[int, list] = {}

    def keep(c):
        def hook(arrays):
            uploads[c] = arrays
            return arrays
        return hook

    records, fleet = run_federated(method, lambda: tiny_bert(seed=0), train, test, clients=2,
                                   rounds=1, batch_size=8, non_iid=1.0,
                                   faults={0: keep(0), 1: keep(1)})
    rec = records[0]
    sent = [global_tensors(c.model, method) for c in fleet]
    # after the round every client holds the same global tensors ...
    assert all(torch.equal(sent[0][k], sent[1][k]) for k in sent[0])
    # ... which are the example-weighted mean of what they uploaded, averaged here by hand
    ups = [unpack(uploads[0]), unpack(uploads[1])]
    ns = [len(c.train["labels"]) for c in fleet]
    assert ns[0] != ns[1]  # non-IID sizes, so the weighting matters
    for k in sent[0]:
        want = (ups[0][k].double() * ns[0] + ups[1][k].double() * ns[1]) / sum(ns)
        assert torch.allclose(sent[0][k].double(), want, atol=1e-6), k
    assert rec.bytes_up == sum(len(pack(u)[0]) for u in ups)
    assert rec.bytes_down == 2 * payload_size(pack(sent[0]))
    assert rec.cumulative_bytes == rec.bytes_up + rec.bytes_down and rec.rejected == []
    assert 0.0 <= rec.accuracy <= 1.0 and len(rec.client_accuracy) == 2
    if method == "pfedpara":
        assert all(k.rpartition(".")[2] in ("hada_X1", "hada_Y1", "weight", "bias")
                   for k in sent[0])
        # W2 stays per client and differs between them after local training
        loc = [local_tensors(c.model, method) for c in fleet]
        assert any(not torch.equal(loc[0][k], loc[1][k]) for k in loc[0])


def test_wrong_shape_and_dropped_client_are_rejected_round_completes():
    train, test = _data()

    def wrong_shape(arrays):
        tensors = unpack(arrays)
        key = next(iter(tensors))
        tensors[key] = torch.zeros(3, 3)
        return pack(tensors)

    def drop(arrays):
        raise ConnectionError("client 2 went away")

    records, fleet = run_federated("lora", lambda: tiny_bert(seed=0), train, test,
                                   clients=3, rounds=1, batch_size=8,
                                   faults={0: wrong_shape, 2: drop})
    rej = records[0].rejected
    assert len(rej) == 2
    assert rej[0].startswith("client 2: client failed") and "went away" in rej[0]
    assert rej[1].startswith("client 0:") and "shape (3, 3)" in rej[1]
    # the global tensors are exactly client 1's upload (the only valid one)
    g0 = global_tensors(fleet[0].model, "lora")
    g1 = global_tensors(fleet[1].model, "lora")
    assert all(torch.equal(g0[k], g1[k]) for k in g0)
    assert isinstance(pack(g0)[0], np.ndarray)


def test_trim_cuts_padding_columns_without_changing_logits():
    from deltatune.federated.flower import trim

    torch.manual_seed(0)
    model = tiny_bert(seed=0).eval()
    lengths = torch.tensor([5, 9, 3])
    ids = torch.randint(5, 100, (3, 16))
    mask = (torch.arange(16)[None, :] < lengths[:, None]).long()
    ids = ids * mask  # right padding with id 0
    batch = {"input_ids": ids, "attention_mask": mask,
             "token_type_ids": torch.zeros_like(ids), "labels": torch.tensor([0, 1, 2])}
    cut = trim(batch)
    assert cut["input_ids"].shape == (3, 9) and cut["attention_mask"].shape == (3, 9)
    assert torch.equal(cut["labels"], batch["labels"])
    with torch.no_grad():
        full, short = model(**batch).logits, model(**cut).logits
    assert torch.allclose(full, short, atol=1e-5)
    # a batch without a mask is left alone
    assert trim({"input_ids": ids})["input_ids"] is ids


def test_client_update_depends_only_on_seed_and_round():
    # the same client fit twice from the same state, with unrelated random draws between,
    # gives the same upload: batch order and dropout come from (seed, round) alone
    from deltatune.federated.flower import DeltaClient
    from deltatune.federated.run import prepare

    train, test = _data()
    uploads = []
    for junk in (0, 7):
        torch.rand(junk)
        model = prepare(tiny_bert(seed=0), "lora", 4, seed=3)
        client = DeltaClient("0", model, "lora", train, test, batch_size=8, seed=3)
        uploads.append(unpack(client.fit([], {"round": 2})[0]))
    assert all(torch.equal(uploads[0][k], uploads[1][k]) for k in uploads[0])


def test_on_round_sees_every_round_and_unfinished_runs_are_not_reused(tmp_path):
    from deltatune.cli.federate import _reusable
    from deltatune.federated.report import write_results

    train, test = _data()
    seen: list[list[int]] = []
    settings = {"task": "toy", "rounds": 2, "clients": 2, "methods": "lora"}
    # saved after round 1 only: an interrupted run, which a resume must not reuse
    records, _ = run_federated("lora", lambda: tiny_bert(seed=0), train, test, clients=2,
                               rounds=2, batch_size=8,
                               on_round=lambda recs: seen.append([r.round for r in recs]))
    assert seen == [[1], [1, 2]]
    write_results({"lora": records[:1]}, settings, tmp_path)
    assert _reusable(tmp_path, settings) == ({}, {})
    write_results({"lora": records}, settings, tmp_path, seconds={"lora": 1.5})
    done, seconds = _reusable(tmp_path, settings)
    assert done["lora"] == records and seconds == {"lora": 1.5}
