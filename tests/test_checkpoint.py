"""Checkpoints and artifact writes: round trips, incomplete folders ignored, atomic replacement, pruning."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from popri.checkpoint import (
    atomic_dir,
    atomic_open,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_npy,
    atomic_write_text,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    write_jsonl,
)


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"lora.A": torch.randn(4, 3, generator=generator), "lora.B": torch.randn(3, 4, generator=generator)}


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_checkpoint_round_trip_keeps_tensors_meta_and_files(tmp_path: Path) -> None:
    # prepare
    tensors = _tensors(0)
    meta = {"round": 3, "ledger": {"delta": 3e-6, "history": [[3.35, 1.0, 3]]}, "seed": 0}

    # execute
    path = save_checkpoint(tmp_path, 3, tensors=tensors, meta=meta, files={"pairs.jsonl": '{"a": 1}\n'})
    found = latest_checkpoint(tmp_path)
    loaded_tensors, loaded_meta = load_checkpoint(found)

    # assert
    assert found == path == tmp_path / "round-0003"
    assert loaded_meta == meta
    assert loaded_tensors.keys() == tensors.keys()
    for name, tensor in tensors.items():
        torch.testing.assert_close(loaded_tensors[name], tensor, rtol=0, atol=0)
    assert (path / "pairs.jsonl").read_text() == '{"a": 1}\n'
    assert _leftovers(tmp_path) == []  # the temporary build folder is gone


def test_latest_checkpoint_is_the_highest_round(tmp_path: Path) -> None:
    # prepare: written out of order, and past 9 so a plain string sort of unpadded names would fail
    for round_index in (2, 10, 9):
        save_checkpoint(tmp_path, round_index, tensors=_tensors(round_index), meta={"round": round_index})

    # execute
    found = latest_checkpoint(tmp_path)

    # assert
    assert found is not None
    assert load_checkpoint(found)[1] == {"round": 10}


def test_latest_checkpoint_ignores_temporary_and_incomplete_folders(tmp_path: Path) -> None:
    # prepare: a crash mid-save leaves a .tmp-* folder; a folder without meta.json is not complete
    save_checkpoint(tmp_path, 1, tensors=_tensors(1), meta={"round": 1})
    leftover = tmp_path / ".tmp-abc123"
    leftover.mkdir()
    (leftover / "meta.json").write_text('{"round": 5}')
    incomplete = tmp_path / "round-0002"
    incomplete.mkdir()
    torch.save(_tensors(2), incomplete / "state.pt")

    # execute
    found = latest_checkpoint(tmp_path)

    # assert
    assert found == tmp_path / "round-0001"


def test_latest_checkpoint_of_missing_or_empty_directory_is_none(tmp_path: Path) -> None:
    # execute / assert
    assert latest_checkpoint(tmp_path / "nowhere") is None
    assert latest_checkpoint(tmp_path) is None


def test_saving_a_round_again_replaces_it(tmp_path: Path) -> None:
    # prepare
    save_checkpoint(tmp_path, 4, tensors=_tensors(0), meta={"version": 1}, files={"old.txt": "old"})

    # execute
    path = save_checkpoint(tmp_path, 4, tensors=_tensors(1), meta={"version": 2})

    # assert
    tensors, meta = load_checkpoint(path)
    assert meta == {"version": 2}
    torch.testing.assert_close(tensors["lora.A"], _tensors(1)["lora.A"], rtol=0, atol=0)
    assert not (path / "old.txt").exists()


def test_failed_checkpoint_save_leaves_the_previous_one_and_no_temporary_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # prepare
    save_checkpoint(tmp_path, 1, tensors=_tensors(1), meta={"round": 1})

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("popri.checkpoint.torch.save", crash)

    # execute
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, tensors=_tensors(2), meta={"round": 2})

    # assert
    assert latest_checkpoint(tmp_path) == tmp_path / "round-0001"
    assert _leftovers(tmp_path) == []
    assert not (tmp_path / "round-0002").exists()


def test_atomic_write_replaces_the_file_content(tmp_path: Path) -> None:
    # prepare
    path = tmp_path / "sub" / "metrics.json"

    # execute
    atomic_write_text(path, "old\n")
    atomic_write_json(path, {"epsilon": 0.5})

    # assert
    assert json.loads(path.read_text()) == {"epsilon": 0.5}
    assert _leftovers(path.parent) == []


def test_failed_atomic_write_keeps_the_old_file_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # prepare
    path = tmp_path / "metrics.json"
    path.write_text("old content\n")

    def failing_replace(src: object, dst: object) -> None:
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", failing_replace)

    # execute
    with pytest.raises(OSError, match="rename failed"):
        atomic_write_text(path, "new content\n")

    # assert
    assert path.read_text() == "old content\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_write_jsonl_writes_one_record_per_line_unescaped(tmp_path: Path) -> None:
    # prepare
    rows = [{"prompt": "p", "chosen": "Æsop's fable"}, {"prompt": "q", "chosen": "line\nbreak"}]

    # execute
    write_jsonl(tmp_path / "pairs.jsonl", rows)

    # assert
    text = (tmp_path / "pairs.jsonl").read_text(encoding="utf-8")
    assert "Æsop" in text
    assert [json.loads(line) for line in text.splitlines()] == rows


def test_prune_keeps_the_newest_two_checkpoints(tmp_path: Path) -> None:
    # prepare
    for round_index in (1, 2, 3, 4, 11):
        save_checkpoint(tmp_path, round_index, tensors={}, meta={"round": round_index})
    (tmp_path / "metrics.jsonl").write_text("{}\n")

    # execute
    prune_checkpoints(tmp_path)

    # assert: other files in the output folder are left alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "round-0004", "round-0011"]
    assert latest_checkpoint(tmp_path) == tmp_path / "round-0011"


def test_prune_with_fewer_checkpoints_than_kept_deletes_nothing(tmp_path: Path) -> None:
    # prepare
    save_checkpoint(tmp_path, 1, tensors={}, meta={"round": 1})

    # execute
    prune_checkpoints(tmp_path, keep=2)

    # assert
    assert latest_checkpoint(tmp_path) == tmp_path / "round-0001"


def test_atomic_write_fsyncs_the_file_and_its_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # prepare: record what every fsync was called on
    import stat

    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)

    # execute
    atomic_write_json(tmp_path / "ledger.json", {"history": []})

    # assert: the data before the rename, the directory entry after it
    assert synced == ["file", "dir"]


def test_checkpoint_files_and_folders_are_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # prepare
    import stat

    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)

    # execute
    save_checkpoint(tmp_path, 0, tensors=_tensors(0), meta={"round": 0}, files={"pairs.jsonl": ""})

    # assert: state.pt, pairs.jsonl and meta.json, then the new folder and its parent
    assert synced == ["file", "file", "file", "dir", "dir"]


def test_a_second_lock_on_a_run_folder_is_refused_until_the_first_is_released(tmp_path: Path) -> None:
    # prepare
    from popri.checkpoint import RunLock, RunLockedError

    first = RunLock(tmp_path).acquire()

    # execute / assert: flock locks belong to an open file, so a second open (any process) is refused
    with pytest.raises(RunLockedError, match="in use by another popri process"):
        RunLock(tmp_path).acquire()
    first.release()
    with RunLock(tmp_path) as again:
        assert again.held
    assert not again.held


def test_atomic_write_npy_round_trips_through_np_load(tmp_path: Path) -> None:
    # Prepare
    array = np.random.default_rng(3).normal(size=(5, 4)).astype(np.float32)
    path = tmp_path / "cache" / "sums.npy"

    # Execute
    atomic_write_npy(path, array)

    # Assert
    loaded = np.load(path)
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, array)
    assert _leftovers(path.parent) == []


def test_atomic_write_bytes_gives_a_secret_owner_only_permissions(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "node.key"

    # Execute
    atomic_write_bytes(path, b"secret", mode=0o600)

    # Assert
    assert path.read_bytes() == b"secret"
    assert path.stat().st_mode & 0o777 == 0o600


def test_atomic_open_that_fails_keeps_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "plot.png"
    path.write_bytes(b"old")

    # Execute
    with pytest.raises(RuntimeError, match="render failed"), atomic_open(path) as fh:
        fh.write(b"half")
        raise RuntimeError("render failed")

    # Assert
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]


def test_atomic_dir_replaces_the_whole_folder(tmp_path: Path) -> None:
    # Prepare
    target = tmp_path / "generator"
    target.mkdir()
    (target / "stale.bin").write_bytes(b"old")

    # Execute
    with atomic_dir(target) as tmp:
        (tmp / "adapter_config.json").write_text("{}")

    # Assert: the old folder's files are gone with it, no temporary folder is left
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generator"]


def test_atomic_dir_that_fails_keeps_the_old_folder(tmp_path: Path) -> None:
    # Prepare
    target = tmp_path / "dataset"
    target.mkdir()
    (target / "README.md").write_text("old")

    # Execute
    with pytest.raises(OSError, match="disk full"), atomic_dir(target) as tmp:
        (tmp / "README.md").write_text("new")
        raise OSError("disk full")

    # Assert
    assert (target / "README.md").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]
