"""Hyperparameter search on validation only: ``popri bench --grid KEY=V1,V2 [--grid KEY=...]``.

Every point of the Cartesian grid is one benchmark run in ``OUTPUT/<point>/`` with ``tune`` on: checkpoints are
chosen on one half of the validation users and the point is scored on the other half
(:func:`benchmark.datasets.tuning_splits`); the test split is never read. ``OUTPUT/search.json`` and
``OUTPUT/search.md`` then list every point's score per (method, ε) with its interval over seeds, and the best point
of each. Give PE and POPri grids of the same size (equal effort), and run the final rows once, without ``--grid``,
at the chosen settings: that is the only time the test split is touched.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmark.config import BenchConfig, BenchConfigError, apply_overrides, parse_assignments
from popri.checkpoint import atomic_write_text

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GridPoint:
    """One setting of the grid: ``KEY=VALUE`` assignments applied on top of the base configuration."""

    assignments: tuple[str, ...]

    @property
    def name(self) -> str:
        """A folder name that says the setting, e.g. ``corpus.temperature=0.7+popri.beta=0.1``.

        No commas: Flower's FAB manifest is comma-separated, so a comma in any path under an app folder breaks
        ``flwr run`` there."""
        text = "+".join(self.assignments) or "base"
        return re.sub(r"[^A-Za-z0-9._=+-]", "_", text)


def parse_grid(items: list[str]) -> list[GridPoint]:
    """``["corpus.temperature=0.7,1.0", "popri.beta=0.1,0.5"]`` as the Cartesian product of the values (the first
    key varies slowest). Errors name the item."""
    axes: list[list[str]] = []
    for key, raw in parse_assignments(items).items():
        values = [v.strip() for v in raw.split(",")]
        if not all(values):
            raise BenchConfigError(f"invalid benchmark key 'grid {key}': give values as KEY=V1,V2,..., got {raw!r}")
        if len(set(values)) != len(values):
            raise BenchConfigError(f"invalid benchmark key 'grid {key}': a value is listed twice in {raw!r}")
        axes.append([f"{key}={v}" for v in values])
    return [GridPoint(tuple(point)) for point in itertools.product(*axes)]


def point_configs(base: BenchConfig, points: list[GridPoint]) -> list[tuple[GridPoint, BenchConfig]]:
    """Every point's configuration, all built (and so validated) before any point runs."""
    root = base.output_dir
    out = []
    for point in points:
        start = dataclasses.replace(base, tune=True, output=str(root / point.name))
        config = apply_overrides(start, list(point.assignments))
        if config.corpus.generator != base.corpus.generator:  # the points share the loaded models
            raise BenchConfigError("invalid benchmark key 'grid corpus.generator': a grid cannot vary the models")
        if config.cache_dir != base.cache_dir or config.output != str(root / point.name):
            raise BenchConfigError("invalid benchmark key 'grid': a grid cannot vary cache-dir or output")
        out.append((point, config))
    return out


