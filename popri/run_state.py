"""What a run carries from round to round, and how it survives a crash: the privacy ledger, the RNG states, the
per-round records and the source salt; their checkpoint and restore; and the rules for resuming a run folder.

The ledger is charged through :meth:`RunState.charge`, which writes the journal (``ledger.json``) before the noisy
result exists: a crash from there on can only over-count, never under-count, the privacy spent. A resumed run takes
the larger of the checkpoint's ledger and the journal, so it never recounts from fewer rounds.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from popri import checkpoint as ckpt
from popri.config import ConfigError, RunConfig, config_to_flat, resume_locked_keys
from popri.privacy import PrivacyLedger, make_noise_rng

logger = logging.getLogger(__name__)

JOURNAL = "ledger.json"
SALT_FILE = "source-salt.json"


def check_resume_config(saved: dict[str, Any], now: RunConfig) -> None:
    """Refuse a resume whose locked keys differ from the saved run's; the error names the first key and its value."""
    flat = config_to_flat(now)
    changed = [k for k in resume_locked_keys() if saved.get(k) != flat.get(k)]
    if changed:
        key = changed[0]
        raise ConfigError(
            f"invalid config key '{key}': a resumed run must keep {key}={saved.get(key)!r} (the privacy ledger depends"
            " on it)"
        )


class RunFolder:
    """The run's output folder: held under an exclusive lock for the whole run, checked before anything is written."""

    def __init__(self, output: Path) -> None:
        self.out = Path(output)
        self.ckpt_dir = self.out / "checkpoints"
        self.journal = self.out / JOURNAL
        self.lock = ckpt.RunLock(self.out)

    def open(self, config: RunConfig, *, resume: bool) -> None:
        """Take the lock, check that a new run does not overwrite one (or a resume continues a compatible one),
        and write ``config.json`` atomically. On any error the lock is released and nothing was written."""
        saved = self.out / "config.json"
        if resume and not saved.exists():
            raise FileNotFoundError(f"--resume: {saved} does not exist; start a new run without --resume")
        self.lock.acquire()
        try:
            if resume:
                check_resume_config(json.loads(saved.read_text()), config)
            elif ckpt.latest_checkpoint(self.ckpt_dir) is not None or self.journal.exists():
                raise FileExistsError(
                    f"{self.out} already holds a run; pass --resume to continue it or pick a new --output"
                )
            ckpt.atomic_write_json(saved, config_to_flat(config))
        except BaseException:
            self.lock.release()
            raise

    def close(self) -> None:
        self.lock.release()


@dataclass
class RunState:
    """Everything a resumed run needs besides the model weights; mutable, saved with every checkpoint."""

    ledger: PrivacyLedger
    noise_rng: np.random.Generator
    noise_reproducible: bool
    prompt_rng: np.random.Generator
    train_rng: np.random.Generator
    control_rng: np.random.Generator
    sample_gen: torch.Generator
    source_salt: str
    records: list[dict[str, Any]] = field(default_factory=list)
    rounds_done: int = 0

    @classmethod
    def fresh(cls, config: RunConfig) -> RunState:
        p = config.privacy
        noise_rng, reproducible = make_noise_rng(p.noise_seed)
        return cls(
            ledger=PrivacyLedger(delta=p.delta, accountant=p.accountant, target_epsilon=p.epsilon),
            noise_rng=noise_rng,
            noise_reproducible=reproducible,
            prompt_rng=np.random.default_rng([config.seed, 1]),
            train_rng=np.random.default_rng([config.seed, 2]),
            control_rng=np.random.default_rng([config.seed, 3]),
            sample_gen=torch.Generator().manual_seed(config.seed),
            source_salt=secrets.token_hex(16),
        )

    # -- the ledger --------------------------------------------------------------------------------------------

    def charge(self, folder: RunFolder, *, noise_multiplier: float, sample_rate: float) -> float:
        """Charge one release and write the journal durably, before the noisy result exists."""
        epsilon = self.ledger.charge(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
        ckpt.atomic_write_json(folder.journal, self.ledger.state_dict())
        return epsilon

    def _adopt_journal(self, folder: RunFolder) -> None:
        """Take the journal if it holds more charged rounds than the checkpoint: a round released (charged) after
        the last checkpoint stays charged, even though the round itself is redone. The ledger never shrinks."""
        if not folder.journal.exists():
            return
        journal = PrivacyLedger.from_state_dict(json.loads(folder.journal.read_text()))
        if journal.rounds_charged > self.ledger.rounds_charged:
            logger.warning(
                "%d round(s) were released after the last checkpoint; they stay charged (epsilon %.4f -> %.4f)",
                journal.rounds_charged - self.ledger.rounds_charged,
                self.ledger.epsilon(),
                journal.epsilon(),
            )
            self.ledger = journal

    # -- save / restore ----------------------------------------------------------------------------------------

    def save_salt(self, folder: RunFolder) -> None:
        """The salt outlives a crash before the first checkpoint, so a resume proves the same sources."""
        ckpt.atomic_write_json(folder.out / SALT_FILE, {"source-salt": self.source_salt})

    def meta(self, round_index: int) -> dict[str, Any]:
        rng_state = {
            "prompt": self.prompt_rng.bit_generator.state,
            "train": self.train_rng.bit_generator.state,
            "control": self.control_rng.bit_generator.state,
        }
        if self.noise_reproducible:
            rng_state["noise"] = self.noise_rng.bit_generator.state
        return {
            "round": round_index,
            "ledger": self.ledger.state_dict(),
            "rng": rng_state,
            "records": self.records,
            "source-salt": self.source_salt,
        }

    def restore(self, folder: RunFolder) -> dict[str, Any] | None:
        """Continue from the latest checkpoint (and the journal); returns the checkpoint's tensors, or None when the
        run had no checkpoint yet (it then starts from round 1 with the journal's ledger)."""
        salt_file = folder.out / SALT_FILE
        if salt_file.exists():
            self.source_salt = str(json.loads(salt_file.read_text())["source-salt"])
        latest = ckpt.latest_checkpoint(folder.ckpt_dir)
        if latest is None:
            logger.info("no checkpoint in %s: starting from round 1", folder.ckpt_dir)
            self._adopt_journal(folder)
            return None
        tensors, meta = ckpt.load_checkpoint(latest)
        self.sample_gen.set_state(tensors["sample_generator"])
        self.ledger = PrivacyLedger.from_state_dict(meta["ledger"])
        self._adopt_journal(folder)
        self.prompt_rng.bit_generator.state = meta["rng"]["prompt"]
        self.train_rng.bit_generator.state = meta["rng"]["train"]
        self.control_rng.bit_generator.state = meta["rng"]["control"]
        if self.noise_reproducible and "noise" in meta["rng"]:
            self.noise_rng.bit_generator.state = meta["rng"]["noise"]
        self.records = meta["records"]
        self.source_salt = str(meta.get("source-salt", self.source_salt))
        self.rounds_done = int(meta["round"]) + 1
        logger.info(
            "resumed from %s: %d round(s) done, ledger epsilon=%.4f over %d charged round(s)",
            latest.name,
            self.rounds_done,
            self.ledger.epsilon(),
            self.ledger.rounds_charged,
        )
        return tensors
