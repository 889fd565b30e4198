"""The popri command: --help everywhere, the privacy calculator, clear config errors."""

from __future__ import annotations

import argparse
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


# -- the command table and lazy loading --------------------------------------------------------------------------

_HEAVY = ("torch", "flwr", "opacus", "transformers", "ray", "server", "client", "benchmark")


def _modules_loaded_by(argv: list[str]) -> tuple[int, list[str], str]:
    """Run ``popri <argv>`` in a fresh interpreter; return its exit code, the heavy packages it imported, its output."""
    code = (
        "import json, sys\n"
        "from popri.cli import main\n"
        "try:\n"
        f"    rc = main({argv!r})\n"
        "except SystemExit as exc:\n"
        "    rc = exc.code\n"
        f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({list(_HEAVY)!r}))\n"
        "print('\\nMODULES=' + json.dumps([rc, heavy]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rc, heavy = json.loads(out.stdout.rsplit("MODULES=", 1)[1])
    return rc, heavy, out.stdout


def test_top_level_help_lists_every_command_without_importing_torch_or_flower() -> None:
    # Prepare
    from popri.cli import COMMANDS

    # Execute
    rc, heavy, text = _modules_loaded_by(["--help"])

    # Assert
    assert rc == 0
    assert heavy == []
    for name, command in COMMANDS.items():
        assert name in text and command.help.split()[0] in text


def test_privacy_calculator_imports_no_torch() -> None:
    # Execute
    argv = ["privacy", "--epsilon", "1", "--rounds", "20", "--sample-rate", "0.5", "--delta", "3e-6", "--json"]
    rc, heavy, text = _modules_loaded_by(argv)

    # Assert
    assert rc == 0
    assert heavy == []
    assert json.loads(text.split("\nMODULES=")[0].strip().splitlines()[-1])["epsilon"] <= 1.0


def test_a_command_loads_only_its_own_module() -> None:
    # Execute
    rc, heavy, _ = _modules_loaded_by(["config", "--json"])

    # Assert: not even the benchmark or deployment tooling
    assert rc == 0
    assert heavy == []


def test_every_table_command_registers_its_own_name_and_a_handler() -> None:
    # Prepare
    from popri.cli import COMMANDS, make_parser

    # Execute
    parser = make_parser()  # imports every module in the table
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))

    # Assert
    assert set(sub.choices) == set(COMMANDS)
    for name, command_parser in sub.choices.items():
        assert _has_handler(command_parser), name


def _has_handler(parser: argparse.ArgumentParser) -> bool:
    """A handler of its own, or one on every step of its nested subcommands (``deploy certs``, ...)."""
    if parser.get_default("func") is not None:
        return True
    nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return bool(nested) and all(_has_handler(p) for a in nested for p in a.choices.values())


