"""Durable writes for the whole project: atomic text/JSON/JSONL files, checkpoints, and the run folder's lock.

Every write goes to a temporary file in the same directory, is fsynced, renamed over the target, and the directory is
fsynced too, so after a crash (or a power cut) a reader sees the old file or the new one, never half of one, and a
rename that returned has reached the disk. A crash at any point leaves the last complete checkpoint intact.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import numpy as np

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


@contextlib.contextmanager
def atomic_open(path: Path, *, mode: int | None = None) -> Iterator[IO[bytes]]:
    """A binary handle whose content replaces ``path`` when the block ends without error; else nothing changes.

    The data go to a temporary file in the same directory (created 0600), are fsynced, get ``mode`` if given, and
    are renamed over ``path``; the directory is fsynced last. For writers that want a file object (``np.save``,
    ``savefig``, ``torch.save``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Write ``data`` through :func:`atomic_open` (``mode=0o600`` for a secret: it never exists more readable)."""
    with atomic_open(path, mode=mode) as fh:
        fh.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a fsynced temporary file in the same directory, rename, fsync the directory."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_npy(path: Path, array: np.ndarray) -> None:
    """:func:`atomic_write_bytes` of ``array`` in numpy's ``.npy`` format (what ``np.load`` reads)."""
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())


def _fsync_tree(root: Path) -> None:
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(folder))


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """A temporary folder beside ``target`` to fill; it replaces ``target`` when the block ends without error.

    Every file in it is fsynced, an existing ``target`` is removed, the folder is renamed into place and the parent
    fsynced: a reader sees the old folder or the new one, never half of one. On error the temporary folder goes and
    ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(target.parent)


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
