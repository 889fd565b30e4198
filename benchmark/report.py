"""Benchmark outputs: ``results.json`` (every number), ``results.md`` (the table) and ``privacy_utility.png``.

Gap closure (the POPri paper's headline number) is computed per data set and seed from the rows of that seed:

    gap_closure = (acc − acc_eps0) / (acc_epsinf − acc_eps0)

0 means no better than the public-only model, 1 means as good as non-private training on the private data. It is
left empty when either reference is missing or when the two references are equal.

Per data set, ``summary`` holds one entry per (method, ε) over seeds (mean and Student-t 95 % interval of accuracy,
gap closure, cross-entropy and the distribution metrics) and ``comparisons`` the paired differences (accuracy points,
a − b) with paired-bootstrap 95 % intervals over test users (:mod:`benchmark.stats`). The table says "better" only
where that interval excludes zero.
"""

from __future__ import annotations

import json
import math
import os
import platform
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from benchmark.stats import mean_ci95, paired_bootstrap_difference, verdict
from popri.checkpoint import atomic_open, atomic_write_text

METHOD_LABELS = {
    "eps0": "ε=0 (public only)",
    "epsinf": "ε=∞ (non-private)",
    "oracle": "oracle: N real texts (non-private)",
    "dpfedavg": "DP-FedAvg",
    "pe": "PE",
    "popri": "POPri",
}
SHORT_LABELS = {
    "eps0": "ε=0",
    "epsinf": "ε=∞",
    "oracle": "oracle",
    "dpfedavg": "DP-FedAvg",
    "pe": "PE",
    "popri": "POPri",
}
PRIVATE = ("dpfedavg", "pe", "popri")
REFERENCES = ("eps0", "epsinf", "oracle")
# paired comparisons between the private methods at the same ε (a − b); each method − eps0 is added to them
PAIRS = (("popri", "pe"), ("popri", "dpfedavg"), ("pe", "dpfedavg"))
DISTRIBUTION_KEYS = ("fid", "knn_precision", "knn_recall", "mean_words")


def _jsonable(value: Any) -> Any:
    """JSON has no infinity: ``inf`` becomes the string "inf" (and NaN becomes null)."""
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if math.isnan(value):
            return None
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def as_float(value: Any) -> float:
    return math.inf if value == "inf" else float(value)


def gap_closure(accuracy: float, *, eps0: float | None, epsinf: float | None) -> float | None:
    """(acc − acc_eps0) / (acc_epsinf − acc_eps0), or None without both references or with equal references."""
    if eps0 is None or epsinf is None or epsinf == eps0:
        return None
    return (accuracy - eps0) / (epsinf - eps0)


def _seed(row: dict[str, Any]) -> int:
    return int(row.get("seed", 0))


