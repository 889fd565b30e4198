"""How cost grows (``popri perf --only growth``): round stages against K·J, node scoring against users per node, and
both extrapolated to the paper's sizes from the measured slopes.

- **Node scoring** (:func:`bench_scoring_growth`): synthetic per-user embedding sums (:func:`synthetic_user_sums`)
  scored by the function a node runs, :meth:`popri.node.NodeScorer.score` at q = 1 (Poisson sampling, then
  :func:`popri.scoring.clipped_scores_sum`: raw scores ``S_u · e_j``, z-score, clip to L2 norm 1, sum, in chunks of
  512 users), against unit-norm sample embeddings. Wall seconds are the median of repeats
  (:func:`benchmark.perf.timing.interleaved`); memory is the ``tracemalloc`` peak of one more, untimed call
  (:func:`traced_peak_bytes`: numpy reports its array buffers to tracemalloc; what was allocated before the call, such
  as the node's user-sum table, is not counted and is reported beside it as ``user_sums_mib``). Two sweeps: users
  per node U at a fixed K·J, and K·J at a fixed U.
- **Round stages** (:func:`bench_round_growth`): one round's parts, each timed, for K·J in a list at a fixed
  J = samples-per-prompt (K = K·J / J): generate (the policy's merged bf16 copy, then
  :func:`popri.generation.sample_completions`, as :func:`popri.loop.load_parts` does), embed
  (:func:`popri.embedding.embed_texts`), node scoring (as above, one node of synthetic users) and DPO
  (:meth:`popri.dpo.LoraDPO.train_round` on the round's K pairs).
- **Fits** (:func:`fit_power_law`, :func:`fit_linear`): every time is fitted as a power law by least squares on
  log-log axes, ``log t = log c + Σ_i b_i log x_i``; node scoring in two variables, ``t = c · U^a · (K·J)^b``. The
  peak memory of node scoring is fitted linearly, ``m = m0 + m_U · U + m_KJ · K·J`` (the sampled-user index grows
  with U, the per-chunk score matrices with K·J; the user-sum table is allocated before the call).
- **Extrapolation** (:func:`extrapolate`): each stage at the paper's size (K = 1,800, J = 10, so K·J = 18,000;
  72,000 clients spread evenly over 1, 8 or 64 nodes that score in parallel), every row labelled ``extrapolated``.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import math
import time
import tracemalloc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmark.perf.inputs import EMBEDDING_DIM, PerfAssets, PerfSizes, perf_prompts
from benchmark.perf.schema import size_list
from benchmark.perf.timing import count_tokens, interleaved, median, sig

logger = logging.getLogger(__name__)

STAGES = ("generate", "embed", "score", "dpo")
STAGE_LABELS = {
    "generate": "generation",
    "embed": "embedding",
    "score": "node scoring",
    "dpo": "DPO",
}
PAPER_PROMPTS = 1_800  # K (Hou et al. 2025)
PAPER_SAMPLES_PER_PROMPT = 10  # J
PAPER_SAMPLES = PAPER_PROMPTS * PAPER_SAMPLES_PER_PROMPT  # K·J = 18,000
PAPER_CLIENTS = 72_000
PAPER_NODES = (1, 8, 64)
EXTRAPOLATED = "extrapolated"
ROUND_PLOT = "growth_round.png"
SCORING_PLOT = "growth_scoring.png"
_MIB = 2**20


# -- fits ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PowerLaw:
    """``y = coefficient · Π_i x_i ** exponents[i]``, fitted by least squares on ``log y = log c + Σ_i b_i log x_i``.

    ``r2_log`` is the coefficient of determination on the log scale; ``points`` the number of measurements.
    """

    variables: tuple[str, ...]
    exponents: tuple[float, ...]
    coefficient: float
    r2_log: float
    points: int

    def predict(self, **x: float) -> float:
        """``c · Π_i x_i^{b_i}`` at the named values (every variable of the fit)."""
        return self.coefficient * math.prod(
            float(x[v]) ** b for v, b in zip(self.variables, self.exponents, strict=True)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": "log y = log c + " + " + ".join(f"b_{v} log {v}" for v in self.variables) + " (least squares)",
            "variables": list(self.variables),
            "exponents": [round(b, 4) for b in self.exponents],
            "coefficient": sig(self.coefficient),
            "r2_log": round(self.r2_log, 4),
            "points": self.points,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PowerLaw:
        return cls(
            variables=tuple(data["variables"]),
            exponents=tuple(float(b) for b in data["exponents"]),
            coefficient=float(data["coefficient"]),
            r2_log=float(data.get("r2_log", float("nan"))),
            points=int(data.get("points", 0)),
        )


@dataclass(frozen=True)
class LinearFit:
    """``y = intercept + Σ_i slopes[i] · x_i``, ordinary least squares."""

    variables: tuple[str, ...]
    slopes: tuple[float, ...]
    intercept: float
    points: int

    def predict(self, **x: float) -> float:
        return self.intercept + sum(s * float(x[v]) for v, s in zip(self.variables, self.slopes, strict=True))

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": "y = y0 + " + " + ".join(f"m_{v} {v}" for v in self.variables) + " (least squares)",
            "variables": list(self.variables),
            "slopes": [sig(s) for s in self.slopes],
            "intercept": sig(self.intercept),
            "points": self.points,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LinearFit:
        return cls(
            variables=tuple(data["variables"]),
            slopes=tuple(float(s) for s in data["slopes"]),
            intercept=float(data["intercept"]),
            points=int(data.get("points", 0)),
        )


def _design(x: Mapping[str, Sequence[float]], n: int, transform: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    columns = [np.ones(n)]
    for name, values in x.items():
        column = np.asarray(values, dtype=np.float64)
        if column.shape != (n,):
            raise ValueError(f"variable {name!r} has {column.size} values for {n} measurements")
        columns.append(transform(column))
    return np.column_stack(columns)


def fit_power_law(*, x: Mapping[str, Sequence[float]], y: Sequence[float]) -> PowerLaw:
    """Least squares on log-log axes: ``log y = log c + Σ_i b_i log x_i`` over the measurements (all > 0).

    With one variable, ``b`` is the slope of the log-log plot: y grows like ``x^b`` (b = 1: linear).
    """
    ys = np.asarray(y, dtype=np.float64)
    if ys.ndim != 1 or ys.size < len(x) + 1:
        raise ValueError(f"{ys.size} measurements cannot fit {len(x) + 1} parameters")
    if np.any(ys <= 0) or any(np.any(np.asarray(v, dtype=np.float64) <= 0) for v in x.values()):
        raise ValueError("a power law needs positive sizes and measurements")
    design = _design(x, ys.size, np.log)
    target = np.log(ys)
    params, *_ = np.linalg.lstsq(design, target, rcond=None)
    residual = target - design @ params
    spread = float(np.sum((target - target.mean()) ** 2))
    r2 = 1.0 - float(np.sum(residual**2)) / spread if spread > 0 else 1.0
    return PowerLaw(
        variables=tuple(x),
        exponents=tuple(float(b) for b in params[1:]),
        coefficient=float(np.exp(params[0])),
        r2_log=r2,
        points=int(ys.size),
    )


def fit_linear(*, x: Mapping[str, Sequence[float]], y: Sequence[float]) -> LinearFit:
    """Ordinary least squares ``y = y0 + Σ_i m_i x_i`` (minimum-norm solution when the sizes do not pin every m_i)."""
    ys = np.asarray(y, dtype=np.float64)
    design = _design(x, ys.size, lambda c: c)
    params, *_ = np.linalg.lstsq(design, ys, rcond=None)
    return LinearFit(
        variables=tuple(x),
        slopes=tuple(float(m) for m in params[1:]),
        intercept=float(params[0]),
        points=int(ys.size),
    )


# -- synthetic private data and memory -------------------------------------------------------------------------------


def synthetic_user_sums(
    *, users: int, texts_per_user: float, rng: np.random.Generator, dim: int = EMBEDDING_DIM, chunk_texts: int = 65_536
) -> tuple[np.ndarray, int]:
    """(U, dim) float64 per-user sums ``S_u = Σ_{i < n_u} x_i`` and ``Σ_u n_u``, the number of private texts.

    ``n_u ~ Geometric(1 / texts_per_user)`` (mean ``texts_per_user``, at least 1) and ``x_i = g_i / ||g_i||`` with
    ``g_i ~ N(0, I_dim)`` in float32: unit-norm embeddings like all-MiniLM-L6-v2's, summed as
    :func:`popri.scoring.user_embedding_sums` sums them (in float64). Built ``chunk_texts`` texts at a time, so 10^6
    users never hold their 10^7 texts at once; the chunking does not change the values (one stream of draws).
    """
    counts = rng.geometric(1.0 / texts_per_user, size=users)
    ends = np.cumsum(counts)  # ends[u] = texts of users 0..u
    sums = np.empty((users, dim), dtype=np.float64)
    start = 0
    while start < users:
        before = int(ends[start - 1]) if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, before + chunk_texts, side="right")))
        block = counts[start:stop]
        texts = rng.standard_normal((int(block.sum()), dim), dtype=np.float32)
        texts /= np.sqrt(np.einsum("ij,ij->i", texts, texts))[:, None]
        offsets = np.concatenate([[0], np.cumsum(block)[:-1]])
        sums[start:stop] = np.add.reduceat(texts.astype(np.float64), offsets, axis=0)
        start = stop
    return sums, int(counts.sum())


def unit_sample_embeddings(*, samples: int, rng: np.random.Generator, dim: int = EMBEDDING_DIM) -> np.ndarray:
    """(samples, dim) unit-norm rows, float32 values held in float64 (a node receives float32 and scores in float64)."""
    emb = rng.standard_normal((samples, dim), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.astype(np.float64)


def traced_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes that ``fn()`` allocates, as ``tracemalloc`` sees them (Python objects and numpy array buffers),
    above what was traced when it started: ``peak - current_at_start``. Allocations made before the call (its inputs)
    are not counted; its return value is.
    """
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    start = tracemalloc.get_traced_memory()[0]
    try:
        fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        if not tracing:
            tracemalloc.stop()
    return max(0, peak - start)


