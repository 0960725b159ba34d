"""wordnet-term-spans: BIO tags exact by construction, on real WordNet 3.0 lines.

The synset lines below are copied verbatim from Debian wordnet-base (WordNet 3.0
data.{noun,verb,adj,adv}); the expected tags are written by hand from the glosses.
"""

from __future__ import annotations

import json

import pytest

from deltatune.datasets import build, load
from deltatune.datasets import wordnet as W
from deltatune.datasets._common import SPLITS, SourceArchive
from tests.datasets.conftest import make_deb
from tests.datasets.test_wordnet import HEADER

REAL = {
    "noun": [
        "02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 023 @ 02083346 n 0000 @ "
        "01317541 n 0000 #m 02083863 n 0000 #m 07994941 n 0000 ~ 01322604 n 0000 ~ 02084732 n "
        "0000 ~ 02084861 n 0000 ~ 02085272 n 0000 ~ 02085374 n 0000 ~ 02087122 n 0000 ~ "
        "02103406 n 0000 ~ 02110341 n 0000 ~ 02110806 n 0000 ~ 02110958 n 0000 ~ 02111129 n "
        "0000 ~ 02111277 n 0000 ~ 02111500 n 0000 ~ 02111626 n 0000 ~ 02112497 n 0000 ~ "
        "02112826 n 0000 ~ 02113335 n 0000 ~ 02113978 n 0000 %p 02158846 n 0000 | a member of "
        "the genus Canis (probably descended from the common wolf) that has been domesticated "
        'by man since prehistoric times; occurs in many breeds; "the dog barked all night"  ',
        "07614500 13 n 02 ice_cream 0 icecream 0 007 @ 07611358 n 0000 ~ 07614825 n 0000 ~ "
        "07615052 n 0000 ~ 07615190 n 0000 ~ 07615460 n 0000 ~ 07615569 n 0000 ~ 07615671 n "
        "0000 | frozen dessert containing cream and sugar and flavoring  ",
    ],
    "verb": [
        "00613411 31 v 02 abandon 1 give_up 0 003 $ 01989071 v 0000 $ 01848483 v 0000 + "
        "00204439 n 0101 01 + 08 00 | stop maintaining or insisting on; of ideas or claims; "
        '"He abandoned the thought of asking for her hand in marriage"; "Both sides have to '
        'give up some claims in these negotiations"  ',
        "01196542 34 v 02 kick 0 give_up 0 001 @ 02534062 v 0000 02 + 08 00 + 33 00 | stop "
        'consuming; "kick a habit"; "give up alcohol"  ',
    ],
    "adj": [
        "00958880 00 a 01 faithful 0 009 ^ 00583239 a 0000 ^ 02460503 a 0000 ^ 02464694 a 0000 "
        "= 04876985 n 0000 + 08223475 n 0101 + 04876985 n 0102 ! 00959731 a 0101 & 00959244 a "
        "0000 & 00959530 a 0000 | steadfast in affection or allegiance; \"years of faithful "
        'service"; "faithful employees"; "we do not doubt that England has a faithful patriot '
        'in the Lord Chancellor"  ',
    ],
    "adv": [
        "00085811 02 r 05 quickly 0 rapidly 0 speedily 0 chop-chop 0 apace 0 004 \\ 00979366 a "
        "0302 \\ 00979697 a 0201 ! 00161630 r 0101 \\ 00979366 a 0101 | with rapid movements; "
        '"he works quickly"  ',
    ],
}
INDEX = {"noun": ["dog n 1 0 1 1 02084071  "], "verb": ["kick v 1 0 1 1 01196542  "],
         "adj": ["faithful a 1 0 1 1 00958880  "], "adv": ["quickly r 1 0 1 1 00085811  "]}


@pytest.fixture
def real_deb(tmp_path):
    files = {}
    for pos in W.FILE_POS:
        files[f"usr/share/wordnet/data.{pos}"] = (HEADER + "\n".join(REAL[pos]) + "\n").encode()
        files[f"usr/share/wordnet/index.{pos}"] = (HEADER + "\n".join(INDEX[pos]) + "\n").encode()
    return make_deb(tmp_path / "wordnet-base_1%3a3.0-99_all.deb", files)


FAITHFUL = "we do not doubt that England has a faithful patriot in the Lord Chancellor"


def _by_sentence(rows):
    return {(r["query"], r["example"]): list(zip(r["tokens"], r["tags"])) for r in rows}


def test_tokenize_keeps_inner_apostrophes_hyphens_and_dots():
    assert W.tokenize("Don't run--you'll be out of breath") == [
        "Don't", "run", "-", "-", "you'll", "be", "out", "of", "breath"]
    assert W.tokenize("a well-qualified officer; the U.S. army") == [
        "a", "well-qualified", "officer", ";", "the", "U.S", ".", "army"]


