"""Empirical privacy audit: a lower bound on ε of popri's own DP mechanism from a distinguishing game with a canary.

The game (Jagielski, Ullman, Oprea 2020, "Auditing Differentially Private Machine Learning: How Private is Private
SGD?", NeurIPS; Nasr, Song, Thakurta, Papernot, Carlini 2021, "Adversary Instantiation: Lower Bounds for Differentially
Private Machine Learning", IEEE S&P; Nasr et al. 2023, "Tight Auditing of Differentially Private Machine Learning",
USENIX Security):

1. Fixed, seeded data: ``users`` background users, each with a few private texts (random unit vectors in ``dim``
   dimensions), spread round-robin over ``nodes`` nodes, and per round ``samples`` synthetic-sample embeddings. One
   extra *canary* user, on the first node, owns a single private text.
2. Every trial runs the mechanism as the run does, through the real node and server code: each node is a
   :class:`popri.node.NodeScorer` (Poisson sampling of its users at rate q, clip, sum), reached through ONE adapter,
   :func:`node_reply`; central mode: the server validates and re-clips every reply
   (:func:`popri.privacy.validate_node_sum`), sums them and adds :func:`popri.privacy.gaussian_mechanism`;
   secure-aggregation mode: every node sends :func:`popri.node.secure_node_vector` (its box-projected sum plus its
   noise share) and the attacker sees only the sum.
   σ comes from :func:`popri.privacy.calibrate_noise` at (ε, δ, q, T). Half of the trials include the canary.
3. The attacker sees only the released noisy sums ``y_t`` and knows everything else (the worst case DP protects
   against), except the private bits: which trials hold the canary, which users the nodes sampled, and the noise.
   Per round it projects ``x_t = <y_t − q·B_t, d_t>`` (``B_t`` the background users' sum, ``d_t`` the canary's
   clipped vector ``c_t``, at q < 1 minus its part in the background users' span, :func:`_attack_direction`).
   The trials are split, stratified, into a *tuning* half and a *bound* half; the likelihood-ratio attack and its
   threshold are tuned only on the tuning half and the Clopper–Pearson bound is computed only on the
   bound half (no double-dipping). The Gaussian-DP bound tunes nothing and uses every trial.

The canary is the worst case the clipping allows: :func:`~popri.scoring.clip_user_scores` z-scores each row, and a
z-scored vector of length N has norm √N >= 1, so every user with non-constant scores is clipped to norm exactly 1.

Two lower bounds, each at confidence 1 − α/2 so that both hold jointly with >= 1 − α (Bonferroni); the report gives
the larger:

- **Clopper–Pearson** (non-parametric, Jagielski et al. 2020, Alg. 2). The statistic is the Neyman–Pearson optimal
  one for a Poisson-subsampled Gaussian shift, ``Λ = Σ_t log(1 − q + q·exp((a_t (x_t − m_t) − a_t²/2) / v_t))`` with
  ``a_t = <c_t, d_t>`` (the canary's shift of ``x_t``) and the per-round mean ``m_t`` and variance ``v_t`` of ``x_t``
  without the canary estimated on the tuning half (at q = 1 it is the linear statistic ``Σ_t x_t`` up to an affine
  map). The threshold and the side of the test are chosen on the tuning half; on the bound half (ε, δ)-DP implies
  ``TPR <= e^ε FPR + δ`` (or the same for the complement set), so ``ε_cp = log((TPR_lo − δ) / FPR_hi)`` with
  Clopper–Pearson ends.
- **Gaussian DP** (parametric). Where the statistic is Gaussian with the same variance in both worlds — exactly so at
  q = 1, where the background is fixed and the noise Gaussian — the linear statistic ``S = Σ_t x_t`` gives
  ``μ̂ = (mean_with − mean_without) / pooled std``; ``μ̂·sqrt(n1 n0 / (n1 + n0))`` is non-central t, which gives an
  exact lower confidence bound ``μ_lo``. A mechanism whose output post-processes to N(0, 1) vs N(μ, 1) is no better
  than μ-GDP, so ``ε_gdp = ε_μlo(δ)`` solving ``δ = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)`` (Dong, Roth, Su 2019,
  Cor. 2.13). At q < 1 the world with the canary is a mixture over the rounds it was sampled in, not a Gaussian;
  there the bound assumes what the accountant assumes — a Poisson-subsampled Gaussian at the claimed rate q — and
  estimates only its per-round ratio μ_r of shift to noise (:func:`subsampled_mu_estimate`, method of moments), then
  ``ε_gdp`` is the lower end of the PRV accountant's ε at noise multiplier 1/μ_r,lo
  (:func:`subsampled_gaussian_epsilon_lower`). That bound is only as valid as the model; the Clopper–Pearson bound
  needs no model.

The Clopper–Pearson bound is capped by the trial count: with n bound-half trials per world it is at most
``log(((α/4)^(1/n) − δ) / (1 − (α/4)^(1/n)))`` (:func:`epsilon_lower_bound_ceiling`). The parametric bound is not,
which is what lets the audit refute a claim of ε = 7 when σ is halved.

For reference the report gives the ε of the mechanism as run: at q = 1 the exact μ-GDP ε with
``μ = sqrt(Σ_t ||c_t||²) / σ`` (Balle & Wang 2018, Thm. 8); at q < 1 the PRV accountant's ε at the σ used.

Power checks, audit only, never in a normal run: ``break_mode="no-clip"`` turns the clip off for every user (the
canary then moves its node's sum by its z-score norm √N; the server's re-clip still bounds the node's total), and
``"low-noise"`` multiplies σ by ``noise_scale`` (default 0.1) while the claim stays the same. ``measure_grid`` runs
the documented grid and writes a dated results page.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import math
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import optimize, stats
from tqdm import tqdm

from popri.checkpoint import atomic_open, atomic_write_json, atomic_write_text
from popri.config import ConfigError, PrivacyConfig
from popri.node import NodeScorer, secure_node_vector
from popri.privacy import (
    SENSITIVITY,
    calibrate_noise,
    compute_epsilon,
    gaussian_mechanism,
    poisson_sample,
    validate_node_sum,
)
from popri.scoring import clip_user_scores, raw_user_scores, user_embedding_sums

logger = logging.getLogger(__name__)

BREAK_MODES = ("none", "no-clip", "low-noise")
MODES = ("central", "secagg")
DEFAULT_NOISE_SCALE = 0.1  # "low-noise" without --noise-scale runs σ·0.1


# --------------------------------------------------------------------------------------------------- statistics


def clopper_pearson(
    successes: np.ndarray | int, trials: np.ndarray | int, *, confidence: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided exact (Clopper–Pearson 1934) interval for a binomial proportion, vectorised over ``successes``.

    lower = Beta⁻¹(α/2; k, n − k + 1) (0 when k = 0), upper = Beta⁻¹(1 − α/2; k + 1, n − k) (1 when k = n), with
    α = 1 − confidence. Each end alone is a one-sided bound at level 1 − α/2.

    >>> lo, hi = clopper_pearson(0, 10, confidence=0.95)
    >>> float(lo), round(float(hi), 4)
    (0.0, 0.3085)
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    k = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    if np.any(k < 0) or np.any(k > n):
        raise ValueError("successes must lie in [0, trials]")
    alpha = 1.0 - confidence
    # Keep the Beta parameters valid where the closed-form ends (0 or 1) apply; np.where picks those instead.
    lower = np.where(k > 0, stats.beta.ppf(alpha / 2, np.maximum(k, 1.0), n - k + 1), 0.0)
    upper = np.where(k < n, stats.beta.ppf(1 - alpha / 2, k + 1, np.maximum(n - k, 1.0)), 1.0)
    return lower, upper


def epsilon_lower_bound_ceiling(*, n_with: int, n_without: int, delta: float, confidence: float = 0.95) -> float:
    """The largest ε_lb any mechanism can produce with these trial counts (perfectly separated scores).

    ``log((CP_lower(n1, n1) − δ) / CP_upper(0, n0))`` = ``log(((α/2)^(1/n1) − δ) / (1 − (α/2)^(1/n0)))``.
    """
    (lo,), _ = clopper_pearson(np.array([n_with]), n_with, confidence=confidence)
    _, (hi,) = clopper_pearson(np.array([0]), n_without, confidence=confidence)
    return float(math.log((lo - delta) / hi)) if lo > delta else 0.0


def empirical_epsilon(
    scores_with: np.ndarray, scores_without: np.ndarray, *, delta: float, confidence: float = 0.95
) -> dict[str, Any]:
    """ε lower bound from attack scores of trials with and without the canary (higher score = "present").

    ε_lb = max over thresholds τ of max(log((TPR_lo − δ)/FPR_hi), log((TNR_lo − δ)/FNR_hi)), floored at 0, where
    "present" means score >= τ and the bounds are Clopper–Pearson ends (Jagielski et al. 2020, Alg. 2).
    Returns the bound and the threshold, rates and direction that reach it.
    """
    pos = np.sort(np.asarray(scores_with, dtype=np.float64))
    neg = np.sort(np.asarray(scores_without, dtype=np.float64))
    n1, n0 = pos.size, neg.size
    if n1 == 0 or n0 == 0:
        raise ValueError("need trials both with and without the canary")
    thresholds = np.unique(np.concatenate([pos, neg, [np.inf]]))
    tp = n1 - np.searchsorted(pos, thresholds, side="left")
    fp = n0 - np.searchsorted(neg, thresholds, side="left")
    tpr_lo, _ = clopper_pearson(tp, n1, confidence=confidence)
    _, fpr_hi = clopper_pearson(fp, n0, confidence=confidence)
    tnr_lo, _ = clopper_pearson(n0 - fp, n0, confidence=confidence)
    _, fnr_hi = clopper_pearson(n1 - tp, n1, confidence=confidence)
    with np.errstate(divide="ignore", invalid="ignore"):
        eps_pos = np.where(tpr_lo > delta, np.log(np.maximum(tpr_lo - delta, 1e-300) / fpr_hi), -np.inf)
        eps_neg = np.where(tnr_lo > delta, np.log(np.maximum(tnr_lo - delta, 1e-300) / fnr_hi), -np.inf)
    i_pos, i_neg = int(np.argmax(eps_pos)), int(np.argmax(eps_neg))
    if eps_pos[i_pos] >= eps_neg[i_neg]:
        i, raw, direction = i_pos, float(eps_pos[i_pos]), "present if score >= threshold"
    else:
        i, raw, direction = i_neg, float(eps_neg[i_neg]), "absent if score < threshold (complement set)"
    # Area under the ROC curve, a threshold-free summary (Mann–Whitney U / (n1 n0)).
    ranks = stats.rankdata(np.concatenate([pos, neg]))
    auc = float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))
    return {
        "epsilon_lower_bound": max(0.0, raw) if np.isfinite(raw) else 0.0,
        "threshold": float(thresholds[i]),
        "direction": direction,
        "tpr": float(tp[i] / n1),
        "fpr": float(fp[i] / n0),
        "tpr_lower": float(tpr_lo[i]),
        "fpr_upper": float(fpr_hi[i]),
        "tnr_lower": float(tnr_lo[i]),
        "fnr_upper": float(fnr_hi[i]),
        "auc": auc,
        "roc_fpr": fp / n0,
        "roc_tpr": tp / n1,
    }


def gdp_epsilon(*, mu: float, delta: float) -> float:
    """Exact ε(δ) of a μ-GDP mechanism: the root of ``Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2) = δ`` (0 if none).

    Source: Balle & Wang 2018 ("Improving the Gaussian Mechanism for Differential Privacy", Thm. 8); Dong, Roth, Su
    2019 (Cor. 2.13). With q = 1, T Gaussian releases of a shift c_t with noise σ are μ-GDP, μ = sqrt(Σ||c_t||²)/σ.

    >>> round(gdp_epsilon(mu=1.0, delta=1e-5), 2)
    4.38
    """
    if mu <= 0:
        return 0.0
    if math.isinf(mu):
        return math.inf

    def delta_of(eps: float) -> float:
        a = stats.norm.cdf(-eps / mu + mu / 2)
        b = math.exp(eps + stats.norm.logcdf(-eps / mu - mu / 2))
        return float(a - b) - delta

    if delta_of(0.0) <= 0:
        return 0.0
    high = 1.0
    while delta_of(high) > 0:
        high *= 2
        if high > 1e4:
            return math.inf
    return float(optimize.brentq(delta_of, 0.0, high, xtol=1e-10))


def per_test_confidence(confidence: float, *, tests: int = 2) -> float:
    """Bonferroni: each of ``tests`` bounds at ``1 − (1 − confidence)/tests``; all hold jointly with ``confidence``."""
    if not 0 < confidence < 1 or tests < 1:
        raise ValueError(f"need 0 < confidence < 1 and tests >= 1, got {confidence}, {tests}")
    return 1.0 - (1.0 - confidence) / tests


def gdp_mu_estimate(
    scores_with: np.ndarray, scores_without: np.ndarray, *, confidence: float = 0.975
) -> dict[str, float]:
    """μ̂ = (mean_with − mean_without) / pooled std, and its exact one-sided lower confidence bound.

    Model: ``scores_without ~ N(m, s²)``, ``scores_with ~ N(m + μ s, s²)``, independent. Then
    ``t = μ̂ · sqrt(n1 n0 / (n1 + n0))`` is non-central t with ``n1 + n0 − 2`` degrees of freedom and non-centrality
    ``μ · sqrt(n1 n0 / (n1 + n0))`` (the standardised mean difference, Hedges & Olkin 1985, ch. 5); ``μ_lower`` is the
    non-centrality at which ``P(T >= t) = 1 − confidence``, scaled back (``mu_upper`` likewise). The pooled std uses
    ``ddof = 1`` in each world.
    """
    pos = np.asarray(scores_with, dtype=np.float64)
    neg = np.asarray(scores_without, dtype=np.float64)
    n1, n0 = pos.size, neg.size
    if n1 < 2 or n0 < 2:
        raise ValueError(f"need at least 2 scores in each world, got {n1} with and {n0} without the canary")
    if not 0.5 < confidence < 1:
        raise ValueError(f"confidence must be in (0.5, 1), got {confidence}")
    df = n1 + n0 - 2
    pooled = math.sqrt(((n1 - 1) * pos.var(ddof=1) + (n0 - 1) * neg.var(ddof=1)) / df)
    if pooled == 0:
        raise ValueError("both worlds give constant scores: the pooled standard deviation is 0")
    mu_hat = float((pos.mean() - neg.mean()) / pooled)
    scale = math.sqrt(n1 * n0 / (n1 + n0))
    t_obs = mu_hat * scale
    alpha = 1.0 - confidence

    def noncentrality(tail: float) -> float:
        # P(T >= t_obs | λ) rises with λ: find the λ where it equals ``tail``. The t is near-normal with sd <= ~1 +
        # |λ|/sqrt(2 df), so ±(10 + |t|) brackets the root.
        width = 10.0 + abs(t_obs)
        return float(
            optimize.brentq(lambda lam: stats.nct.sf(t_obs, df, lam) - tail, t_obs - width, t_obs + width, xtol=1e-8)
        )

    return {
        "mu_hat": mu_hat,
        "mu_lower": noncentrality(alpha) / scale,
        "mu_upper": noncentrality(1.0 - alpha) / scale,
        "confidence": confidence,
    }


def subsampled_mu_estimate(
    projections_with: np.ndarray,
    projections_without: np.ndarray,
    *,
    sample_rate: float,
    confidence: float = 0.975,
) -> dict[str, float]:
    """Per-round μ of a Poisson-subsampled Gaussian from the attacker's per-round projections, with a lower bound.

    Model (what the accountant assumes): each round the canary is sampled with probability q and then moves ``x_t``
    by ``a_t = μ_r s_t``, where ``s_t`` is the std of ``x_t`` without the canary. Then
    ``E[Σ_t x_t | with] − E[Σ_t x_t | without] = q μ_r Σ_t s_t``, so ``μ̂_r = Δ̂ / (q Σ_t ŝ_t)``. Lower bound: Δ at
    one-sided ``1 − α/2`` (normal, Welch standard error) over the upper ends of the ``s_t`` at ``1 − α/(2T)`` each
    (χ², Bonferroni over rounds), ``α = 1 − confidence``. Source: the method of moments on the mixture
    ``(1 − q) N(0, s²) + q N(a, s²)`` that defines the subsampled Gaussian (Mironov, Talwar, Zhang 2019).
    """
    pos = np.asarray(projections_with, dtype=np.float64)
    neg = np.asarray(projections_without, dtype=np.float64)
    if pos.ndim != 2 or neg.ndim != 2 or pos.shape[1] != neg.shape[1] or min(pos.shape[0], neg.shape[0]) < 2:
        raise ValueError("need (trials, rounds) projections with >= 2 trials in each world and the same rounds")
    if not 0 < sample_rate <= 1 or not 0.5 < confidence < 1:
        raise ValueError(f"need 0 < sample_rate <= 1 and 0.5 < confidence < 1, got {sample_rate}, {confidence}")
    n1, n0, rounds = pos.shape[0], neg.shape[0], pos.shape[1]
    alpha = 1.0 - confidence
    sum_with, sum_without = pos.sum(axis=1), neg.sum(axis=1)
    diff = float(sum_with.mean() - sum_without.mean())
    se = math.sqrt(sum_with.var(ddof=1) / n1 + sum_without.var(ddof=1) / n0)
    sd = neg.std(axis=0, ddof=1)
    # s_t upper end: sqrt((n0 − 1) ŝ² / χ²_{α/(2T)}(n0 − 1)).
    sd_upper = sd * math.sqrt((n0 - 1) / stats.chi2.ppf(alpha / (2 * rounds), n0 - 1))
    return {
        "mu_hat": diff / (sample_rate * float(sd.sum())),
        "mu_lower": float((diff - stats.norm.ppf(1 - alpha / 2) * se) / (sample_rate * float(sd_upper.sum()))),
        "confidence": confidence,
    }


def subsampled_gaussian_epsilon_lower(*, mu: float, sample_rate: float, rounds: int, delta: float) -> float:
    """A lower end of ε(δ) of T rounds of the Poisson-subsampled Gaussian with noise multiplier 1/μ at rate q.

    Uses the PRV accountant (Gopi, Lee, Wutschitz 2021, "Numerical Composition of Differential Privacy"), whose
    discretised privacy-loss distribution brackets the true ε; this returns the bracket's lower end (Opacus' public
    ``get_epsilon`` gives the upper one). At q = 1 it is the exact μ√T-GDP ε of :func:`gdp_epsilon`.
    """
    if mu <= 0:
        return 0.0
    if sample_rate >= 1.0:
        return gdp_epsilon(mu=mu * math.sqrt(rounds), delta=delta)
    from opacus.accountants import PRVAccountant

    accountant = PRVAccountant()
    accountant.history = [(1.0 / mu, sample_rate, rounds)]
    eps_error, delta_error = 0.01, delta / 1000
    with warnings.catch_warnings(), np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")  # PRV's own numerical warnings; the bracket stays valid
        dprv = accountant._get_dprv(eps_error=eps_error, delta_error=delta_error)  # the bracket's lower end
        eps_lower, _, _ = dprv.compute_epsilon(delta, delta_error, eps_error)
    return max(0.0, float(eps_lower)) if np.isfinite(eps_lower) else math.inf


def split_trials(present: np.ndarray, *, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Stratified random halves of the trials: (tuning indices, bound indices), disjoint, covering every trial.

    Each world (with / without the canary) is shuffled and cut in two, so both halves hold both worlds.
    """
    present = np.asarray(present, dtype=bool)
    tune, bound = [], []
    for world in (np.flatnonzero(present), np.flatnonzero(~present)):
        if world.size < 2:
            raise ValueError("need at least 2 trials in each world to split them into a tuning and a bound half")
        shuffled = rng.permutation(world)
        tune.append(shuffled[: shuffled.size // 2])
        bound.append(shuffled[shuffled.size // 2 :])
    return np.sort(np.concatenate(tune)), np.sort(np.concatenate(bound))


def held_out_clopper_pearson(
    tune_with: np.ndarray,
    tune_without: np.ndarray,
    bound_with: np.ndarray,
    bound_without: np.ndarray,
    *,
    delta: float,
    confidence: float,
) -> dict[str, Any]:
    """ε lower bound at a threshold and side chosen on the tuning half, evaluated on the bound half only.

    The tuning half picks τ and the side that maximise :func:`empirical_epsilon` there. On the bound half, (ε, δ)-DP
    implies ``TPR <= e^ε FPR + δ`` (side "present if score >= τ") or ``TNR <= e^ε FNR + δ`` (the complement set), so
    ``ε_lb = max(0, log((TPR_lo − δ) / FPR_hi))`` (or the complement's), with two-sided Clopper–Pearson ends at
    ``confidence`` (each end one-sided at ``1 − (1 − confidence)/2``; the pair holds jointly with ``confidence``).
    Source: Jagielski et al. 2020, Alg. 2, with the threshold chosen on held-out trials.
    """
    tuned = empirical_epsilon(tune_with, tune_without, delta=delta, confidence=confidence)
    threshold, complement = tuned["threshold"], tuned["direction"].startswith("absent")
    pos, neg = np.asarray(bound_with, dtype=np.float64), np.asarray(bound_without, dtype=np.float64)
    n1, n0 = pos.size, neg.size
    tp, fp = int(np.sum(pos >= threshold)), int(np.sum(neg >= threshold))
    if complement:  # the rejection set is "score < τ": its rates are TNR (without) against FNR (with)
        (hit_lo,), _ = clopper_pearson(np.array([n0 - fp]), n0, confidence=confidence)
        _, (miss_hi,) = clopper_pearson(np.array([n1 - tp]), n1, confidence=confidence)
    else:
        (hit_lo,), _ = clopper_pearson(np.array([tp]), n1, confidence=confidence)
        _, (miss_hi,) = clopper_pearson(np.array([fp]), n0, confidence=confidence)
    bound = math.log((hit_lo - delta) / miss_hi) if hit_lo > delta and miss_hi > 0 else 0.0
    return {
        "epsilon_lower_bound": max(0.0, bound),
        "threshold": float(threshold),
        "direction": tuned["direction"],
        "tpr": tp / n1,
        "fpr": fp / n0,
        "rate_lower": float(hit_lo),
        "rate_upper": float(miss_hi),
        "tuning_epsilon": tuned["epsilon_lower_bound"],
    }


# ------------------------------------------------------------------------------------------------------- the game


def node_reply(
    scorer: NodeScorer,
    sample_embeddings: np.ndarray,
    *,
    sample_rate: float,
    rng: np.random.Generator,
    noise_share: tuple[float, int] | None = None,
    clipping_range: float = PrivacyConfig().secagg_clipping_range,
) -> tuple[np.ndarray, int]:
    """What one node sends in a round, as the ClientApp computes it: the one place the audit reaches node code.

    Central mode (``noise_share=None``): ``NodeScorer.score`` — the sum over Poisson-sampled users (rate q) of their
    clipped score vectors, and how many were sampled. Secure-aggregation mode (``noise_share=(σ, min_replies)``):
    :func:`popri.node.secure_node_vector` of that sum — projected onto the SecAgg+ box, plus the node's share
    N(0, σ²/min_replies) — as the ClientApp's ``train`` handler sends it. Sampling and noise use two independent
    streams spawned from ``rng``, as :func:`popri.node.node_generators` gives the ClientApp.
    """
    sampling_rng, noise_rng = rng.spawn(2)
    node_sum, sampled = scorer.score(sample_embeddings, sample_rate=sample_rate, rng=sampling_rng)
    if noise_share is None:
        return node_sum, sampled
    noise_multiplier, min_replies = noise_share
    vector = secure_node_vector(
        node_sum=node_sum,
        noise_multiplier=noise_multiplier,
        min_replies=min_replies,
        clipping_range=clipping_range,
        rng=noise_rng,
    )
    return vector, sampled


class _UnclippedScorer(NodeScorer):
    """``--break no-clip`` only: a node that sums its sampled users' z-scores without the clip (max_norm = ∞)."""

    def score(
        self, sample_embeddings: np.ndarray, *, sample_rate: float, rng: np.random.Generator
    ) -> tuple[np.ndarray, int]:
        users = poisson_sample(num_users=self.num_users, sample_rate=sample_rate, rng=rng)
        raw_scores = raw_user_scores(sample_embeddings, self.user_sums[users])
        return clip_user_scores(raw_scores, max_norm=np.inf).sum(axis=0), int(users.size)


def _unit_rows(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((rows, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _release(
    scorers: list[NodeScorer],
    sample_embeddings: np.ndarray,
    *,
    mode: str,
    sample_rate: float,
    noise_multiplier: float,
    min_replies: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """One round's released vector: what the server publishes (central) or unmasks (secagg)."""
    n = sample_embeddings.shape[0]
    if mode == "secagg":  # each node noises its own sum; SecAgg+ reveals only the total
        share = (noise_multiplier, min_replies)
        return sum(
            (node_reply(s, sample_embeddings, sample_rate=sample_rate, rng=rng, noise_share=share)[0] for s in scorers),
            start=np.zeros(n),
        )
    summed_scores = np.zeros(n)
    for scorer in scorers:  # the server validates and re-clips every reply, then noises the total once
        node_sum, sampled = node_reply(scorer, sample_embeddings, sample_rate=sample_rate, rng=rng)
        summed_scores += validate_node_sum(node_sum, expected_len=n, num_users=sampled)
    return gaussian_mechanism(
        summed_scores=summed_scores, noise_multiplier=noise_multiplier, sensitivity=SENSITIVITY, rng=rng
    )


def _user_vectors(sample_embeddings: np.ndarray, user_sums: np.ndarray, *, break_mode: str) -> np.ndarray:
    """Every background user's clipped score vector (unclipped for ``no-clip``): what the attacker can compute."""
    max_norm = np.inf if break_mode == "no-clip" else 1.0
    return clip_user_scores(raw_user_scores(sample_embeddings, user_sums), max_norm=max_norm)


def _attack_direction(canary_vector: np.ndarray, user_vectors: np.ndarray, *, sample_rate: float) -> np.ndarray:
    """The direction the attacker projects the release on: ``c_t`` at q = 1, else ``c_t`` minus its projection on
    the background users' span.

    At q = 1 the background sum is known exactly and subtracted. At q < 1 which background users were sampled is
    secret, and their random sum along ``c_t`` would hide the canary; the part of ``c_t`` orthogonal to every
    background vector sees none of it (when the users span the whole space, nothing is left and ``c_t`` is kept).
    """
    if sample_rate >= 1.0 or user_vectors.shape[0] == 0:
        return canary_vector
    coef, *_ = np.linalg.lstsq(user_vectors.T, canary_vector, rcond=None)
    orthogonal = canary_vector - user_vectors.T @ coef
    if np.linalg.norm(orthogonal) < 1e-6 * np.linalg.norm(canary_vector):
        return canary_vector
    return orthogonal


def play_game(
    *,
    noise_multiplier: float,
    rounds: int,
    trials: int,
    samples: int,
    users: int,
    dim: int,
    break_mode: str,
    rng: np.random.Generator,
    progress: bool = False,
    mode: str = "central",
    nodes: int = 1,
    min_replies: int = 1,
    sample_rate: float = 1.0,
) -> dict[str, Any]:
    """Run the distinguishing game through the node and server code; return what the attacker sees, per trial.

    ``noise_multiplier`` is the σ actually used (already scaled for ``low-noise``). ``rng`` draws the data, the
    canary, which trials hold it, then every trial's user sampling and noise. Returns ``present`` (trials,),
    ``projections`` (trials, rounds) with ``x_t = <y_t − q·B_t, d_t>`` (``d_t``: :func:`_attack_direction`), ``shifts``
    ``a_t = <c_t, d_t>`` (how far ``x_t`` moves when the canary is sampled), ``canary_norms`` ``||c_t||`` and the
    linear statistic ``Σ_t x_t`` split into ``scores_with`` / ``scores_without``.
    """
    if break_mode not in BREAK_MODES:
        raise ValueError(f"break_mode must be one of {BREAK_MODES}, got {break_mode!r}")
    if mode not in MODES or nodes < 1 or not 1 <= min_replies <= nodes:
        raise ValueError(f"need mode in {MODES} and 1 <= min_replies <= nodes, got {mode!r}, {min_replies}, {nodes}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if users < nodes:
        raise ValueError(f"need at least one background user per node, got {users} users for {nodes} nodes")
    # Background users: 1..20 private texts each (varied, like characters of a play); the canary has one.
    counts = rng.integers(1, 21, size=users)
    user_index = np.repeat(np.arange(users), counts)
    background = user_embedding_sums(_unit_rows(rng, int(counts.sum()), dim), user_index, users)
    canary = user_embedding_sums(_unit_rows(rng, 1, dim), np.zeros(1, dtype=np.int64), 1)
    sample_sets = [_unit_rows(rng, samples, dim) for _ in range(rounds)]
    present = np.zeros(trials, dtype=bool)
    present[: trials // 2] = True
    rng.shuffle(present)

    scorer_type = _UnclippedScorer if break_mode == "no-clip" else NodeScorer
    node_of_user = np.arange(users) % nodes
    without_canary = [scorer_type(background[node_of_user == i]) for i in range(nodes)]
    with_canary = [scorer_type(np.vstack([background[node_of_user == 0], canary])), *without_canary[1:]]
    # The attacker's knowledge: the canary's own vector c_t and the expected background q·B_t (q = 1 samples
    # everyone and draws nothing from the generator).
    everyone = np.random.Generator(np.random.PCG64(0))
    canary_vectors = np.stack([scorer_type(canary).score(e, sample_rate=1.0, rng=everyone)[0] for e in sample_sets])
    expected_background = np.stack(
        [sample_rate * sum(s.score(e, sample_rate=1.0, rng=everyone)[0] for s in without_canary) for e in sample_sets]
    )
    canary_norms = np.linalg.norm(canary_vectors, axis=1)
    if break_mode != "no-clip" and not np.allclose(canary_norms, 1.0, atol=1e-9):
        raise RuntimeError(f"canary is not at the clip bound: norms {canary_norms}")
    directions = np.stack(
        [
            _attack_direction(c, _user_vectors(e, background, break_mode=break_mode), sample_rate=sample_rate)
            for c, e in zip(canary_vectors, sample_sets, strict=True)
        ]
    )
    shifts = np.einsum("tn,tn->t", canary_vectors, directions)  # E[x_t] moves by a_t when the canary is sampled

    projections = np.empty((trials, rounds))
    for k in tqdm(range(trials), desc="audit", unit="trial", disable=not progress):
        world = with_canary if present[k] else without_canary
        for t, emb in enumerate(sample_sets):
            released = _release(
                world,
                emb,
                mode=mode,
                sample_rate=sample_rate,
                noise_multiplier=noise_multiplier,
                min_replies=min_replies,
                rng=rng,
            )
            projections[k, t] = (released - expected_background[t]) @ directions[t]  # it sees only `released`
    linear = projections.sum(axis=1)
    return {
        "present": present,
        "projections": projections,
        "shifts": shifts,
        "canary_norms": canary_norms,
        "scores_with": linear[present],
        "scores_without": linear[~present],
    }


def likelihood_ratio_scores(
    projections: np.ndarray, present: np.ndarray, shifts: np.ndarray, *, tune: np.ndarray, sample_rate: float
) -> np.ndarray:
    """The attacker's statistic per trial, tuned on the trials in ``tune`` only.

    ``Λ = Σ_t log(1 − q + q·exp((a_t (x_t − m_t) − a_t²/2) / v_t))`` with ``a_t`` the canary's shift: the
    log-likelihood ratio of a canary sampled with probability q each round against none, when ``x_t`` is N(m_t, v_t)
    without the canary and N(m_t + a_t, v_t) with it (Neyman–Pearson optimal for that model). ``m_t`` and ``v_t`` are
    estimated from the tuning trials without the canary, so a mechanism with the wrong noise is attacked with its
    real noise level.
    """
    tune_without = projections[tune][~present[tune]]
    if tune_without.shape[0] < 2:
        raise ValueError("the tuning half needs at least 2 trials without the canary")
    mean, var = tune_without.mean(axis=0), np.maximum(tune_without.var(axis=0, ddof=1), 1e-300)
    z = (shifts * (projections - mean) - shifts**2 / 2) / var
    with np.errstate(divide="ignore"):
        return np.logaddexp(math.log1p(-sample_rate) if sample_rate < 1 else -np.inf, math.log(sample_rate) + z).sum(
            axis=1
        )


# ------------------------------------------------------------------------------------------------------ the audit


@dataclass(frozen=True)
class AuditConfig:
    """One audit: the claim it tests, the game's size, the deployment it mimics and the break it plants."""

    epsilon: float
    delta: float
    rounds: int
    trials: int
    break_mode: str = "none"
    noise_scale: float = DEFAULT_NOISE_SCALE
    seed: int = 0
    samples: int = 64
    users: int = 5
    dim: int = 64
    confidence: float = 0.95
    accountant: str = "rdp"
    mode: str = "central"
    nodes: int = 1
    min_replies: int = 1
    sample_rate: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        if self.epsilon <= 0 or not 0 < self.delta < 1:
            problems.append(f"need epsilon > 0 and 0 < delta < 1, got {self.epsilon}, {self.delta}")
        if self.rounds < 1 or self.trials < 8 or self.samples < 2 or self.users < 0 or self.dim < 2:
            problems.append("need rounds >= 1, trials >= 8, samples >= 2, users >= 0, dim >= 2")
        if self.break_mode not in BREAK_MODES:
            problems.append(f"break must be one of {BREAK_MODES}, got {self.break_mode!r}")
        if not self.noise_scale > 0:
            problems.append(f"noise-scale must be > 0, got {self.noise_scale}")
        if self.break_mode != "low-noise" and self.noise_scale != DEFAULT_NOISE_SCALE:
            problems.append("noise-scale applies only with --break low-noise")
        if not 0 < self.confidence < 1:
            problems.append(f"confidence must be in (0, 1), got {self.confidence}")
        if self.mode not in MODES:
            problems.append(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.nodes < 1 or not 1 <= self.min_replies <= self.nodes or self.users < self.nodes:
            problems.append(
                f"need 1 <= min-replies <= nodes <= users, got {self.min_replies}, {self.nodes}, {self.users}"
            )
        if not 0 < self.sample_rate <= 1:
            problems.append(f"sample-rate must be in (0, 1], got {self.sample_rate}")
        if problems:
            raise ConfigError("audit settings: " + "; ".join(problems))

    @property
    def sigma_factor(self) -> float:
        """The factor on the calibrated σ that the game actually uses (1 unless ``break_mode == "low-noise"``)."""
        return self.noise_scale if self.break_mode == "low-noise" else 1.0


def evaluate_game(game: dict[str, Any], *, config: AuditConfig, rng: np.random.Generator) -> dict[str, Any]:
    """Both lower bounds from a played game; report the larger.

    Clopper–Pearson: split, tune the attack and its threshold on one half, bound on the other. Gaussian DP: the
    linear statistic and its directions are fixed before any trial is seen, so it has nothing to tune and uses all
    trials.

    Each bound is at confidence :func:`per_test_confidence` (Bonferroni over the two), so the reported maximum holds
    with ``config.confidence``. The parametric bound is exact μ-GDP at q = 1 and model-based at q < 1 (see the
    module docstring).
    """
    present, q = game["present"], config.sample_rate
    tune, bound = split_trials(present, rng=rng)
    per_test = per_test_confidence(config.confidence, tests=2)
    attack = likelihood_ratio_scores(game["projections"], present, game["shifts"], tune=tune, sample_rate=q)
    tune_present, bound_present = present[tune], present[bound]
    cp = held_out_clopper_pearson(
        attack[tune][tune_present],
        attack[tune][~tune_present],
        attack[bound][bound_present],
        attack[bound][~bound_present],
        delta=config.delta,
        confidence=per_test,
    )
    # The parametric bound tunes nothing (S and d_t are fixed before any trial is seen), so it may use every trial.
    projections = game["projections"]
    if q >= 1.0:  # exact: the linear statistic is Gaussian with equal variances in both worlds
        linear = projections.sum(axis=1)
        mu = gdp_mu_estimate(linear[present], linear[~present], confidence=per_test)
        eps_gdp = gdp_epsilon(mu=max(mu["mu_lower"], 0.0), delta=config.delta)
        mu["mu_round_lower"] = mu["mu_lower"] / math.sqrt(config.rounds)
    else:  # model-based: a subsampled Gaussian at rate q whose per-round noise-to-shift ratio is estimated
        mu = subsampled_mu_estimate(projections[present], projections[~present], sample_rate=q, confidence=per_test)
        mu["mu_upper"] = math.nan
        mu["mu_round_lower"] = mu["mu_lower"]
        eps_gdp = subsampled_gaussian_epsilon_lower(
            mu=max(mu["mu_lower"], 0.0), sample_rate=q, rounds=config.rounds, delta=config.delta
        )
    n1, n0 = int(bound_present.sum()), int((~bound_present).sum())
    roc = empirical_epsilon(attack[bound][bound_present], attack[bound][~bound_present], delta=config.delta)
    reported = max(cp["epsilon_lower_bound"], eps_gdp)
    return {
        "epsilon_lower_bound": reported,
        "epsilon_lower_bound_cp": cp["epsilon_lower_bound"],
        "epsilon_lower_bound_gdp": eps_gdp,
        "parametric_model": "mu-GDP of the linear statistic" if q >= 1.0 else "subsampled Gaussian at rate q",
        "bound_source": "gdp" if eps_gdp > cp["epsilon_lower_bound"] else "clopper-pearson",
        "gdp_mu_hat": mu["mu_hat"],
        "gdp_mu_lower": mu["mu_lower"],
        "gdp_mu_upper": mu["mu_upper"],
        "gdp_mu_round_lower": mu["mu_round_lower"],
        "per_test_confidence": per_test,
        "epsilon_lower_bound_ceiling": epsilon_lower_bound_ceiling(
            n_with=n1, n_without=n0, delta=config.delta, confidence=per_test
        ),
        "threshold": cp["threshold"],
        "direction": cp["direction"],
        "tpr": cp["tpr"],
        "fpr": cp["fpr"],
        "rate_lower": cp["rate_lower"],
        "rate_upper": cp["rate_upper"],
        "epsilon_lower_bound_tuning_half": cp["tuning_epsilon"],
        "auc": roc["auc"],
        "tuning_trials": int(tune.size),
        "bound_trials": int(bound.size),
        "bound_trials_with_canary": n1,
        "bound_trials_without_canary": n0,
        "_attack": attack,
        "_bound": bound,
        "_roc": roc,
    }


def run_audit(
    *,
    epsilon: float,
    delta: float,
    rounds: int,
    trials: int,
    break_mode: str,
    seed: int,
    output_dir: str | Path | None,
    progress: bool = True,
    noise_scale: float | None = None,
    samples: int = 64,
    users: int = 5,
    dim: int = 64,
    confidence: float = 0.95,
    accountant: str = "rdp",
    mode: str = "central",
    nodes: int = 1,
    min_replies: int | None = None,
    sample_rate: float = 1.0,
) -> dict[str, Any]:
    """Audit popri's mechanism calibrated for (``epsilon``, ``delta``, q, T); write the report unless ``output_dir``
    is None.

    σ = :func:`popri.privacy.calibrate_noise` at ``sample_rate`` and ``rounds``; the claimed ε is
    :func:`popri.privacy.compute_epsilon` at that σ. ``min_replies`` defaults to ``nodes``. Writes
    ``output_dir/audit.json`` and ``output_dir/audit.png`` and returns the JSON's content.
    """
    config = AuditConfig(
        epsilon=epsilon,
        delta=delta,
        rounds=rounds,
        trials=trials,
        break_mode=break_mode,
        noise_scale=DEFAULT_NOISE_SCALE if noise_scale is None else noise_scale,
        seed=seed,
        samples=samples,
        users=users,
        dim=dim,
        confidence=confidence,
        accountant=accountant,
        mode=mode,
        nodes=nodes,
        min_replies=nodes if min_replies is None else min_replies,
        sample_rate=sample_rate,
    )
    return audit(config, output_dir=output_dir, progress=progress)


def audit(config: AuditConfig, *, output_dir: str | Path | None, progress: bool = False) -> dict[str, Any]:
    """Play and evaluate one audit (see :func:`run_audit`)."""
    started = time.perf_counter()
    q = config.sample_rate
    sigma = calibrate_noise(
        epsilon=config.epsilon, delta=config.delta, sample_rate=q, rounds=config.rounds, accountant=config.accountant
    )
    claimed = compute_epsilon(
        noise_multiplier=sigma, delta=config.delta, sample_rate=q, rounds=config.rounds, accountant=config.accountant
    )
    sigma_used = sigma * config.sigma_factor
    logger.info(
        "audit: epsilon=%.4g delta=%.3g q=%g T=%d sigma=%.4g (used %.4g) break=%s mode=%s, %d node(s)",
        claimed,
        config.delta,
        q,
        config.rounds,
        sigma,
        sigma_used,
        config.break_mode,
        config.mode,
        config.nodes,
    )
    game_rng, split_rng = np.random.Generator(np.random.PCG64(config.seed)).spawn(2)
    game = play_game(
        noise_multiplier=sigma_used,
        rounds=config.rounds,
        trials=config.trials,
        samples=config.samples,
        users=config.users,
        dim=config.dim,
        break_mode=config.break_mode,
        rng=game_rng,
        progress=progress,
        mode=config.mode,
        nodes=config.nodes,
        min_replies=config.min_replies,
        sample_rate=q,
    )
    found = evaluate_game(game, config=config, rng=split_rng)
    mu = float(np.sqrt(np.sum(game["canary_norms"] ** 2)) / sigma_used)
    if q >= 1.0:
        reference, reference_method = gdp_epsilon(mu=mu, delta=config.delta), "exact mu-GDP (q = 1)"
    else:
        reference = compute_epsilon(
            noise_multiplier=sigma_used / float(np.max(game["canary_norms"])),
            delta=config.delta,
            sample_rate=q,
            rounds=config.rounds,
            accountant="prv",
        )
        reference_method = "PRV accountant at the sigma used"
    settings = asdict(config)
    settings["break"] = settings.pop("break_mode")
    result: dict[str, Any] = {
        "epsilon_claimed": claimed,
        "epsilon_lower_bound": found["epsilon_lower_bound"],
        "lower_bound_exceeds_claim": found["epsilon_lower_bound"] > claimed,
        **{k: v for k, v in found.items() if not k.startswith("_") and k != "epsilon_lower_bound"},
        "epsilon_mechanism": reference,
        "epsilon_mechanism_method": reference_method,
        "epsilon_exact_gdp": reference if q >= 1.0 else None,
        "gdp_mu": mu if q >= 1.0 else None,
        "trials_with_canary": int(game["present"].sum()),
        "trials_without_canary": int((~game["present"]).sum()),
        "epsilon_target": config.epsilon,
        "noise_multiplier": sigma,
        "noise_multiplier_used": sigma_used,
        "canary_norm": float(np.mean(game["canary_norms"])),
        **settings,
        "nodes": config.nodes,
        "min_replies": config.min_replies if config.mode == "secagg" else None,
        "statistic": "tuned on half the trials: sum_t log(1 - q + q exp((a_t (x_t - m_t) - a_t^2/2) / v_t)), "
        "x_t = <released_t - q B_t, c_t>",
        "bound_formula": "max(CP: log((TPR_lo - delta)/FPR_hi) at the tuned threshold on the bound half; "
        "GDP: eps(mu_lower, delta), q = 1 only), each at per_test_confidence (Bonferroni)",
        "seconds": round(time.perf_counter() - started, 3),
    }
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "audit.json", result)
        _plot(out / "audit.png", game=game, found=found, result=result)
    logger.info(
        "audit: epsilon lower bound %.3f (CP %.3f, GDP %s) vs claimed %.3f -> %s",
        result["epsilon_lower_bound"],
        result["epsilon_lower_bound_cp"],
        "n/a" if result["epsilon_lower_bound_gdp"] is None else f"{result['epsilon_lower_bound_gdp']:.3f}",
        claimed,
        "FLAGGED" if result["lower_bound_exceeds_claim"] else "not flagged",
    )
    return result


def _plot(path: Path, *, game: dict[str, Any], found: dict[str, Any], result: dict[str, Any]) -> None:
    """Bound-half histograms of the attack statistic in both worlds, and the bound half's ROC against the (ε, δ)
    boundary TPR = e^ε FPR + δ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bound = found["_bound"]
    attack, present = found["_attack"][bound], game["present"][bound]
    fig, (ax_h, ax_r) = plt.subplots(1, 2, figsize=(11, 4.2))
    finite = attack[np.isfinite(attack)]
    bins = np.linspace(finite.min(), finite.max(), 60)
    ax_h.hist(attack[~present], bins=bins, alpha=0.6, label="without canary")
    ax_h.hist(attack[present], bins=bins, alpha=0.6, label="with canary")
    ax_h.axvline(found["threshold"], color="k", ls="--", lw=1, label="threshold (tuning half)")
    ax_h.set_xlabel("attack statistic Λ (bound half)")
    ax_h.set_ylabel("trials")
    ax_h.legend()
    ax_h.set_title(
        f"break={result['break']}, σ used={result['noise_multiplier_used']:.3g}, q={result['sample_rate']:g}, "
        f"T={result['rounds']}"
    )

    roc = found["_roc"]
    ax_r.plot(np.clip(roc["roc_fpr"], 1e-5, 1), roc["roc_tpr"], label=f"empirical ROC (AUC {roc['auc']:.3f})")
    grid = np.logspace(-5, 0, 200)
    for eps, style, name in (
        (result["epsilon_claimed"], "-", "claimed"),
        (result["epsilon_lower_bound"], ":", "lower bound"),
    ):
        ax_r.plot(
            grid,
            np.minimum(1, np.exp(eps) * grid + result["delta"]),
            ls=style,
            color="gray",
            label=f"TPR = e^ε·FPR + δ, {name} ε = {eps:.2f}",
        )
    ax_r.set_xscale("log")
    ax_r.set_xlabel("false positive rate (0 drawn at 1e-5)")
    ax_r.set_ylabel("true positive rate")
    ax_r.set_ylim(0, 1.02)
    ax_r.legend(fontsize=8, loc="upper left")
    ax_r.set_title(
        f"ε_lb = {result['epsilon_lower_bound']:.2f} ({result['confidence']:.0%}, {result['bound_source']}), "
        f"claimed {result['epsilon_claimed']:.2f}"
    )
    fig.tight_layout()
    try:
        with atomic_open(path) as fh:
            fig.savefig(fh, format="png", dpi=110)
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------------------------------- the grid

GRID_SETTINGS = (  # (mode, nodes, sample rate): the deployments measured in docs/audit.md
    ("central", 1, 1.0),
    ("secagg", 3, 1.0),
    ("central", 1, 0.1),
    ("secagg", 3, 0.1),
)
GRID_EPSILONS = (1.0, 7.0)
GRID_NOISE = (("none", 1.0), ("low-noise", 0.5), ("low-noise", 0.1))  # (break, σ factor)


def _git_commit() -> str:
    """Short commit of the working tree, with ``+dirty`` when tracked files differ from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], capture_output=True).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def measure_grid(
    *,
    output_dir: str | Path,
    trials: int,
    rounds: int,
    delta: float,
    seed: int,
    samples: int = 64,
    users: int = 5,
    dim: int = 64,
    confidence: float = 0.95,
    progress: bool = False,
) -> dict[str, Any]:
    """Audit every row of the documented grid and write ``output_dir/<date>-<commit>.{json,md}``.

    Rows: real σ, σ/2 and σ/10 at ε in {1, 7}, for central and secagg (3 nodes) at q = 1 and q = 0.1.
    """
    date, commit = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"), _git_commit()
    rows = []
    for mode, nodes, q in GRID_SETTINGS:
        for eps in GRID_EPSILONS:
            for break_mode, factor in GRID_NOISE:
                row = run_audit(
                    epsilon=eps,
                    delta=delta,
                    rounds=rounds,
                    trials=trials,
                    break_mode=break_mode,
                    noise_scale=factor if break_mode == "low-noise" else None,
                    seed=seed,
                    output_dir=None,
                    progress=progress,
                    samples=samples,
                    users=users,
                    dim=dim,
                    confidence=confidence,
                    mode=mode,
                    nodes=nodes,
                    sample_rate=q,
                )
                row["sigma_factor"] = factor
                rows.append(row)
    report = {"date": date, "commit": commit, "command": " ".join(["popri", "audit", *sys.argv[1:]]), "rows": rows}
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{date}-{commit}"
    atomic_write_json(out / f"{stem}.json", report)
    atomic_write_text(out / f"{stem}.md", _grid_markdown(report))
    logger.info("audit grid: %d rows -> %s", len(rows), out / f"{stem}.md")
    return report


def _grid_markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    first = rows[0]
    lines = [
        f"# Privacy audit grid, {report['date']}, commit {report['commit']}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Settings: T = {first['rounds']}, δ = {first['delta']:g}, {first['trials']} trials per row (Clopper–Pearson: "
        "half tune the attack and threshold, half give the bound; GDP: all trials), "
        f"{first['samples']} samples of dimension {first['dim']}, {first['users']} background users, "
        f"seed {first['seed']}, RDP accountant; reported bound = max(Clopper–Pearson, GDP), each at "
        f"{first['per_test_confidence']:.1%} (Bonferroni: {first['confidence']:.0%} jointly). The parametric "
        "bound is μ-GDP of the linear statistic at q = 1 (μ̂ over all T rounds) and a subsampled Gaussian at rate q "
        "with an estimated per-round μ at q < 1 (μ̂ per round). ε mechanism: exact μ-GDP at q = 1, PRV at "
        "q < 1, at the σ used.",
        "",
        "| mode | q | target ε | σ factor | σ used | ε claimed | ε mechanism | ε_lb CP | ceiling CP | μ̂ [μ_lo] "
        "| ε_lb GDP | **ε lower bound** | flagged | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gdp = f"{r['epsilon_lower_bound_gdp']:.3f}"
        mode = r["mode"] + (f" ×{r['nodes']}" if r["mode"] == "secagg" else "")
        lines.append(
            f"| {mode} | {r['sample_rate']:g} | {r['epsilon_target']:g} | {r['sigma_factor']:g} "
            f"| {r['noise_multiplier_used']:.4g} | {r['epsilon_claimed']:.3f} | {r['epsilon_mechanism']:.3g} "
            f"| {r['epsilon_lower_bound_cp']:.3f} | {r['epsilon_lower_bound_ceiling']:.2f} "
            f"| {r['gdp_mu_hat']:.3f} [{r['gdp_mu_lower']:.3f}] | {gdp} | **{r['epsilon_lower_bound']:.3f}** "
            f"| {'**yes**' if r['lower_bound_exceeds_claim'] else 'no'} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------- the CLI


def _handle(args: argparse.Namespace) -> int:
    """``popri audit`` handler: run the audit (or the whole grid with ``--grid``); returns the exit status."""
    if args.grid:
        measure_grid(
            output_dir=args.output,
            trials=args.trials,
            rounds=args.rounds,
            delta=args.delta,
            seed=args.seed,
            samples=args.samples,
            users=args.users,
            progress=not args.no_progress,
        )
        return 0
    run_audit(
        epsilon=args.epsilon,
        delta=args.delta,
        rounds=args.rounds,
        trials=args.trials,
        break_mode=args.break_mode,
        noise_scale=args.noise_scale,
        seed=args.seed,
        output_dir=args.output,
        progress=not args.no_progress,
        samples=args.samples,
        users=args.users,
        mode=args.mode,
        nodes=args.nodes if args.mode == "secagg" else 1,
        min_replies=args.min_replies,
        sample_rate=args.sample_rate,
    )
    return 0


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``audit`` on an argparse subparsers object; the handler is ``args.func(args)``."""
    parser = subparsers.add_parser(
        "audit",
        help="empirical lower bound on epsilon of popri's DP mechanism (canary distinguishing game)",
        description=(
            "Run popri's node scoring (Poisson sampling, clipping), the server's re-clip and the Gaussian mechanism "
            "(or the nodes' secure-aggregation noise shares) over T rounds on seeded random embeddings, many times "
            "with and without a worst-case canary user. Half the trials tune the attack, the other half give two "
            "epsilon lower bounds (Clopper-Pearson and Gaussian-DP, Bonferroni-corrected); the larger is reported. "
            "Writes DIR/audit.json and DIR/audit.png, or with --grid the dated results page DIR/<date>-<commit>.md."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for audit.json and audit.png")
    parser.add_argument("--epsilon", type=float, default=1.0, help="target epsilon the noise is calibrated for")
    parser.add_argument("--delta", type=float, default=3e-6, help="delta of the claim and of the bound")
    parser.add_argument("--rounds", type=int, default=20, help="T, rounds composed")
    parser.add_argument("--trials", type=int, default=2000, help="games played, half with the canary")
    parser.add_argument("--sample-rate", type=float, default=1.0, help="q, the Poisson rate each node samples users at")
    parser.add_argument(
        "--break",
        dest="break_mode",
        choices=BREAK_MODES,
        default="none",
        help="audit a deliberately broken mechanism to check the audit's power: no-clip (clip off) or low-noise "
        "(sigma times --noise-scale); none audits the real mechanism",
    )
    parser.add_argument(
        "--noise-scale",
        type=float,
        default=None,
        metavar="F",
        help=f"with --break low-noise: run sigma*F (default {DEFAULT_NOISE_SCALE:g}); 0.5 halves the noise",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the canary, the sampling and the noise")
    parser.add_argument("--samples", type=int, default=64, help="N, synthetic samples scored per round")
    parser.add_argument("--users", type=int, default=5, help="background users besides the canary")
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="central",
        help="central: one node, the server re-clips and noises the sum; secagg: every node adds its noise share "
        "and the attacker sees the total",
    )
    parser.add_argument("--nodes", type=int, default=3, help="secagg: nodes whose noisy vectors are summed")
    parser.add_argument(
        "--min-replies", type=int, default=None, help="secagg: min-replies the shares assume (default: --nodes)"
    )
    parser.add_argument(
        "--grid",
        action="store_true",
        help="measure the documented grid (modes x q x epsilon x noise) and write DIR/<date>-<commit>.{md,json}",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=_handle)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m popri.audit ...``: the same flags as ``popri audit``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="popri")
    sub = parser.add_subparsers(dest="command", required=True)
    add_subparser(sub)
    args = parser.parse_args(["audit", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