# -- node scoring ----------------------------------------------------------------------------------------------------


def score_point(
    *, user_sums: np.ndarray, sample_embeddings: np.ndarray, rng: np.random.Generator, repeats: int
) -> dict[str, Any]:
    """Seconds (median of ``repeats``) and tracemalloc peak of ``NodeScorer(user_sums).score(e, sample_rate=1)``."""
    from popri.node import NodeScorer

    scorer = NodeScorer(user_sums)

    def call() -> Any:
        return scorer.score(sample_embeddings, sample_rate=1.0, rng=rng)

    times, _ = interleaved({"score": call}, repeats)
    peak = traced_peak_bytes(call)
    return {
        "users": int(user_sums.shape[0]),
        "samples": int(sample_embeddings.shape[0]),
        "seconds": sig(median(times["score"])),
        "runs_s": [sig(t) for t in times["score"]],
        "peak_call_mib": round(peak / _MIB, 2),
        "user_sums_mib": round(user_sums.nbytes / _MIB, 2),
    }


def bench_scoring_growth(
    *,
    users: Sequence[int],
    users_samples: int,
    samples: Sequence[int],
    samples_users: int,
    texts_per_user: float,
    repeats: int,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """Node scoring against users per node (at K·J = ``users_samples``) and against K·J (at U = ``samples_users``).

    Rows are sorted by the size they vary; the fits are over both sweeps together.
    """
    by_users = []
    for u in sorted(users):
        sums, texts = synthetic_user_sums(users=u, texts_per_user=texts_per_user, rng=rng)
        emb = unit_sample_embeddings(samples=users_samples, rng=rng)
        by_users.append(
            {**score_point(user_sums=sums, sample_embeddings=emb, rng=rng, repeats=repeats), "texts": texts}
        )
        logger.info("growth scoring: %d users, K·J=%d: %.4fs", u, users_samples, by_users[-1]["seconds"])
        del sums
    sums, texts = synthetic_user_sums(users=samples_users, texts_per_user=texts_per_user, rng=rng)
    by_samples = []
    for kj in sorted(samples):
        emb = unit_sample_embeddings(samples=kj, rng=rng)
        by_samples.append(
            {**score_point(user_sums=sums, sample_embeddings=emb, rng=rng, repeats=repeats), "texts": texts}
        )
        logger.info("growth scoring: %d users, K·J=%d: %.4fs", samples_users, kj, by_samples[-1]["seconds"])
    del sums
    points = by_users + by_samples
    x = {"users": [p["users"] for p in points], "samples": [p["samples"] for p in points]}
    return {
        "function": "popri.node.NodeScorer.score at sample_rate=1 (Poisson sampling, then "
        "popri.scoring.clipped_scores_sum over the sampled users, 512 rows gathered at a time)",
        "data": f"synthetic: per-user sums of Geometric(mean {texts_per_user:g}) unit-norm {EMBEDDING_DIM}-dim "
        "float32 embeddings (seeded numpy Generator), unit-norm sample embeddings",
        "memory": "tracemalloc peak of one untimed call above what was traced at its start (numpy array buffers and "
        "Python objects; the node's user-sum table, allocated before, is user_sums_mib)",
        "texts_per_user": texts_per_user,
        "embedding_dim": EMBEDDING_DIM,
        "repeats": repeats,
        "by_users": by_users,
        "by_samples": by_samples,
        "time_fit": fit_power_law(x=x, y=[p["seconds"] for p in points]).to_dict(),
        "memory_fit": fit_linear(x=x, y=[p["peak_call_mib"] for p in points]).to_dict(),
    }


# -- round stages ----------------------------------------------------------------------------------------------------


def _shares(seconds: Mapping[str, float]) -> tuple[float, dict[str, float], str]:
    total = float(sum(seconds.values()))
    shares = {k: round(v / total, 4) if total > 0 else 0.0 for k, v in seconds.items()}
    return total, shares, max(seconds, key=lambda k: seconds[k])


def _one_round(
    assets: PerfAssets,
    sizes: PerfSizes,
    *,
    prompts: list[str],
    embedder: Any,
    user_sums: np.ndarray,
    seed: int,
    rng: np.random.Generator,
) -> tuple[dict[str, float], dict[str, Any]]:
    """The four timed stages of one round on K = len(prompts) prompts; (seconds per stage, details)."""
    import torch

    from popri.config import GenerationConfig, TrainConfig
    from popri.dpo import LoraDPO
    from popri.embedding import embed_texts
    from popri.generation import sample_completions
    from popri.node import NodeScorer
    from popri.preferences import build_pairs

    g = GenerationConfig()
    j = sizes.samples_per_prompt
    dpo = LoraDPO(  # a run's trainer: bf16 frozen base, fp32 LoRA (setup, not timed)
        copy.deepcopy(assets.model).to(torch.bfloat16), assets.tokenizer, config=TrainConfig(batch_size=sizes.dpo_batch)
    )
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    sampler = dpo.generation_model(torch.bfloat16)  # as popri.loop.load_parts: merge the policy's adapter, then sample
    samples = sample_completions(
        sampler,
        assets.tokenizer,
        prompts,
        samples_per_prompt=j,
        max_new_tokens=sizes.max_new_tokens,
        token_budget=sizes.token_budget,
        temperature=g.temperature,
        top_p=g.top_p,
        batch_size=sizes.generation_batch,
        generator=torch.Generator().manual_seed(seed),
    )
    del sampler
    gc.collect()
    seconds["generate"] = time.perf_counter() - start

    start = time.perf_counter()
    embeddings = embed_texts(embedder, samples)
    seconds["embed"] = time.perf_counter() - start

    scorer = NodeScorer(user_sums)
    start = time.perf_counter()
    node_sum, _ = scorer.score(embeddings.astype(np.float32).astype(np.float64), sample_rate=1.0, rng=rng)
    seconds["score"] = time.perf_counter() - start

    pairs = build_pairs(  # the node's sum ranks the samples (no noise: the ranking does not change DPO's cost)
        prompts=prompts,
        samples=samples,
        dp_scores=node_sum,
        samples_per_prompt=j,
        rejected_rank=min(sizes.rejected_rank, j - 1),
    )
    start = time.perf_counter()
    dpo.train_round(pairs, rng=np.random.default_rng([seed, len(prompts)]))
    seconds["dpo"] = time.perf_counter() - start
    del dpo
    gc.collect()
    detail = {
        "pairs": len(pairs),
        "tokens_per_sample": round(count_tokens(assets.tokenizer, samples) / len(samples), 1),
    }
    return seconds, detail


def _stage_fit(rows: Sequence[Mapping[str, Any]], stage: str) -> dict[str, Any]:
    """The stage's power law over every size, plus ``slope_largest_two`` = log(t_n / t_{n-1}) / log(x_n / x_{n-1})
    between the two largest sizes (where fixed costs weigh least): a check on the extrapolation's slope."""
    xs = [float(r["samples"]) for r in rows]
    ts = [float(r["seconds"][stage]) for r in rows]
    local = math.log(ts[-1] / ts[-2]) / math.log(xs[-1] / xs[-2])
    return {**fit_power_law(x={"samples": xs}, y=ts).to_dict(), "slope_largest_two": round(local, 4)}


def bench_round_growth(
    assets: PerfAssets,
    sizes: PerfSizes,
    *,
    samples: Sequence[int],
    users: int,
    texts_per_user: float,
    repeats: int,
    seed: int,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """Each round stage's seconds (median of ``repeats``) for K·J in ``samples``, J fixed, K = K·J / J; fits.

    Each repeat starts from a fresh policy (the same LoRA initialisation), so every size trains the same model.
    """
    from popri.embedding import load_embedder

    j = sizes.samples_per_prompt
    embedder = assets.embedder if assets.embedder is not None else load_embedder()
    user_sums, texts = synthetic_user_sums(users=users, texts_per_user=texts_per_user, rng=rng)
    rows = []
    for kj in sorted(samples):
        k = kj // j
        prompts = perf_prompts(assets, dataclasses.replace(sizes, prompts=k), seed=seed)
        runs: dict[str, list[float]] = {s: [] for s in STAGES}
        detail: dict[str, Any] = {}
        for _ in range(repeats):
            seconds, detail = _one_round(
                assets, sizes, prompts=prompts, embedder=embedder, user_sums=user_sums, seed=seed, rng=rng
            )
            for stage in STAGES:
                runs[stage].append(seconds[stage])
        med = {s: sig(median(runs[s])) for s in STAGES}
        total, shares, dominant = _shares(med)
        rows.append(
            {
                "samples": kj,
                "prompts": k,
                **detail,
                "seconds": med,
                "runs_s": {s: [sig(t) for t in runs[s]] for s in STAGES},
                "total_s": sig(total),
                "shares": shares,
                "dominant": dominant,
            }
        )
        logger.info("growth round: K·J=%d: %s", kj, ", ".join(f"{s} {med[s]:.3g}s" for s in STAGES))
    fits = {s: _stage_fit(rows, s) for s in STAGES}
    return {
        "what": "One round's stages, each timed: generate (merge the policy's adapter into a bf16 copy, "
        "sample_completions), embed (embed_texts), node scoring (NodeScorer.score, one node of synthetic users, q=1), "
        "DPO (LoraDPO.train_round on the K pairs, bf16 base); no transport, no noise, no checkpoint",
        "samples_per_prompt": j,
        "max_new_tokens": sizes.max_new_tokens,
        "token_budget": sizes.token_budget,
        "generation_batch": sizes.generation_batch,
        "dpo_batch": sizes.dpo_batch,
        "users": users,
        "texts": texts,
        "repeats": repeats,
        "rows": rows,
        "fits": fits,
        "fit_note": "every stage fitted against K·J on log-log axes (t = c · (K·J)^b); at fixed J, K ∝ K·J, so DPO's "
        "slope in its K pairs is the same b",
    }


# -- extrapolation ---------------------------------------------------------------------------------------------------


def extrapolate(
    growth: Mapping[str, Any],
    *,
    prompts: int = PAPER_PROMPTS,
    samples_per_prompt: int = PAPER_SAMPLES_PER_PROMPT,
    clients: int = PAPER_CLIENTS,
    nodes: Sequence[int] = PAPER_NODES,
) -> dict[str, Any]:
    """Every stage at K prompts × J samples, ``clients`` users spread evenly over each number of ``nodes``.

    From the fits of :func:`bench_round_growth` (measured at J_m = its samples-per-prompt): generate, embed at
    K·J; DPO, which trains on K pairs, at K (that is, at K·J_m on the sweep's axis). Node scoring from the
    two-variable fit of :func:`bench_scoring_growth` at U = clients / nodes users per node and K·J samples; nodes
    score in parallel, so the round waits for one node: ``total = generate + embed + score(U) + dpo``. The node's
    memory: its user-sum table ``U · 384 · 8`` bytes, plus the call's peak from the linear memory fit. Every row is
    labelled ``extrapolated``.
    """
    round_ = growth["round"]
    fits = {s: PowerLaw.from_dict(f) for s, f in round_["fits"].items()}
    scoring = growth["scoring"]
    score_fit = PowerLaw.from_dict(scoring["time_fit"])
    memory_fit = LinearFit.from_dict(scoring["memory_fit"])
    kj = prompts * samples_per_prompt
    dpo_at = prompts * int(round_["samples_per_prompt"])
    largest = {
        "samples": max(r["samples"] for r in round_["rows"]),
        "users": max(p["users"] for p in scoring["by_users"] + scoring["by_samples"]),
    }
    rows = []
    for n in nodes:
        users = clients / n
        seconds = {
            "generate": fits["generate"].predict(samples=kj),
            "embed": fits["embed"].predict(samples=kj),
            "score": score_fit.predict(users=users, samples=kj),
            "dpo": fits["dpo"].predict(samples=dpo_at),
        }
        total, shares, dominant = _shares(seconds)
        rows.append(
            {
                "label": EXTRAPOLATED,
                "nodes": n,
                "users_per_node": round(users, 1),
                "samples": kj,
                "prompts": prompts,
                "samples_per_prompt": samples_per_prompt,
                "pairs": prompts,
                "seconds": {k: sig(v, 4) for k, v in seconds.items()},
                "total_s": sig(total, 4),
                "shares": shares,
                "dominant": dominant,
                "node_user_sums_mib": round(users * EMBEDDING_DIM * 8 / _MIB, 1),
                "node_peak_call_mib": round(memory_fit.predict(users=users, samples=kj), 1),
            }
        )
    return {
        "label": EXTRAPOLATED,
        "how": f"from the measured fits: generate and embed at K·J={kj:,}; DPO at K={prompts:,} pairs (K·J="
        f"{dpo_at:,} on the sweep's J={round_['samples_per_prompt']} axis); node scoring t = c·U^a·(K·J)^b at U = "
        f"{clients:,} / nodes; nodes score in parallel (total = generate + embed + one node's scoring + DPO)",
        "largest_measured": largest,
        "rows": rows,
    }


# -- the whole comparison --------------------------------------------------------------------------------------------


def bench_growth(assets: PerfAssets, sizes: PerfSizes, *, seed: int) -> dict[str, Any]:
    """perf.json's ``growth``: scoring sweeps, round sweep, fits, paper-size extrapolation, the generated reading."""
    rng = np.random.default_rng([seed, 29])
    scoring = bench_scoring_growth(
        users=size_list("growth-users", sizes.growth_users),
        users_samples=sizes.growth_users_samples,
        samples=size_list("growth-scoring-samples", sizes.growth_scoring_samples),
        samples_users=sizes.growth_scoring_users,
        texts_per_user=sizes.growth_texts_per_user,
        repeats=sizes.repeats_growth_scoring,
        rng=rng,
    )
    round_ = bench_round_growth(
        assets,
        sizes,
        samples=size_list("growth-kj", sizes.growth_kj),
        users=sizes.growth_round_users,
        texts_per_user=sizes.growth_texts_per_user,
        repeats=sizes.repeats_growth_round,
        seed=seed,
        rng=rng,
    )
    growth: dict[str, Any] = {"scoring": scoring, "round": round_}
    growth["extrapolated"] = extrapolate(growth)
    growth["reading"] = growth_reading(growth)
    return growth


def _nodes(n: int) -> str:
    return f"{n} node" + ("s" if n != 1 else "")


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def _stage_list(row: Mapping[str, Any]) -> str:
    order = sorted(row["shares"], key=lambda s: -row["shares"][s])
    return ", ".join(f"{STAGE_LABELS[s]} {_pct(row['shares'][s])}" for s in order)


def growth_reading(growth: Mapping[str, Any]) -> list[str]:
    """The generated reading: which stage dominates at each size, the slopes, what a GPU or more nodes would change.

    Built only from the measured rows and the fits (no GPU number is invented: a GPU was not measured).
    """
    round_, scoring, extra = growth["round"], growth["scoring"], growth["extrapolated"]
    rows = round_["rows"]
    lines = [
        "Measured on this CPU, share of the round by stage: "
        + "; ".join(f"K·J={r['samples']:,}: {_stage_list(r)}" for r in rows)
        + ".",
        "Slopes (t ∝ (K·J)^b, log-log least squares): "
        + ", ".join(
            f"{STAGE_LABELS[s]} b={f['exponents'][0]:.2f}"
            + (f" ({f['slope_largest_two']:.2f} between the two largest sizes)" if "slope_largest_two" in f else "")
            for s, f in round_["fits"].items()
        )
        + ".",
    ]
    tf, mf = scoring["time_fit"], scoring["memory_fit"]
    slopes = dict(zip(mf["variables"], mf["slopes"], strict=True))
    lines.append(
        f"Node scoring: t ∝ U^{tf['exponents'][0]:.2f} · (K·J)^{tf['exponents'][1]:.2f}; peak memory of the call "
        f"≈ {mf['intercept']:.3g} MiB + {1000 * slopes['users']:.3g} MiB per 1,000 users + "
        f"{1000 * slopes['samples']:.3g} MiB per 1,000 samples (linear fit), beside the node's own user-sum table "
        f"of U·{EMBEDDING_DIM}·8 bytes."
    )
    per_user_table = EMBEDDING_DIM * 8 / _MIB
    lines.append(
        f"The call's memory grows by {slopes['users'] / per_user_table:.2f}× the user-sum table's "
        f"{EMBEDDING_DIM * 8:,} bytes per user (the sampled-user index; rows are gathered 512 at a time, never the "
        "whole table), and with K·J by the per-chunk score matrices (512 users × K·J, float64)."
    )
    ex = extra["rows"]
    lines.append(
        f"Extrapolated to the paper's size (K·J={ex[0]['samples']:,}, K={ex[0]['prompts']:,} pairs, "
        f"{PAPER_CLIENTS:,} clients; far beyond the largest measured K·J={extra['largest_measured']['samples']:,}): "
        + "; ".join(
            f"{_nodes(r['nodes'])} ({r['users_per_node']:,.0f} users each): "
            f"{STAGE_LABELS[r['dominant']]} dominates ({_stage_list(r)}), {r['total_s']:,.0f} s"
            for r in ex
        )
        + "."
    )
    largest = rows[-1]
    server = sum(largest["shares"][s] for s in ("generate", "embed", "dpo"))
    server_ex = sum(ex[0]["shares"][s] for s in ("generate", "embed", "dpo"))
    lines.append(
        "GPU: not measured (no GPU speed-up is claimed here). A GPU on the server would act on generation, "
        f"embedding and DPO: on this CPU they are {_pct(server)} of the round at K·J={largest['samples']:,} "
        f"(generation {_pct(largest['shares']['generate'])}, DPO {_pct(largest['shares']['dpo'])}, embedding "
        f"{_pct(largest['shares']['embed'])}) and {_pct(server_ex)} of the extrapolated paper-size round on 1 node; "
        f"node scoring ({_pct(largest['shares']['score'])} measured, {_pct(ex[0]['shares']['score'])} extrapolated) "
        "runs on the nodes' own hardware."
    )
    first, last = ex[0], ex[-1]
    lines.append(
        f"More nodes change only node scoring: from {first['nodes']} to {last['nodes']} nodes, users per node "
        f"{first['users_per_node']:,.0f} → {last['users_per_node']:,.0f}, one node's scoring "
        f"{first['seconds']['score']:.3g} → {last['seconds']['score']:.3g} s and its user-sum table "
        f"{first['node_user_sums_mib']:,.0f} → {last['node_user_sums_mib']:,.0f} MiB (extrapolated); generation, "
        "embedding and DPO run once on the server whatever the number of nodes."
    )
    return lines


# -- perf.md and the plots -------------------------------------------------------------------------------------------


def _s(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def growth_markdown(growth: Mapping[str, Any]) -> list[str]:
    """perf.md's "How cost grows" section: tables (measured, then extrapolated rows), plots, fits, reading."""
    round_, scoring, extra = growth["round"], growth["scoring"], growth["extrapolated"]
    stage_heads = " | ".join(f"{STAGE_LABELS[s]} s" for s in STAGES)
    lines = [
        "",
        "## How cost grows",
        "",
        f"Round stages against K·J at J={round_['samples_per_prompt']} (K = K·J / J prompts, K pairs), "
        f"≤ {round_['max_new_tokens']} new tokens, one node of {round_['users']:,} synthetic users; medians of "
        f"{round_['repeats']} run(s). {round_['what']}. Rows marked *extrapolated* were not measured: {extra['how']}.",
        "",
        f"| K·J | K | {stage_heads} | total s | dominant | measured |",
        "|---|---|" + "---|" * len(STAGES) + "---|---|---|",
    ]
    for r in round_["rows"]:
        lines.append(
            f"| {r['samples']:,} | {r['prompts']:,} | "
            + " | ".join(_s(r["seconds"][s]) for s in STAGES)
            + f" | {_s(r['total_s'])} | {STAGE_LABELS[r['dominant']]} ({_pct(r['shares'][r['dominant']])}) | yes |"
        )
    for r in extra["rows"]:
        lines.append(
            f"| {r['samples']:,} | {r['prompts']:,} | "
            + " | ".join(_s(r["seconds"][s]) for s in STAGES)
            + f" | {_s(r['total_s'])} | {STAGE_LABELS[r['dominant']]} ({_pct(r['shares'][r['dominant']])}) | "
            f"**{EXTRAPOLATED}**, {_nodes(r['nodes'])} of {r['users_per_node']:,.0f} users |"
        )
    lines += [
        "",
        f"![round stages against K·J]({ROUND_PLOT})",
        "",
        f"Node scoring: {scoring['function']}; {scoring['data']}; medians of {scoring['repeats']}; memory: "
        f"{scoring['memory']}.",
        "",
        "| users per node | K·J | seconds | peak of the call MiB | user-sum table MiB | sweep | measured |",
        "|---|---|---|---|---|---|---|",
    ]
    for sweep, points in (("users", scoring["by_users"]), ("K·J", scoring["by_samples"])):
        for p in points:
            lines.append(
                f"| {p['users']:,} | {p['samples']:,} | {_s(p['seconds'])} | {p['peak_call_mib']:,} | "
                f"{p['user_sums_mib']:,} | {sweep} | yes |"
            )
    for r in extra["rows"]:
        lines.append(
            f"| {r['users_per_node']:,.0f} | {r['samples']:,} | {_s(r['seconds']['score'])} | "
            f"{r['node_peak_call_mib']:,} | {r['node_user_sums_mib']:,} | - | "
            f"**{EXTRAPOLATED}** ({_nodes(r['nodes'])}) |"
        )
    tf, mf = scoring["time_fit"], scoring["memory_fit"]
    lines += [
        "",
        f"![node scoring against users per node and K·J]({SCORING_PLOT})",
        "",
        "Fits: "
        + "; ".join(
            f"{STAGE_LABELS[s]} t = {f['coefficient']:.3g}·(K·J)^{f['exponents'][0]:.3f} (R² on logs {f['r2_log']:.3f})"
            for s, f in round_["fits"].items()
        )
        + f" (against K·J at the round's {round_['users']:,} users); node scoring sweeps t = "
        f"{tf['coefficient']:.3g}·U^{tf['exponents'][0]:.3f}·(K·J)^{tf['exponents'][1]:.3f} "
        f"(R² on logs {tf['r2_log']:.3f}, {tf['points']} points); peak MiB = {mf['intercept']:.4g} + "
        + " + ".join(f"{m:.4g}·{v}" for v, m in zip(mf["variables"], mf["slopes"], strict=True))
        + ".",
        "",
        "Reading (generated from the rows above):",
        "",
        *[f"- {line}" for line in growth["reading"]],
    ]
    return lines


def _save(fig: Any, path: Path) -> None:
    from popri.checkpoint import atomic_open

    with atomic_open(path) as fh:  # savefig writes in place: atomic like every other artifact
        fig.savefig(fh, format="png", dpi=100)


def write_growth_plots(output: Path, growth: Mapping[str, Any]) -> list[Path]:
    """``output/growth_round.png`` (stage seconds against K·J) and ``output/growth_scoring.png`` (node scoring
    seconds and memory against users per node, seconds against K·J); log-log axes, measured points joined by solid
    lines, the fitted power laws dashed out to the paper's size, extrapolated points hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    round_, scoring, extra = growth["round"], growth["scoring"], growth["extrapolated"]
    paper = extra["rows"][0]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        xs = [r["samples"] for r in round_["rows"]]
        line = np.geomspace(min(xs), paper["samples"], 50)
        for stage in STAGES:
            fit = PowerLaw.from_dict(round_["fits"][stage])
            (points,) = ax.plot(xs, [r["seconds"][stage] for r in round_["rows"]], "o-", label=STAGE_LABELS[stage])
            ax.plot(line, [fit.predict(samples=x) for x in line], "--", color=points.get_color(), alpha=0.6)
            ax.plot([paper["samples"]], [paper["seconds"][stage]], "o", mfc="none", color=points.get_color(), ms=9)
        ax.plot(xs, [r["total_s"] for r in round_["rows"]], "k.-", label="round total")
        ax.axvline(paper["samples"], color="grey", ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"K·J samples per round (J={round_['samples_per_prompt']})")
        ax.set_ylabel("seconds")
        ax.set_title(
            f"round stages; dashed: fitted slopes; hollow: {EXTRAPOLATED} paper size\n"
            f"(K·J={paper['samples']:,}; DPO at K={paper['prompts']:,}; scoring {paper['users_per_node']:,.0f} users)",
            fontsize=9,
        )
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        _save(fig, output / ROUND_PLOT)
        written.append(output / ROUND_PLOT)
    finally:
        plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    try:
        tf = PowerLaw.from_dict(scoring["time_fit"])
        mf = LinearFit.from_dict(scoring["memory_fit"])
        by_u, by_kj = scoring["by_users"], scoring["by_samples"]
        kj0, u0 = by_u[0]["samples"], by_kj[0]["users"]
        us = [p["users"] for p in by_u]
        paper_users = [r["users_per_node"] for r in extra["rows"]]
        u_line = np.geomspace(min(us + paper_users), max(us + paper_users), 50)
        ax = axes[0]
        ax.plot(us, [p["seconds"] for p in by_u], "o-", label=f"measured, K·J={kj0:,}")
        ax.plot(u_line, [tf.predict(users=u, samples=kj0) for u in u_line], "--", alpha=0.6, label="fit")
        ax.plot(
            u_line,
            [tf.predict(users=u, samples=paper["samples"]) for u in u_line],
            "--",
            alpha=0.6,
            label=f"fit at K·J={paper['samples']:,} ({EXTRAPOLATED})",
        )
        ax.plot(
            paper_users,
            [r["seconds"]["score"] for r in extra["rows"]],
            "o",
            mfc="none",
            ms=9,
            label="paper: 72,000 clients / 1, 8, 64 nodes",
        )
        ax.set_xlabel("users per node")
        ax.set_ylabel("seconds")
        ax.set_title("node scoring time")
        ax = axes[1]
        ax.plot(us, [p["peak_call_mib"] for p in by_u], "o-", label=f"peak of the call, K·J={kj0:,}")
        ax.plot(us, [p["user_sums_mib"] for p in by_u], "s-", label="user-sum table (held)")
        ax.plot(
            u_line,
            [max(mf.predict(users=u, samples=paper["samples"]), 1e-3) for u in u_line],
            "--",
            alpha=0.6,
            label=f"linear fit at K·J={paper['samples']:,} ({EXTRAPOLATED})",
        )
        ax.plot(
            paper_users,
            [max(r["node_peak_call_mib"], 1e-3) for r in extra["rows"]],
            "o",
            mfc="none",
            ms=9,
            label="paper: 72,000 clients / 1, 8, 64 nodes",
        )
        ax.set_xlabel("users per node")
        ax.set_ylabel("MiB")
        ax.set_title("node scoring memory (tracemalloc)")
        ax = axes[2]
        kjs = [p["samples"] for p in by_kj]
        kj_line = np.geomspace(min(kjs), paper["samples"], 50)
        ax.plot(kjs, [p["seconds"] for p in by_kj], "o-", label=f"measured, {u0:,} users")
        ax.plot(
            kj_line,
            [tf.predict(users=u0, samples=x) for x in kj_line],
            "--",
            alpha=0.6,
            label=f"fit (to K·J={paper['samples']:,}: {EXTRAPOLATED})",
        )
        ax.axvline(paper["samples"], color="grey", ls=":")
        ax.set_xlabel("K·J samples")
        ax.set_ylabel("seconds")
        ax.set_title("node scoring time against K·J")
        for ax in axes:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
        fig.tight_layout()
        _save(fig, output / SCORING_PLOT)
        written.append(output / SCORING_PLOT)
    finally:
        plt.close(fig)
    return written
