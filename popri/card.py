"""The privacy card of a run and the synthetic corpus as a Hugging Face dataset users can load.

The card states the guarantee and every parameter it depends on: ε, δ, the accountant, the unit of privacy
(user-level: add or remove one user, a user being a (device, user id) pair), the mechanism (Gaussian on the sum of
per-user score vectors clipped to L2 norm 1, so sensitivity 1), σ, rounds, sampling rate, privacy mode, generator,
date, popri version and whether the noise was seeded. It never states a count of users: under user-level DP the
number of users is exactly what differs between neighbouring data sets.

``DIR/synthetic/`` is a parquet dataset (``datasets.load_dataset("parquet", data_dir=DIR/synthetic/data)`` or
``datasets.load_dataset(str(DIR/synthetic))``) with the card as its ``README.md``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

UNIT_OF_PRIVACY = "user-level: add or remove one user; a user is one (device, user id) pair"
MECHANISM = (
    "Gaussian mechanism on the sum of per-user score vectors, each clipped to L2 norm <= 1 (sensitivity 1), "
    "once per round"
)
DATA_FILE = "data/train-00000-of-00001.parquet"


class CardError(ValueError):
    """A privacy card that cannot be built: the message names the field or file and the fix."""


def popri_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("popri")
    except PackageNotFoundError:
        return "unknown (not installed)"


def popri_commit() -> str | None:
    """The git commit of the popri source in use, when it runs from a checkout (results are dated by commit)."""
    import subprocess

    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


@dataclass(frozen=True)
class PrivacyCard:
    """What a reader of a synthetic corpus needs to know about its differential-privacy guarantee.

    ``epsilon`` is what the ledger spent (None for a control run, which touched no private data).
    ``non_private`` holds the NON-PRIVATE diagnostics, if any were on; they are outside the guarantee.
    """

    epsilon: float | None
    delta: float
    accountant: str
    noise_multiplier: float
    rounds: int
    rounds_planned: int
    sample_rate: float
    privacy_mode: str
    generator: str
    noise_seeded: bool
    target_epsilon: float | None = None
    control: bool = False
    date: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"))
    popri_version: str = field(default_factory=popri_version)
    popri_commit: str | None = field(default_factory=popri_commit)
    non_private: dict[str, Any] | None = None
    mechanism: str = MECHANISM  # what released private data (POPri's by default; the benchmark's PE has its own)

    def __post_init__(self) -> None:
        if self.epsilon is not None and not (math.isfinite(self.epsilon) and self.epsilon >= 0):
            raise CardError(f"privacy card field 'epsilon' must be a finite number >= 0, got {self.epsilon!r}")
        if not 0 < self.delta < 1:
            raise CardError(f"privacy card field 'delta' must be in (0, 1), got {self.delta!r}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise CardError(f"privacy card field 'noise_multiplier' must be > 0, got {self.noise_multiplier!r}")
        if not 0 < self.sample_rate <= 1:
            raise CardError(f"privacy card field 'sample_rate' must be in (0, 1], got {self.sample_rate!r}")
        if self.rounds < 0 or self.rounds_planned < 0:
            raise CardError(f"privacy card fields 'rounds'/'rounds_planned' must be >= 0, got {self.rounds}")
        if self.privacy_mode not in ("central", "secagg"):
            raise CardError(
                f"privacy card field 'privacy_mode' must be 'central' or 'secagg', got {self.privacy_mode!r}"
            )

    @classmethod
    def from_run_dir(cls, run_dir: Path) -> PrivacyCard:
        """The card of the run in ``run_dir``, from its privacy.json, config.json and diagnostics.json."""
        summary = _read_json(run_dir / "privacy.json")
        config = _read_json(run_dir / "config.json")
        diagnostics = run_dir / "diagnostics.json"
        return cls.from_summary(
            summary,
            generator=str(config.get("model", "unknown")),
            non_private=_read_json(diagnostics) if diagnostics.exists() else None,
            diagnostics_on=bool(config.get("diagnostics")),
        )

    @classmethod
    def from_summary(
        cls,
        summary: dict[str, Any],
        *,
        generator: str,
        non_private: dict[str, Any] | None = None,
        diagnostics_on: bool = False,
    ) -> PrivacyCard:
        """The card from a run's privacy summary (privacy.json's content)."""
        try:
            control = bool(summary.get("control", False))
            if diagnostics_on and non_private is None:
                non_private = {"note": "NON-PRIVATE diagnostics were on (similarity to held-out private text)"}
            return cls(
                epsilon=None if control else float(summary["epsilon"]),
                delta=float(summary["delta"]),
                accountant=str(summary["accountant"]),
                noise_multiplier=float(summary["noise_multiplier"]),
                rounds=int(summary["rounds_completed"]),
                rounds_planned=int(summary.get("rounds_planned", summary["rounds_completed"])),
                sample_rate=float(summary["sample_rate"]),
                privacy_mode=str(summary.get("privacy_mode", "central")),
                generator=generator,
                noise_seeded=bool(summary["noise_seeded"]),
                target_epsilon=summary.get("target_epsilon"),
                control=control,
                non_private=non_private,
            )
        except KeyError as err:
            raise CardError(f"privacy summary lacks the key {err}; is privacy.json from a complete run?") from None

    def to_dict(self) -> dict[str, Any]:
        """The card's fields, plus the fixed statements (unit of privacy, mechanism), for YAML or JSON."""
        out = {"unit_of_privacy": UNIT_OF_PRIVACY, **dataclasses.asdict(self)}
        if out["non_private"] is None:
            del out["non_private"]
        return out

    def guarantee(self, subject: str = "This corpus") -> str:
        """One paragraph in words: what is protected, how, and its limits (``subject``: what the card is about)."""
        if self.control:
            return (
                "CONTROL run: the preference pairs were random and no private data was read, so there is no "
                "privacy cost and no guarantee to state."
            )
        noise_by = (
            "each node added its share of the noise and the server saw only the secure sum (SecAgg+)"
            if self.privacy_mode == "secagg"
            else "the server added the noise to the sum of the nodes' clipped replies"
        )
        text = (
            f"{subject} is ({self.epsilon:.4g}, {self.delta:.3g})-differentially private at the user level: "
            f"adding or removing all the data of one user (one (device, user id) pair) changes the probability of "
            f"any output by at most a factor e^{self.epsilon:.4g}, up to δ={self.delta:.3g}. Private data reached "
            f"the generator only through {self.rounds} round(s) of the {self.mechanism}, "
            f"noise multiplier σ={self.noise_multiplier:.4g}, "
            f"users sampled with rate q={self.sample_rate:g} ({'all users' if self.sample_rate == 1 else 'Poisson'}"
            f"); {noise_by}. ε is from Opacus' {self.accountant.upper()} accountant. Everything after the mechanism "
            "(preference pairs, DPO, sampling from the generator) is post-processing and costs no privacy."
        )
        if self.noise_seeded:
            text += (
                " WARNING: the noise came from a seeded (reproducible) generator: anyone who knows the seed can "
                "remove it, so this run is NOT private against them."
            )
        return text


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CardError(f"{path} does not exist; the run folder is incomplete (has the run finished?)")
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CardError(f"{path}: not valid JSON (line {err.lineno}): {err.msg}") from None
    if not isinstance(value, dict):
        raise CardError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def card_table(card: PrivacyCard) -> list[str]:
    """The card's parameters as a two-column markdown table."""
    epsilon = "none (control run)" if card.epsilon is None else f"{card.epsilon:.6g}"
    rows = [
        ("ε (spent)", epsilon),
        ("target ε", "none (σ given)" if card.target_epsilon is None else f"{card.target_epsilon:g}"),
        ("δ", f"{card.delta:g}"),
        ("accountant", f"Opacus {card.accountant.upper()}"),
        ("unit of privacy", UNIT_OF_PRIVACY),
        ("mechanism", card.mechanism),
        ("noise multiplier σ", f"{card.noise_multiplier:.6g}"),
        ("rounds (charged / planned)", f"{card.rounds} / {card.rounds_planned}"),
        ("sampling rate q", f"{card.sample_rate:g}"),
        ("privacy mode", card.privacy_mode),
        ("noise seeded", "yes: reproducible, NOT private against anyone with the seed" if card.noise_seeded else "no"),
        ("generator", card.generator),
        ("date", card.date),
        ("popri version", card.popri_version),
        ("popri commit", card.popri_commit or "unknown (not a git checkout)"),
    ]
    return ["| parameter | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]


def card_markdown(card: PrivacyCard, *, title: str, description: str = "", subject: str = "This corpus") -> str:
    """A dataset card (README.md): a YAML header Hugging Face reads, then the guarantee in words and a table."""
    import yaml

    # No `configs:` block: datasets 5.2 hashes its relative data_files, so two runs' folders of the same name would
    # share one cache entry and load stale text; the standard data/train-* layout is detected without it.
    header: dict[str, Any] = {"pretty_name": title, "tags": ["synthetic", "differential-privacy", "popri"]}
    header["privacy"] = card.to_dict()
    lines = ["---", yaml.safe_dump(header, sort_keys=False, allow_unicode=True).rstrip(), "---", "", f"# {title}", ""]
    if description:
        lines += [description, ""]
    lines += ["## Privacy guarantee", "", card.guarantee(subject), "", *card_table(card)]
    if card.non_private:
        lines += [
            "",
            "## NON-PRIVATE diagnostics",
            "",
            "These numbers were computed on held-out private text WITHOUT differential privacy. They are a "
            "benchmark diagnostic, outside the guarantee above; do not publish them with the corpus.",
            "",
            "```json",
            json.dumps(card.non_private, indent=2),
            "```",
        ]
    return "\n".join(lines) + "\n"


def write_card(
    path: Path, card: PrivacyCard, *, title: str, description: str = "", subject: str = "This corpus"
) -> Path:
    """Write the card as markdown to ``path`` (e.g. next to a corpus the benchmark or ``popri generate`` wrote)."""
    from popri.checkpoint import atomic_write_text

    atomic_write_text(path, card_markdown(card, title=title, description=description, subject=subject))
    return path


def write_synthetic_dataset(texts: list[str], out_dir: Path, *, card: PrivacyCard, title: str = "") -> Path:
    """``out_dir`` as a Hugging Face dataset: ``data/train-00000-of-00001.parquet`` (column ``text``) + README.md.

    Built in a temporary folder and renamed into place, so a reader never sees half a dataset.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not all(isinstance(t, str) for t in texts):
        raise TypeError("write_synthetic_dataset: every text must be a str")
    from popri.checkpoint import atomic_dir, atomic_write_text

    with atomic_dir(out_dir) as tmp:
        (tmp / DATA_FILE).parent.mkdir(parents=True)
        pq.write_table(pa.table({"text": pa.array(texts, type=pa.string())}), tmp / DATA_FILE)
        description = (
            f"Synthetic text written by a generator fine-tuned with POPri ({len(texts)} samples; column `text`). "
            'Load it with `datasets.load_dataset("parquet", data_dir="<this folder>/data")`.'
        )
        atomic_write_text(
            tmp / "README.md", card_markdown(card, title=title or "POPri synthetic corpus", description=description)
        )
    return out_dir
