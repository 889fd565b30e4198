"""``popri privacy``: σ for a target ε, or ε for a given σ, with the run's own validation.

The ``rdp`` accountant is :mod:`popri.rdp` (numpy/scipy, no torch); ``prv`` loads Opacus when it is asked for.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from popri.config import ConfigError, config_from_flat, delta_warning


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``privacy``; its handler is :func:`cmd_privacy`."""
    parser = subparsers.add_parser(
        "privacy",
        help="noise multiplier <-> epsilon calculator (RDP or PRV accountant)",
        description="Print sigma for a target epsilon, or epsilon for a given sigma, for T rounds of the sampled "
        "Gaussian mechanism on a sensitivity-1 sum (user-level DP). Values are checked like a run's config keys.",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--epsilon", metavar="FLOAT", help="target epsilon: print the smallest sigma that meets it")
    which.add_argument("--noise-multiplier", metavar="FLOAT", help="sigma: print the epsilon it spends")
    parser.add_argument("--rounds", metavar="INT", required=True, help="T, number of rounds")
    parser.add_argument("--sample-rate", metavar="FLOAT", required=True, help="q, Poisson sampling rate of users")
    parser.add_argument("--delta", metavar="FLOAT", required=True, help="delta")
    parser.add_argument(
        "--accountant",
        choices=("rdp", "prv"),
        default="rdp",
        help="rdp (popri.rdp, no torch) or prv (Opacus) (default: rdp)",
    )
    parser.add_argument("--num-users", metavar="INT", type=int, help="warn if delta is not below 1/(this many users)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=cmd_privacy)
    return parser


def _spend(
    *, epsilon: float | None, sigma: float | None, delta: float, sample_rate: float, rounds: int, accountant: str
) -> tuple[float, float]:
    """``(sigma, epsilon)``: the given σ and what it spends, or the calibrated σ for ``epsilon`` and what it spends."""
    if accountant == "rdp":
        from popri.rdp import calibrate_noise_multiplier, compute_epsilon
    else:
        from popri.privacy import calibrate_noise  # loads opacus (and torch)
        from popri.privacy import compute_epsilon as opacus_epsilon

        def compute_epsilon(*, noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
            return opacus_epsilon(
                noise_multiplier=noise_multiplier, delta=delta, sample_rate=sample_rate, rounds=rounds, accountant="prv"
            )

        def calibrate_noise_multiplier(*, epsilon: float, sample_rate: float, rounds: int, delta: float) -> float:
            return calibrate_noise(
                epsilon=epsilon, delta=delta, sample_rate=sample_rate, rounds=rounds, accountant="prv"
            )

    common = {"delta": delta, "sample_rate": sample_rate, "rounds": rounds}
    if sigma is None:
        assert epsilon is not None  # PrivacyConfig guarantees one of the two
        try:
            sigma = calibrate_noise_multiplier(epsilon=epsilon, **common)
        except (ValueError, RuntimeError) as err:
            raise ConfigError(f"invalid config key 'epsilon': {err}") from None
    return sigma, compute_epsilon(noise_multiplier=sigma, **common)


def cmd_privacy(args: argparse.Namespace) -> int:
    fixed_sigma = args.noise_multiplier is not None
    # The run's schema checks every value (rounds >= 1, 0 < delta < 1, 0 < q <= 1, finite numbers, reachable epsilon).
    config = config_from_flat(
        {
            "epsilon": None if fixed_sigma else args.epsilon,
            "noise-multiplier": args.noise_multiplier,
            "rounds": args.rounds,
            "sample-rate": args.sample_rate,
            "delta": args.delta,
            "accountant": args.accountant,
        }
    )
    p = config.privacy
    sigma, epsilon = _spend(
        epsilon=p.epsilon,
        sigma=p.noise_multiplier,
        delta=p.delta,
        sample_rate=p.sample_rate,
        rounds=config.rounds,
        accountant=p.accountant,
    )
    if args.num_users is not None and (warning := delta_warning(p.delta, args.num_users)):
        print(f"popri: warning: {warning}", file=sys.stderr)
    result = {
        "epsilon": epsilon,
        "noise_multiplier": sigma,
        "delta": p.delta,
        "sample_rate": p.sample_rate,
        "rounds": config.rounds,
        "accountant": p.accountant,
        "target_epsilon": p.epsilon,
    }
    settings = f"T={config.rounds}, q={p.sample_rate}, delta={p.delta}, {p.accountant}"
    if args.json:
        print(json.dumps(result))
    elif fixed_sigma:
        print(f"epsilon = {epsilon:.4f}  (sigma={sigma}, {settings})")
    else:
        shown = math.ceil(sigma * 1e4) / 1e4  # rounded up: a copied sigma must not spend more than the target
        print(f"noise multiplier sigma = {shown:.4f}  (gives epsilon={epsilon:.4f} <= {p.epsilon}, {settings})")
    return 0
