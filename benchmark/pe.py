"""Private Evolution (PE) baseline with user-level DP, on the same generator, embedder and prompts as POPri.

PE (Lin et al. 2024, "Differentially Private Synthetic Data via Foundation Model APIs 1: Images", ICLR; Xie et al.
2024, "... 2: Text" (Aug-PE), ICML; Hou et al. 2024, PrE-Text, ICML) steers an *untuned* generator by selection:

1. population ``P_t`` of N synthetic samples, embedded (all-MiniLM-L6-v2, unit norm);
2. DP nearest-neighbour histogram: every private text votes for its nearest sample (cosine). User-level DP as in
   DPSDA's ``vote_normalization_level="client"``: user u's vote counts ``c_u ∈ N^N`` are normalised,
   ``v_u = c_u / ||c_u||_2``, so ||v_u|| = 1 and adding or removing one user moves ``H = Σ_u v_u`` by at most 1 in L2;
   ``H̃ = H + N(0, σ² I)`` (σ is the noise multiplier on sensitivity 1, the same mechanism and accountant as POPri);
3. keep the ``keep`` samples with the largest noisy votes;
4. variations: the kept samples become the in-context examples of the paper's prompt template (3 per prompt), and
   the generator writes ``N − keep`` new samples from them; ``P_{t+1}`` = kept + new. This is the "prompt-based" PE
   that the POPri paper compares with (its Figure 1: the prompt, not the model, is updated).

After T iterations the final corpus is written from the last kept set, exactly as POPri writes its final corpus from
its tuned model. Privacy: T releases of the Gaussian mechanism with sensitivity 1 and all users (q = 1), accounted
with Opacus like POPri (:mod:`popri.privacy`).

Communication per participating client per iteration: down = the N × d float32 embedding matrix, up = the N float32
vote vector ``v_u``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmark.config import PEConfig
from benchmark.corpus import Generator, generate_from_examples
from popri.checkpoint import atomic_write_npy
from popri.privacy import PrivacyLedger, calibrate_noise, gaussian_mechanism

logger = logging.getLogger(__name__)


def nearest_sample(private_embeddings: np.ndarray, sample_embeddings: np.ndarray, *, chunk: int = 4096) -> np.ndarray:
    """Index of the most cosine-similar sample for every private text (unit-norm rows: cosine = dot product)."""
    out = np.empty(private_embeddings.shape[0], dtype=np.int64)
    for start in range(0, private_embeddings.shape[0], chunk):
        sims = private_embeddings[start : start + chunk] @ sample_embeddings.T  # (chunk, N)
        out[start : start + chunk] = sims.argmax(axis=1)
    return out


def user_vote_sum(nearest: np.ndarray, owner: np.ndarray, *, num_samples: int) -> np.ndarray:
    """``H = Σ_u c_u / ||c_u||_2`` with ``c_u[j]`` = number of user u's texts whose nearest sample is j.

    Each user's normalised vote vector has L2 norm exactly 1: the sum has user-level sensitivity 1. Computed from the
    (user, sample) pair counts, so memory is O(texts), not O(users × samples).
    """
    if nearest.shape != owner.shape:
        raise ValueError(f"{nearest.shape[0]} votes but {owner.shape[0]} owner ids")
    if nearest.size == 0:
        return np.zeros(num_samples, dtype=np.float64)
    pairs, counts = np.unique(owner.astype(np.int64) * num_samples + nearest, return_counts=True)
    users, samples = pairs // num_samples, pairs % num_samples
    norms = np.zeros(int(users.max()) + 1, dtype=np.float64)
    np.add.at(norms, users, counts.astype(np.float64) ** 2)
    votes = np.zeros(num_samples, dtype=np.float64)
    np.add.at(votes, samples, counts / np.sqrt(norms[users]))
    return votes


def dp_vote_histogram(
    *,
    sample_embeddings: np.ndarray,
    private_embeddings: np.ndarray,
    owner: np.ndarray,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """The released histogram ``H̃ = Σ_u v_u + N(0, σ² I)`` (only this leaves the private side)."""
    nearest = nearest_sample(private_embeddings, sample_embeddings)
    votes = user_vote_sum(nearest, owner, num_samples=sample_embeddings.shape[0])
    return gaussian_mechanism(summed_scores=votes, noise_multiplier=noise_multiplier, sensitivity=1.0, rng=rng)


@dataclass
class PEResult:
    corpus: list[str]
    epsilon: float
    noise_multiplier: float
    rounds: int
    bytes_down_per_client_round: int
    bytes_up_per_client_round: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


def run_pe(
    gen: Generator,
    embedder: Any,
    *,
    initial: list[str],
    private_embeddings: np.ndarray,
    owner: np.ndarray,
    config: PEConfig,
    corpus_size: int,
    epsilon: float,
    delta: float,
    accountant: str,
    seed: int,
    noise_rng: np.random.Generator,
    progress: bool = False,
) -> PEResult:
    """T PE iterations at (ε, δ) over all users, then the final corpus from the last kept set."""
    from popri.embedding import embed_texts

    start = time.time()
    sigma = calibrate_noise(epsilon=epsilon, delta=delta, sample_rate=1.0, rounds=config.rounds, accountant=accountant)
    ledger = PrivacyLedger(delta=delta, accountant=accountant, target_epsilon=epsilon)
    logger.info("PE: epsilon=%g delta=%g sigma=%.4f rounds=%d (q=1)", epsilon, delta, sigma, config.rounds)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    population = generate_from_examples(
        gen, initial, count=config.population, rng=rng, generator=generator, progress=progress, desc="PE population"
    )
    examples = initial
    history: list[dict[str, Any]] = []
    down = up = 0
    for t in tqdm(range(1, config.rounds + 1), desc=f"PE eps={epsilon:g}", disable=not progress, leave=False):
        sample_embeddings = embed_texts(embedder, population)
        down = int(sample_embeddings.astype(np.float32).nbytes)
        up = int(np.zeros(len(population), dtype=np.float32).nbytes)
        ledger.charge(noise_multiplier=sigma, sample_rate=1.0)  # charged before the noisy result is used
        dp_votes = dp_vote_histogram(
            sample_embeddings=sample_embeddings,
            private_embeddings=private_embeddings,
            owner=owner,
            noise_multiplier=sigma,
            rng=noise_rng,
        )
        top = np.argsort(-dp_votes, kind="stable")[: config.keep]
        examples = [population[int(i)] for i in top]
        history.append({"round": t, "epsilon": ledger.epsilon(), "kept_dp_votes_mean": float(dp_votes[top].mean())})
        if t < config.rounds:
            population = examples + generate_from_examples(
                gen,
                examples,
                count=config.population - len(examples),
                rng=rng,
                generator=generator,
                progress=progress,
                desc="PE variations",
            )
    corpus = generate_from_examples(
        gen,
        examples,
        count=corpus_size,
        rng=rng,
        generator=generator,
        progress=progress,
        desc="PE corpus",
        samples_per_prompt=gen.config.samples_per_prompt,
    )
    return PEResult(
        corpus=corpus,
        epsilon=ledger.epsilon(),
        noise_multiplier=sigma,
        rounds=config.rounds,
        bytes_down_per_client_round=down,
        bytes_up_per_client_round=up,
        seconds=time.time() - start,
        history=history,
    )


def cached_text_embeddings(
    embedder: Any, texts: list[str], *, cache: Path | None, progress: bool = False
) -> np.ndarray:
    """Embeddings of the private train texts, computed once per data set (the simulation's stand-in for every client
    embedding its own texts on its device)."""
    from popri.embedding import embed_texts

    if cache is not None and cache.exists():
        emb = np.load(cache)
        if emb.shape[0] == len(texts):
            return emb
    emb = embed_texts(embedder, texts, progress=progress)
    if cache is not None:
        atomic_write_npy(cache, emb)
    return emb
