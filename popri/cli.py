"""The ``popri`` command: run, privacy, audit, bench."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from popri.config import ConfigError, RunConfig, config_from_flat
from popri.logs import setup_logging

# flag -> config key; every other run setting is reachable through --set KEY=VALUE
_RUN_FLAGS = {
    "rounds": "rounds",
    "epsilon": "epsilon",
    "delta": "delta",
    "prompts": "prompts",
    "samples_per_prompt": "samples-per-prompt",
    "final_samples": "final-samples",
    "seed": "seed",
    "data": "data",
    "output": "output",
    "sample_rate": "sample-rate",
    "noise_multiplier": "noise-multiplier",
    "max_users": "max-users",
    "num_nodes": "num-nodes",
}


def config_from_args(args: argparse.Namespace) -> RunConfig:
    flat: dict[str, Any] = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        flat[key.strip()] = value.strip()
    for attr, key in _RUN_FLAGS.items():
        value = getattr(args, attr)
        if value is not None:
            flat[key] = value
    if args.noise_multiplier is not None and args.epsilon is None:
        flat["epsilon"] = None  # sigma given: the run reports the epsilon it spends instead of targeting one
    flat["diagnostics"] = args.diagnostics
    flat["control"] = args.control
    return config_from_flat(flat)


def cmd_run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
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


def cmd_privacy(args: argparse.Namespace) -> int:
    from popri.privacy import calibrate_noise, compute_epsilon

    common = {
        "delta": args.delta,
        "sample_rate": args.sample_rate,
        "rounds": args.rounds,
        "accountant": args.accountant,
    }
    if args.noise_multiplier is not None:
        sigma = args.noise_multiplier
        epsilon = compute_epsilon(noise_multiplier=sigma, **common)
    else:
        sigma = calibrate_noise(epsilon=args.epsilon, **common)
        epsilon = compute_epsilon(noise_multiplier=sigma, **common)
    result = {
        "epsilon": epsilon,
        "noise_multiplier": sigma,
        "delta": args.delta,
        "sample_rate": args.sample_rate,
        "rounds": args.rounds,
        "accountant": args.accountant,
        "target_epsilon": args.epsilon,
    }
    if args.json:
        print(json.dumps(result))
    elif args.noise_multiplier is not None:
        print(
            f"epsilon = {epsilon:.4f}  (sigma={sigma}, T={args.rounds}, q={args.sample_rate}, delta={args.delta}, "
            f"{args.accountant})"
        )
    else:
        print(
            f"noise multiplier sigma = {sigma:.4f}  (gives epsilon={epsilon:.4f} <= {args.epsilon}, T={args.rounds}, "
            f"q={args.sample_rate}, delta={args.delta}, {args.accountant})"
        )
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="popri", description="POPri: private federated learning from preference-optimized synthetic data."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run POPri on Flower's simulation engine",
        description="Run POPri end to end (Flower simulation) and write the artifacts to --output.",
    )
    run.add_argument("--output", help="artifact directory (default runs/default)")
    run.add_argument("--rounds", type=int, help="T, private rounds (default 6)")
    run.add_argument("--epsilon", type=float, help="target epsilon after all rounds (default 7)")
    run.add_argument("--noise-multiplier", type=float, help="fix sigma instead of calibrating it to --epsilon")
    run.add_argument("--delta", type=float, help="target delta (default 3e-6)")
    run.add_argument("--sample-rate", type=float, help="q, Poisson sampling rate of users (default 1)")
    run.add_argument("--prompts", type=int, help="K, prompts (= preference pairs) per round (default 32)")
    run.add_argument("--samples-per-prompt", type=int, help="J, completions per prompt (default 4)")
    run.add_argument("--final-samples", type=int, help="size of the final synthetic corpus (default 256)")
    run.add_argument("--seed", type=int, help="seed for prompts, sampling and DPO order (default 0)")
    run.add_argument("--data", help="'shakespeare' (default) or a user JSONL/JSON/parquet file")
    run.add_argument("--max-users", type=int, help="use at most this many users (default all)")
    run.add_argument("--num-nodes", type=int, help="virtual Flower nodes (default 2)")
    run.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    run.add_argument(
        "--diagnostics",
        action="store_true",
        help="NON-PRIVATE: per-round similarity of samples to held-out private validation text",
    )
    run.add_argument("--control", action="store_true", help="random preference pairs (no private data; a control)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="any other config key, e.g. --set beta=0.05 (repeatable; see README)",
    )
    run.set_defaults(func=cmd_run)

    priv = sub.add_parser(
        "privacy",
        help="noise multiplier <-> epsilon calculator (Opacus accountants)",
        description="Print sigma for a target epsilon, or epsilon for a given sigma.",
    )
    which = priv.add_mutually_exclusive_group(required=True)
    which.add_argument("--epsilon", type=float, help="target epsilon: print the calibrated sigma")
    which.add_argument("--noise-multiplier", type=float, help="sigma: print the epsilon it spends")
    priv.add_argument("--rounds", type=int, required=True, help="T, number of rounds")
    priv.add_argument("--sample-rate", type=float, required=True, help="q, Poisson sampling rate of users")
    priv.add_argument("--delta", type=float, required=True, help="delta")
    priv.add_argument("--accountant", choices=("rdp", "prv"), default="rdp", help="Opacus accountant (default rdp)")
    priv.add_argument("--json", action="store_true", help="print one JSON object")
    priv.set_defaults(func=cmd_privacy)

    for module in ("popri.audit", "benchmark.cli", "popri.deploy", "popri.generate", "popri.export"):
        try:
            __import__(module, fromlist=["add_subparser"]).add_subparser(sub)
        except ImportError as err:  # optional parts: a missing one must not break the others
            logging.getLogger(__name__).debug("%s unavailable: %s", module, err)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"popri: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
