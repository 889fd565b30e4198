"""``popri config``: every config key with its type, default and help (text, JSON, or the pyproject TOML table)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from popri.config import RUN_CONTROL_KEYS, RunConfig, config_to_app_config, describe_keys, key_specs

_SECTION_NOTES = {
    None: "run",
    "generation": "generation: the server LLM",
    "privacy": "privacy: the DP mechanism and its budget",
    "train": "train: preference pairs and LoRA DPO",
    "data": "data: the private users",
}


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``config``; its handler is :func:`cmd_config`."""
    parser = subparsers.add_parser(
        "config",
        help="list every config key with its type, default and help",
        description="List every popri config key (a 'popri run --KEY' flag, a '--set KEY=VALUE' item, a "
        "'flwr run . -c KEY=VALUE' override) with its type, default and help.",
    )
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help='print a JSON list of {"key", "type", "default", "help"}')
    fmt.add_argument(
        "--toml", action="store_true", help="print the [tool.flwr.app.config] table that pyproject.toml declares"
    )
    parser.set_defaults(func=cmd_config)
    return parser


def toml_value(value: bool | int | float | str) -> str:
    """A scalar in TOML syntax (strings as JSON-escaped basic strings, which TOML reads the same way)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)


def app_config_toml() -> str:
    """``[tool.flwr.app.config]`` with every key at its RunConfig default, then the run-control keys."""
    values = config_to_app_config(RunConfig())
    lines = [
        "# Every popri config key at its default (`popri config --toml` writes this table; a test checks it).",
        '# Override with `flwr run . -c "key=value"`; "" means none (no value) for the optional keys.',
        "[tool.flwr.app.config]",
    ]
    section: object = object()
    for spec in key_specs():
        if spec.section != section:
            section = spec.section
            lines.append(f"# {_SECTION_NOTES[spec.section]}")
        note = "  # none" if spec.default is None else ""
        lines.append(f"{spec.key} = {toml_value(values[spec.key])}{note}")
    lines.append("# not config keys: run control for the ServerApp (continue from the last checkpoint; progress bars)")
    lines += [f"{key} = {toml_value(value)}" for key, value in RUN_CONTROL_KEYS.items()]
    return "\n".join(lines)


def cmd_config(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(describe_keys(), indent=2))
        return 0
    if args.toml:
        print(app_config_toml())
        return 0
    rows = [
        (s.key, s.type_label, json.dumps(s.default), s.help + (" [kept by --resume]" if s.resume_locked else ""))
        for s in key_specs()
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for key, type_label, default, help_text in rows:
        print(f"{key:<{widths[0]}}  {type_label:<{widths[1]}}  {default:<{widths[2]}}  {help_text}")
    return 0
