"""``popri generate``: more samples from a finished run, resumable, deterministic, private data untouched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from popri.export import RunFolderError
from popri.generate import card_path, generate_more, meta_path
from tests.run_artifacts import finished_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return finished_run(tmp_path_factory.mktemp("generate"), tiny_model_dir)


def _texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_interrupted_then_resumed_generation_equals_one_call(run_dir, tmp_path):
    # Prepare
    one_go, resumed = tmp_path / "one.jsonl", tmp_path / "resumed.jsonl"

    # Execute
    generate_more(run_dir, samples=7, output=one_go, seed=3, batch_size=3, progress=False)
    first = generate_more(run_dir, samples=4, output=resumed, seed=3, batch_size=3, progress=False)
    second = generate_more(run_dir, samples=7, output=resumed, seed=3, batch_size=3, progress=False)

    # Assert
    assert (first, second) == (4, 3)
    assert len(_texts(one_go)) == 7
    assert _texts(resumed) == _texts(one_go)


def test_another_seed_gives_other_samples(run_dir, tmp_path):
    # Prepare
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"

    # Execute
    generate_more(run_dir, samples=4, output=a, seed=0, batch_size=4, progress=False)
    generate_more(run_dir, samples=4, output=b, seed=1, batch_size=4, progress=False)

    # Assert
    assert _texts(a) != _texts(b)


def test_a_torn_last_line_is_dropped_and_written_again(run_dir, tmp_path):
    # Prepare: a file cut in the middle of its third line, as a crash mid-write leaves it
    reference, torn = tmp_path / "reference.jsonl", tmp_path / "torn.jsonl"
    generate_more(run_dir, samples=5, output=reference, seed=2, batch_size=2, progress=False)
    generate_more(run_dir, samples=3, output=torn, seed=2, batch_size=2, progress=False)
    data = torn.read_bytes()
    torn.write_bytes(data[: data.rfind(b"\n", 0, len(data) - 1) + 1] + b'{"text": "half')

    # Execute
    generate_more(run_dir, samples=5, output=torn, seed=2, batch_size=2, progress=False)

    # Assert
    assert _texts(torn) == _texts(reference)


def test_generation_reads_no_private_data_and_charges_nothing(run_dir, tmp_path):
    # Prepare: a copy of the run whose private data file does not exist
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "data": str(tmp_path / "gone.jsonl")}))
    before = {name: (run / name).read_bytes() for name in ("ledger.json", "privacy.json", "rounds.jsonl")}
    out = tmp_path / "more.jsonl"

    # Execute
    generate_more(run, samples=3, output=out, seed=0, batch_size=3, progress=False)

    # Assert
    assert {name: (run / name).read_bytes() for name in before} == before
    assert len(_texts(out)) == 3
    card = card_path(out).read_text()
    privacy = json.loads((run / "privacy.json").read_text())
    assert f"{privacy['epsilon']:.6g}" in card
    assert "no further privacy cost" in card


def test_samples_keep_the_runs_token_budget(run_dir, tmp_path):
    # Prepare
    from transformers import AutoTokenizer

    out = tmp_path / "more.jsonl"
    budget = json.loads((run_dir / "config.json").read_text())["token-budget"]
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "generator")

    # Execute
    generate_more(run_dir, samples=6, output=out, seed=0, batch_size=3, progress=False)

    # Assert
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in _texts(out)]
    assert max(lengths) <= budget
    assert all("Original Text Sample" not in t for t in _texts(out))


def test_resuming_with_another_seed_is_refused_and_the_file_kept(run_dir, tmp_path):
    # Prepare
    out = tmp_path / "more.jsonl"
    generate_more(run_dir, samples=2, output=out, seed=0, batch_size=2, progress=False)
    before = out.read_bytes()

    # Execute / Assert
    with pytest.raises(ValueError, match="seed=0"):
        generate_more(run_dir, samples=4, output=out, seed=1, batch_size=2, progress=False)
    assert out.read_bytes() == before
    assert json.loads(meta_path(out).read_text())["seed"] == 0


def test_several_samples_per_prompt_resume_exactly_and_another_value_is_refused(run_dir, tmp_path):
    # Prepare: 7 samples at 2 per prompt in one go, and the same interrupted after 4
    one_go, resumed = tmp_path / "one.jsonl", tmp_path / "resumed.jsonl"
    generate_more(run_dir, samples=7, output=one_go, seed=2, batch_size=3, samples_per_prompt=2, progress=False)
    generate_more(run_dir, samples=4, output=resumed, seed=2, batch_size=3, samples_per_prompt=2, progress=False)

    # Execute: resume with the same setting, then try another one
    generate_more(run_dir, samples=7, output=resumed, seed=2, batch_size=3, samples_per_prompt=2, progress=False)
    with pytest.raises(ValueError, match="samples_per_prompt=2"):
        generate_more(run_dir, samples=9, output=resumed, seed=2, batch_size=3, samples_per_prompt=1, progress=False)

    # Assert: the resumed file is the uninterrupted one, and the setting is on record
    assert _texts(resumed) == _texts(one_go) and len(_texts(one_go)) == 7
    assert json.loads(meta_path(resumed).read_text())["samples_per_prompt"] == 2
    with pytest.raises(ValueError, match="--samples-per-prompt must be >= 1, got 0"):
        generate_more(run_dir, samples=2, output=tmp_path / "zero.jsonl", samples_per_prompt=0, progress=False)


def test_a_foreign_output_file_is_not_appended_to(run_dir, tmp_path):
    # Prepare
    out = tmp_path / "notes.jsonl"
    out.write_text("my own notes\n")

    # Execute / Assert
    with pytest.raises(FileExistsError, match="not written by popri generate"):
        generate_more(run_dir, samples=2, output=out, progress=False)
    assert out.read_text() == "my own notes\n"


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("config", "config.json: missing"),
        ("privacy", "privacy.json does not exist"),
        ("generator", "generator: missing"),
    ],
)
def test_a_partial_run_folder_is_refused_naming_the_file(run_dir, tmp_path, damage, reason):
    # Prepare
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    if damage == "generator":
        shutil.rmtree(run / "generator")
    else:
        (run / f"{damage}.json").unlink()

    # Execute
    with pytest.raises(ValueError) as err:  # RunFolderError and CardError are both ValueErrors
        generate_more(run, samples=2, output=tmp_path / "out.jsonl", progress=False)

    # Assert
    assert reason in str(err.value)
    assert not (tmp_path / "out.jsonl").exists()


def test_generate_command_appends_and_reports_a_broken_run(run_dir, tmp_path, caplog):
    # Prepare
    from popri.cli import main

    out = tmp_path / "more.jsonl"

    # Execute
    ok = main(["generate", "--run", str(run_dir), "--samples", "2", "--output", str(out), "--no-progress"])
    broken = main(["generate", "--run", str(tmp_path), "--samples", "2", "--output", str(tmp_path / "x.jsonl")])

    # Assert
    assert ok == 0 and len(_texts(out)) == 2
    assert broken == 2
    assert "config.json: missing" in caplog.text


def test_a_corrupt_config_is_refused_with_the_file_and_line(run_dir, tmp_path):
    # Prepare
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "config.json").write_text('{\n  "rounds": 2,\n  oops\n}')

    # Execute / Assert
    with pytest.raises(RunFolderError, match=r"config.json.*line 3"):
        generate_more(run, samples=2, output=tmp_path / "out.jsonl", progress=False)
