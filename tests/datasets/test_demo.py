"""The committed demo subset: loads offline, holds out words, matches its declared sizes."""

from __future__ import annotations

import gzip
import json
import re
from importlib import resources

import pytest

import deltatune.datasets as D
from deltatune.core.errors import DataError
from deltatune.datasets import demo
from deltatune.datasets._common import SPLITS


def test_demo_loads_without_network_and_matches_sizes():
    splits = {s: D.load("wordnet-definitions-demo", s) for s in SPLITS}
    assert {s: len(r) for s, r in splits.items()} == demo.SIZES
    assert D.info("wordnet-definitions-demo")["counts"] == {**demo.SIZES, "total": 4600}


def test_demo_held_out_words_never_appear_in_train():
    words = {s: {r["word"] for r in D.load("wordnet-definitions-demo", s)} for s in SPLITS}
    assert not words["train"] & words["validation"]
    assert not words["train"] & words["test"]
    assert not words["validation"] & words["test"]
    assert len(words["train"]) == demo.SIZES["train"]  # one noun row per word


def test_demo_rows_follow_the_selection_rule():
    for split in SPLITS:
        for row in D.load("wordnet-definitions-demo", split):
            assert row["prompt"] == f"Define the word {row['word']} (noun)."
            assert re.fullmatch(r"[a-z]+(-[a-z]+)*", row["word"])
            assert demo.MIN_WORDS <= len(row["response"].split()) <= demo.MAX_WORDS
            assert row["references"][0] == row["response"]
            assert '"' not in row["response"]  # examples were split off


def test_demo_file_is_small_and_licensed():
    data = resources.files("deltatune.datasets") / "data"
    assert len((data / demo.FILE).read_bytes()) < 1_000_000
    assert "Princeton University" in (data / "WORDNET-LICENSE.txt").read_text()


def test_encode_is_deterministic_and_round_trips():
    raw = (resources.files("deltatune.datasets") / "data" / demo.FILE).read_bytes()
    splits = demo.decode(raw)
    assert demo.encode(splits) == demo.encode(demo.decode(demo.encode(splits)))
    assert demo.decode(demo.encode(splits)) == splits
    first = json.loads(gzip.decompress(raw).split(b"\n", 1)[0])
    assert first["split"] == "train" and list(first) == ["split", *demo.FIELDS]


def _full_row(word, n_words=4, pos="noun", frequency=2):
    definition = " ".join(["sense"] * n_words)
    return {"prompt": f"Define the word {word} ({pos}).", "response": definition,
            "word": word, "pos": pos, "lexname": "noun.act", "synset": "n1", "senses": 1,
            "frequency": frequency, "examples": [], "references": [definition]}


def test_select_takes_the_first_eligible_rows_in_order(monkeypatch):
    monkeypatch.setattr(demo, "SIZES", {"train": 2, "validation": 1, "test": 1})
    full = {"train": [_full_row("a1", pos="verb"), _full_row("a2", n_words=13),
                      _full_row("a3", frequency=0), _full_row("a4"), _full_row("a5", n_words=1),
                      _full_row("a6"), _full_row("a7")],
            "validation": [_full_row("b1")], "test": [_full_row("c1"), _full_row("c2")]}
    picked = demo.select(full)
    assert [r["word"] for r in picked["train"]] == ["a4", "a6"]
    assert list(picked["train"][0]) == list(demo.FIELDS)
    full["validation"] = []
    with pytest.raises(DataError, match="only 0 eligible validation rows"):
        demo.select(full)


def test_build_demo_regenerates_the_committed_file(monkeypatch):
    """build() re-derives the subset from the full set: fed the committed rows as the
    'full' data set (they are all eligible and in order), it must reproduce the file."""
    raw = (resources.files("deltatune.datasets") / "data" / demo.FILE).read_bytes()
    committed = demo.decode(raw)
    full = {s: [{**r, "pos": "noun", "frequency": 1} for r in rows]
            for s, rows in committed.items()}
    monkeypatch.setattr(D, "load", lambda name, split: full[split])
    path = D.build("wordnet-definitions-demo", progress=False)
    assert demo.decode((path / demo.FILE).read_bytes()) == committed
    assert gzip.decompress((path / demo.FILE).read_bytes()) == gzip.decompress(raw)
