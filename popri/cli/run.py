"""``popri run``: POPri end to end on Flower's simulation engine; every config key is a flag, made from the schema."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from popri.config import KeySpec, RunConfig, coerce_value, config_from_flat, key_specs, parse_assignments

_SECTION_TITLES = {
    None: "run",
    "generation": "generation (server LLM)",
    "privacy": "privacy (DP mechanism and budget)",
    "train": "train (preference pairs and LoRA DPO)",
    "data": "data (private users)",
}


def shown_default(value: Any) -> str:
    """A default as the help prints it: ``none`` for None, quotes only for the empty string."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return "''"
    return str(value)


def _flag_help(spec: KeySpec) -> str:
    text = f"{spec.help} (default: {shown_default(spec.default)})"
    if spec.resume_locked:
        text += "; kept by --resume"
    return text.replace("%", "%%")  # argparse formats help strings with %


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--KEY`` flag per config key, grouped by section; values stay strings until :func:`config_from_args`."""
    groups = {section: parser.add_argument_group(title) for section, title in _SECTION_TITLES.items()}
    for spec in key_specs():
        group = groups[spec.section]
        if spec.type_name == "bool":
            group.add_argument(
                f"--{spec.key}", dest=spec.name, action=argparse.BooleanOptionalAction, help=_flag_help(spec)
            )
        else:
            metavar = spec.type_name.upper() + ("|none" if spec.optional else "")
            group.add_argument(f"--{spec.key}", dest=spec.name, metavar=metavar, help=_flag_help(spec))


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``run``; its handler is :func:`cmd_run`."""
    parser = subparsers.add_parser(
        "run",
        help="run POPri on Flower's simulation engine",
        description="Run POPri end to end (Flower simulation) and write the artifacts to --output. Every config key "
        "is a flag (see 'popri config'); --set KEY=VALUE sets any of them too, and a flag wins over --set.",
    )
    add_run_flags(parser)
    control = parser.add_argument_group("run control")
    control.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    control.add_argument("--no-progress", action="store_true", help="no progress bars")
    control.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="any config key, e.g. --set beta=0.05 (repeatable; 'popri config' lists the keys)",
    )
    parser.set_defaults(func=cmd_run)
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run's config: ``--set`` items, then the flags given (a flag wins), validated by the schema.

    A noise multiplier given without an epsilon fixes σ: epsilon becomes None, so the run spends what σ spends over
    all its rounds instead of stopping at the default target.
    """
    flat = parse_assignments(args.set or [])
    given_epsilon = "epsilon" in flat
    for spec in key_specs():
        value = getattr(args, spec.name, None)
        if value is not None:
            flat[spec.key] = coerce_value(spec.key, value, spec.type_label)
            given_epsilon = given_epsilon or spec.key == "epsilon"
    if flat.get("noise-multiplier") is not None and not given_epsilon:
        flat["epsilon"] = None
    return config_from_flat(flat)


def cmd_run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    config.resolved_noise_multiplier()  # an unreachable epsilon is a ConfigError here, before any model loads
    from server.simulation import run_simulation

    out = run_simulation(config, resume=args.resume, progress=not args.no_progress)
    summary = json.loads((out / "privacy.json").read_text())
    logging.getLogger("popri").info(
        "done: epsilon=%.4f (delta=%g) over %d round(s); artifacts in %s",
        summary["epsilon"],
        summary["delta"],
        summary["rounds_completed"],
        out,
    )
    return 0
