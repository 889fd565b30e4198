"""Benchmark outputs: ``results.json`` (every number), ``results.md`` (the table) and ``privacy_utility.png``.

Gap closure (the POPri paper's headline number) is computed per data set from the rows of that data set:

    gap_closure = (acc − acc_eps0) / (acc_epsinf − acc_eps0)

0 means no better than the public-only model, 1 means as good as non-private training on the private data. It is
left empty when either reference is missing or when the two references are equal.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

METHOD_LABELS = {
    "eps0": "ε=0 (public only)",
    "epsinf": "ε=∞ (non-private)",
    "dpfedavg": "DP-FedAvg",
    "pe": "PE",
    "popri": "POPri",
}


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


def with_gap_closure(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of one data set with ``gap_closure`` filled in from its eps0 and epsinf rows."""
    ref = {r["method"]: r["accuracy"] for r in rows if r["method"] in ("eps0", "epsinf")}
    return [
        {**r, "gap_closure": gap_closure(r["accuracy"], eps0=ref.get("eps0"), epsinf=ref.get("epsinf"))} for r in rows
    ]


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


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def write_results_json(path: Path, results: dict[str, Any]) -> None:
    _atomic_write(path, json.dumps(_jsonable(results), indent=2, ensure_ascii=False) + "\n")


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


def markdown_table(results: dict[str, Any]) -> str:
    """The privacy-utility table per data set (test accuracy %, gap closure %), then the details of every row."""
    lines = ["# LargeFedBench results", ""]
    lines.append(
        f"Preset `{results.get('preset')}`; δ = {results.get('delta')} for every private method; accountant: Opacus "
        f"{str(results.get('accountant', '')).upper()}. Top-1 next-token accuracy (%) on the test split (held-out "
        "users), EOS included, pads excluded; in parentheses the gap closure (acc − acc_ε0)/(acc_ε∞ − acc_ε0) in %. "
        "Checkpoints (epochs, steps, rounds) were chosen on the validation split only."
    )
    lines.append("")
    for name, ds in results.get("datasets", {}).items():
        rows = ds.get("results", [])
        split = ds.get("splits", {})
        lines.append(f"## {name}")
        lines.append("")
        if split:
            lines.append(
                "Private train: {} users / {} texts; validation: {} users / {} texts; test: {} users / {} texts "
                "(held out by user). Downstream model: {:,} parameters.".format(
                    split["train"]["users"],
                    split["train"]["texts"],
                    split["validation"]["users"],
                    split["validation"]["texts"],
                    split["test"]["users"],
                    split["test"]["texts"],
                    ds.get("downstream_parameters", 0),
                )
            )
            lines.append("")
        private_eps = sorted({as_float(r["epsilon"]) for r in rows if r["method"] not in ("eps0", "epsinf")})
        columns = ["ε=0", *[f"ε={e:g}" for e in private_eps], "ε=∞"]
        lines.append("| method | " + " | ".join(columns) + " |")
        lines.append("|---" * (len(columns) + 1) + "|")
        for method in METHOD_LABELS:
            mine = [r for r in rows if r["method"] == method]
            if not mine:
                continue
            cells = []
            for col in columns:
                hit = next((r for r in mine if f"ε={_eps_label(r['epsilon'])}" == col), None)
                if hit is None:
                    cells.append("")
                    continue
                cell = _pct(hit["accuracy"])
                if method not in ("eps0", "epsinf") and hit.get("gap_closure") is not None:
                    cell += f" ({_pct(hit['gap_closure'], 0)}%)"
                cells.append(cell)
            lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append(
            "| method | ε target | ε spent | σ | accuracy % | cross-entropy | gap closure % | selected | wall s | "
            "down / client / round | up / client / round |"
        )
        lines.append("|---" * 11 + "|")
        for r in rows:
            spent = r.get("epsilon_spent")
            sigma = r.get("noise_multiplier")
            lines.append(
                "| {} | {} | {} | {} | {} | {:.3f} | {} | {} | {:.0f} | {} | {} |".format(
                    METHOD_LABELS.get(r["method"], r["method"]),
                    _eps_label(r["epsilon"]),
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
    _atomic_write(path, markdown_table(results) + "\n")


def plot_privacy_utility(path: Path, results: dict[str, Any]) -> None:
    """Test accuracy vs ε per private method, one panel per data set, with the ε=0 and ε=∞ references as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(results.get("datasets", {}).items())
    if not datasets:
        return
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, (name, ds) in zip(axes[0], datasets, strict=True):
        rows = ds.get("results", [])
        for method, style in (("eps0", ":"), ("epsinf", "--")):
            ref = next((r for r in rows if r["method"] == method), None)
            if ref is not None:
                ax.axhline(100 * ref["accuracy"], linestyle=style, color="grey", label=METHOD_LABELS[method])
        for method in ("dpfedavg", "pe", "popri"):
            pts = sorted((as_float(r["epsilon"]), 100 * r["accuracy"]) for r in rows if r["method"] == method)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=METHOD_LABELS[method])
        eps = sorted({as_float(r["epsilon"]) for r in rows if r["method"] in ("dpfedavg", "pe", "popri")})
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(output: Path, results: dict[str, Any]) -> None:
    """results.json, results.md and privacy_utility.png, rewritten after every finished row."""
    for ds in results.get("datasets", {}).values():
        ds["results"] = with_gap_closure(ds.get("results", []))
    write_results_json(output / "results.json", results)
    write_markdown(output / "results.md", results)
    plot_privacy_utility(output / "privacy_utility.png", results)