@pytest.mark.parametrize("command", ["run", "privacy", "config", "audit", "bench", "deploy"])
def test_every_command_has_help_through_main(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])

    # Assert
    assert exc.value.code == 0
    assert f"usage: popri {command}" in capsys.readouterr().out


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])

    # Assert
    assert exc.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_verbose_flag_still_works(capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    code = main(["-v", "config", "--json"])

    # Assert
    assert code == 0
    assert json.loads(capsys.readouterr().out)


# -- popri run: flags generated from the schema ------------------------------------------------------------------


def _run_args(argv: list[str]) -> argparse.Namespace:
    return make_parser(["run"]).parse_args(["run", *argv])


def test_run_help_shows_every_key_as_a_flag_with_its_real_default(capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    from popri.cli.run import shown_default
    from popri.config import key_specs

    # Execute
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines

    # Assert
    for spec in key_specs():
        assert f"--{spec.key}" in text
        assert f"(default: {shown_default(spec.default)})" in text


def test_every_config_key_is_settable_by_its_flag() -> None:
    # Prepare
    from popri.cli.run import config_from_args

    # Execute
    argv = ["--lora-r", "8", "--prepare-timeout", "12.5", "--no-control", "--diagnostics"]
    config = config_from_args(_run_args(argv))

    # Assert
    assert config.train.lora_r == 8
    assert config.prepare_timeout == 12.5
    assert config.diagnostics is True and config.control is False


def test_the_existing_short_flags_keep_working(tmp_path) -> None:
    # Prepare
    from popri.cli.run import config_from_args

    argv = (
        f"--rounds 3 --epsilon 2 --delta 1e-6 --prompts 5 --samples-per-prompt 5 --final-samples 7 --seed 4 "
        f"--data users.jsonl --output {tmp_path} --sample-rate 0.5 --noise-multiplier 3 --max-users 9 --num-nodes 3 "
        f"--resume --diagnostics --control --no-progress --set beta=0.05"
    ).split()

    # Execute
    args = _run_args(argv)
    config = config_from_args(args)

    # Assert
    assert (config.rounds, config.privacy.epsilon, config.privacy.delta, config.generation.prompts) == (3, 2.0, 1e-6, 5)
    assert (config.generation.samples_per_prompt, config.final_samples, config.seed) == (5, 7, 4)
    assert (config.data.data, config.output, config.privacy.sample_rate) == ("users.jsonl", str(tmp_path), 0.5)
    assert (config.privacy.noise_multiplier, config.data.max_users, config.num_nodes) == (3.0, 9, 3)
    assert config.diagnostics and config.control and config.train.beta == 0.05
    assert args.resume and args.no_progress


@pytest.mark.parametrize(
    "argv", [["--noise-multiplier", "3.35"], ["--set", "noise-multiplier=3.35"], ["--noise-multiplier=3.35"]]
)
def test_a_fixed_sigma_unsets_the_default_epsilon_target(argv: list[str]) -> None:
    # Prepare
    from popri.cli.run import config_from_args

    # Execute
    config = config_from_args(_run_args(argv))

    # Assert: the run spends what sigma spends; it does not stop at the default epsilon=7
    assert config.privacy.noise_multiplier == 3.35
    assert config.privacy.epsilon is None


def test_an_explicit_epsilon_beside_a_fixed_sigma_stays_a_cap() -> None:
    # Prepare
    from popri.cli.run import config_from_args

    # Execute
    config = config_from_args(_run_args(["--set", "epsilon=3", "--noise-multiplier", "2"]))

    # Assert
    assert config.privacy.epsilon == 3.0 and config.privacy.noise_multiplier == 2.0


@pytest.mark.parametrize(
    ("argv", "key"),
    [
        (["--rounds", "true"], "rounds"),
        (["--noise-multiplier", "inf"], "noise-multiplier"),
        (["--temperature", "nan"], "temperature"),
        (["--set", "noise-seed=-1"], "noise-seed"),
        (["--epsilon", "1e-9"], "epsilon"),
    ],
)
def test_run_refuses_bad_values_before_loading_anything(argv: list[str], key: str, capsys, tmp_path) -> None:
    # Execute
    code = main(["run", "--output", str(tmp_path / "out"), *argv])

    # Assert
    assert code == 2
    assert f"invalid config key '{key}'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_set_item_without_equals_sign_names_the_item(capsys, tmp_path) -> None:
    # Execute
    code = main(["run", "--output", str(tmp_path), "--set", "beta"])

    # Assert
    assert code == 2
    assert "'beta'" in capsys.readouterr().err


# -- popri privacy: the run's validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "key"),
    [
        (["--epsilon", "7", "--rounds", "0", "--sample-rate", "1", "--delta", "3e-6"], "rounds"),
        (["--epsilon", "7", "--rounds", "-5", "--sample-rate", "1", "--delta", "3e-6"], "rounds"),
        (["--noise-multiplier", "2", "--rounds", "-5", "--sample-rate", "1", "--delta", "3e-6"], "rounds"),
        (["--epsilon", "7", "--rounds", "20", "--sample-rate", "1", "--delta", "1.5"], "delta"),
        (["--noise-multiplier", "2", "--rounds", "20", "--sample-rate", "1", "--delta", "1.5"], "delta"),
        (["--epsilon", "7", "--rounds", "20", "--sample-rate", "1.5", "--delta", "3e-6"], "sample-rate"),
        (["--epsilon", "1e-9", "--rounds", "20", "--sample-rate", "1", "--delta", "3e-6"], "epsilon"),
        (["--epsilon", "inf", "--rounds", "20", "--sample-rate", "1", "--delta", "3e-6"], "epsilon"),
        (["--noise-multiplier", "nan", "--rounds", "20", "--sample-rate", "1", "--delta", "3e-6"], "noise-multiplier"),
        (["--noise-multiplier", "0", "--rounds", "20", "--sample-rate", "1", "--delta", "3e-6"], "noise-multiplier"),
        (["--epsilon", "7", "--rounds", "2.5", "--sample-rate", "1", "--delta", "3e-6"], "rounds"),
    ],
)
def test_privacy_calculator_refuses_what_a_run_refuses(argv: list[str], key: str, capsys) -> None:
    # Execute
    code = main(["privacy", *argv])

    # Assert
    assert code == 2
    captured = capsys.readouterr()
    assert f"popri: invalid config key '{key}'" in captured.err
    assert captured.out == ""


def test_privacy_calculator_text_output_rounds_sigma_up(capsys) -> None:
    # Execute
    code = main(["privacy", "--epsilon", "1", "--rounds", "20", "--sample-rate", "1", "--delta", "3e-6"])

    # Assert: the printed sigma, copied into a run, still meets the target
    from popri.rdp import compute_epsilon

    out = capsys.readouterr().out
    shown = float(out.split("sigma = ")[1].split()[0])
    assert code == 0
    assert compute_epsilon(noise_multiplier=shown, sample_rate=1.0, rounds=20, delta=3e-6) <= 1.0


def test_privacy_calculator_warns_when_delta_is_not_below_one_over_the_users(capsys) -> None:
    # Execute
    argv = ["privacy", "--noise-multiplier", "3", "--rounds", "5", "--sample-rate", "1", "--delta", "0.01"]
    code = main([*argv, "--num-users", "200"])
    err = capsys.readouterr().err

    # Assert
    assert code == 0
    assert "warning" in err and "delta" in err and "200" not in err


# -- popri config --------------------------------------------------------------------------------------------------


def test_config_json_lists_every_key_with_type_default_and_help(capsys) -> None:
    # Prepare
    from popri.config import RunConfig, config_to_flat, known_keys

    # Execute
    code = main(["config", "--json"])
    entries = json.loads(capsys.readouterr().out)

    # Assert
    assert code == 0
    assert [e["key"] for e in entries] == known_keys()
    assert all(set(e) == {"key", "type", "default", "help"} and e["help"] for e in entries)
    defaults = config_to_flat(RunConfig())
    assert {e["key"]: e["default"] for e in entries} == defaults
    assert {e["key"]: e["type"] for e in entries}["noise-multiplier"] == "float | None"


def test_config_text_lists_every_key(capsys) -> None:
    # Prepare
    from popri.config import known_keys

    # Execute
    code = main(["config"])
    lines = capsys.readouterr().out.splitlines()

    # Assert
    assert code == 0
    assert [line.split()[0] for line in lines] == known_keys()


def test_config_toml_is_the_table_pyproject_declares(capsys) -> None:
    # Prepare
    import tomllib
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    declared = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]

    # Execute
    code = main(["config", "--toml"])
    printed = tomllib.loads(capsys.readouterr().out)["tool"]["flwr"]["app"]["config"]

    # Assert
    assert code == 0
    assert printed == declared
