"""Empirical privacy audit: a lower bound on ε of popri's own DP mechanism from a distinguishing game with a canary.

The game (Jagielski, Ullman, Oprea 2020, "Auditing Differentially Private Machine Learning: How Private is Private
SGD?", NeurIPS; Nasr, Song, Thakurta, Papernot, Carlini 2021, "Adversary Instantiation: Lower Bounds for Differentially
Private Machine Learning", IEEE S&P; Nasr et al. 2023, "Tight Auditing of Differentially Private Machine Learning",
USENIX Security):

1. Fixed, seeded data: ``users`` background users, each with a few private texts (random unit vectors in ``dim``
   dimensions), and per round ``samples`` synthetic-sample embeddings (random unit vectors). One extra *canary* user
   owns a single private text (a seeded random unit vector).
2. Every trial runs the mechanism exactly as clients and server run it, with popri's own functions:
   :func:`popri.scoring.user_embedding_sums`, :func:`popri.scoring.clipped_scores_sum` (that is
   :func:`~popri.scoring.raw_user_scores` + :func:`~popri.scoring.clip_user_scores` + the sum over users) and
   :func:`popri.privacy.gaussian_mechanism` with σ from :func:`popri.privacy.calibrate_noise`, over T rounds, with
   all users in every round (q = 1, the paper's setting). Half of the trials include the canary, half do not.
3. The attacker sees only the released noisy sums ``y_t`` and knows everything else (the worst case DP protects
   against). It computes the Neyman–Pearson optimal statistic for a Gaussian mean shift,
   ``S = Σ_t <y_t − B_t, c_t>`` with ``B_t`` the background users' sum and ``c_t`` the canary's contribution in
   round t, and says "canary present" when ``S >= threshold``.

The canary is the worst case the clipping allows. :func:`~popri.scoring.clip_user_scores` z-scores each row, and a
z-scored vector of length N has L2 norm exactly √N >= 1, so the clip brings *every* user whose scores are not constant
to norm exactly 1: any non-constant canary reaches the sensitivity bound, and its direction does not matter because
the noise is isotropic. The audit checks ``||c_t|| = 1`` and records it.

The bound (Jagielski et al. 2020, Sec. 3 and Alg. 2). (ε, δ)-DP implies, for the test's rejection set and its
complement, ``TPR <= e^ε·FPR + δ`` and ``TNR <= e^ε·FNR + δ``. With Clopper–Pearson intervals at confidence
1 − α (TPR_lower, FPR_upper, ... are the ends of the two-sided exact intervals, each one-sided at 1 − α/2, so a pair
holds jointly with >= 1 − α by the union bound)::

    ε_lb = max over thresholds of max( log((TPR_lower − δ) / FPR_upper), log((TNR_lower − δ) / FNR_upper) )

floored at 0. As in those papers the threshold is chosen on the same trials, which makes the stated confidence
slightly optimistic. The bound is limited by the statistics: with n trials per world and perfect separation it is at
most ``log(((α/2)^(1/n) − δ) / (1 − (α/2)^(1/n))) ≈ log(n / ln(2/α))`` (≈ 5.6 for 2,000 trials in all at 95 %);
:func:`epsilon_lower_bound_ceiling` gives it and ``audit.json`` reports it. Claims of ε above the ceiling cannot be
refuted by the audit, whatever the mechanism does.

For reference the audit also reports the exact ε of the mechanism as run: with q = 1 the T releases are μ-GDP with
``μ = sqrt(Σ_t ||c_t||²) / σ`` (Dong, Roth, Su 2019, Cor. 3.3), and ``δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)``
(Balle & Wang 2018, Thm. 8). The accountant's ε (RDP) is an upper bound on it.

Power checks: ``break_mode="no-clip"`` turns the clip off for every user (``max_norm = inf``: the canary then moves
the sum by its z-score norm √N instead of 1) and ``"low-noise"`` divides σ by 10 while the claim stays the same; both
must give ``ε_lb > ε_claimed``. They exist only here, never in a normal run.

Secure-aggregation mode (``mode="secagg"``): the users are spread over ``nodes`` nodes (the canary on the first); each
node adds its share with :func:`popri.privacy.add_noise_share` (σ²/``min_replies``) and the attacker sees only the sum
of the node vectors, as the server does after SecAgg+. With ``nodes == min_replies`` (the fewest shares a released sum
can hold) the shares must audit exactly like the central draw.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import optimize, stats
from tqdm import tqdm

from popri.privacy import SENSITIVITY, add_noise_share, calibrate_noise, compute_epsilon, gaussian_mechanism
from popri.scoring import clip_user_scores, clipped_scores_sum, raw_user_scores, user_embedding_sums

logger = logging.getLogger(__name__)

BREAK_MODES = ("none", "no-clip", "low-noise")
MODES = ("central", "secagg")
LOW_NOISE_FACTOR = 10.0  # "low-noise" divides σ by this
_CHUNK = 4096  # trials per vectorised block


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


# ------------------------------------------------------------------------------------------------------- the game


def _unit_rows(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((rows, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _users_sum(sample_embeddings: np.ndarray, user_sums: np.ndarray, *, break_mode: str) -> np.ndarray:
    """Σ_u clip(z_u) as clients and server compute it; with ``no-clip`` the clip is off (max_norm = ∞)."""
    if user_sums.shape[0] == 0:
        return np.zeros(sample_embeddings.shape[0], dtype=np.float64)
    if break_mode == "no-clip":
        return clip_user_scores(raw_user_scores(sample_embeddings, user_sums), max_norm=np.inf).sum(axis=0)
    return clipped_scores_sum(sample_embeddings, user_sums)


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
) -> dict[str, Any]:
    """Run the distinguishing game; return attack scores of trials with and without the canary.

    ``noise_multiplier`` is the σ actually used (already divided for ``low-noise``). ``rng`` draws the data, the
    canary, which trials hold it, and the noise, in that order. Central mode: per round and block of trials the
    released matrix is ``gaussian_mechanism(summed_scores=(trials, N) sums)``. Secure-aggregation mode: the sum over
    ``nodes`` of ``add_noise_share(node_sum=(trials, N) node sums, min_replies=min_replies)``.
    """
    if break_mode not in BREAK_MODES:
        raise ValueError(f"break_mode must be one of {BREAK_MODES}, got {break_mode!r}")
    if mode not in MODES or nodes < 1 or not 1 <= min_replies <= nodes:
        raise ValueError(f"need mode in {MODES} and 1 <= min_replies <= nodes, got {mode!r}, {min_replies}, {nodes}")
    # Background users: 1..20 private texts each (varied, like characters of a play).
    counts = rng.integers(1, 21, size=users)
    user_index = np.repeat(np.arange(users), counts)
    background = user_embedding_sums(_unit_rows(rng, int(counts.sum()), dim), user_index, users)
    # The canary: one private text of its own.
    canary = user_embedding_sums(_unit_rows(rng, 1, dim), np.zeros(1, dtype=np.int64), 1)
    with_canary = np.vstack([background, canary])
    sample_sets = [_unit_rows(rng, samples, dim) for _ in range(rounds)]

    present = np.zeros(trials, dtype=bool)
    present[: trials // 2] = True
    rng.shuffle(present)

    groups = nodes if mode == "secagg" else 1
    if users < groups:
        raise ValueError(f"need at least one background user per node, got {users} users for {groups} nodes")
    node_of_user = np.arange(users) % groups
    node_base = np.empty((rounds, groups, samples))  # per node: its background users' sum
    shift = np.empty((rounds, samples))
    for t, emb in enumerate(sample_sets):
        for i in range(node_base.shape[1]):
            node_base[t, i] = _users_sum(emb, background[node_of_user == i], break_mode=break_mode)
        shift[t] = _users_sum(emb, with_canary, break_mode=break_mode) - _users_sum(
            emb, background, break_mode=break_mode
        )
    base = node_base.sum(axis=1)
    canary_norms = np.linalg.norm(shift, axis=1)
    if break_mode != "no-clip" and not np.allclose(canary_norms, 1.0, atol=1e-9):
        raise RuntimeError(f"canary is not at the clip bound: norms {canary_norms}")

    scores = np.zeros(trials)
    blocks = [(s, min(s + _CHUNK, trials)) for s in range(0, trials, _CHUNK)]
    with tqdm(total=rounds * len(blocks), desc="audit", unit="block", disable=not progress) as bar:
        for t in range(rounds):
            for start, stop in blocks:
                canary_part = present[start:stop, None] * shift[t]
                if mode == "central":
                    summed = base[t] + canary_part  # (block, N): what the clients' sum is
                    released = gaussian_mechanism(
                        summed_scores=summed, noise_multiplier=noise_multiplier, sensitivity=SENSITIVITY, rng=rng
                    )
                else:  # each node noises its own sum (the canary lives on node 0); the server sees their total
                    released = sum(
                        add_noise_share(
                            node_sum=node_base[t, i] + canary_part * (i == 0),  # (block, N) for every node
                            noise_multiplier=noise_multiplier,
                            min_replies=min_replies,
                            rng=rng,
                        )
                        for i in range(nodes)
                    )
                scores[start:stop] += (released - base[t]) @ shift[t]  # the attacker sees only `released`
                bar.update(1)
    return {
        "scores_with": scores[present],
        "scores_without": scores[~present],
        "canary_norms": canary_norms,
    }


# ------------------------------------------------------------------------------------------------------ the audit


def run_audit(
    *,
    epsilon: float,
    delta: float,
    rounds: int,
    trials: int,
    break_mode: str,
    seed: int,
    output_dir: str | Path,
    progress: bool = True,
    samples: int = 128,
    users: int = 100,
    dim: int = 384,
    confidence: float = 0.95,
    accountant: str = "rdp",
    mode: str = "central",
    nodes: int = 1,
    min_replies: int = 1,
) -> dict[str, Any]:
    """Audit popri's mechanism calibrated for (``epsilon``, ``delta``) over ``rounds`` rounds; write the report.

    σ = :func:`popri.privacy.calibrate_noise` (q = 1); the claimed ε is :func:`popri.privacy.compute_epsilon` at that
    σ. Writes ``output_dir/audit.json`` and ``output_dir/audit.png`` and returns the JSON's content.
    """
    if break_mode not in BREAK_MODES:
        raise ValueError(f"break_mode must be one of {BREAK_MODES}, got {break_mode!r}")
    if epsilon <= 0 or not 0 < delta < 1:
        raise ValueError(f"need epsilon > 0 and 0 < delta < 1, got {epsilon}, {delta}")
    if rounds < 1 or trials < 2 or samples < 2 or users < 0 or dim < 2:
        raise ValueError("need rounds >= 1, trials >= 2, samples >= 2, users >= 0, dim >= 2")
    started = time.perf_counter()
    sigma = calibrate_noise(epsilon=epsilon, delta=delta, sample_rate=1.0, rounds=rounds, accountant=accountant)
    claimed = compute_epsilon(
        noise_multiplier=sigma, delta=delta, sample_rate=1.0, rounds=rounds, accountant=accountant
    )
    sigma_used = sigma / LOW_NOISE_FACTOR if break_mode == "low-noise" else sigma
    logger.info(
        "audit: epsilon=%.4g delta=%.3g T=%d sigma=%.4g (used %.4g) break=%s mode=%s%s",
        claimed,
        delta,
        rounds,
        sigma,
        sigma_used,
        break_mode,
        mode,
        f" ({nodes} nodes, shares for {min_replies})" if mode == "secagg" else "",
    )

    rng = np.random.Generator(np.random.PCG64(seed))
    game = play_game(
        noise_multiplier=sigma_used,
        rounds=rounds,
        trials=trials,
        samples=samples,
        users=users,
        dim=dim,
        break_mode=break_mode,
        rng=rng,
        progress=progress,
        mode=mode,
        nodes=nodes,
        min_replies=min_replies,
    )
    found = empirical_epsilon(game["scores_with"], game["scores_without"], delta=delta, confidence=confidence)
    n1, n0 = game["scores_with"].size, game["scores_without"].size
    ceiling = epsilon_lower_bound_ceiling(n_with=n1, n_without=n0, delta=delta, confidence=confidence)
    mu = float(np.sqrt(np.sum(game["canary_norms"] ** 2)) / sigma_used) if sigma_used > 0 else math.inf
    result: dict[str, Any] = {
        "epsilon_claimed": claimed,
        "epsilon_lower_bound": found["epsilon_lower_bound"],
        "lower_bound_exceeds_claim": found["epsilon_lower_bound"] > claimed,
        "epsilon_lower_bound_ceiling": ceiling,
        "epsilon_exact_gdp": gdp_epsilon(mu=mu, delta=delta),
        "gdp_mu": mu,
        "confidence": confidence,
        "trials": trials,
        "trials_with_canary": n1,
        "trials_without_canary": n0,
        "tpr": found["tpr"],
        "fpr": found["fpr"],
        "tpr_lower": found["tpr_lower"],
        "fpr_upper": found["fpr_upper"],
        "tnr_lower": found["tnr_lower"],
        "fnr_upper": found["fnr_upper"],
        "threshold": found["threshold"],
        "direction": found["direction"],
        "auc": found["auc"],
        "break": break_mode,
        "epsilon_target": epsilon,
        "delta": delta,
        "rounds": rounds,
        "sample_rate": 1.0,
        "accountant": accountant,
        "noise_multiplier": sigma,
        "noise_multiplier_used": sigma_used,
        "canary_norm": float(np.mean(game["canary_norms"])),
        "samples": samples,
        "users": users,
        "dim": dim,
        "seed": seed,
        "statistic": "sum over rounds of <noisy sum - background sum, canary contribution>",
        "bound_formula": "max_tau max(log((TPR_lo - delta)/FPR_hi), log((TNR_lo - delta)/FNR_hi)), Clopper-Pearson",
        "mode": mode,
        "nodes": nodes if mode == "secagg" else None,
        "min_replies": min_replies if mode == "secagg" else None,
        "seconds": round(time.perf_counter() - started, 3),
    }
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(out / "audit.png", game=game, found=found, result=result)
    logger.info(
        "audit: epsilon lower bound %.3f vs claimed %.3f (ceiling %.2f with %d trials, exact GDP epsilon %.3f) -> %s",
        result["epsilon_lower_bound"],
        claimed,
        ceiling,
        trials,
        result["epsilon_exact_gdp"],
        out / "audit.json",
    )
    return result


def _plot(path: Path, *, game: dict[str, Any], found: dict[str, Any], result: dict[str, Any]) -> None:
    """Score histograms of both worlds and the empirical ROC against the (ε, δ) boundary TPR = e^ε FPR + δ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_h, ax_r) = plt.subplots(1, 2, figsize=(11, 4.2))
    both = np.concatenate([game["scores_with"], game["scores_without"]])
    bins = np.linspace(both.min(), both.max(), 60)
    ax_h.hist(game["scores_without"], bins=bins, alpha=0.6, label="without canary")
    ax_h.hist(game["scores_with"], bins=bins, alpha=0.6, label="with canary")
    ax_h.axvline(found["threshold"], color="k", ls="--", lw=1, label="threshold")
    ax_h.set_xlabel("attack statistic Σ_t <y_t − B_t, c_t>")
    ax_h.set_ylabel("trials")
    ax_h.legend()
    ax_h.set_title(f"break={result['break']}, σ used={result['noise_multiplier_used']:.3g}, T={result['rounds']}")

    fpr = np.clip(found["roc_fpr"], 1e-5, 1)
    ax_r.plot(fpr, found["roc_tpr"], label=f"empirical ROC (AUC {found['auc']:.3f})")
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
        f"ε_lb = {result['epsilon_lower_bound']:.2f} ({result['confidence']:.0%} CP), "
        f"claimed {result['epsilon_claimed']:.2f}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------- the CLI


