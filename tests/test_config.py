"""Run configuration: defaults, validation errors that name the key, flat-key round trips, and the Flower app config."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from popri.config import (
    ConfigError,
    GenerationConfig,
    PrivacyConfig,
    RunConfig,
    TrainConfig,
    config_from_flat,
    config_to_app_config,
    config_to_flat,
    known_keys,
    load_config,
    save_config,
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
