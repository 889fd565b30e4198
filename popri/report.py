"""``DIR/report.md``: one page a person reads after a run.

The per-round plot, the privacy card, a table of the rounds, the time per stage (from rounds.jsonl ``seconds``) and
a dozen samples of the first and the last round side by side (``DIR/samples/round-XXXX.jsonl``, written each round
because the checkpoints keep only the newest two). It publishes no count of users: under user-level DP the number
of users is private, so the ``users_sampled`` field of rounds.jsonl stays out of the report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from popri.card import CardError, PrivacyCard, card_table
from popri.checkpoint import atomic_write_text, write_jsonl

SAMPLES_DIR = "samples"
SIDE_BY_SIDE = 12


def round_samples_path(run_dir: Path, round_index: int) -> Path:
    """``DIR/samples/round-XXXX.jsonl`` of the 0-based round ``round_index`` (the checkpoints' numbering)."""
    return Path(run_dir) / SAMPLES_DIR / f"round-{round_index:04d}.jsonl"


def save_round_samples(run_dir: Path, round_index: int, rows: list[dict[str, Any]]) -> Path:
    """Keep a round's samples (``{"prompt", "text", "dp_score"?}`` rows) for the report; returns the file."""
    path = round_samples_path(run_dir, round_index)
    write_jsonl(path, rows)
    return path


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{path}: line {number} is not valid JSON") from None
    return rows


def _cell(text: Any) -> str:
    """A markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|") or "*(empty)*"


def _round_sample_files(run_dir: Path) -> list[Path]:
    found = sorted((run_dir / SAMPLES_DIR).glob("round-*.jsonl"))
    if found:
        return found
    return sorted((run_dir / "checkpoints").glob("round-*/samples.jsonl"))  # runs older than the samples folder


def _stage_table(records: list[dict[str, Any]]) -> list[str]:
    done = [r for r in records if isinstance(r.get("seconds"), dict)]
    if not done:
        return ["No timings recorded."]
    stages: list[str] = []
    for r in done:
        stages += [s for s in r["seconds"] if s not in stages]
    totals = {s: sum(float(r["seconds"].get(s, 0.0)) for r in done) for s in stages}
    grand = sum(totals.values()) or 1.0
    lines = ["| stage | total s | mean s / round | share |", "|---|---:|---:|---:|"]
    for s in stages:
        lines.append(f"| {s} | {totals[s]:.1f} | {totals[s] / len(done):.2f} | {100 * totals[s] / grand:.0f} % |")
    lines.append(f"| **all** | **{grand:.1f}** | **{grand / len(done):.2f}** | 100 % |")
    return lines


def _round_table(records: list[dict[str, Any]]) -> list[str]:
    lines = ["| round | ε spent | DPO loss | reward margin | pairs | seconds |", "|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        if r.get("discarded"):
            lines.append(f"| {r.get('round')} | discarded: too few valid replies | | | | |")
            continue

        def num(key: str, fmt: str = ".4f", r: dict[str, Any] = r) -> str:
            return format(r[key], fmt) if isinstance(r.get(key), int | float) else "–"

        seconds = sum(r["seconds"].values()) if isinstance(r.get("seconds"), dict) else None
        lines.append(
            f"| {r.get('round')} | {num('privacy/epsilon')} | {num('dpo/loss')} | {num('dpo/rewards_margin')} | "
            f"{r.get('pairs', '–')} | {'–' if seconds is None else f'{seconds:.1f}'} |"
        )
    return lines


def _side_by_side(run_dir: Path, count: int) -> list[str]:
    files = _round_sample_files(run_dir)
    if not files:
        return ["No per-round samples were saved."]
    first, last = _read_jsonl(files[0]), _read_jsonl(files[-1])
    name = {f: f.parent.name if f.name == "samples.jsonl" else f.stem for f in (files[0], files[-1])}

    def label(path: Path) -> str:
        return f"round {int(name[path].split('-')[-1]) + 1}"

    # One sample per prompt reads better than J near-duplicates of the first prompts.
    def spread(rows: list[dict[str, Any]]) -> list[str]:
        seen, picked = set(), []
        for row in rows:
            if row.get("prompt") not in seen:
                seen.add(row.get("prompt"))
                picked.append(str(row.get("text", "")))
        picked += [str(r.get("text", "")) for r in rows if str(r.get("text", "")) not in picked]
        return picked[:count]

    left, right = spread(first), spread(last)
    lines = [f"| # | {label(files[0])} | {label(files[-1])} |", "|---:|---|---|"]
    for i in range(max(len(left), len(right))):
        a = _cell(left[i]) if i < len(left) else ""
        b = _cell(right[i]) if i < len(right) else ""
        lines.append(f"| {i + 1} | {a} | {b} |")
    return lines


def report_markdown(run_dir: Path, *, samples: int = SIDE_BY_SIDE) -> str:
    """The report of the run in ``run_dir`` as markdown (read-only: writes nothing)."""
    run_dir = Path(run_dir)
    rounds_file = run_dir / "rounds.jsonl"
    records = _read_jsonl(rounds_file) if rounds_file.exists() else []
    config_file = run_dir / "config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    lines = [f"# POPri run report: `{run_dir.name}`", ""]
    try:
        card: PrivacyCard | None = PrivacyCard.from_run_dir(run_dir)
    except CardError as err:
        card, lines = None, [*lines, f"*No privacy card: {err}*", ""]
    if card is not None:
        commit = f" (commit {card.popri_commit})" if card.popri_commit else ""
        lines += [f"{card.date}, popri {card.popri_version}{commit}, generator `{card.generator}`.", ""]
    if config:
        lines += [
            f"K={config.get('prompts')} prompts × J={config.get('samples-per-prompt')} samples per round, "
            f"{len([r for r in records if not r.get('discarded')])} of {config.get('rounds')} planned round(s) "
            f"trained, final corpus of {config.get('final-samples')} samples.",
            "",
        ]
    if (run_dir / "rounds.png").exists():
        lines += ["![per-round curves](rounds.png)", ""]
    if card is not None:
        lines += ["## Privacy", "", card.guarantee("This run's output (generator and corpus)"), ""]
        lines += [*card_table(card), ""]
        if card.non_private:
            lines += [
                "### NON-PRIVATE diagnostics",
                "",
                "Computed on held-out private text without DP; outside the guarantee above.",
                "",
                "```json",
                json.dumps(card.non_private, indent=2),
                "```",
                "",
            ]
    lines += ["## Rounds", "", *_round_table(records), ""]
    lines += ["## Time per stage", "", *_stage_table(records), ""]
    lines += ["## Samples: first and last round", "", *_side_by_side(run_dir, samples), ""]
    lines += [
        "## Files",
        "",
        "- `generator/`: the tuned LoRA adapter (peft) with its privacy card; `popri export` merges it.",
        "- `synthetic/`: the final corpus as a Hugging Face parquet dataset with its dataset card; "
        "`synthetic.jsonl`: the same texts as JSONL.",
        "- `rounds.jsonl`, `privacy.json`, `ledger.json`, `config.json`, `checkpoints/`, `samples/`, `run.log`.",
        "",
    ]
    return "\n".join(lines)


def write_report(run_dir: Path, *, samples: int = SIDE_BY_SIDE) -> Path:
    """Write ``run_dir/report.md``; returns its path."""
    path = Path(run_dir) / "report.md"
    atomic_write_text(path, report_markdown(run_dir, samples=samples))
    return path
