"""``wordnet-definitions-demo``: a small subset of ``wordnet-definitions`` shipped in the package.

``make demo`` must run on a machine without apt or network, so a few thousand rows live
in ``deltatune/datasets/data/wordnet-definitions-demo.jsonl.gz`` (with the WordNet
licence beside it). The subset is chosen so that SmolLM2-135M can visibly learn it in
minutes on two CPU cores: nouns whose definition is short (2-12 words) and that occur
in the SemCor concordance (frequency >= 1), i.e. familiar words. Train rows come from the
full set's train split and validation/test rows from its held-out words, so the held-out
metric still measures generalisation to unseen words.

``build("wordnet-definitions-demo")`` regenerates the same content from the full data
set (it needs ``apt-get download wordnet-base`` once); copy the ``.jsonl.gz`` it writes
into the package to refresh the committed file.
"""

from __future__ import annotations

import gzip
from importlib import resources
from typing import Any

from deltatune.core.errors import DataError
from deltatune.datasets import BuildContext, DatasetSpec, register
from deltatune.datasets._common import SPLITS, BuildResult, Row, Source, jsonl_bytes, parse_jsonl
from deltatune.datasets.wordnet import CITATION, LICENCE, license_text

NAME = "wordnet-definitions-demo"
FILE = f"{NAME}.jsonl.gz"
SIZES = {"train": 4000, "validation": 300, "test": 300}
MIN_WORDS, MAX_WORDS = 2, 12
FIELDS = ("prompt", "response", "word", "references")


def eligible(row: Row) -> bool:
    """The demo's filter: a noun with a 2-12 word definition, seen in SemCor."""
    n_words = len(row["response"].split())
    return row["pos"] == "noun" and MIN_WORDS <= n_words <= MAX_WORDS and row["frequency"] >= 1


def select(splits: dict[str, list[Row]]) -> dict[str, list[Row]]:
    """Pick the demo rows from the full data set's splits (already in seeded hash order).

    Takes the first ``SIZES[split]`` eligible rows of each split, keeping ``FIELDS``.
    """
    out = {}
    for split in SPLITS:
        picked = [r for r in splits[split] if eligible(r)][:SIZES[split]]
        if len(picked) < SIZES[split]:
            raise DataError(f"only {len(picked)} eligible {split} rows for the demo subset; "
                            f"{SIZES[split]} wanted")
        out[split] = [{k: r[k] for k in FIELDS} for r in picked]
    return out


def encode(splits: dict[str, list[Row]]) -> bytes:
    """The committed file's bytes: JSON lines with a ``split`` field, gzip with mtime 0."""
    rows = [{"split": s, **r} for s in SPLITS for r in splits[s]]
    return gzip.compress(jsonl_bytes(rows), compresslevel=9, mtime=0)


def decode(raw: bytes, where: str = FILE) -> dict[str, list[Row]]:
    """Inverse of :func:`encode`: {split: rows without the split field}."""
    try:
        text = gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise DataError(f"{where}: not a readable gzip file ({exc})") from None
    out: dict[str, list[Row]] = {s: [] for s in SPLITS}
    for row in parse_jsonl(text, where):
        split = row.pop("split", None)
        if split not in out:
            raise DataError(f"{where}: row with unknown split {split!r}")
        out[split].append(row)
    return out


def _packaged_bytes() -> bytes:
    path = resources.files("deltatune.datasets") / "data" / FILE
    if not path.is_file():
        raise DataError(f"the packaged demo subset {FILE} is missing from this installation; "
                        f"reinstall deltatune, or rebuild it with "
                        f"`deltatune data build {NAME}` (needs apt-get download)")
    return path.read_bytes()


def load_packaged(split: str) -> list[Row]:
    """Rows of one split of the committed demo subset (no network, no cache)."""
    return decode(_packaged_bytes())[split]


def packaged_meta() -> dict[str, Any]:
    """meta.json-like facts about the committed subset (counts computed from the file)."""
    splits = decode(_packaged_bytes())
    counts = {s: len(splits[s]) for s in SPLITS}
    return {"name": NAME, "kind": "sft", "description": SPEC.description,
            "source": {"registry": "deltatune", "package": "deltatune",
                       "file": f"deltatune/datasets/data/{FILE}",
                       "derived_from": "wordnet-definitions"},
            "licence": {"name": LICENCE, "notice": license_text()},
            "counts": {**counts, "total": sum(counts.values())},
            "build": _build_facts(), "citation": CITATION}


def _build_facts() -> dict[str, Any]:
    return {"selection": f"rows of wordnet-definitions with pos == noun, a definition of "
                         f"{MIN_WORDS}-{MAX_WORDS} words and SemCor frequency >= 1; the first "
                         f"{SIZES['train']}/{SIZES['validation']}/{SIZES['test']} of the "
                         f"train/validation/test splits in their seeded order",
            "fields": list(FIELDS), "held_out": "validation and test words never occur in "
                                                "train (the full set is split by word)"}


def build_demo(ctx: BuildContext) -> BuildResult:
    """Builder: regenerate the demo subset from the full ``wordnet-definitions``."""
    from deltatune.datasets import load

    full = {s: load("wordnet-definitions", s) for s in SPLITS}
    splits = select(full)
    return BuildResult(splits=splits, build=_build_facts(),
                       extra_files={FILE: encode(splits)})


SPEC = register(DatasetSpec(
    name=NAME, kind="sft",
    description=f"{sum(SIZES.values())}-row subset of wordnet-definitions (short definitions "
                f"of common nouns) shipped inside deltatune: no network needed",
    source=Source("deltatune", "wordnet-definitions"), licence=LICENCE, notice=license_text(),
    builder=build_demo, citation=CITATION))

