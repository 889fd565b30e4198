"""DIR/report.md: plot, privacy card, time per stage, first and last round side by side; and what feeds it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from popri.report import report_markdown, round_samples_path, save_round_samples, write_report
from tests.run_artifacts import finished_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return finished_run(tmp_path_factory.mktemp("report"), tiny_model_dir, rounds=3)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_finished_run_writes_every_artifact_a_user_takes_home(run_dir):
    # Execute: the run already finished; read what it left

    # Assert
    for name in ("report.md", "rounds.png", "synthetic.jsonl", "synthetic/README.md", "initial_set.json"):
        assert (run_dir / name).is_file(), name
    assert {"adapter_config.json", "adapter_model.safetensors", "popri_generator.json", "privacy-card.md"} <= {
        p.name for p in (run_dir / "generator").iterdir()
    }
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-0001", "round-0002"]


def test_every_rounds_samples_outlive_checkpoint_pruning(run_dir):
    # Prepare
    newest = run_dir / "checkpoints" / "round-0002" / "samples.jsonl"

    # Execute
    saved = [round_samples_path(run_dir, t) for t in range(3)]

    # Assert
    assert all(p.is_file() for p in saved)
    assert _rows(saved[-1]) == _rows(newest)
    assert all(len(_rows(p)) == 9 for p in saved)  # K=3 prompts x J=3 samples


def test_report_shows_plot_card_stages_and_first_and_last_round(run_dir):
    # Prepare
    report = (run_dir / "report.md").read_text()
    privacy = json.loads((run_dir / "privacy.json").read_text())
    first = _rows(round_samples_path(run_dir, 0))[0]["text"]

    # Execute: the sections, in order
    sections = [line for line in report.splitlines() if line.startswith("## ")]

    # Assert
    assert "![per-round curves](rounds.png)" in report
    assert sections[:4] == ["## Privacy", "## Rounds", "## Time per stage", "## Samples: first and last round"]
    assert f"{privacy['epsilon']:.6g}" in report
    for stage in ("generate", "embed", "collect", "aggregate", "dpo", "checkpoint"):
        assert f"| {stage} |" in report
    assert "| # | round 1 | round 3 |" in report
    assert " ".join(first.split()).replace("|", "\\|") in report


def test_report_publishes_no_count_of_users(run_dir):
    # Prepare: at q = 1 every round samples all 9 training users of the tiny run
    records = _rows(run_dir / "rounds.jsonl")

    # Execute
    report = (run_dir / "report.md").read_text()

    # Assert
    assert records and not any("users_sampled" in r for r in records)
    assert "users_sampled" not in report
    assert "9 users" not in report
    assert not [line for line in report.splitlines() if line.startswith("| round |") and "user" in line]


def test_report_of_a_run_with_a_discarded_round_and_old_layout(tmp_path):
    # Prepare: an older run folder (samples only in checkpoints) whose second round was discarded
    run = tmp_path / "run"
    (run / "checkpoints" / "round-0000").mkdir(parents=True)
    (run / "checkpoints" / "round-0000" / "samples.jsonl").write_text('{"prompt": 0, "text": "a | b"}\n')
    records = [
        {"round": 1, "pairs": 1, "dpo/loss": 0.69, "privacy/epsilon": 1.5, "seconds": {"generate": 2.0, "dpo": 1.0}},
        {"round": 2, "discarded": True, "seconds": {"collect": 3.0}},
    ]
    (run / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    # Execute
    report = report_markdown(run)

    # Assert
    assert "No privacy card" in report and "privacy.json does not exist" in report
    assert "| 2 | discarded" in report
    assert "| generate | 2.0 | 1.00 | 33 % |" in report
    assert "a \\| b" in report


def test_write_report_rewrites_the_file_from_the_folder(tmp_path):
    # Prepare
    run = tmp_path / "run"
    save_round_samples(run, 0, [{"prompt": 0, "text": "first words"}])
    save_round_samples(run, 4, [{"prompt": 0, "text": "last words"}])

    # Execute
    path = write_report(run)

    # Assert
    report = path.read_text()
    assert "| # | round 1 | round 5 |" in report
    assert "| 1 | first words | last words |" in report
