"""The popri command: --help everywhere, the privacy calculator, clear config errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from popri.cli import main, make_parser


def test_privacy_json_reproduces_the_paper_values(capsys):
    assert (
        main(
            [
                "privacy",
                "--noise-multiplier",
                "19.3",
                "--rounds",
                "20",
                "--sample-rate",
                "1",
                "--delta",
                "3e-6",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["epsilon"] == pytest.approx(0.997, abs=1e-3)
    assert (
        main(
            [
                "privacy",
                "--noise-multiplier",
                "3.35",
                "--rounds",
                "20",
                "--sample-rate",
                "1",
                "--delta",
                "3e-6",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["epsilon"] == pytest.approx(6.96, abs=1e-2)


def test_privacy_calibration_prints_a_sigma_that_does_not_overshoot(capsys):
    assert main(["privacy", "--epsilon", "1", "--rounds", "20", "--sample-rate", "1", "--delta", "3e-6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["epsilon"] <= 1.0
    assert out["noise_multiplier"] == pytest.approx(19.3, abs=0.2)


@pytest.mark.parametrize("command", ["run", "privacy", "audit", "bench"])
def test_every_subcommand_has_help(command, capsys):
    parser = make_parser()
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([command, "--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_invalid_run_config_exits_2_and_names_the_key(capsys, tmp_path):
    code = main(["run", "--output", str(tmp_path), "--prompts", "0"])
    assert code == 2
    assert "'prompts'" in capsys.readouterr().err


def test_unknown_set_key_is_refused(capsys, tmp_path):
    assert main(["run", "--output", str(tmp_path), "--set", "lerning-rate=0.1"]) == 2
    assert "unknown config key 'lerning-rate'" in capsys.readouterr().err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "popri.cli", "--help"], capture_output=True, text=True, check=True)
    assert "run" in out.stdout and "privacy" in out.stdout
