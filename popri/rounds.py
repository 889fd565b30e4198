"""The server's side of a POPri run, free of any transport: generate → embed → collect → aggregate with DP →
pairs → DPO → checkpoint, then the final synthetic corpus.

``collect`` is the only door to private data: it takes the round's sample embeddings and returns each node's
clipped sum (central mode: the server noises the total), or only the secure sum of the nodes' already noised vectors
(secure-aggregation mode). The Flower ServerApp passes a function that sends messages; tests may pass anything.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from popri import checkpoint as ckpt
from popri.assets import generator_dir, load_generator
from popri.card import PrivacyCard, write_synthetic_dataset
from popri.config import ConfigError, RunConfig, config_to_flat, save_config
from popri.data import load_user_data, split_users
from popri.dpo import LoraDPO
from popri.embedding import embed_texts, load_embedder
from popri.export import write_generator
from popri.generation import build_prompts, make_initial_set, sample_completions
from popri.preferences import PreferencePair, build_pairs, random_pairs
from popri.privacy import (
    BudgetExceededError,
    InvalidReplyError,
    PrivacyLedger,
    gaussian_mechanism,
    make_noise_rng,
    validate_node_sum,
)
from popri.report import save_round_samples, write_report
from popri.vllm_backend import VllmSampler, vllm_unavailable_reason

logger = logging.getLogger(__name__)

# Keys whose change would break the privacy ledger or the meaning of a resumed run.
_RESUME_LOCKED = ("epsilon", "noise-multiplier", "delta", "sample-rate", "accountant", "data", "max-users", "seed")


@dataclass(frozen=True)
class NodeReply:
    """One node's answer: its clipped sum over sampled users, or the error that replaced it."""

    node_id: int
    node_sum: np.ndarray | None
    num_users: int
    error: str | None = None


@dataclass(frozen=True)
class SecureSum:
    """Secure-aggregation mode: the unmasked sum of the node vectors (each already carrying its noise share), and
    how many nodes it sums. ``dp_sum`` is None when the protocol released nothing (too few nodes survived)."""

    dp_sum: np.ndarray | None
    replies: int
    failures: int = 0


# (sample embeddings, round, sample rate) -> each node's reply                                    (central mode)
Collect = Callable[[np.ndarray, int, float], list[NodeReply]]
# (sample embeddings, round, sample rate, charge) -> the secure sum; ``charge()`` must run before the sum can be
# unmasked                                                                                         (secagg mode)
SecureCollect = Callable[[np.ndarray, int, float, Callable[[], None]], SecureSum]


def aggregate_replies(replies: list[NodeReply], *, expected_len: int) -> tuple[np.ndarray | None, int, list[str]]:
    """Validate and re-clip every reply; sum the good ones. Returns (sum or None, users, rejection reasons)."""
    total = np.zeros(expected_len, dtype=np.float64)
    users, accepted, rejected = 0, 0, []
    for reply in replies:
        if reply.error is not None or reply.node_sum is None:
            rejected.append(f"node {reply.node_id}: {reply.error or 'empty reply'}")
            continue
        try:
            total += validate_node_sum(reply.node_sum, expected_len=expected_len, num_users=reply.num_users)
        except InvalidReplyError as err:
            rejected.append(f"node {reply.node_id}: {err}")
            continue
        users += reply.num_users
        accepted += 1
    for reason in rejected:
        logger.warning("rejected reply from %s", reason)
    return (total if accepted else None), users, rejected


