"""WordNet parsing and the two WordNet data sets, on a hand-written miniature WordNet."""

from __future__ import annotations

import json

import pytest

from deltatune.core.errors import DataError
from deltatune.datasets import build, load
from deltatune.datasets import wordnet as W
from deltatune.datasets._common import SPLITS, SourceArchive
from tests.datasets.conftest import make_deb

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
LONG = " ".join(["word"] * 31)
DATA = {
    "noun": [
        '00000100 05 n 02 dog 0 domestic_dog 0 001 @ 00000300 n 0000 | a member of the genus '
        'Canis; "the dog barked all night"  ',
        '00000200 18 n 01 dog 1 000 | a dull unattractive unpleasant girl or woman; "she got '
        'a reputation as a frump"; "she\'s a real dog"  ',
        "00000300 05 n 01 cat 0 000 | feline mammal usually having thick soft fur  ",
        "00000400 13 n 01 ice_cream 0 000 | frozen dessert  ",
        "00000500 15 n 01 Paris 0 000 | the capital and largest city of France  ",
        "00000600 04 n 01 run 0 000 | a score in baseball made by a runner touching all four "
        "bases safely  ",
        "00000700 23 n 01 a 0 000 | a metric unit of length equal to one ten billionth of a "
        "meter  ",
        "00000800 28 n 01 o'clock 0 000 | according to the clock  ",
        f"00000900 09 n 01 verbosity 0 000 | {LONG}  ",
    ],
    "verb": ['00001000 38 v 01 run 0 001 @ 00001100 v 0000 01 + 02 00 | move fast by using '
             'one\'s feet; "Don\'t run--you\'ll be out of breath"  '],
    "adj": ['00002000 00 a 01 quick(a) 0 000 | moving quickly and lightly; "a quick step"  ',
            "00002100 00 s 01 fast 0 000 | acting or moving or capable of acting or moving "
            "quickly  "],
    "adv": ['00003000 02 r 01 quickly 0 000 | with rapid movements; "he works quickly"  '],
}
INDEX = {
    "noun": ["a n 1 0 1 0 00000700  ", "cat n 1 0 1 1 00000300  ",
             "dog n 2 1 @ 2 1 00000100 00000200  ", "ice_cream n 1 0 1 0 00000400  ",
             "o'clock n 1 0 1 0 00000800  ", "paris n 1 0 1 0 00000500  ",
             "run n 1 0 1 0 00000600  ", "verbosity n 1 0 1 0 00000900  "],
    "verb": ["run v 1 1 @ 1 1 00001000  "],
    "adj": ["fast a 1 0 1 0 00002100  ", "quick a 1 0 1 0 00002000  "],
    "adv": ["quickly r 1 0 1 0 00003000  "],
}
CNTLIST = "dog%1:05:00:: 1 42\ndog%1:18:00:: 2 1\nrun%2:38:00:: 1 7\nfast%5:00:00:quick:00 1 3\n"


def wordnet_files() -> dict[str, bytes]:
    """The miniature WordNet in the Debian package layout."""
    files = {}
    for pos in W.FILE_POS:
        files[f"usr/share/wordnet/data.{pos}"] = (HEADER + "\n".join(DATA[pos]) + "\n").encode()
        files[f"usr/share/wordnet/index.{pos}"] = (HEADER + "\n".join(INDEX[pos]) + "\n").encode()
    files["usr/share/wordnet/cntlist.rev"] = CNTLIST.encode()
    return files


@pytest.fixture
def deb(tmp_path):
    return make_deb(tmp_path / "wordnet-base_1%3a3.0-99_all.deb", wordnet_files())


@pytest.mark.parametrize("gloss, definition, examples", [
    ('a member of the genus Canis; "the dog barked all night"',
     "a member of the genus Canis", ("the dog barked all night",)),
    ('girl; "she got a reputation"; "she\'s a real dog"  ', "girl",
     ("she got a reputation", "she's a real dog")),
    ("feline mammal usually having thick soft fur  ", "feline mammal usually having thick soft fur",
     ()),
    ('the act of putting one thing in the place of another: "he sent Smith in for Jones"',
     "the act of putting one thing in the place of another", ("he sent Smith in for Jones",)),
    ('promise of reward as in "carrot and stick"; "used the carrot of subsidized housing"',
     'promise of reward as in "carrot and stick"', ("used the carrot of subsidized housing",)),
    ('significant progress (especially in the phrase "make strides"); "they made big strides"',
     'significant progress (especially in the phrase "make strides")', ("they made big strides",)),
    ('move with force, "He pushed the table into a corner"', "move with force",
     ("He pushed the table into a corner",)),
    ('a workplace; as in the expression "on the job";', 'a workplace; as in the expression '
     '"on the job"', ()),
])
def test_split_gloss(gloss, definition, examples):
    assert W.split_gloss(gloss) == (definition, examples)


