"""A run's published artifacts: ``rounds.jsonl``, ``privacy.json``, ``synthetic.jsonl``, ``diagnostics.json`` and
the ``rounds.png`` plot. Every file is written atomically (:mod:`popri.checkpoint`).

Only what is safe to publish goes here: ε spent, replies used and rejected, DPO metrics, timings. No user count
(exact or per node) is ever part of an artifact: under add/remove-one-user DP it is exactly what differs between
neighbouring data sets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from popri import checkpoint as ckpt
from popri.config import RunConfig
from popri.privacy import PrivacyLedger

# Record keys that would publish a count of users; refused by :func:`write_progress` as a last line of defence.
FORBIDDEN_RECORD_KEYS = frozenset({"users_sampled", "num_users", "num-users", "users"})


def privacy_summary(
    config: RunConfig, ledger: PrivacyLedger, *, noise_multiplier: float, noise_seeded: bool
) -> dict[str, Any]:
    """``privacy.json``: the budget spent and the settings it was spent under."""
    p = config.privacy
    return {
        "epsilon": ledger.epsilon(),
        "delta": p.delta,
        "noise_multiplier": noise_multiplier,
        "sample_rate": p.sample_rate,
        "rounds_completed": ledger.rounds_charged,
        "accountant": p.accountant,
        "target_epsilon": p.epsilon,
        "rounds_planned": config.rounds,
        "noise_seeded": noise_seeded,
        "privacy_mode": p.privacy_mode,
        "control": config.control,
    }


def write_progress(out: Path, records: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """``rounds.jsonl`` and ``privacy.json``, after every round (and every discarded attempt)."""
    leaked = sorted({k for r in records for k in r} & FORBIDDEN_RECORD_KEYS)
    if leaked:
        raise ValueError(f"round records must not publish user counts; found key {leaked[0]!r}")
    ckpt.write_jsonl(out / "rounds.jsonl", records)
    ckpt.atomic_write_json(out / "privacy.json", summary)


def write_synthetic(out: Path, texts: list[str]) -> None:
    ckpt.write_jsonl(out / "synthetic.jsonl", [{"text": t} for t in texts])


def write_diagnostics(
    out: Path, records: list[dict[str, Any]], *, final: float, final_se: float, control: bool
) -> None:
    """NON-PRIVATE diagnostic summary (benchmark use only)."""
    rounds = [r for r in records if "diagnostics/val_similarity" in r]
    ckpt.atomic_write_json(
        out / "diagnostics.json",
        {
            "note": "NON-PRIVATE diagnostic: similarity to held-out private validation text",
            "first_round": rounds[0]["diagnostics/val_similarity"] if rounds else None,
            "first_round_se": rounds[0]["diagnostics/val_similarity_se"] if rounds else None,
            "final": final,
            "final_se": final_se,
            "control": control,
        },
    )


def plot_rounds(records: list[dict[str, Any]], path: Path) -> None:
    """Per-round curves: DPO loss and margin, ε spent and, when present, the non-private diagnostic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in records if not r.get("discarded")]
    panels = [("dpo/loss", "DPO loss"), ("dpo/rewards_margin", "reward margin"), ("privacy/epsilon", "ε spent")]
    if any("diagnostics/val_similarity" in r for r in done):
        panels.append(("diagnostics/val_similarity", "similarity to validation\n(NON-PRIVATE diagnostic)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, title) in zip(np.atleast_1d(axes), panels, strict=True):
        xs = [r["round"] for r in done if key in r]
        ys = [r[key] for r in done if key in r]
        ax.plot(xs, ys, marker="o")
        if key == "diagnostics/val_similarity":
            se = [r["diagnostics/val_similarity_se"] for r in done if key in r]
            ax.fill_between(xs, np.subtract(ys, se), np.add(ys, se), alpha=0.3)
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with ckpt.atomic_open(path) as fh:  # savefig writes in place: atomic like every other artifact
            fig.savefig(fh, format="png", dpi=100)
    finally:
        plt.close(fig)
