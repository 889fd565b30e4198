"""The ``popri`` command: one table of subcommands, each loaded only when it runs.

``popri --help`` lists every command from :data:`COMMANDS` without importing any of them (no torch, no Flower);
``popri CMD ...`` imports only CMD's module and builds only its parser. A command module exposes
``add_subparser(subparsers) -> argparse.ArgumentParser``: it registers CMD with ``set_defaults(func=handler)``, and
the handler takes the parsed namespace and returns the exit code. A :class:`~popri.config.ConfigError` from a handler
prints ``popri: <message>`` and exits with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from popri.config import ConfigError
from popri.logs import setup_logging


@dataclass(frozen=True)
class Command:
    """A subcommand: the module whose ``add_subparser`` registers it, and its one-line help for ``popri --help``."""

    module: str
    help: str


# The one registry of subcommands. A module that fails to import is an error of its command, never hidden.
COMMANDS: dict[str, Command] = {
    "run": Command("popri.cli.run", "run POPri on Flower's simulation engine"),
    "privacy": Command("popri.cli.privacy", "noise multiplier <-> epsilon calculator (RDP or PRV accountant)"),
    "config": Command("popri.cli.config", "list every config key with its type, default and help"),
    "generate": Command("popri.generate", "more synthetic text from a finished run's generator (no privacy cost)"),
    "export": Command("popri.export", "write a finished run's generator as a merged transformers folder"),
    "audit": Command("popri.audit", "empirical lower bound on epsilon of popri's DP mechanism (canary game)"),
    "bench": Command("benchmark.cli", "LargeFedBench: next-token accuracy at a privacy budget for POPri and baselines"),
    "deploy": Command("deploy.cli", "real deployment: certificates, keys, SuperLink, SuperNodes, runs (Flower)"),
    "perf": Command(
        "benchmark.perf.cli", "time each stage of a round side by side with its peers (HF, llama.cpp, TRL, ...)"
    ),
}

_VERBOSE_FLAGS = ("-v", "--verbose")


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="popri",
        description="POPri: private federated learning from preference-optimized synthetic data.",
        epilog="Run 'popri COMMAND --help' for the options of one command.",
        allow_abbrev=False,  # the command is found before parsing: '--verb' must not stand for --verbose
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def command_name(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` asks for (the first word after the global flags), or None if there is none."""
    for token in argv:
        if token in _VERBOSE_FLAGS:
            continue
        return None if token.startswith("-") else token
    return None


def load_command(name: str, subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Import the module of command ``name`` and let it register its parser on ``subparsers``."""
    module = importlib.import_module(COMMANDS[name].module)
    return module.add_subparser(subparsers)


def make_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``popri`` parser with the full parsers of ``commands`` (default: all, which imports every module).

    The other commands are listed by name and help only, so ``popri --help`` stays complete and light.
    """
    wanted = set(COMMANDS if commands is None else commands)
    unknown = sorted(wanted - set(COMMANDS))
    if unknown:
        raise ValueError(f"unknown command {unknown[0]!r}; commands: {', '.join(COMMANDS)}")
    parser = _top_parser()
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        if name in wanted:
            load_command(name, sub)
        else:
            sub.add_parser(name, help=command.help, description=command.help)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``popri`` console script: find the command, load only it, parse, run."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    name = command_name(args_list)
    parser = make_parser([name] if name in COMMANDS else [])
    args = parser.parse_args(args_list)  # no or an unknown command: argparse prints the help or the error
    if not hasattr(args, "func"):
        parser.error(f"command {args.command!r} did not register a handler")
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"popri: {err}", file=sys.stderr)
        return 2
