"""Atomic checkpoints and artifact writes: a crash at any point leaves the last complete round intact."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_PREFIX = "round-"


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same directory and rename: readers see the old or the new file, never half."""
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


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def save_checkpoint(
    directory: Path,
    round_index: int,
    *,
    tensors: dict[str, Any],
    meta: dict[str, Any],
    files: dict[str, str] | None = None,
) -> Path:
    """Write ``directory/round-XXXX`` atomically: built in a temporary folder, then renamed into place."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{CHECKPOINT_PREFIX}{round_index:04d}"
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=".tmp-"))
    try:
        torch.save(tensors, tmp / "state.pt")
        for name, text in (files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")  # written last: marks it complete
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
