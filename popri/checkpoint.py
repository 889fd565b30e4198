"""Durable writes for the whole project: atomic text/JSON/JSONL files, checkpoints, and the run folder's lock.

Every write goes to a temporary file in the same directory, is fsynced, renamed over the target, and the directory is
fsynced too, so after a crash (or a power cut) a reader sees the old file or the new one, never half of one, and a
rename that returned has reached the disk. A crash at any point leaves the last complete checkpoint intact.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any

import torch

CHECKPOINT_PREFIX = "round-"
LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """Another process holds the run folder: two writers would corrupt its privacy ledger."""


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries (new, renamed or removed files) to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a fsynced temporary file in the same directory, rename, fsync the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    """:func:`atomic_write_text` of ``obj`` as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """:func:`atomic_write_text` of one JSON object per line (unescaped UTF-8)."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


atomic_write_jsonl = write_jsonl


def save_checkpoint(
    directory: Path,
    round_index: int,
    *,
    tensors: dict[str, Any],
    meta: dict[str, Any],
    files: dict[str, str] | None = None,
) -> Path:
    """Write ``directory/round-XXXX`` atomically: built and fsynced in a temporary folder, then renamed into place."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{CHECKPOINT_PREFIX}{round_index:04d}"
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=".tmp-"))
    try:
        with (tmp / "state.pt").open("wb") as fh:
            torch.save(tensors, fh)
            fh.flush()
            os.fsync(fh.fileno())
        for name, text in (files or {}).items():
            _write_synced(tmp / name, text)
        _write_synced(tmp / "meta.json", json.dumps(meta, indent=2) + "\n")  # written last: marks it complete
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(directory)
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    """The complete checkpoint of the highest round, or None. Unfinished temporary folders are ignored."""
    if not directory.is_dir():
        return None
    done = sorted(p for p in directory.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / "meta.json").exists())
    return done[-1] if done else None


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, meta) of a checkpoint folder."""
    tensors = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    meta = json.loads((path / "meta.json").read_text())
    return tensors, meta


def prune_checkpoints(directory: Path, keep: int = 2) -> None:
    """Keep the newest ``keep`` checkpoints (the ledger is in each, so older ones add nothing)."""
    done = sorted(p for p in directory.iterdir() if p.name.startswith(CHECKPOINT_PREFIX))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(directory)


class RunLock:
    """An exclusive ``fcntl.flock`` on ``DIR/.lock``, held while a run writes the folder (its ledger above all).

    A second process (or a second run in this process) that tries to take it gets :class:`RunLockedError` at once
    instead of waiting; the kernel releases the lock if the holder dies, so a crashed run never blocks its resume.
    """

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LOCK_NAME
        self._fh: IO[str] | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            fh.close()
            if err.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise RunLockedError(
                    f"{self.path.parent} is in use by another popri process (lock {self.path}); wait for it to finish"
                    " or pick another --output"
                ) from None
            raise
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")  # for a person looking at the folder; the lock itself is the flock
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    @property
    def held(self) -> bool:
        return self._fh is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