def test_parse_data_line_fields():
    s = W.parse_data_line(DATA["noun"][0], "n")
    assert (s.offset, s.pos, s.ss_type, s.lexname) == ("00000100", "n", "n", "noun.animal")
    assert s.words == ("dog", "domestic_dog")
    assert s.synset_id == "n00000100"
    assert s.definition == "a member of the genus Canis"
    assert s.examples == ("the dog barked all night",)
    verb = W.parse_data_line(DATA["verb"][0], "v")  # frames between pointers and gloss
    assert verb.lexname == "verb.motion" and verb.definition == "move fast by using one's feet"
    adj = W.parse_data_line(DATA["adj"][0], "a")
    assert adj.words == ("quick",)  # the (a) syntactic marker is dropped
    assert W.parse_data_line(HEADER, "n") is None


def test_parse_data_line_hex_word_count_and_errors():
    line = ("00000001 05 n 0a " + " ".join(f"w{i} 0" for i in range(10))
            + " 000 | ten words")
    assert len(W.parse_data_line(line, "n").words) == 10  # w_cnt is hexadecimal
    with pytest.raises(DataError, match="malformed"):
        W.parse_data_line("00000001 99 n 01 x 0 000 | lexfile 99 does not exist", "n")
    with pytest.raises(DataError, match="malformed"):
        W.parse_data_line("garbage | x", "n")


def test_parse_index_and_cntlist():
    assert W.parse_index_line(INDEX["noun"][2]) == ("dog", "n", ("00000100", "00000200"))
    assert W.parse_index_line(HEADER) is None
    counts = W.parse_cntlist(CNTLIST)
    assert counts[("dog", "n")] == 43 and counts[("fast", "a")] == 3
    assert counts[("run", "v")] == 7


def test_lexnames_are_the_45_files_of_lexnames_5wn():
    assert len(W.LEXNAMES) == 45
    assert W.LEXNAMES[0] == "adj.all" and W.LEXNAMES[5] == "noun.animal"
    assert W.LEXNAMES[38] == "verb.motion" and W.LEXNAMES[44] == "adj.ppl"


def test_definition_rows_filters_and_fields(tmp_path, deb):
    wn = W.read_wordnet(SourceArchive(deb))
    rows, dropped = W.definition_rows(wn)
    assert [(r["word"], r["pos"]) for r in rows] == [
        ("cat", "noun"), ("dog", "noun"), ("fast", "adjective"), ("quick", "adjective"),
        ("quickly", "adverb"), ("run", "noun"), ("run", "verb")]
    assert dropped == {"definition longer than 30 words": 1, "multi-word collocation": 1,
                       "not a plain lowercase word (digits, dots, apostrophes...)": 1,
                       "proper noun or capitalised form": 1, "single letter": 1}
    dog = rows[1]
    assert dog == {
        "prompt": "Define the word dog (noun).", "response": "a member of the genus Canis",
        "word": "dog", "pos": "noun", "lexname": "noun.animal", "synset": "n00000100",
        "senses": 2, "frequency": 43, "examples": ["the dog barked all night"],
        "references": ["a member of the genus Canis",
                       "a dull unattractive unpleasant girl or woman"]}
    assert rows[2]["frequency"] == 3 and rows[2]["lexname"] == "adj.all"


def test_build_definitions_splits_by_word(deb):
    path = build("wordnet-definitions", source=deb, progress=False)
    splits = {s: load("wordnet-definitions", s) for s in SPLITS}
    words = {s: {r["word"] for r in rows} for s, rows in splits.items()}
    assert not words["train"] & (words["validation"] | words["test"])
    assert sum(len(r) for r in splits.values()) == 7
    # both parts of speech of "run" are in the same split
    assert sum("run" in w for w in words.values()) == 1
    meta = json.loads((path / "meta.json").read_text())
    assert meta["counts"]["total"] == 7
    assert meta["source"]["version"] == "1:3.0-99"
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in meta["licence"]["notice"]
    assert meta["build"]["dropped"]["multi-word collocation"] == 1


def test_build_lexnames(deb):
    path = build("wordnet-lexnames", source=deb, progress=False)
    rows = [r for s in SPLITS for r in load("wordnet-lexnames", s)]
    assert len(rows) == 13  # every synset of the miniature has a definition
    by_id = {r["synset"]: r for r in rows}
    assert by_id["n00000100"]["label"] == "noun.animal"
    assert by_id["n00000100"]["text"] == "a member of the genus Canis"
    assert by_id["n00000100"]["words"] == ["dog", "domestic dog"]
    assert by_id["a00002100"]["pos"] == "adjective"
    meta = json.loads((path / "meta.json").read_text())
    # label names follow the lexicographer file numbers
    assert meta["label_names"] == [n for n in W.LEXNAMES if n in {r["label"] for r in rows}]


def test_missing_wordnet_files_are_named(tmp_path):
    files = wordnet_files()
    del files["usr/share/wordnet/index.adv"]
    deb = make_deb(tmp_path / "broken.deb", files)
    with pytest.raises(DataError, match="index.adv"):
        build("wordnet-definitions", source=deb, progress=False)


def test_license_file_ships_with_the_package():
    text = W.license_text()
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in text
    assert 'PROVIDED "AS IS"' in text
