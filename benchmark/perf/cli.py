"""``popri perf``: the performance harness's command line (``python -m benchmark.perf`` runs it standalone).

``popri perf --output DIR [--quick] [--only NAME ...] [--size KEY=VALUE ...] [--threads N]
[--peer-python NAME=PATH ...]`` writes ``DIR/perf.json`` and ``DIR/perf.md``. ``popri/cli.py`` registers it with
:func:`add_subparser`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmark.perf.schema import COMPARISONS, DEFAULT_COMPARISONS, WORKER_PEER_NAMES, PerfSizes, sizes_with_overrides
from popri.config import ConfigError, default_cache_dir, split_assignment

if TYPE_CHECKING:
    from benchmark.perf.stages import GenerationPeers

DESCRIPTION = (
    "Time popri's stages against their peers (HF generate, llama.cpp, CTranslate2, OpenVINO GenAI, vLLM CPU, the "
    "reference scoring loop, TRL's DPOTrainer) in one process, interleaved, on the same inputs; time one default "
    "round. Writes DIR/perf.json and DIR/perf.md (dated by time and commit). Sizes default to a default run's "
    "(popri.config); a peer that is not installed is a row saying why. See docs/perf.md."
)


def _add_perf_flags(group: Any, *, short_names: bool) -> None:
    """The harness's own flags; ``short_names`` adds ``--only/--size/--threads`` beside the ``--perf-*`` ones."""

    def names(flag: str) -> list[str]:
        return [f"--{flag}", f"--perf-{flag}"] if short_names else [f"--perf-{flag}"]

    group.add_argument("--quick", action="store_true", help="perf: small sizes (a smoke test, ~3 min on 2 busy cores)")
    group.add_argument(
        *names("only"),
        dest="perf_only",
        nargs="+",
        choices=COMPARISONS,
        default=None,
        help="perf: measure only these (the others keep their values from an existing OUTPUT/perf.json); 'growth' "
        "(how cost grows against K·J and users per node, ~25 min at default sizes) and 'corpus' (corpus sampling: "
        "float32 vs bf16, J samples per prompt) run only when named here",
    )
    group.add_argument(
        *names("size"),
        dest="perf_size",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="perf: override one size, e.g. prompts=16, repeats-generation=1, dpo-pairs=32 or growth-kj=128,256,512 "
        "(keys: "
        + ", ".join(f.replace("_", "-") for f in PerfSizes.__dataclass_fields__)
        + "; the growth-* lists and corpus-per-prompt are comma-separated)",
    )
    group.add_argument(
        *names("threads"),
        dest="perf_threads",
        type=int,
        default=None,
        help="perf: torch intra-op threads for popri and the peers alike (default: torch's choice)",
    )
    group.add_argument(
        "--peer-python",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help=f"perf: the interpreter (a venv's bin/python) holding a generation peer; NAME is one of "
        f"{', '.join(WORKER_PEER_NAMES)} (default: this interpreter)",
    )
    group.add_argument(
        "--peer-work",
        default=None,
        metavar="DIR",
        help="perf: where peers cache the models they convert (default: CACHE_DIR/peers)",
    )


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``perf`` on an argparse subparsers object; its handler is ``args.func(args)``."""
    parser = subparsers.add_parser(
        "perf",
        help="performance harness: popri's stages against their peers, one default round",
        description=DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output", default="runs/perf", metavar="DIR", help="folder for perf.json and perf.md")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompts, sampling and pairs")
    parser.add_argument(
        "--cache-dir", default=None, help="model and embedding cache (default $POPRI_CACHE or ~/.cache/popri)"
    )
    parser.add_argument("--log-level", default="INFO", help="logging level")
    _add_perf_flags(parser, short_names=True)
    parser.set_defaults(func=handle)
    return parser


def peers_from_args(args: argparse.Namespace) -> GenerationPeers:
    """``--peer-python NAME=PATH`` and ``--peer-work`` as :class:`GenerationPeers` (unknown names: ConfigError)."""
    from benchmark.perf.stages import GenerationPeers

    pythons: dict[str, str | None] = {}
    for item in getattr(args, "peer_python", None) or []:
        name, path = split_assignment(item)
        if name not in WORKER_PEER_NAMES:
            raise ConfigError(
                f"invalid --peer-python {name}={path}: unknown peer; known: {', '.join(WORKER_PEER_NAMES)}"
            )
        pythons[name] = path
    cache_dir = getattr(args, "cache_dir", None)
    work = getattr(args, "peer_work", None)
    default_work = default_cache_dir(cache_dir) / "peers"
    return GenerationPeers(pythons=pythons, work_dir=Path(work) if work else default_work)


def main(args: argparse.Namespace) -> int:
    """Measure, write OUTPUT/perf.json and perf.md, print the table; 2 on bad flags."""
    from benchmark.perf.report import render_markdown  # torch and the models load only when the harness runs
    from benchmark.perf.runner import run_perf

    output = Path(getattr(args, "output", None) or "runs/perf")
    quick = bool(getattr(args, "quick", False))
    try:
        sizes = sizes_with_overrides(PerfSizes.quick() if quick else PerfSizes(), getattr(args, "perf_size", []))
        peers = peers_from_args(args)
    except ConfigError as err:
        print(f"popri perf: {err}", file=sys.stderr)
        return 2
    result = run_perf(
        output,
        quick=quick,
        sizes=sizes,
        only=tuple(getattr(args, "perf_only", None) or DEFAULT_COMPARISONS),
        cache_dir=getattr(args, "cache_dir", None) or "",
        seed=int(getattr(args, "seed", None) or 0),
        threads=getattr(args, "perf_threads", None),
        peers=peers,
    )
    print(render_markdown(result))
    print(f"wrote {output / 'perf.json'} and {output / 'perf.md'}")
    return 0


def handle(args: argparse.Namespace) -> int:
    """``popri perf``'s handler: logging as asked, then :func:`main`."""
    level = getattr(logging, str(getattr(args, "log_level", "INFO")).upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    return main(args)


def run(argv: list[str] | None = None) -> int:
    """``python -m benchmark.perf ...`` is ``popri perf ...``."""
    parser = argparse.ArgumentParser(prog="popri")
    add_subparser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["perf", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))