def test_tag_occurrences_marks_every_case_insensitive_match():
    tokens = ["Give", "up", "or", "give", "up", "now"]
    assert W.tag_occurrences(tokens, ["give", "up"], "VERB") == [
        "B-VERB", "I-VERB", "O", "B-VERB", "I-VERB", "O"]
    assert W.tag_occurrences(["the", "dogs"], ["dog"], "NOUN") is None  # inflection: no match
    assert W.tag_occurrences(["a", "a"], ["a", "a", "a"], "NOUN") is None


def test_rows_from_real_wordnet_lines_are_tagged_exactly(real_deb):
    rows, dropped = W.term_span_rows(W.read_wordnet(SourceArchive(real_deb)))
    got = _by_sentence(rows)
    assert got == {
        ("dog", "the dog barked all night"):
            [("the", "O"), ("dog", "B-NOUN"), ("barked", "O"), ("all", "O"), ("night", "O")],
        ("give up", "Both sides have to give up some claims in these negotiations"):
            [("Both", "O"), ("sides", "O"), ("have", "O"), ("to", "O"), ("give", "B-VERB"),
             ("up", "I-VERB"), ("some", "O"), ("claims", "O"), ("in", "O"), ("these", "O"),
             ("negotiations", "O")],
        ("kick", "kick a habit"): [("kick", "B-VERB"), ("a", "O"), ("habit", "O")],
        ("give up", "give up alcohol"): [("give", "B-VERB"), ("up", "I-VERB"), ("alcohol", "O")],
        ("faithful", "years of faithful service"):
            [("years", "O"), ("of", "O"), ("faithful", "B-ADJ"), ("service", "O")],
        ("faithful", "faithful employees"): [("faithful", "B-ADJ"), ("employees", "O")],
        ("faithful", FAITHFUL):
            [(t, "B-ADJ" if t == "faithful" else "O") for t in FAITHFUL.split(" ")],
        ("quickly", "he works quickly"):
            [("he", "O"), ("works", "O"), ("quickly", "B-ADV")],
    }
    # "He abandoned the thought..." uses an inflected form: skipped, and counted
    assert dropped == {"no synset word occurs verbatim in the example": 1}
    dog = next(r for r in rows if r["query"] == "dog")
    assert (dog["pos"], dog["lexname"], dog["synset"]) == ("noun", "noun.animal", "n02084071")


def test_conflicting_and_duplicate_rows_are_dropped(tmp_path):
    files = {}
    data = {"noun": ['00000100 04 n 01 run 0 000 | a score; "a good run"; "a good run"  ',
                     '00000200 04 n 01 fast 0 000 | abstaining; "run fast"  '],
            "verb": ['00000300 38 v 01 run 0 000 | move; "a good run"  '],
            "adj": ['00000400 00 a 01 fast 0 000 | quick; "run fast"  '],
            "adv": []}
    for pos in W.FILE_POS:
        files[f"usr/share/wordnet/data.{pos}"] = (HEADER + "\n".join(data[pos]) + "\n").encode()
        files[f"usr/share/wordnet/index.{pos}"] = HEADER.encode()
    deb = make_deb(tmp_path / "w.deb", files)
    rows, dropped = W.term_span_rows(W.read_wordnet(SourceArchive(deb)))
    # "a good run": twice as a noun (one kept), once as a verb -> tags disagree: all dropped
    # "run fast": "fast" as noun and adjective -> dropped; "run" is in no synset of that text
    assert rows == []
    assert dropped == {"same word and sentence tagged differently by two synsets": 5}


def test_build_splits_words_and_sentences_apart(real_deb):
    path = build("wordnet-term-spans", source=real_deb, progress=False)
    splits = {s: load("wordnet-term-spans", s) for s in SPLITS}
    assert sum(len(r) for r in splits.values()) == 8
    words = {s: {r["query"].lower() for r in rows} for s, rows in splits.items()}
    sents = {s: {r["example"].lower() for r in rows} for s, rows in splits.items()}
    for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
        assert not words[a] & words[b]
        assert not sents[a] & sents[b]
    # both "give up" rows (two synsets) are in one split
    assert sum("give up" in w for w in words.values()) == 1
    meta = json.loads((path / "meta.json").read_text())
    assert meta["kind"] == "tagging" and meta["counts"]["total"] == 8
    assert meta["build"]["tag_set"][0] == "O" and len(meta["build"]["tag_set"]) == 9
    assert meta["build"]["spans"] == {s: sum(t.startswith("B-") for r in rows for t in r["tags"])
                                      for s, rows in splits.items()}
    for rows in splits.values():
        for r in rows:
            assert len(r["tokens"]) == len(r["tags"]) and "group" not in r