def with_gap_closure(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of one data set with ``gap_closure`` filled in from the eps0 and epsinf rows of the same seed."""
    ref = {(r["method"], _seed(r)): r["accuracy"] for r in rows if r["method"] in ("eps0", "epsinf")}
    return [
        {
            **r,
            "gap_closure": gap_closure(
                r["accuracy"], eps0=ref.get(("eps0", _seed(r))), epsinf=ref.get(("epsinf", _seed(r)))
            ),
        }
        for r in rows
    ]


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, float], list[dict[str, Any]]]:
    """Rows by (method, ε), each list sorted by seed."""
    out: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["method"], as_float(r["epsilon"])), []).append(r)
    return {k: sorted(v, key=_seed) for k, v in out.items()}


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (method, ε): ``seeds``, ``accuracy_mean``/``accuracy_ci95``, ``gap_closure_mean``/``_ci95``,
    ``cross_entropy_mean``/``_ci95`` and, for generated corpora, the distribution metrics' means (``fid``, ...)."""
    out = []
    for (method, eps), mine in _groups(rows).items():
        entry: dict[str, Any] = {"method": method, "epsilon": eps, "seeds": [_seed(r) for r in mine]}
        for key in ("accuracy", "gap_closure", "cross_entropy", *DISTRIBUTION_KEYS):
            values = [r.get(key) for r in mine if r.get(key) is not None]
            if not values:
                continue
            mean, ci = mean_ci95(values)
            if key in DISTRIBUTION_KEYS:
                entry[key], entry[f"{key}_ci95"] = mean, ci
            else:
                entry[f"{key}_mean"], entry[f"{key}_ci95"] = mean, ci
        out.append(entry)
    return out


def _per_user(row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    correct, tokens = row.get("test_user_correct"), row.get("test_user_tokens")
    if not correct or not tokens or len(correct) != len(tokens):
        return None
    return np.asarray(correct, dtype=np.float64), np.asarray(tokens, dtype=np.float64)


def compare(
    rows: list[dict[str, Any]], a: str, b: str, *, epsilon_a: float, epsilon_b: float, resamples: int, seed: int
) -> dict[str, Any] | None:
    """The paired difference a − b (accuracy points) over the seeds both have, with its bootstrap interval; None when
    no seed has per-test-user counts for both."""
    groups = _groups(rows)
    by_seed_a = {_seed(r): r for r in groups.get((a, epsilon_a), [])}
    by_seed_b = {_seed(r): r for r in groups.get((b, epsilon_b), [])}
    per_seed, seeds = [], []
    for s in sorted(set(by_seed_a) & set(by_seed_b)):
        ua, ub = _per_user(by_seed_a[s]), _per_user(by_seed_b[s])
        if ua is None or ub is None or ua[1].shape != ub[1].shape:
            continue
        per_seed.append((ua[0], ua[1], ub[0], ub[1]))
        seeds.append(s)
    if not per_seed:
        return None
    # a fixed, readable seed per comparison: the same input always gives the same interval
    rng = np.random.default_rng([seed, zlib.crc32(f"{a}|{b}|{epsilon_a}".encode())])
    diff, ci = paired_bootstrap_difference(per_seed, rng=rng, resamples=resamples)
    return {
        "a": a,
        "b": b,
        "epsilon": epsilon_a,
        "seeds": seeds,
        "diff_mean": 100 * diff,
        "diff_ci95": [100 * ci[0], 100 * ci[1]],
        "reading": verdict(SHORT_LABELS.get(a, a), SHORT_LABELS.get(b, b), ci),
    }


def comparisons(rows: list[dict[str, Any]], *, resamples: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """POPri − PE, POPri − DP-FedAvg, PE − DP-FedAvg at every ε, then every other method − eps0."""
    present = set(_groups(rows))
    private_eps = sorted({e for m, e in present if m in PRIVATE})
    out = []
    jobs = [(a, b, e, e) for e in private_eps for a, b in PAIRS]
    jobs += [(m, "eps0", e, 0.0) for m, e in sorted(present, key=lambda k: (list(METHOD_LABELS).index(k[0]), k[1]))]
    for a, b, ea, eb in jobs:
        if a == b or (a, ea) not in present or (b, eb) not in present:
            continue
        hit = compare(rows, a, b, epsilon_a=ea, epsilon_b=eb, resamples=resamples, seed=seed)
        if hit is not None:
            out.append(hit)
    return out


def environment() -> dict[str, Any]:
    import torch

    try:
        import flwr

        flwr_version = getattr(flwr, "__version__", "?")
    except ImportError:  # pragma: no cover - flwr is a dependency
        flwr_version = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": flwr_version,
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
        "machine": platform.machine(),
    }


def write_results_json(path: Path, results: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(_jsonable(results), indent=2, ensure_ascii=False) + "\n")


def read_results_json(path: Path) -> dict[str, Any]:
    """results.json as written, with "inf" turned back into a float in the ε fields (so rows compare equal)."""
    results = dict(json.loads(path.read_text(encoding="utf-8")))
    for ds in results.get("datasets", {}).values():
        for row in ds.get("results", []):
            for key in ("epsilon", "epsilon_spent"):
                if row.get(key) in ("inf", "-inf"):
                    row[key] = float(row[key])
    return results


def _pct(x: float | None, digits: int = 2) -> str:
    return "" if x is None else f"{100 * x:.{digits}f}"


def _eps_label(eps: Any) -> str:
    value = as_float(eps)
    return "∞" if math.isinf(value) else f"{value:g}"


def _bytes(n: Any) -> str:
    if n is None:
        return "–"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def _cell(entry: dict[str, Any], *, reference: bool) -> str:
    """``mean`` or ``mean [low, high]`` (accuracy %), and the gap closure % for the other methods."""
    cell = _pct(entry.get("accuracy_mean"))
    ci = entry.get("accuracy_ci95")
    if ci is not None:
        cell += f" [{_pct(ci[0])}, {_pct(ci[1])}]"
    if not reference and entry.get("gap_closure_mean") is not None:
        cell += f" ({_pct(entry['gap_closure_mean'], 0)}%)"
    return cell


def _num(x: Any, digits: int = 3) -> str:
    return "–" if x is None else f"{float(x):.{digits}f}"


def _words(x: Any) -> str:
    return _num(x, digits=1)


def markdown_table(results: dict[str, Any]) -> str:
    """Per data set: the privacy-utility table (mean over seeds and 95 % interval), the paired comparisons, the
    distribution metrics, then the details of every row."""
    lines = ["# LargeFedBench results", ""]
    lines.append(
        f"Preset `{results.get('preset')}`; δ = {results.get('delta')} for every private method; accountant: Opacus "
        f"{str(results.get('accountant', '')).upper()}. Top-1 next-token accuracy (%) on the test split (held-out "
        "users), EOS included, pads excluded: mean over seeds, with a Student-t 95 % interval over seeds in brackets "
        "when there are several; in parentheses the gap closure (acc − acc_ε0)/(acc_ε∞ − acc_ε0) in %. "
        "Checkpoints (epochs, steps, rounds) were chosen on the validation split only."
    )
    lines.append("")
    for name, ds in results.get("datasets", {}).items():
        rows = ds.get("results", [])
        summary = ds.get("summary") or summarise(rows)
        split = ds.get("splits", {})
        lines.append(f"## {name}")
        lines.append("")
        if split:
            lines.append(
                "Private train: {} users / {} texts; validation: {} users / {} texts; test: {} users / {} texts "
                "(held out by user). Downstream model: {:,} parameters ({}).".format(
                    split["train"]["users"],
                    split["train"]["texts"],
                    split["validation"]["users"],
                    split["validation"]["texts"],
                    split["test"]["users"],
                    split["test"]["texts"],
                    ds.get("downstream_parameters", 0),
                    ds.get("downstream_kind", "gpt2"),
                )
            )
            lines.append("")
        if ds.get("scored_on", "test") != "test":
            lines.append(
                "**Tuning run:** checkpoints were chosen on the first half of the validation users and every number "
                "below is scored on the second half (shown above as 'test'); the test split was not read."
            )
            lines.append("")
        private_eps = sorted({as_float(e["epsilon"]) for e in summary if e["method"] not in REFERENCES})
        columns = ["ε=0", *[f"ε={e:g}" for e in private_eps], "ε=∞"]
        lines.append("| method | " + " | ".join(columns) + " | seeds |")
        lines.append("|---" * (len(columns) + 2) + "|")
        for method in METHOD_LABELS:
            mine = [e for e in summary if e["method"] == method]
            if not mine:
                continue
            cells = []
            for col in columns:
                hit = next((e for e in mine if f"ε={_eps_label(e['epsilon'])}" == col), None)
                cells.append("" if hit is None else _cell(hit, reference=method in ("eps0", "epsinf")))
            seeds = max(len(e.get("seeds", [])) for e in mine)
            lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(cells) + f" | {seeds} |")
        lines.append("")
        comps = ds.get("comparisons", [])
        if comps:
            lines.append(
                "Paired differences a − b in accuracy points, averaged over the seeds both share; 95 % interval from a "
                'bootstrap over test users (the same resample for a and b, per seed). "better" only where the '
                "interval excludes zero."
            )
            lines.append("")
            lines.append("| a − b | ε | seeds | difference (points) | 95 % interval | reading |")
            lines.append("|---" * 6 + "|")
            for c in comps:
                lines.append(
                    "| {} − {} | {} | {} | {:+.2f} | [{:+.2f}, {:+.2f}] | {} |".format(
                        SHORT_LABELS.get(c["a"], c["a"]),
                        SHORT_LABELS.get(c["b"], c["b"]),
                        _eps_label(c["epsilon"]),
                        len(c.get("seeds", [])),
                        c["diff_mean"],
                        c["diff_ci95"][0],
                        c["diff_ci95"][1],
                        c["reading"],
                    )
                )
            lines.append("")
        dist = [e for e in summary if e.get("fid") is not None]
        if dist:
            lines.append(
                "Distribution of each corpus against the test users' texts (all-MiniLM-L6-v2 embeddings, equal sample "
                "counts; mean over seeds): FID (lower is closer) and k-NN precision / recall (k = 3). Non-private "
                "benchmark diagnostics."
            )
            lines.append("")
            lines.append("| method | ε | FID | precision | recall | words per text |")
            lines.append("|---" * 6 + "|")
            for e in dist:
                lines.append(
                    f"| {METHOD_LABELS.get(e['method'], e['method'])} | {_eps_label(e['epsilon'])} | {_num(e['fid'])} "
                    f"| {_num(e.get('knn_precision'))} | {_num(e.get('knn_recall'))} | {_words(e.get('mean_words'))} |"
                )
            reference = [r["reference_mean_words"] for r in rows if r.get("reference_mean_words") is not None]
            if reference:
                lines.append("")
                lines.append(f"The test users' texts have {_words(reference[0])} words per text.")
            lines.append("")
        progress = [r for r in rows if r.get("round_metrics")]
        if progress:
            lines.append(
                "POPri's progress: FID of each round's samples to the validation users (equal counts; lower is "
                "closer). Non-private benchmark diagnostic, never part of a popri run."
            )
            lines.append("")
            width = max(len(r["round_metrics"]) for r in progress)
            lines.append("| ε | seed | " + " | ".join(f"round {i + 1}" for i in range(width)) + " |")
            lines.append("|---" * (width + 2) + "|")
            for r in sorted(progress, key=lambda r: (as_float(r["epsilon"]), _seed(r))):
                fids = [_num(m.get("fid")) for m in r["round_metrics"]] + [""] * (width - len(r["round_metrics"]))
                lines.append(f"| {_eps_label(r['epsilon'])} | {_seed(r)} | " + " | ".join(fids) + " |")
            lines.append("")
        lines.append(
            "| method | ε target | seed | ε spent | σ | accuracy % | cross-entropy | gap closure % | selected "
            "| wall s | down / client / round | up / client / round |"
        )
        lines.append("|---" * 12 + "|")
        for r in rows:
            spent = r.get("epsilon_spent")
            sigma = r.get("noise_multiplier")
            lines.append(
                "| {} | {} | {} | {} | {} | {} | {:.3f} | {} | {} | {:.0f} | {} | {} |".format(
                    METHOD_LABELS.get(r["method"], r["method"]),
                    _eps_label(r["epsilon"]),
                    r.get("seed", "–"),
                    "–" if spent is None else (_eps_label(spent) if spent == "inf" else f"{float(spent):.3f}"),
                    "–" if sigma is None else f"{float(sigma):.3f}",
                    _pct(r["accuracy"]),
                    r["cross_entropy"],
                    _pct(r.get("gap_closure"), 1) or "–",
                    r.get("selected", ""),
                    r.get("wall_seconds", 0.0),
                    _bytes(r.get("bytes_down_per_client_round")),
                    _bytes(r.get("bytes_up_per_client_round")),
                )
            )
        lines.append("")
    return "\n".join(lines)


def write_markdown(path: Path, results: dict[str, Any]) -> None:
    atomic_write_text(path, markdown_table(results) + "\n")


def _yerr(entries: list[dict[str, Any]]) -> np.ndarray:
    """(2, n) distances from the means to the interval ends (0 where an entry has no interval)."""
    lows, highs = [], []
    for e in entries:
        ci, mean = e.get("accuracy_ci95"), e["accuracy_mean"]
        lows.append(0.0 if ci is None else 100 * (mean - ci[0]))
        highs.append(0.0 if ci is None else 100 * (ci[1] - mean))
    return np.asarray([lows, highs])


def plot_privacy_utility(path: Path, results: dict[str, Any]) -> None:
    """Test accuracy vs ε per private method (mean over seeds, error bars = 95 % intervals over seeds), one panel per
    data set, with the ε=0, ε=∞ and oracle references as lines (their intervals as bands)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(results.get("datasets", {}).items())
    if not datasets:
        return
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, (name, ds) in zip(axes[0], datasets, strict=True):
        summary = ds.get("summary") or summarise(ds.get("results", []))
        for method, style in (("eps0", ":"), ("epsinf", "--"), ("oracle", "-.")):
            ref = next((e for e in summary if e["method"] == method), None)
            if ref is not None:
                line = ax.axhline(
                    100 * ref["accuracy_mean"], linestyle=style, color="grey", label=METHOD_LABELS[method]
                )
                if ref.get("accuracy_ci95") is not None:
                    low, high = ref["accuracy_ci95"]
                    ax.axhspan(100 * low, 100 * high, color=line.get_color(), alpha=0.12)
        for method in PRIVATE:
            mine = sorted((e for e in summary if e["method"] == method), key=lambda e: as_float(e["epsilon"]))
            if mine:
                ax.errorbar(
                    [as_float(e["epsilon"]) for e in mine],
                    [100 * e["accuracy_mean"] for e in mine],
                    yerr=_yerr(mine),
                    marker="o",
                    capsize=3,
                    label=METHOD_LABELS[method],
                )
        eps = sorted({as_float(e["epsilon"]) for e in summary if e["method"] in PRIVATE})
        if len(eps) > 1 and eps[0] > 0 and eps[-1] / eps[0] >= 5:
            ax.set_xscale("log")
        if eps:
            from matplotlib.ticker import NullFormatter

            ax.set_xticks(eps)
            ax.set_xticklabels([f"{e:g}" for e in eps])
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("ε (δ = {:g})".format(results.get("delta", 0)))
        ax.set_ylabel("next-token accuracy on test (%)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_open(path) as fh:
            fig.savefig(fh, format=path.suffix.lstrip(".") or "png", dpi=110)
    finally:
        plt.close(fig)


def write_all(output: Path, results: dict[str, Any]) -> None:
    """results.json, results.md and privacy_utility.png, rewritten after every finished row (the per-seed rows, then
    per data set the ``summary`` over seeds and the paired ``comparisons``)."""
    config = results.get("config") or {}
    resamples = int(config.get("bootstrap_resamples", 2000))
    seed = int(config.get("seed", 0))
    for ds in results.get("datasets", {}).values():
        ds["results"] = with_gap_closure(ds.get("results", []))
        ds["summary"] = summarise(ds["results"])
        ds["comparisons"] = comparisons(ds["results"], resamples=resamples, seed=seed)
    write_results_json(output / "results.json", results)
    write_markdown(output / "results.md", results)
    plot_privacy_utility(output / "privacy_utility.png", results)