def collect(points: list[tuple[GridPoint, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One entry per (point, data set, method, ε) from the points' ``summary`` (validation-half scores)."""
    rows = []
    for point, results in points:
        for name, ds in results.get("datasets", {}).items():
            for entry in ds.get("summary", []):
                rows.append(
                    {
                        "point": list(point.assignments),
                        "dataset": name,
                        "method": entry["method"],
                        "epsilon": entry["epsilon"],
                        "seeds": entry["seeds"],
                        "accuracy_mean": entry.get("accuracy_mean"),
                        "accuracy_ci95": entry.get("accuracy_ci95"),
                        "fid": entry.get("fid"),
                        "knn_precision": entry.get("knn_precision"),
                        "knn_recall": entry.get("knn_recall"),
                        "mean_words": entry.get("mean_words"),
                    }
                )
    return rows


def point_differences(
    points: list[tuple[GridPoint, dict[str, Any]]], *, resamples: int = 2000, seed: int = 0
) -> list[dict[str, Any]]:
    """Per (data set, method, ε): every later point minus the first point that has it, in accuracy points, with a
    95 % paired-bootstrap interval over the scoring users (:func:`benchmark.report.compare`).

    Points of one seed score the same validation half, so the pairing holds; the interval covers which scoring users
    the half happens to hold, with the seeds fixed. It is what separates two points that share a seed, where an
    interval over seeds (one seed) does not exist.
    """
    from benchmark.report import as_float, compare

    first: dict[tuple[str, str, float], tuple[GridPoint, list[dict[str, Any]]]] = {}
    out = []
    for point, results in points:
        for name, ds in results.get("datasets", {}).items():
            groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
            for row in ds.get("results", []):
                groups.setdefault((row["method"], as_float(row["epsilon"])), []).append(row)
            for (method, epsilon), rows in groups.items():
                key = (name, method, epsilon)
                if key not in first:
                    first[key] = (point, rows)
                    continue
                base_point, base_rows = first[key]
                labelled = [{**r, "method": "this point"} for r in rows]
                labelled += [{**r, "method": "first point"} for r in base_rows]
                diff = compare(
                    labelled,
                    "this point",
                    "first point",
                    epsilon_a=epsilon,
                    epsilon_b=epsilon,
                    resamples=resamples,
                    seed=seed,
                )
                if diff is not None:
                    out.append(
                        {
                            "dataset": name,
                            "method": method,
                            "epsilon": epsilon,
                            "point": list(point.assignments),
                            "versus": list(base_point.assignments),
                            "seeds": diff["seeds"],
                            "diff_mean": diff["diff_mean"],
                            "diff_ci95": diff["diff_ci95"],
                            "reading": diff["reading"],
                        }
                    )
    return out


def best_points(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (data set, method, ε): the row with the highest mean validation-half accuracy."""
    best: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in rows:
        key = (row["dataset"], row["method"], str(row["epsilon"]))
        if row["accuracy_mean"] is not None and (key not in best or row["accuracy_mean"] > best[key]["accuracy_mean"]):
            best[key] = row
    return list(best.values())


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _metric(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _point(assignments: list[str]) -> str:
    return ", ".join(f"`{a}`" for a in assignments) or "base"


def markdown(search: dict[str, Any]) -> str:
    """search.md: every point's validation-half accuracy (%) with its 95 % interval over seeds, then the best ones."""
    lines = [
        "# LargeFedBench hyperparameter search",
        "",
        f"Measured {search['date']} at commit {search['commit']}. Base preset `{search['preset']}`, seeds "
        f"{search['seeds']}. Scored on the second half of the validation users, checkpoints chosen on the first "
        "half; the test split was not read. Accuracy in % (mean over seeds, Student-t 95 % interval in brackets); "
        "FID (lower is closer), k-NN precision and recall to the scoring half, and the corpus's mean words per text.",
        "",
        "| point | data set | method | ε | accuracy | FID | precision | recall | words |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in search["rows"]:
        ci = row["accuracy_ci95"]
        interval = f" [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else ""
        lines.append(
            f"| {_point(row['point'])} | {row['dataset']} | {row['method']} | {row['epsilon']} | "
            f"{_pct(row['accuracy_mean'])}{interval} | {_metric(row.get('fid'), 4)} | "
            f"{_metric(row.get('knn_precision'), 2)} | {_metric(row.get('knn_recall'), 2)} | "
            f"{_metric(row.get('mean_words'), 1)} |"
        )
    if search.get("differences"):
        lines += [
            "",
            "## Each point against the first one",
            "",
            "Accuracy points, this point − the first point with the same data set, method and ε; 95 % paired-bootstrap "
            'interval over the scoring users (same users at both points of a seed). "better" only where the '
            "interval excludes zero.",
            "",
            "| point | versus | data set | method | ε | difference | reading |",
            "|---|---|---|---|---|---|---|",
        ]
        for d in search["differences"]:
            low, high = d["diff_ci95"]
            lines.append(
                f"| {_point(d['point'])} | {_point(d['versus'])} | {d['dataset']} | {d['method']} | {d['epsilon']} | "
                f"{d['diff_mean']:+.2f} [{low:+.2f}, {high:+.2f}] | {d['reading']} |"
            )
    lines += ["", "## Best point per method", ""]
    for row in search["best"]:
        lines.append(
            f"- {row['dataset']} {row['method']} ε={row['epsilon']}: {_point(row['point'])} "
            f"({_pct(row['accuracy_mean'])} %)"
        )
    lines += [
        "",
        "A difference between points smaller than their intervals is not a choice the search can support; prefer "
        "the simpler or the default setting then.",
        "",
    ]
    return "\n".join(lines)


def _public_key(config: BenchConfig) -> str:
    """What a seed's public corpus, public base model and private-text embeddings depend on: points that agree on it
    share them (a grid over, say, POPri's β would otherwise regenerate the same public corpus at every point)."""
    d = config.to_dict()
    return json.dumps([d["datasets"], d["corpus"], d["downstream"], d["seed"]], sort_keys=True, default=str)


def _share_public(source: Path, target: Path) -> int:
    """Copy the public corpora, base models and private embedding caches of ``source`` into ``target``; returns how
    many files were copied (the point then runs with ``resume``, which reuses exactly these)."""
    copied = 0
    patterns = ("*/private/*.npy", "*/seed*/public.jsonl", "*/seed*/public.jsonl.seconds.json", "*/seed*/base_model.pt")
    for pattern in patterns:
        for path in source.glob(pattern):
            dest = target / path.relative_to(source)
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)
                copied += 1
    return copied


def run_search(base: BenchConfig, grid: list[GridPoint], *, assets: Any = None) -> dict[str, Any]:
    """Run every grid point (models loaded once and shared), then write ``search.json`` and ``search.md``."""
    from benchmark.perf.report import source_commit
    from benchmark.run import Assets, run_benchmark

    configs = point_configs(base, grid)
    shared = assets or Assets(base)
    done: list[tuple[GridPoint, dict[str, Any]]] = []
    root = base.output_dir
    root.mkdir(parents=True, exist_ok=True)
    search: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "commit": source_commit(),
        "preset": base.preset,
        "seeds": base.seed_values(),
        "grid": [list(p.assignments) for p in grid],
    }
    publics: dict[str, Path] = {}
    for point, config in configs:
        key = _public_key(config)
        if not base.resume:  # a fresh search starts every point afresh, whatever an earlier one left there
            shutil.rmtree(config.output_dir, ignore_errors=True)
        if key in publics and _share_public(publics[key], config.output_dir):
            logger.info("%s: public corpora, base models and embeddings shared from %s", point.name, publics[key])
            config = dataclasses.replace(config, resume=True)
        publics.setdefault(key, config.output_dir)
        shared.config = config  # the loaded models are the same for every point; the settings are the point's
        done.append((point, run_benchmark(config, assets=shared)))
        search["rows"] = collect(done)
        search["best"] = best_points(search["rows"])
        search["differences"] = point_differences(done, seed=base.seed)
        atomic_write_text(root / "search.json", json.dumps(search, indent=2, default=str) + "\n")
        atomic_write_text(root / "search.md", markdown(search))
    return search
