"""Run configuration: defaults, validation errors that name the key, flat-key round trips, and the Flower app config."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from popri.config import (
    RUN_CONTROL_KEYS,
    ConfigError,
    GenerationConfig,
    PrivacyConfig,
    RunConfig,
    TrainConfig,
    coerce_value,
    config_from_flat,
    config_to_app_config,
    config_to_flat,
    delta_warning,
    describe_keys,
    known_keys,
    load_config,
    parse_assignments,
    resume_locked_keys,
    save_config,
    split_run_options,
)

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_defaults_build_a_valid_config() -> None:
    # execute
    config = RunConfig()
    from_no_keys = config_from_flat({})

    # assert
    assert from_no_keys == config
    assert config.train.rejected_rank < config.generation.samples_per_prompt
    assert config.privacy.epsilon is not None and config.privacy.accountant in ("rdp", "prv")


def test_every_flat_key_has_help_text() -> None:
    # prepare
    sections = ("generation", "privacy", "train", "data")
    fields = [f for f in dataclasses.fields(RunConfig) if f.name not in sections]
    for name in sections:
        fields += dataclasses.fields(type(getattr(RunConfig(), name)))

    # execute
    missing = [f.name for f in fields if not f.metadata.get("help")]

    # assert: the CLI and the docs are generated from it
    assert len(fields) == len(known_keys())
    assert missing == []


def test_flat_keys_are_unique_and_kebab_case() -> None:
    # execute
    keys = known_keys()

    # assert: one flat key per field, so a key can never set two fields
    assert len(keys) == len(set(keys))
    assert all(k == k.lower() and "_" not in k for k in keys)


@pytest.mark.parametrize(
    ("flat", "key"),
    [
        ({"prompts": 0}, "prompts"),
        ({"prompts": "many"}, "prompts"),
        ({"max-new-tokens": 2.5}, "max-new-tokens"),
        ({"samples-per-prompt": 1}, "samples-per-prompt"),
        ({"temperature": 0}, "temperature"),
        ({"top-p": 1.5}, "top-p"),
        ({"delta": 2}, "delta"),
        ({"delta": 0}, "delta"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"epsilon": "none", "noise-multiplier": "none"}, "epsilon"),
        ({"noise-multiplier": 0.0}, "noise-multiplier"),
        ({"sample-rate": 0.0}, "sample-rate"),
        ({"sample-rate": 1.01}, "sample-rate"),
        ({"accountant": "foo"}, "accountant"),
        ({"privacy-mode": "local"}, "privacy-mode"),
        ({"rejected-rank": 4}, "rejected-rank"),  # default samples-per-prompt is 4
        ({"rejected-rank": 5, "samples-per-prompt": 5}, "rejected-rank"),
        ({"rejected-rank": 0}, "rejected-rank"),
        ({"beta": 0.0}, "beta"),
        ({"completion-end": "newline"}, "completion-end"),
        ({"length-penalty": -0.1}, "length-penalty"),
        ({"embedding-precision": "fp16"}, "embedding-precision"),
        ({"learning-rate": "fast"}, "learning-rate"),
        ({"max-users": -1}, "max-users"),
        ({"validation-fraction": 1.0}, "validation-fraction"),
        ({"rounds": 0}, "rounds"),
        ({"num-nodes": 0}, "num-nodes"),
        ({"min-replies": 3, "num-nodes": 2}, "min-replies"),
        ({"diagnostics": "maybe"}, "diagnostics"),
        ({"noise-seed": "abc"}, "noise-seed"),
        ({"reply-timeout": 0}, "reply-timeout"),
    ],
)
def test_invalid_value_raises_config_error_naming_the_key(flat: dict[str, Any], key: str) -> None:
    # execute / assert
    with pytest.raises(ConfigError, match=f"'{key}'"):
        config_from_flat(flat)


def test_unknown_key_is_rejected_by_name() -> None:
    # execute / assert: a typo must not silently fall back to the default
    with pytest.raises(ConfigError, match="'promts'"):
        config_from_flat({"prompts": 8, "promts": 8})


def test_string_values_from_the_command_line_are_coerced() -> None:
    # prepare: `-c key=value` delivers strings
    flat = {
        "prompts": "8",
        "temperature": "0.7",
        "diagnostics": "true",
        "control": "0",
        "noise-seed": "none",
        "epsilon": "",
        "noise-multiplier": "2.5",
        "max-new-tokens": 16.0,
    }

    # execute
    config = config_from_flat(flat)

    # assert
    assert config.generation.prompts == 8 and isinstance(config.generation.prompts, int)
    assert config.generation.temperature == 0.7
    assert config.diagnostics is True and config.control is False
    assert config.privacy.noise_seed is None and config.privacy.epsilon is None
    assert config.privacy.noise_multiplier == 2.5
    assert config.generation.max_new_tokens == 16 and isinstance(config.generation.max_new_tokens, int)


def _custom_config() -> RunConfig:
    return RunConfig(
        generation=GenerationConfig(prompts=5, samples_per_prompt=6, temperature=0.8, initial_instruction="Say hi."),
        privacy=PrivacyConfig(epsilon=None, noise_multiplier=4.2, delta=1e-6, sample_rate=0.5, noise_seed=11),
        train=TrainConfig(rejected_rank=5, beta=0.05),
        rounds=3,
        diagnostics=True,
        output="runs/x",
    )


def test_flat_round_trip_gives_back_the_same_config() -> None:
    # prepare
    config = _custom_config()

    # execute
    flat = config_to_flat(config)
    rebuilt = config_from_flat(flat)

    # assert
    assert set(flat) == set(known_keys())
    assert flat["noise-multiplier"] == 4.2 and flat["epsilon"] is None
    assert rebuilt == config


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    # prepare
    config = _custom_config()
    path = tmp_path / "config.json"

    # execute
    save_config(config, path)
    loaded = load_config(path)

    # assert
    assert loaded == config
    assert json.loads(path.read_text())["samples-per-prompt"] == 6


def test_load_config_names_the_file_of_invalid_json(tmp_path: Path) -> None:
    # prepare
    path = tmp_path / "broken.json"
    path.write_text('{"prompts": 8,\n "rounds": }\n')

    # execute / assert
    with pytest.raises(ConfigError, match=r"broken\.json.*line 2"):
        load_config(path)


def test_flower_app_config_in_pyproject_is_known_and_valid() -> None:
    # prepare: both apps split off the run-control flags (resume, progress) first, then build the config
    from server.app import run_options

    with PYPROJECT.open("rb") as fh:
        app_config = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    flat, _, _ = run_options(app_config)

    # execute
    unknown = sorted(set(flat) - set(known_keys()))
    config = config_from_flat(flat)

    # assert: every other key is a config field, and every value lands in its field
    assert unknown == []
    assert flat, "no popri keys in [tool.flwr.app.config]"
    rebuilt = config_to_app_config(config)  # TOML has no null: optional keys read "" for none
    assert {key: rebuilt[key] for key in flat} == flat


# -- one schema: pyproject, resume locks, value parsing ------------------------------------------------------------


def _declared_app_config() -> dict[str, Any]:
    with PYPROJECT.open("rb") as fh:
        return tomllib.load(fh)["tool"]["flwr"]["app"]["config"]


def test_pyproject_declares_every_key_with_the_runconfig_default_and_type() -> None:
    # Prepare
    declared = _declared_app_config()

    # Execute
    expected = {**config_to_app_config(RunConfig()), **RUN_CONTROL_KEYS}

    # Assert: both ways, so `flwr run . -c "KEY=VALUE"` reaches every key and a bare `flwr run .` runs the defaults
    assert sorted(set(expected) - set(declared)) == []
    assert sorted(set(declared) - set(expected)) == []
    mismatched = {
        k: (declared[k], v) for k, v in expected.items() if declared[k] != v or type(declared[k]) is not type(v)
    }
    assert mismatched == {}


def test_pyproject_table_builds_the_default_config() -> None:
    # Prepare
    flat, resume, progress = split_run_options(_declared_app_config())

    # Execute
    config = config_from_flat(flat)

    # Assert
    assert config == RunConfig()
    assert resume is False and progress is False


def test_app_config_round_trip_keeps_none_values() -> None:
    # Prepare: a fixed-sigma run (epsilon None) and no noise seed
    config = RunConfig(privacy=PrivacyConfig(epsilon=None, noise_multiplier=3.35), rounds=20)

    # Execute
    app = config_to_app_config(config)
    rebuilt = config_from_flat(app)

    # Assert: every key present (Flower drops nothing), TOML-typed, and the same config back
    assert set(app) == set(known_keys())
    assert app["epsilon"] == "" and app["noise-seed"] == ""
    assert all(isinstance(v, bool | int | float | str) for v in app.values())
    assert rebuilt == config
    assert config_from_flat(config_to_flat(config)) == config


def test_fixed_sigma_survives_the_simulation_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Prepare: capture what popri run hands to the ServerApp and ClientApp, without starting Flower
    import flwr.simulation

    import client.app
    import server.app
    from server.simulation import run_simulation

    seen: dict[str, dict[str, Any]] = {}
    monkeypatch.setattr(server.app, "make_server_app", lambda overrides, errors: seen.setdefault("server", overrides))
    monkeypatch.setattr(client.app, "make_client_app", lambda overrides: seen.setdefault("client", overrides))
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **kwargs: None)
    config = RunConfig(privacy=PrivacyConfig(epsilon=None, noise_multiplier=0.8), rounds=20, output=str(tmp_path))

    # Execute
    with pytest.raises(RuntimeError, match=r"privacy\.json"):
        run_simulation(config)
    flat, _, _ = split_run_options(seen["server"])
    on_server = config_from_flat(flat)

    # Assert: the ServerApp sees no epsilon target, so its ledger never stops the run early
    from popri.privacy import PrivacyLedger

    assert seen["client"] == seen["server"]
    assert on_server == config and on_server.privacy.epsilon is None
    ledger = PrivacyLedger(delta=on_server.privacy.delta, target_epsilon=on_server.privacy.epsilon)
    for _ in range(on_server.rounds):
        ledger.charge(noise_multiplier=on_server.resolved_noise_multiplier(), sample_rate=1.0)
    assert ledger.rounds_charged == 20 and ledger.epsilon() > 7.0


def test_resume_locked_keys_cover_the_ledger_and_the_user_set() -> None:
    # Execute
    locked = resume_locked_keys()

    # Assert
    must = {"epsilon", "noise-multiplier", "delta", "sample-rate", "accountant", "data", "max-users", "seed"}
    assert must | {"privacy-mode", "min-replies"} <= set(locked)
    assert set(locked) <= set(known_keys())
    assert "learning-rate" not in locked and "rounds" not in locked


def test_new_server_keys_have_their_defaults() -> None:
    # Execute
    config = config_from_flat({"prepare-timeout": "90", "max-discarded-rounds": "0"})

    # Assert
    assert RunConfig().prepare_timeout == 3600.0 and RunConfig().max_discarded_rounds == 3
    assert config.prepare_timeout == 90.0 and config.max_discarded_rounds == 0


@pytest.mark.parametrize(
    ("flat", "key"),
    [
        ({"noise-multiplier": "inf"}, "noise-multiplier"),
        ({"noise-multiplier": float("inf")}, "noise-multiplier"),
        ({"epsilon": "inf"}, "epsilon"),
        ({"epsilon": float("nan")}, "epsilon"),
        ({"delta": "nan"}, "delta"),
        ({"temperature": "NaN"}, "temperature"),
        ({"learning-rate": float("nan")}, "learning-rate"),
        ({"reply-timeout": "inf"}, "reply-timeout"),
        ({"noise-seed": -1}, "noise-seed"),
        ({"noise-seed": "-3"}, "noise-seed"),
        ({"rounds": True}, "rounds"),
        ({"rounds": "true"}, "rounds"),
        ({"prompts": False}, "prompts"),
        ({"beta": True}, "beta"),
        ({"data": True}, "data"),
        ({"diagnostics": 2}, "diagnostics"),
        ({"epsilon": 1e-9}, "epsilon"),
        ({"prepare-timeout": 0}, "prepare-timeout"),
        ({"max-discarded-rounds": -1}, "max-discarded-rounds"),
    ],
)
def test_non_finite_negative_seed_and_bool_values_are_refused_by_key(flat: dict[str, Any], key: str) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=f"'{key}'"):
        config_from_flat(flat)


def test_dataclasses_refuse_wrong_types_when_built_directly() -> None:
    # Execute / Assert: the checks live in the dataclasses, not only in the flat-key parser
    with pytest.raises(ConfigError, match="'rounds'"):
        RunConfig(rounds=True)
    with pytest.raises(ConfigError, match="'noise-multiplier'"):
        PrivacyConfig(noise_multiplier=float("inf"))
    with pytest.raises(ConfigError, match="'prompts'"):
        GenerationConfig(prompts=8.0)  # type: ignore[arg-type]


def test_an_unreachable_epsilon_is_a_config_error_not_an_opacus_error() -> None:
    # Prepare: the PRV accountant has no closed-form floor; Opacus gives up while calibrating
    config = RunConfig(privacy=PrivacyConfig(epsilon=1e-9, accountant="prv"))

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"'epsilon'.*raise epsilon or delta"):
        config.resolved_noise_multiplier()


def test_parse_assignments_types_values_by_the_schema() -> None:
    # Execute
    values = parse_assignments(
        ["prompts=8", "epsilon=none", "noise-multiplier= 2.5", "diagnostics=true", "data=1", "initial-instruction=a=b"]
    )

    # Assert
    assert values == {
        "prompts": 8,
        "epsilon": None,
        "noise-multiplier": 2.5,
        "diagnostics": True,
        "data": "1",
        "initial-instruction": "a=b",
    }
    assert isinstance(values["prompts"], int)


@pytest.mark.parametrize(
    ("item", "match"),
    [
        ("prompts", r"KEY=VALUE, got 'prompts'"),
        ("=3", r"KEY=VALUE, got '=3'"),
        ("promts=3", r"unknown config key 'promts' \(in 'promts=3'\)"),
        ("prompts=many", r"'prompts'.*\(in 'prompts=many'\)"),
        ("noise-multiplier=inf", r"'noise-multiplier'.*finite.*\(in 'noise-multiplier=inf'\)"),
    ],
)
def test_parse_assignments_errors_name_the_item(item: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_assignments([item])


def test_parse_assignments_takes_run_control_keys_only_when_asked() -> None:
    # Execute / Assert
    assert parse_assignments(["resume=true", "rounds=2"], run_control=True) == {"resume": True, "rounds": 2}
    with pytest.raises(ConfigError, match="unknown config key 'resume'"):
        parse_assignments(["resume=true"])


def test_coerce_value_serves_other_dataclasses_by_type_name() -> None:
    # Execute / Assert: the benchmark and the perf harness parse their own fields with it
    assert coerce_value("rounds", "10", "int") == 10
    assert coerce_value("noise-seed", "none", "int | None") is None
    assert coerce_value("rate", "0.5", "float") == 0.5
    with pytest.raises(ConfigError, match="'rate'"):
        coerce_value("rate", "inf", "float")


@pytest.mark.parametrize(("delta", "users", "warns"), [(1e-2, 100, True), (1e-2, 99, False), (3e-6, 1400, False)])
def test_delta_warning_when_delta_is_not_below_one_over_the_users(delta: float, users: int, warns: bool) -> None:
    # Execute
    message = delta_warning(delta, users)

    # Assert: the warning states no count (counts are private)
    assert (message is not None) is warns
    assert message is None or str(users) not in message


def test_describe_keys_gives_type_default_and_help_for_every_key() -> None:
    # Execute
    entries = describe_keys()

    # Assert
    assert [e["key"] for e in entries] == known_keys()
    by_key = {e["key"]: e for e in entries}
    assert by_key["prepare-timeout"] == {
        "key": "prepare-timeout",
        "type": "float",
        "default": 3600.0,
        "help": by_key["prepare-timeout"]["help"],
    }
    assert by_key["noise-seed"]["type"] == "int | None" and by_key["noise-seed"]["default"] is None


def test_flower_overrides_of_any_key_reach_the_config() -> None:
    # Prepare: Flower's own parsing and merging of `flwr run . -c "..."` against this pyproject
    from flwr.common.config import get_fused_config_from_dir, parse_config_args

    overrides = parse_config_args(["lora-r=8 noise-multiplier=3.35 epsilon='' max-discarded-rounds=1"])

    # Execute
    fused = get_fused_config_from_dir(PYPROJECT.parent, overrides)
    flat, _, _ = split_run_options(fused)
    config = config_from_flat(flat)

    # Assert: a fixed-sigma run with no epsilon target, and a key the old table did not declare
    assert config.train.lora_r == 8 and config.max_discarded_rounds == 1
    assert config.privacy.noise_multiplier == 3.35 and config.privacy.epsilon is None


def test_config_and_rdp_modules_import_neither_torch_nor_flower() -> None:
    # Prepare
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from popri.config import RunConfig, config_from_flat\n"
        "import popri.rdp\n"
        "config_from_flat({'rounds': '3'}); RunConfig()\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'flwr', 'opacus', 'transformers'}))\n"
    )

    # Execute
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    # Assert
    assert out.stdout.strip() == "[]"