def _handle(args: argparse.Namespace) -> int:
    """``popri audit`` handler: run the audit from parsed arguments; returns the exit status."""
    run_audit(
        epsilon=args.epsilon,
        delta=args.delta,
        rounds=args.rounds,
        trials=args.trials,
        break_mode=args.break_mode,
        seed=args.seed,
        output_dir=args.output,
        progress=not args.no_progress,
        samples=args.samples,
        users=args.users,
        mode=args.mode,
        nodes=args.nodes,
        min_replies=args.min_replies if args.min_replies is not None else args.nodes,
    )
    return 0


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``audit`` on an argparse subparsers object; the handler is ``args.func(args)``."""
    parser = subparsers.add_parser(
        "audit",
        help="empirical lower bound on epsilon of popri's DP mechanism (canary distinguishing game)",
        description=(
            "Run popri's scoring, clipping and Gaussian mechanism over T rounds on seeded random embeddings, many "
            "times with and without a worst-case canary user, and turn the optimal attacker's TPR/FPR into an "
            "epsilon lower bound (Clopper-Pearson, Jagielski et al. 2020). Writes DIR/audit.json and DIR/audit.png."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for audit.json and audit.png")
    parser.add_argument("--epsilon", type=float, default=1.0, help="target epsilon the noise is calibrated for")
    parser.add_argument("--delta", type=float, default=3e-6, help="delta of the claim and of the bound")
    parser.add_argument("--rounds", type=int, default=20, help="T, rounds composed (all users every round, q=1)")
    parser.add_argument("--trials", type=int, default=2000, help="games played, half with the canary")
    parser.add_argument(
        "--break",
        dest="break_mode",
        choices=BREAK_MODES,
        default="none",
        help="audit a deliberately broken mechanism to check the audit's power: no-clip (clip off) or low-noise "
        f"(sigma / {LOW_NOISE_FACTOR:g}); none audits the real mechanism",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the canary and the noise")
    parser.add_argument("--samples", type=int, default=128, help="N, synthetic samples scored per round")
    parser.add_argument("--users", type=int, default=100, help="background users besides the canary")
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="central",
        help="central: one noise draw on the sum; secagg: every node adds its share, the attacker sees the total",
    )
    parser.add_argument("--nodes", type=int, default=3, help="secagg: nodes whose noisy vectors are summed")
    parser.add_argument(
        "--min-replies", type=int, default=None, help="secagg: min-replies the shares assume (default: --nodes)"
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
