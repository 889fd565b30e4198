"""The server's side of a POPri run, free of any transport: generate → embed → release → pairs → DPO → checkpoint,
then the final synthetic corpus.

The release (:mod:`popri.release`) is the only door to private data. The parts that do the work — the sampler, the
embedder, the trainer — are injected (:class:`ServerParts`), so the loop can run with fakes in tests;
:func:`load_parts` builds the real ones. The run state (:mod:`popri.run_state`) holds the ledger and RNGs, the
artifacts (:mod:`popri.artifacts`) are what the run publishes.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from popri import artifacts
from popri import checkpoint as ckpt
from popri.assets import generator_dir, load_generator
from popri.card import PrivacyCard, write_synthetic_dataset
from popri.config import ConfigError, RunConfig, config_to_flat
from popri.data import load_user_data, split_users
from popri.export import write_generator
from popri.generation import build_prompts, make_initial_set, prompts_for, sample_completions
from popri.logs import make_tracker
from popri.preferences import PreferencePair, build_pairs, random_pairs
from popri.privacy import BudgetExceededError
from popri.release import CentralRelease, Collect, Release, ReleaseStrategy, SecureCollect, SecureRelease
from popri.report import save_round_samples, write_report
from popri.run_state import RunFolder, RunState
from popri.vllm_backend import VllmSampler, vllm_unavailable_reason

logger = logging.getLogger(__name__)


class Trainer(Protocol):
    """What the loop needs from the preference trainer (:class:`popri.dpo.LoraDPO` is the real one)."""

    def train_round(
        self, pairs: list[PreferencePair], *, rng: np.random.Generator, progress: bool = ...
    ) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# (prompts, samples per prompt, progress label, generator) -> len(prompts) * samples per prompt texts
Generate = Callable[[list[str], int, str, torch.Generator], list[str]]
# texts -> (len(texts), d) unit-norm embeddings
Embed = Callable[[list[str]], np.ndarray]


@dataclass
class ServerParts:
    """The server's workers, injected into :class:`PopriRun`. ``dpo`` and ``embedder`` are the real objects when
    :func:`load_parts` built them (benchmark code reaches them), else None."""

    generate: Generate
    embed: Embed
    trainer: Trainer
    initial_set: list[str]
    dpo: Any = None
    embedder: Any = None


def load_parts(config: RunConfig, *, out: Path, progress: bool) -> ServerParts:
    """The real generator (torch or vLLM), LoRA DPO trainer and sentence embedder, and the public initial set."""
    from popri.dpo import LoraDPO
    from popri.embedding import embed_texts, embedder_precision, load_embedder

    g, cache = config.generation, config.resolved_cache_dir()
    # Policy and reference share the frozen base, so both run at this one precision (no bf16/fp32 mismatch).
    dtype = torch.bfloat16 if config.train.precision == "bf16" else torch.float32
    model, tokenizer = load_generator(g.model, cache_dir=cache, dtype=dtype)
    dpo = LoraDPO(model, tokenizer, config=config.train)
    vllm = _start_vllm(config) if g.generation_backend == "vllm" else None
    embedder = load_embedder(precision=config.embedding_precision)
    logger.info("sentence embedder in %s", embedder_precision(embedder))
    initial_set = make_initial_set(
        model,
        tokenizer,
        instruction=g.initial_instruction,
        size=g.initial_set_size,
        max_new_tokens=g.max_new_tokens,
        token_budget=g.token_budget,
        seed=config.seed,
        cache_dir=cache,
        model_id=g.model,
        progress=progress,
    )

    def generate(prompts: list[str], samples_per_prompt: int, desc: str, generator: torch.Generator) -> list[str]:
        # The same sampling settings for either backend.
        sampling: dict[str, Any] = {
            "samples_per_prompt": samples_per_prompt,
            "max_new_tokens": g.max_new_tokens,
            "token_budget": g.token_budget,
            "temperature": g.temperature,
            "top_p": g.top_p,
            "generator": generator,
            "progress": progress,
        }
        if vllm is not None:
            adapter = dpo.save_adapter(out / "serving-adapter")  # the policy as it is now
            return vllm.sample(prompts, tokenizer, adapter_dir=adapter, **sampling)
        sampler = dpo.generation_model(torch.bfloat16)  # merged adapter; bf16 measured 2-3x faster here
        samples = sample_completions(
            sampler, tokenizer, prompts, batch_size=g.generation_batch_size, desc=desc, **sampling
        )
        del sampler
        gc.collect()  # the merged copy holds a full set of weights: free it before DPO allocates
        return samples

    return ServerParts(
        generate=generate,
        embed=lambda texts: embed_texts(embedder, texts),
        trainer=dpo,
        initial_set=initial_set,
        dpo=dpo,
        embedder=embedder,
    )


def _start_vllm(config: RunConfig) -> VllmSampler:
    reason = vllm_unavailable_reason()
    if reason:
        raise ConfigError(f"invalid config key 'generation-backend': 'vllm' cannot run here: {reason}")
    model_dir = generator_dir(config.generation.model, cache_dir=config.resolved_cache_dir())
    return VllmSampler(
        model_dir, lora_rank=config.train.lora_r, gpu_memory=config.generation.vllm_gpu_memory, seed=config.seed
    )


class PopriRun:
    """One POPri run with its artifacts in ``config.output``; ``resume=True`` continues from the last checkpoint.

    The run folder stays locked from construction to :meth:`close` (or the end of a ``with`` block), so a second
    process cannot write the same ledger. ``parts`` replaces the real models (tests pass fakes).
    """

    def __init__(
        self, config: RunConfig, *, resume: bool = False, progress: bool = True, parts: ServerParts | None = None
    ) -> None:
        self.config = config
        self.progress = progress
        self.folder = RunFolder(Path(config.output))
        self.out = self.folder.out
        self.ckpt_dir = self.folder.ckpt_dir
        self.folder.open(config, resume=resume)
        try:
            self.sigma = config.resolved_noise_multiplier()
            self.state = RunState.fresh(config)
            self.parts = parts if parts is not None else load_parts(config, out=self.out, progress=progress)
            if resume:
                tensors = self.state.restore(self.folder)
                if tensors is not None:
                    self.parts.trainer.load_state_dict(tensors["dpo"])
            self.state.save_salt(self.folder)
            self.val_centroid = self._validation_centroid() if config.diagnostics else None
        except BaseException:
            self.folder.close()
            raise
        self.stop_reason: str | None = None
        self._rounds_bar: Any = None  # the rounds progress bar while run() is going

    def close(self) -> None:
        """Release the run folder's lock."""
        self.folder.close()

    def __enter__(self) -> PopriRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what others read --------------------------------------------------------------------------------------

    @property
    def ledger(self) -> Any:
        return self.state.ledger

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.state.records

    @property
    def start_round(self) -> int:
        return self.state.rounds_done

    @property
    def source_salt(self) -> str:
        """The per-run salt the nodes hash their data source with (kept across a resume)."""
        return self.state.source_salt

    @property
    def dpo(self) -> Any:
        return self.parts.dpo

    @property
    def embedder(self) -> Any:
        return self.parts.embedder

    def privacy_summary(self) -> dict[str, Any]:
        summary = artifacts.privacy_summary(
            self.config, self.state.ledger, noise_multiplier=self.sigma, noise_seeded=self.state.noise_reproducible
        )
        summary["stop_reason"] = self.stop_reason
        return summary

    # -- release strategies ------------------------------------------------------------------------------------

    def _charge(self) -> float:
        return self.state.charge(self.folder, noise_multiplier=self.sigma, sample_rate=self.config.privacy.sample_rate)

    def release_strategy(self, collect: Collect | SecureCollect) -> ReleaseStrategy:
        """The strategy of this run's privacy mode around a transport's ``collect``, charging this run's ledger."""
        p = self.config.privacy
        if p.privacy_mode == "secagg":
            return SecureRelease(
                collect,  # type: ignore[arg-type]
                charge=self._charge,
                sample_rate=p.sample_rate,
                min_replies=p.min_replies,
            )
        return CentralRelease(
            collect,  # type: ignore[arg-type]
            charge=self._charge,
            noise_multiplier=self.sigma,
            sample_rate=p.sample_rate,
            min_replies=p.min_replies,
            rng=self.state.noise_rng,
        )

    def _strategy(self, release: ReleaseStrategy | Collect | SecureCollect) -> ReleaseStrategy:
        return release if hasattr(release, "release") else self.release_strategy(release)  # type: ignore[arg-type]

    # -- diagnostics (NON-PRIVATE, benchmark only) -------------------------------------------------------------

    def _validation_centroid(self) -> np.ndarray:
        """NON-PRIVATE diagnostic: the mean embedding of held-out private validation texts (benchmark use only)."""
        logger.warning("--diagnostics reads held-out private validation text without DP: a non-private diagnostic")
        c = self.config
        data = load_user_data(
            c.data.data, min_text_chars=c.data.min_text_chars, max_users=c.data.max_users, seed=c.seed
        )
        _, val = split_users(data, validation_fraction=c.data.validation_fraction, seed=c.seed)
        texts = val.texts[:2000]
        if not texts:
            raise ConfigError("invalid config key 'validation-fraction': --diagnostics needs validation users")
        return self.parts.embed(texts).mean(axis=0).astype(np.float64)

    def _similarity(self, embeddings: np.ndarray) -> tuple[float, float]:
        """Mean cosine of samples to validation texts, and its standard error over samples."""
        assert self.val_centroid is not None
        sims = embeddings.astype(np.float64) @ self.val_centroid
        return float(sims.mean()), float(sims.std(ddof=1) / np.sqrt(len(sims))) if len(sims) > 1 else 0.0

    # -- the rounds --------------------------------------------------------------------------------------------

    def _generate(self, num_prompts: int, samples_per_prompt: int, desc: str) -> tuple[list[str], list[str]]:
        prompts = build_prompts(self.parts.initial_set, num_prompts=num_prompts, rng=self.state.prompt_rng)
        return prompts, self.parts.generate(prompts, samples_per_prompt, desc, self.state.sample_gen)

    def run_round(self, t: int, release: ReleaseStrategy | Collect | SecureCollect) -> dict[str, Any]:
        """One attempt at round ``t`` (0-based). Raises BudgetExceededError before anything is generated when the
        round would take ε past the target. A discarded attempt returns a record with ``discarded: True``."""
        c, g, state = self.config, self.config.generation, self.state
        timings: dict[str, float] = {}
        record: dict[str, Any] = {"round": t + 1}
        if not c.control:
            would_be = state.ledger.epsilon_after(noise_multiplier=self.sigma, sample_rate=c.privacy.sample_rate)
            if c.privacy.epsilon is not None and would_be > c.privacy.epsilon:
                raise BudgetExceededError(
                    f"round {t + 1} would spend epsilon={would_be:.4f} > target {c.privacy.epsilon}"
                )

        self._stage("generate")
        start = time.perf_counter()
        prompts, samples = self._generate(g.prompts, g.samples_per_prompt, f"round {t + 1} generate")
        timings["generate"] = time.perf_counter() - start

        self._stage("embed")
        start = time.perf_counter()
        embeddings = self.parts.embed(samples)
        timings["embed"] = time.perf_counter() - start

        dp_scores: np.ndarray | None = None
        pairs: list[PreferencePair]
        if c.control:
            pairs = random_pairs(
                prompts=prompts, samples=samples, samples_per_prompt=g.samples_per_prompt, rng=state.control_rng
            )
            record.update({"replies": 0, "rejected_replies": 0, "control": True})
        else:
            self._stage("collect: nodes scoring")
            result: Release = self._strategy(release).release(embeddings, t)
            timings.update(result.seconds)
            record.update({"replies": result.replies, "rejected_replies": result.rejected})
            if result.dp_scores is None:
                logger.warning("round %d discarded: %s", t + 1, result.discarded_reason or "nothing released")
                record.update({"discarded": True, "seconds": {k: round(v, 3) for k, v in timings.items()}})
                return record
            dp_scores = result.dp_scores
            pairs = build_pairs(
                prompts=prompts,
                samples=samples,
                dp_scores=dp_scores,
                samples_per_prompt=g.samples_per_prompt,
                rejected_rank=c.train.rejected_rank,
            )
            record["privacy/epsilon"] = state.ledger.epsilon()

        self._stage("dpo")
        start = time.perf_counter()
        metrics = self.parts.trainer.train_round(pairs, rng=state.train_rng, progress=self.progress)
        timings["dpo"] = time.perf_counter() - start
        record.update({"pairs": len(pairs), **{f"dpo/{k}": v for k, v in metrics.items()}})
        if self.val_centroid is not None:
            mean, se = self._similarity(embeddings)
            record.update({"diagnostics/val_similarity": mean, "diagnostics/val_similarity_se": se})

        start = time.perf_counter()
        self._checkpoint(t, record, timings, prompts, samples, dp_scores, pairs)
        timings["checkpoint"] = time.perf_counter() - start
        record["seconds"] = {k: round(v, 3) for k, v in timings.items()}
        return record

    def _stage(self, name: str) -> None:
        """Show the round's current stage beside the rounds bar (the stage's own bar, if any, shows its progress)."""
        if self._rounds_bar is not None:
            self._rounds_bar.set_postfix_str(name)

    def _checkpoint(
        self,
        t: int,
        record: dict[str, Any],
        timings: dict[str, float],
        prompts: list[str],
        samples: list[str],
        dp_scores: np.ndarray | None,
        pairs: list[PreferencePair],
    ) -> None:
        record["seconds"] = {k: round(v, 3) for k, v in timings.items()}
        self.state.records.append(record)
        k = self.config.generation.samples_per_prompt
        sample_rows = [
            {"prompt": i // k, "text": s, **({"dp_score": float(dp_scores[i])} if dp_scores is not None else {})}
            for i, s in enumerate(samples)
        ]
        save_round_samples(self.out, t, sample_rows)  # the report's first-round samples outlive checkpoint pruning
        files = {
            "prompts.json": json.dumps(prompts, ensure_ascii=False),
            "samples.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sample_rows),
            "pairs.jsonl": "".join(json.dumps(p.to_dict(), ensure_ascii=False) + "\n" for p in pairs),
        }
        tensors = {"dpo": self.parts.trainer.state_dict(), "sample_generator": self.state.sample_gen.get_state()}
        ckpt.save_checkpoint(self.ckpt_dir, t, tensors=tensors, meta=self.state.meta(t), files=files)
        ckpt.prune_checkpoints(self.ckpt_dir)
        self.state.rounds_done = t + 1
        self._write_progress_artifacts()

    def _write_progress_artifacts(self) -> None:
        artifacts.write_progress(self.out, self.state.records, self.privacy_summary())

    def run(self, release: ReleaseStrategy | Collect | SecureCollect) -> dict[str, Any]:
        """All remaining rounds, then the final corpus. Returns privacy.json's content.

        ``release`` is a :class:`ReleaseStrategy`, or a transport's collect function (a :data:`Collect` in central
        mode, a :data:`SecureCollect` in secure-aggregation mode) that :meth:`release_strategy` wraps. A discarded
        round is redone, up to ``max-discarded-rounds`` times in a row; then the run stops, its artifacts written.
        """
        c = self.config
        strategy = self._strategy(release)
        logger.info(
            "POPri: %d rounds, K=%d prompts x J=%d samples, sigma=%.4f, target epsilon=%s, delta=%g, q=%g%s",
            c.rounds,
            c.generation.prompts,
            c.generation.samples_per_prompt,
            self.sigma,
            c.privacy.epsilon,
            c.privacy.delta,
            c.privacy.sample_rate,
            " (CONTROL: random pairs, no private data)" if c.control else "",
        )
        tracker = make_tracker(c.report_to, self.out, config=config_to_flat(c))
        bar = tqdm(total=c.rounds, initial=self.start_round, desc="rounds", disable=not self.progress, unit="round")
        self._rounds_bar = bar
        discarded_in_a_row = 0
        while (t := self.state.rounds_done) < c.rounds:
            try:
                record = self.run_round(t, strategy)
            except BudgetExceededError as err:
                logger.warning("privacy budget exhausted, stopping before the round: %s", err)
                self.stop_reason = "privacy budget exhausted"
                break
            if record.get("discarded"):
                self.state.records.append(record)
                self._write_progress_artifacts()
                discarded_in_a_row += 1
                if discarded_in_a_row > c.max_discarded_rounds:
                    self.stop_reason = f"round {t + 1} discarded {discarded_in_a_row} times in a row"
                    logger.error(
                        "stopping the run: round %d was discarded %d times in a row (max-discarded-rounds=%d); "
                        "%d of %d private rounds done. Check that enough nodes are online (min-replies=%d), then "
                        "continue with --resume",
                        t + 1,
                        discarded_in_a_row,
                        c.max_discarded_rounds,
                        t,
                        c.rounds,
                        c.privacy.min_replies,
                    )
                    break
                logger.warning(
                    "round %d/%d is redone (discarded %d time(s) in a row, at most %d)",
                    t + 1,
                    c.rounds,
                    discarded_in_a_row,
                    c.max_discarded_rounds,
                )
                continue
            discarded_in_a_row = 0
            bar.update(1)
            if tracker is not None:
                tracker.log(record)
            extra = ""
            if "diagnostics/val_similarity" in record:
                extra = f" val_similarity={record['diagnostics/val_similarity']:.4f} (non-private)"
            logger.info(
                "round %d/%d: epsilon=%.4f replies=%d pairs=%d dpo_loss=%.4f margin=%.4f %.1fs%s",
                t + 1,
                c.rounds,
                self.state.ledger.epsilon(),
                record["replies"],
                record["pairs"],
                record.get("dpo/loss", float("nan")),
                record.get("dpo/rewards_margin", float("nan")),
                sum(record["seconds"].values()),
                extra,
            )
        bar.close()
        self._rounds_bar = None
        if tracker is not None:
            tracker.close()
        self.finish()
        return self.privacy_summary()

    def finish(self) -> None:
        """The final synthetic corpus (post-processing: no privacy cost), diagnostics and the plot."""
        c = self.config
        start = time.perf_counter()
        texts: list[str] = []
        if c.final_samples:
            per = c.final_samples_per_prompt
            num_prompts = prompts_for(c.final_samples, samples_per_prompt=per)
            texts = self._generate(num_prompts, per, "final corpus")[1][: c.final_samples]
            artifacts.write_synthetic(self.out, texts)
        if self.val_centroid is not None and texts:
            mean, se = self._similarity(self.parts.embed(texts))
            artifacts.write_diagnostics(self.out, self.state.records, final=mean, final_se=se, control=c.control)
        self._write_progress_artifacts()
        artifacts.plot_rounds(self.state.records, self.out / "rounds.png")
        # What a user takes home: the generator (a peft adapter) and the corpus as a dataset, each with its card.
        card = PrivacyCard.from_run_dir(self.out)
        if self.parts.dpo is not None:
            base_path = generator_dir(c.generation.model, cache_dir=c.resolved_cache_dir())
            write_generator(self.parts.dpo, self.out, base_model=c.generation.model, base_path=base_path, card=card)
        ckpt.atomic_write_json(self.out / "initial_set.json", self.parts.initial_set)  # public: popri generate uses it
        if texts:
            write_synthetic_dataset(texts, self.out / "synthetic", card=card)
        write_report(self.out)
        logger.info("final corpus: %d samples in %.1fs -> %s", len(texts), time.perf_counter() - start, self.out)