class PopriRun:
    """One POPri run with its artifacts in ``config.output``; ``resume=True`` continues from the last checkpoint."""

    def __init__(self, config: RunConfig, *, resume: bool = False, progress: bool = True) -> None:
        self.config = config
        self.progress = progress
        self.out = Path(config.output)
        self.ckpt_dir = self.out / "checkpoints"
        self._prepare_output(resume)
        p = config.privacy
        self.sigma = config.resolved_noise_multiplier()
        self.ledger = PrivacyLedger(delta=p.delta, accountant=p.accountant, target_epsilon=p.epsilon)
        self.noise_rng, self.noise_reproducible = make_noise_rng(p.noise_seed)
        self.prompt_rng = np.random.default_rng([config.seed, 1])
        self.train_rng = np.random.default_rng([config.seed, 2])
        self.control_rng = np.random.default_rng([config.seed, 3])
        self.sample_gen = torch.Generator().manual_seed(config.seed)
        cache = config.resolved_cache_dir()
        # Policy and reference share the frozen base, so both run at this one precision (no bf16/fp32 mismatch).
        dtype = torch.bfloat16 if config.train.precision == "bf16" else torch.float32
        model, self.tokenizer = load_generator(config.generation.model, cache_dir=cache, dtype=dtype)
        self.dpo = LoraDPO(model, self.tokenizer, config=config.train)
        self.vllm = self._start_vllm() if config.generation.generation_backend == "vllm" else None
        self.embedder = load_embedder()
        g = config.generation
        self.initial_set = make_initial_set(
            model,
            self.tokenizer,
            instruction=g.initial_instruction,
            size=g.initial_set_size,
            max_new_tokens=g.max_new_tokens,
            token_budget=g.token_budget,
            seed=config.seed,
            cache_dir=cache,
            model_id=g.model,
            progress=progress,
        )
        self.records: list[dict[str, Any]] = []
        self.start_round = 0
        if resume:
            self._restore()
        self.val_centroid = self._validation_centroid() if config.diagnostics else None

    # -- setup -------------------------------------------------------------------------------------------------

    def _prepare_output(self, resume: bool) -> None:
        saved = self.out / "config.json"
        if resume:
            if not saved.exists():
                raise FileNotFoundError(f"--resume: {saved} does not exist; start a new run without --resume")
            before = json.loads(saved.read_text())
            now = config_to_flat(self.config)
            changed = [k for k in _RESUME_LOCKED if before.get(k) != now.get(k)]
            if changed:
                key = changed[0]
                raise ConfigError(
                    f"invalid config key '{key}': a resumed run must keep {key}={before.get(key)!r}"
                    " (the privacy ledger depends on it)"
                )
        elif ckpt.latest_checkpoint(self.ckpt_dir) is not None or (self.out / "ledger.json").exists():
            raise FileExistsError(
                f"{self.out} already holds a run; pass --resume to continue it or pick a new --output"
            )
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(self.config, saved)

    @property
    def _journal(self) -> Path:
        return self.out / "ledger.json"

    def _adopt_journal(self) -> None:
        """Take the ledger journal if it holds more charged rounds than the checkpoint: a round released (charged)
        after the last checkpoint stays charged, even though the round itself is redone. The ledger never shrinks."""
        if not self._journal.exists():
            return
        journal = PrivacyLedger.from_state_dict(json.loads(self._journal.read_text()))
        if journal.rounds_charged > self.ledger.rounds_charged:
            logger.warning(
                "%d round(s) were released after the last checkpoint; they stay charged (epsilon %.4f -> %.4f)",
                journal.rounds_charged - self.ledger.rounds_charged,
                self.ledger.epsilon(),
                journal.epsilon(),
            )
            self.ledger = journal

    def _restore(self) -> None:
        latest = ckpt.latest_checkpoint(self.ckpt_dir)
        if latest is None:
            logger.info("no checkpoint in %s: starting from round 1", self.ckpt_dir)
            self._adopt_journal()
            return
        tensors, meta = ckpt.load_checkpoint(latest)
        self.dpo.load_state_dict(tensors["dpo"])
        self.sample_gen.set_state(tensors["sample_generator"])
        self.ledger = PrivacyLedger.from_state_dict(meta["ledger"])
        self._adopt_journal()
        self.prompt_rng.bit_generator.state = meta["rng"]["prompt"]
        self.train_rng.bit_generator.state = meta["rng"]["train"]
        self.control_rng.bit_generator.state = meta["rng"]["control"]
        if self.noise_reproducible and "noise" in meta["rng"]:
            self.noise_rng.bit_generator.state = meta["rng"]["noise"]
        self.records = meta["records"]
        self.start_round = int(meta["round"]) + 1
        logger.info(
            "resumed from %s: %d round(s) done, ledger epsilon=%.4f over %d charged round(s)",
            latest.name,
            self.start_round,
            self.ledger.epsilon(),
            self.ledger.rounds_charged,
        )

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
        return embed_texts(self.embedder, texts).mean(axis=0).astype(np.float64)

    def _similarity(self, embeddings: np.ndarray) -> tuple[float, float]:
        """Mean cosine of samples to validation texts, and its standard error over samples."""
        assert self.val_centroid is not None
        sims = embeddings.astype(np.float64) @ self.val_centroid
        return float(sims.mean()), float(sims.std(ddof=1) / np.sqrt(len(sims))) if len(sims) > 1 else 0.0

    # -- the rounds --------------------------------------------------------------------------------------------

    def _start_vllm(self) -> VllmSampler:
        reason = vllm_unavailable_reason()
        if reason:
            raise ConfigError(f"invalid config key 'generation-backend': 'vllm' cannot run here: {reason}")
        c = self.config
        model_dir = generator_dir(c.generation.model, cache_dir=c.resolved_cache_dir())
        return VllmSampler(model_dir, lora_rank=c.train.lora_r, gpu_memory=c.generation.vllm_gpu_memory, seed=c.seed)

    def _generate(self, num_prompts: int, samples_per_prompt: int, desc: str) -> tuple[list[str], list[str]]:
        g = self.config.generation
        prompts = build_prompts(self.initial_set, num_prompts=num_prompts, rng=self.prompt_rng)
        # The same sampling settings for either backend.
        sampling: dict[str, Any] = {
            "samples_per_prompt": samples_per_prompt,
            "max_new_tokens": g.max_new_tokens,
            "token_budget": g.token_budget,
            "temperature": g.temperature,
            "top_p": g.top_p,
            "generator": self.sample_gen,
            "progress": self.progress,
        }
        if self.vllm is not None:
            adapter = self.dpo.save_adapter(self.out / "serving-adapter")  # the policy as it is now
            return prompts, self.vllm.sample(prompts, self.tokenizer, adapter_dir=adapter, **sampling)
        sampler = self.dpo.generation_model(torch.bfloat16)  # merged adapter; bf16 measured 2-3x faster here
        samples = sample_completions(
            sampler, self.tokenizer, prompts, batch_size=g.generation_batch_size, desc=desc, **sampling
        )
        del sampler
        gc.collect()  # the merged copy holds a full set of weights: free it before DPO allocates
        return prompts, samples

    def run_round(self, t: int, collect: Collect | SecureCollect) -> dict[str, Any]:
        c, g = self.config, self.config.generation
        q = c.privacy.sample_rate
        timings: dict[str, float] = {}
        record: dict[str, Any] = {"round": t + 1}
        if not c.control:
            would_be = self.ledger.epsilon_after(noise_multiplier=self.sigma, sample_rate=q)
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
        embeddings = embed_texts(self.embedder, samples)
        timings["embed"] = time.perf_counter() - start

        dp_scores: np.ndarray | None = None
        pairs: list[PreferencePair]
        if c.control:
            pairs = random_pairs(
                prompts=prompts, samples=samples, samples_per_prompt=g.samples_per_prompt, rng=self.control_rng
            )
            record.update({"users_sampled": 0, "replies": 0, "rejected_replies": 0, "control": True})
        else:
            if c.privacy.privacy_mode == "secagg":
                dp_scores = self._release_secure(collect, embeddings, t, record, timings)  # type: ignore[arg-type]
            else:
                dp_scores = self._release_central(collect, embeddings, t, record, timings)  # type: ignore[arg-type]
            if dp_scores is None:
                record.update({"discarded": True, "seconds": timings})
                return record
            pairs = build_pairs(
                prompts=prompts,
                samples=samples,
                dp_scores=dp_scores,
                samples_per_prompt=g.samples_per_prompt,
                rejected_rank=c.train.rejected_rank,
            )
            record["privacy/epsilon"] = self.ledger.epsilon()

        self._stage("dpo")
        start = time.perf_counter()
        metrics = self.dpo.train_round(pairs, rng=self.train_rng, progress=self.progress)
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
        """Show the round's current stage beside the rounds bar (its own bar, if any, shows its progress)."""
        bar = getattr(self, "_rounds_bar", None)
        if bar is not None:
            bar.set_postfix_str(name)

    def _charge(self) -> float:
        """Charge one release and write the journal, before the noisy result exists: a crash from here on can only
        over-count, never under-count, the privacy spent."""
        epsilon = self.ledger.charge(noise_multiplier=self.sigma, sample_rate=self.config.privacy.sample_rate)
        ckpt.atomic_write_json(self._journal, self.ledger.state_dict())
        return epsilon

    def _release_central(
        self, collect: Collect, embeddings: np.ndarray, t: int, record: dict[str, Any], timings: dict[str, float]
    ) -> np.ndarray | None:
        """Central mode: each node's clipped sum, validated and re-clipped here, summed, then noised once."""
        p = self.config.privacy
        self._stage("collect: nodes scoring")
        start = time.perf_counter()
        replies = collect(embeddings, t, p.sample_rate)
        timings["collect"] = time.perf_counter() - start
        start = time.perf_counter()
        summed, users, rejected = aggregate_replies(replies, expected_len=len(embeddings))
        accepted = len(replies) - len(rejected)
        record.update({"users_sampled": users, "replies": accepted, "rejected_replies": len(rejected)})
        if summed is None or accepted < p.min_replies:
            # Nothing is released, so nothing is charged: the noisy sum is never computed.
            logger.warning("round %d discarded: %d valid replies < min-replies %d", t + 1, accepted, p.min_replies)
            return None
        self._charge()
        dp_scores = gaussian_mechanism(summed_scores=summed, noise_multiplier=self.sigma, rng=self.noise_rng)
        timings["aggregate"] = time.perf_counter() - start
        return dp_scores

    def _release_secure(
        self,
        collect: SecureCollect,
        embeddings: np.ndarray,
        t: int,
        record: dict[str, Any],
        timings: dict[str, float],
    ) -> np.ndarray | None:
        """Secure-aggregation mode: the nodes noise their own sums; the server only ever sees their total.

        The transport calls ``charge`` once enough masked vectors are in and before it unmasks their sum, so a
        round whose protocol stops earlier is not charged, and one that could have been seen always is.
        """
        p = self.config.privacy
        charged: list[float] = []
        self._stage("collect: secure aggregation")
        start = time.perf_counter()
        result = collect(embeddings, t, p.sample_rate, lambda: charged.append(self._charge()))
        timings["collect"] = time.perf_counter() - start
        # The server never learns how many users each node sampled, nor their total, in this mode.
        record.update({"users_sampled": None, "replies": result.replies, "rejected_replies": result.failures})
        if result.dp_sum is not None and not charged:
            raise RuntimeError("the secure sum was released without charging the privacy ledger")
        if result.dp_sum is None or result.replies < p.min_replies:
            logger.warning(
                "round %d discarded: the secure sum covers %d nodes < min-replies %d%s",
                t + 1,
                result.replies,
                p.min_replies,
                " (charged: the sum could have been unmasked)" if charged else "",
            )
            return None
        dp_sum = np.asarray(result.dp_sum, dtype=np.float64)
        if dp_sum.shape != (len(embeddings),) or not np.all(np.isfinite(dp_sum)):
            logger.warning("round %d discarded: the secure sum has shape %s or non-finite values", t + 1, dp_sum.shape)
            return None
        return dp_sum

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
        self.records.append(record)
        rng_state = {
            "prompt": self.prompt_rng.bit_generator.state,
            "train": self.train_rng.bit_generator.state,
            "control": self.control_rng.bit_generator.state,
        }
        if self.noise_reproducible:
            rng_state["noise"] = self.noise_rng.bit_generator.state
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
        meta = {"round": t, "ledger": self.ledger.state_dict(), "rng": rng_state, "records": self.records}
        tensors = {"dpo": self.dpo.state_dict(), "sample_generator": self.sample_gen.get_state()}
        ckpt.save_checkpoint(self.ckpt_dir, t, tensors=tensors, meta=meta, files=files)
        ckpt.prune_checkpoints(self.ckpt_dir)
        self._write_progress_artifacts()

    def _write_progress_artifacts(self) -> None:
        ckpt.write_jsonl(self.out / "rounds.jsonl", self.records)
        ckpt.atomic_write_json(self.out / "privacy.json", self.privacy_summary())

    def privacy_summary(self) -> dict[str, Any]:
        p = self.config.privacy
        return {
            "epsilon": self.ledger.epsilon(),
            "delta": p.delta,
            "noise_multiplier": self.sigma,
            "sample_rate": p.sample_rate,
            "rounds_completed": self.ledger.rounds_charged,
            "accountant": p.accountant,
            "target_epsilon": p.epsilon,
            "rounds_planned": self.config.rounds,
            "noise_seeded": self.noise_reproducible,
            "privacy_mode": p.privacy_mode,
            "control": self.config.control,
        }

    def run(self, collect: Collect | SecureCollect) -> dict[str, Any]:
        """All remaining rounds, then the final corpus. Returns privacy.json's content.

        ``collect`` is a :data:`Collect` in central mode and a :data:`SecureCollect` in secure-aggregation mode.
        """
        c = self.config
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
        bar = tqdm(range(self.start_round, c.rounds), desc="rounds", disable=not self.progress, unit="round")
        self._rounds_bar = bar
        for t in bar:
            try:
                record = self.run_round(t, collect)
            except BudgetExceededError as err:
                logger.warning("privacy budget exhausted, stopping before the round: %s", err)
                break
            if record.get("discarded"):
                self.records.append(record)
                self._write_progress_artifacts()
                continue
            extra = ""
            if "diagnostics/val_similarity" in record:
                extra = f" val_similarity={record['diagnostics/val_similarity']:.4f} (non-private)"
            logger.info(
                "round %d/%d: epsilon=%.4f users=%s pairs=%d dpo_loss=%.4f margin=%.4f %.1fs%s",
                t + 1,
                c.rounds,
                self.ledger.epsilon(),
                "n/a (secagg)" if record["users_sampled"] is None else record["users_sampled"],
                record["pairs"],
                record.get("dpo/loss", float("nan")),
                record.get("dpo/rewards_margin", float("nan")),
                sum(record["seconds"].values()),
                extra,
            )
        self.finish()
        return self.privacy_summary()

    def finish(self) -> None:
        """The final synthetic corpus (post-processing: no privacy cost), diagnostics and the plot."""
        c = self.config
        start = time.perf_counter()
        texts: list[str] = []
        if c.final_samples:
            _, texts = self._generate(c.final_samples, 1, "final corpus")
            ckpt.write_jsonl(self.out / "synthetic.jsonl", [{"text": t} for t in texts])
        if self.val_centroid is not None and texts:
            mean, se = self._similarity(embed_texts(self.embedder, texts))
            rounds = [r for r in self.records if "diagnostics/val_similarity" in r]
            ckpt.atomic_write_json(
                self.out / "diagnostics.json",
                {
                    "note": "NON-PRIVATE diagnostic: similarity to held-out private validation text",
                    "first_round": rounds[0]["diagnostics/val_similarity"] if rounds else None,
                    "first_round_se": rounds[0]["diagnostics/val_similarity_se"] if rounds else None,
                    "final": mean,
                    "final_se": se,
                    "control": c.control,
                },
            )
        self._write_progress_artifacts()
        plot_rounds(self.records, self.out / "rounds.png")
        # What a user takes home: the generator (peft adapter), the corpus as a dataset, both with the privacy card.
        card = PrivacyCard.from_run_dir(self.out)
        base_path = generator_dir(c.generation.model, cache_dir=c.resolved_cache_dir())
        write_generator(self.dpo, self.out, base_model=c.generation.model, base_path=base_path, card=card)
        ckpt.atomic_write_json(self.out / "initial_set.json", self.initial_set)  # public: popri generate reuses it
        if c.final_samples:
            write_synthetic_dataset(texts, self.out / "synthetic", card=card)
        write_report(self.out)
        logger.info("final corpus: %d samples in %.1fs -> %s", len(texts), time.perf_counter() - start, self.out)


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
