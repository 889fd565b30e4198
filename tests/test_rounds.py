"""The round loop with fake parts (no models): charging order, redone rounds, resume, budget, the lock."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from popri.checkpoint import RunLockedError
from popri.config import GenerationConfig, PrivacyConfig, RunConfig, TrainConfig
from popri.loop import PopriRun, ServerParts
from popri.privacy import compute_epsilon
from popri.release import CentralRelease, NodeReply, SecureRelease, SecureSum

DIM = 8


class FakeTrainer:
    """Counts rounds; its state is that count (enough to see a checkpoint restored)."""

    def __init__(self) -> None:
        self.rounds = 0
        self.seen_pairs: list[int] = []

    def train_round(self, pairs: list[Any], *, rng: np.random.Generator, progress: bool = False) -> dict[str, float]:
        self.rounds += 1
        self.seen_pairs.append(len(pairs))
        return {"loss": 0.69, "rewards_margin": 0.0}

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = int(state["rounds"])


def _embed(texts: list[str]) -> np.ndarray:
    rows = []
    for text in texts:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        v = np.random.default_rng(seed).standard_normal(DIM)
        rows.append(v / np.linalg.norm(v))
    return np.asarray(rows, dtype=np.float32).reshape(len(texts), DIM)


def _generate(prompts: list[str], samples_per_prompt: int, desc: str, generator: torch.Generator) -> list[str]:
    draws = torch.randint(0, 10**9, (len(prompts) * samples_per_prompt,), generator=generator).tolist()
    return [f"sample {d}" for d in draws]


def _parts(trainer: FakeTrainer | None = None) -> ServerParts:
    return ServerParts(
        generate=_generate,
        embed=_embed,
        trainer=trainer or FakeTrainer(),
        initial_set=[f"public line {i}" for i in range(6)],
    )


def _config(out: Path, **privacy: Any) -> RunConfig:
    rounds = privacy.pop("rounds", 3)
    settings = {"epsilon": 7.0, "noise_seed": 5, **privacy}
    return RunConfig(
        generation=GenerationConfig(prompts=3, samples_per_prompt=3, initial_set_size=6),
        privacy=PrivacyConfig(**settings),
        train=TrainConfig(rejected_rank=2),
        rounds=rounds,
        final_samples=0,
        num_nodes=2,
        output=str(out),
    )


def _honest(embeddings: np.ndarray, round_index: int, sample_rate: float) -> list[NodeReply]:
    v = np.linspace(-1.0, 1.0, len(embeddings))
    return [NodeReply(1, v / np.linalg.norm(v), 1), NodeReply(2, -v / np.linalg.norm(v), 1)]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_ledger_is_charged_before_the_noisy_scores_are_used(tmp_path: Path) -> None:
    # Prepare: a trainer that records how many rounds the journal held when it got its pairs
    out = tmp_path / "run"
    journal_rounds: list[int] = []

    class WatchingTrainer(FakeTrainer):
        def train_round(self, pairs: list[Any], **kwargs: Any) -> dict[str, float]:
            history = json.loads((out / "ledger.json").read_text())["history"]
            journal_rounds.append(sum(steps for _, _, steps in history))
            return super().train_round(pairs, **kwargs)

    # Execute
    with PopriRun(_config(out, rounds=2), progress=False, parts=_parts(WatchingTrainer())) as run:
        run.run(_honest)

    # Assert: round t's pairs came after the journal had charged round t
    assert journal_rounds == [1, 2]


def test_central_release_charges_before_the_noise_is_drawn() -> None:
    # Prepare: the noise generator reports when it is first used; the charge records its order
    events: list[str] = []

    class WatchedRng(np.random.Generator):
        def normal(self, *args: Any, **kwargs: Any) -> Any:
            events.append("noise")
            return super().normal(*args, **kwargs)

    def charge() -> float:
        events.append("charge")
        return 0.1

    release = CentralRelease(
        _honest, charge=charge, noise_multiplier=1.0, sample_rate=1.0, min_replies=1, rng=WatchedRng(np.random.PCG64(0))
    )

    # Execute
    result = release.release(np.zeros((6, DIM)), 0)

    # Assert
    assert events == ["charge", "noise"]
    assert result.charged and result.dp_scores is not None and result.replies == 2


def test_central_release_with_too_few_valid_replies_is_discarded_uncharged() -> None:
    # Prepare
    charged: list[int] = []

    def one_broken(embeddings: np.ndarray, t: int, q: float) -> list[NodeReply]:
        return [_honest(embeddings, t, q)[0], NodeReply(2, np.full(len(embeddings), np.nan), 1)]

    release = CentralRelease(
        one_broken,
        charge=lambda: float(charged.append(1) or 0.0),
        noise_multiplier=1.0,
        sample_rate=1.0,
        min_replies=2,
        rng=np.random.default_rng(0),
    )

    # Execute
    result = release.release(np.zeros((6, DIM)), 0)

    # Assert
    assert result.discarded and not result.charged and charged == []
    assert (result.replies, result.rejected) == (1, 1)
    assert "min-replies 2" in (result.discarded_reason or "")


def test_secure_release_refuses_a_sum_released_without_charging() -> None:
    # Prepare: a transport that unmasks without calling charge
    def careless(embeddings: np.ndarray, t: int, q: float, charge: Any) -> SecureSum:
        return SecureSum(np.zeros(len(embeddings)), 2)

    release = SecureRelease(careless, charge=lambda: 0.0, sample_rate=1.0, min_replies=2)

    # Execute / Assert
    with pytest.raises(RuntimeError, match="without charging"):
        release.release(np.zeros((4, DIM)), 0)


def test_a_discarded_round_is_redone_and_the_run_keeps_its_private_rounds(tmp_path: Path) -> None:
    # Prepare: the first two attempts get no valid reply
    attempts = {"n": 0}

    def flaky(embeddings: np.ndarray, t: int, q: float) -> list[NodeReply]:
        attempts["n"] += 1
        return [] if attempts["n"] <= 2 else _honest(embeddings, t, q)

    trainer = FakeTrainer()

    # Execute
    with PopriRun(_config(tmp_path / "run", rounds=3), progress=False, parts=_parts(trainer)) as run:
        summary = run.run(flaky)

    # Assert: 3 private rounds, as requested, after 2 discarded attempts at round 1
    rounds = _read_jsonl(tmp_path / "run" / "rounds.jsonl")
    assert [(r["round"], bool(r.get("discarded"))) for r in rounds] == [
        (1, True),
        (1, True),
        (1, False),
        (2, False),
        (3, False),
    ]
    assert summary["rounds_completed"] == 3 and trainer.rounds == 3 and summary["stop_reason"] is None


def test_too_many_discarded_rounds_in_a_row_stop_the_run_with_its_artifacts(tmp_path: Path) -> None:
    # Prepare: nobody ever answers; one redo is allowed
    out = tmp_path / "run"
    config = dataclasses.replace(_config(out), max_discarded_rounds=1)

    # Execute
    with PopriRun(config, progress=False, parts=_parts()) as run:
        summary = run.run(lambda embeddings, t, q: [])

    # Assert: the first attempt and one redo, then a clean stop; nothing charged
    assert [r["discarded"] for r in _read_jsonl(out / "rounds.jsonl")] == [True, True]
    assert summary["rounds_completed"] == 0 and summary["epsilon"] == 0.0
    assert "discarded 2 times in a row" in summary["stop_reason"]
    assert json.loads((out / "privacy.json").read_text())["stop_reason"] == summary["stop_reason"]
    assert (out / "rounds.png").exists()


def test_a_resumed_run_continues_the_ledger_and_the_trainer(tmp_path: Path) -> None:
    # Prepare: two rounds at a fixed sigma, then the process ends
    out = tmp_path / "run"
    sigma = 2.0
    with PopriRun(_config(out, rounds=2, noise_multiplier=sigma), progress=False, parts=_parts()) as first:
        first.run(_honest)
        salt = first.source_salt
    trainer = FakeTrainer()

    # Execute: resume the same folder asking for four rounds in all
    with PopriRun(
        _config(out, rounds=4, noise_multiplier=sigma), resume=True, progress=False, parts=_parts(trainer)
    ) as run:
        start, charged, resumed_salt = run.start_round, run.ledger.rounds_charged, run.source_salt
        summary = run.run(_honest)

    # Assert: it went on from round 3 with the saved ledger and salt; 4 rounds charged in all, never recounted
    assert (start, charged, resumed_salt) == (2, 2, salt)
    assert summary["rounds_completed"] == 4
    assert summary["epsilon"] == pytest.approx(
        compute_epsilon(noise_multiplier=sigma, delta=3e-6, sample_rate=1.0, rounds=4)
    )
    assert trainer.rounds == 4
    assert [r["round"] for r in _read_jsonl(out / "rounds.jsonl")] == [1, 2, 3, 4]


def test_a_round_that_would_exceed_the_budget_is_never_started(tmp_path: Path) -> None:
    # Prepare: sigma fixed, a target that 2 rounds fit and 3 do not
    sigma = 2.0
    budget = compute_epsilon(noise_multiplier=sigma, delta=3e-6, sample_rate=1.0, rounds=2) + 1e-6
    config = _config(tmp_path / "run", rounds=3, epsilon=budget, noise_multiplier=sigma)
    calls: list[int] = []

    def counting(embeddings: np.ndarray, t: int, q: float) -> list[NodeReply]:
        calls.append(t)
        return _honest(embeddings, t, q)

    # Execute
    with PopriRun(config, progress=False, parts=_parts()) as run:
        summary = run.run(counting)

    # Assert: round 3 was refused before any node was asked
    assert calls == [0, 1]
    assert summary["rounds_completed"] == 2 and summary["epsilon"] <= budget
    assert summary["stop_reason"] == "privacy budget exhausted"


def test_a_second_run_on_a_locked_folder_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    # Prepare: one run holds the folder
    out = tmp_path / "run"
    with PopriRun(_config(out, rounds=1), progress=False, parts=_parts()) as first:
        first.run(_honest)
        ledger_before = (out / "ledger.json").read_text()

        # Execute / Assert: a resume of the same folder while the first still holds it
        with pytest.raises(RunLockedError, match="in use by another popri process"):
            PopriRun(_config(out, rounds=1), resume=True, progress=False, parts=_parts())
        assert (out / "ledger.json").read_text() == ledger_before

    # ...and once the first is done, the folder can be resumed
    with PopriRun(_config(out, rounds=1), resume=True, progress=False, parts=_parts()) as again:
        assert again.ledger.rounds_charged == 1


def test_config_json_is_written_through_the_atomic_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    import popri.checkpoint

    written: list[str] = []
    real = popri.checkpoint.atomic_write_json

    def spy(path: Path, obj: Any) -> None:
        written.append(Path(path).name)
        real(path, obj)

    monkeypatch.setattr(popri.checkpoint, "atomic_write_json", spy)
    out = tmp_path / "run"

    # Execute
    with PopriRun(_config(out, rounds=1), progress=False, parts=_parts()):
        pass

    # Assert
    assert "config.json" in written
    assert json.loads((out / "config.json").read_text())["prompts"] == 3


def test_the_tracker_gets_every_completed_round_and_is_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a tracker that remembers what it was given; round 1's first attempt is discarded
    logged: list[dict[str, Any]] = []
    closed: list[bool] = []

    class Tracker:
        def log(self, record: dict[str, Any]) -> None:
            logged.append(record)

        def close(self) -> None:
            closed.append(True)

    monkeypatch.setattr("popri.loop.make_tracker", lambda report_to, run_dir, *, config: Tracker())
    attempts = {"n": 0}

    def flaky(embeddings: np.ndarray, t: int, q: float) -> list[NodeReply]:
        attempts["n"] += 1
        return [] if attempts["n"] == 1 else _honest(embeddings, t, q)

    config = dataclasses.replace(_config(tmp_path / "run", rounds=2), report_to="tensorboard")

    # Execute
    with PopriRun(config, progress=False, parts=_parts()) as run:
        run.run(flaky)

    # Assert: one record per private round, the discarded attempt left out, then closed once
    assert [r["round"] for r in logged] == [1, 2] and not any(r.get("discarded") for r in logged)
    assert closed == [True]


def test_the_final_corpus_draws_its_samples_per_prompt_from_shared_prompts(tmp_path: Path) -> None:
    # Prepare: a run whose final corpus takes 5 samples at 2 per prompt; the generator records each call
    out = tmp_path / "run"
    calls: list[tuple[int, int, str]] = []

    def recording(prompts: list[str], samples_per_prompt: int, desc: str, generator: torch.Generator) -> list[str]:
        calls.append((len(prompts), samples_per_prompt, desc))
        return _generate(prompts, samples_per_prompt, desc, generator)

    config = dataclasses.replace(_config(out, rounds=1), final_samples=5, final_samples_per_prompt=2)
    parts = dataclasses.replace(_parts(), generate=recording)

    # Execute
    with PopriRun(config, progress=False, parts=parts) as run:
        run.run(_honest)

    # Assert: 3 prompts of 2 samples each, the surplus sample dropped; the round itself kept its K and J
    assert calls == [(3, 3, "round 1 generate"), (3, 2, "final corpus")]
    assert len(_read_jsonl(out / "synthetic.jsonl")) == 5


def test_final_samples_per_prompt_below_one_is_refused_by_key(tmp_path: Path) -> None:
    # Prepare / Execute / Assert: the key is named in the error
    with pytest.raises(ValueError, match="final-samples-per-prompt"):
        dataclasses.replace(_config(tmp_path / "run"), final_samples_per_prompt=0)
