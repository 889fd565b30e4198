"""``popri bench``: the LargeFedBench command line.

``popri bench --preset quick --output runs/bench-quick`` runs every method at toy size; ``--methods``, ``--epsilons``
and ``--dataset`` select parts. ``popri/cli.py`` registers this with :func:`add_subparser`; ``python -m benchmark``
runs it standalone. The performance harness is its own command, ``popri perf`` (:mod:`benchmark.perf.cli`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Any

from benchmark.config import METHODS, PRESETS, BenchConfig, BenchConfigError, apply_overrides, preset_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``popri bench`` (every flag has its help)."""
    parser.add_argument(
        "--preset",
        choices=PRESETS,
        default="default",
        help="quick: all methods at toy size (minutes, CI); default: full comparison on Shakespeare "
        "(<= 90 min on 2 CPU cores); paper: the paper's sizes (GPU)",
    )
    parser.add_argument("--output", default=None, help="results folder (default: runs/bench-PRESET)")
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, default=None, help="methods to run (default: all; eps0 always runs)"
    )
    parser.add_argument(
        "--epsilons", nargs="+", type=float, default=None, help="privacy budgets for the private methods (default 1 7)"
    )
    parser.add_argument(
        "--dataset",
        nargs="+",
        default=None,
        help="shakespeare (default, offline), congress, biorxiv, pubmed, or user JSONL/JSON/parquet files",
    )
    parser.add_argument(
        "--data-file",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="local raw file or folder for congress/biorxiv/pubmed (NAME=PATH when several data sets are given)",
    )
    parser.add_argument("--max-users", type=int, default=None, help="keep a seeded random subset of users (0 = all)")
    parser.add_argument("--delta", type=float, default=None, help="δ for every private method (default 3e-6)")
    parser.add_argument("--accountant", choices=("rdp", "prv"), default=None, help="Opacus accountant (default rdp)")
    parser.add_argument("--seed", type=int, default=None, help="seed for splits, sampling and training (default 0)")
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="replicates per row, seeds SEED..SEED+N-1 shared by every method (default: preset's, 3; quick 2)",
    )
    parser.add_argument(
        "--noise-seed",
        type=int,
        default=None,
        help="reproducible DP noise (experiments only: predictable noise is not private)",
    )
    parser.add_argument("--generator", default=None, help="'smollm2' (packaged) or a local HF model folder")
    parser.add_argument("--corpus-samples", type=int, default=None, help="size of every synthetic corpus")
    parser.add_argument(
        "--popri-backend",
        choices=("inprocess", "simulation"),
        default=None,
        help="run POPri over an in-process Flower grid (default) or Flower's Ray simulation",
    )
    parser.add_argument(
        "--cache-dir", default=None, help="model and embedding cache (default $POPRI_CACHE or ~/.cache/popri)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="any other setting, e.g. dpfedavg.rounds=10, pe.population=128, downstream.kind=pretrained-lora, "
        "data.max-users=200; popri.KEY takes any popri run key (popri.beta=0.1, popri.rounds=4)",
    )
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="SECTION.KEY=V1,V2",
        help="hyperparameter search: run every combination of these values, scored on held-out validation users "
        "only (the test split is not read); writes OUTPUT/search.md and OUTPUT/search.json",
    )
    parser.add_argument(
        "--tune",
        action="store_true",
        help="score on half of the validation users, choose checkpoints on the other half; never read test",
    )
    parser.add_argument("--resume", action="store_true", help="keep the rows already in OUTPUT/results.json")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")


def _data_files(values: list[str], datasets: list[str]) -> dict[str, str]:
    files: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if sep and name in datasets:
            files[name] = path
        elif len(datasets) == 1:
            files[datasets[0]] = value
        else:
            raise BenchConfigError(
                f"invalid benchmark key 'data-file': with several data sets use NAME=PATH, got {value!r}"
            )
    return files


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The preset, with every flag the user gave applied on top."""
    config = preset_config(args.preset)
    spec = config.datasets[0]
    names = args.dataset or [spec.dataset]
    files = _data_files(args.data_file, names)
    spec_changes: dict[str, Any] = {}
    if args.max_users is not None:
        spec_changes["max_users"] = args.max_users
    datasets = tuple(
        dataclasses.replace(spec, dataset=name, data_file=files.get(name, ""), **spec_changes) for name in names
    )
    top: dict[str, Any] = {
        "datasets": datasets,
        "output": args.output or f"runs/bench-{args.preset}",
        "progress": not args.no_progress,
        "resume": args.resume,
        "tune": bool(args.tune or args.grid),
    }
    for key in ("delta", "accountant", "seed", "seeds", "noise_seed"):
        if getattr(args, key) is not None:
            top[key] = getattr(args, key)
    if args.cache_dir is not None:
        top["cache_dir"] = args.cache_dir
    if args.methods:
        top["methods"] = tuple(args.methods)
    if args.epsilons:
        top["epsilons"] = tuple(args.epsilons)
    corpus: dict[str, Any] = {}
    if args.generator is not None:
        corpus["generator"] = args.generator
    if args.corpus_samples is not None:
        corpus["samples"] = args.corpus_samples
    if corpus:
        top["corpus"] = dataclasses.replace(config.corpus, **corpus)
    if args.popri_backend is not None:
        top["popri"] = dataclasses.replace(config.popri, backend=args.popri_backend)
    return apply_overrides(dataclasses.replace(config, **top), args.set)


def handle(args: argparse.Namespace) -> int:
    """Run the benchmark; returns the process exit code."""
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO), format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        config = config_from_args(args)
    except BenchConfigError as err:
        print(f"popri bench: {err}", file=sys.stderr)
        return 2
    out = config.output_dir
    if args.grid:
        from benchmark.search import parse_grid, point_configs, run_search

        try:
            grid = parse_grid(args.grid)
            point_configs(config, grid)
        except BenchConfigError as err:
            print(f"popri bench: {err}", file=sys.stderr)
            return 2
        run_search(config, grid)
        print(f"search: {out / 'search.json'}\ntable:  {out / 'search.md'}")
        print((out / "search.md").read_text(encoding="utf-8"))
        return 0
    from benchmark.run import run_benchmark

    run_benchmark(config)
    print(f"results: {out / 'results.json'}\ntable:   {out / 'results.md'}\nplot:    {out / 'privacy_utility.png'}")
    print((out / "results.md").read_text(encoding="utf-8"))
    return 0


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench`` on an argparse subparsers object; its handler is ``args.func(args)``."""
    parser = subparsers.add_parser(
        "bench",
        help="LargeFedBench: next-token accuracy at a privacy budget for POPri and baselines",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=handle)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="popri")
    add_subparser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))
