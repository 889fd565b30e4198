"""Statistics over seeds and test users: per-row intervals and paired differences between methods.

Two sources of variation are reported separately:

- **seed to seed** (DP noise, user sampling, generation, downstream initialisation): each row's mean over seeds with a
  Student-t 95 % interval (:func:`mean_ci95`);
- **test users** (which held-out people the test happens to contain): paired differences between two methods with a
  bootstrap over test users (:func:`paired_bootstrap_difference`), the same resample for both methods of a pair.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def mean_ci95(values: Sequence[float]) -> tuple[float | None, list[float] | None]:
    """(mean, [low, high]) over seeds: ``x̄ ± t_{0.975, n−1} · s / √n`` (s the sample standard deviation, ddof = 1).

    Source: the Student-t interval for a mean (Student 1908). With one value the interval is undefined (None); with
    values that do not vary it collapses to the mean.
    """
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if x.size == 0:
        return None, None
    mean = float(x.mean())
    if x.size == 1:
        return mean, None
    half = float(stats.t.ppf(0.975, df=x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, [mean - half, mean + half]


def micro_accuracy(correct: np.ndarray, tokens: np.ndarray) -> float:
    """Σ correct / Σ tokens (every target token counts once, as in :func:`benchmark.downstream.evaluate`)."""
    total = float(np.sum(tokens))
    return float(np.sum(correct)) / total if total > 0 else math.nan


def paired_bootstrap_difference(
    per_seed: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    *,
    rng: np.random.Generator,
    resamples: int = 2000,
) -> tuple[float, list[float]]:
    """Mean difference of accuracy a − b over seeds, with a 95 % paired-bootstrap interval over test users.

    ``per_seed[s] = (correct_a, tokens_a, correct_b, tokens_b)``: per-test-user counts of methods a and b at seed s
    (same test users, same order). Method:

    1. for each seed s, the observed difference ``d_s = acc(a) − acc(b)`` with micro-averaged accuracy;
    2. for each of B resamples: per seed, draw the test users with replacement (``rng``, seeded by the caller); the
       *same* draw is used for a and b (paired); ``d_s^* = acc_a(draw) − acc_b(draw)``; then average over seeds,
       ``D^* = mean_s d_s^*``;
    3. report ``mean_s d_s`` and the percentile interval [2.5 %, 97.5 %] of the B values ``D^*``.

    Source: Efron & Tibshirani (1993), "An Introduction to the Bootstrap", ch. 13 (percentile interval) and the paired
    design of Koehn (2004) for system comparisons. The interval covers test-user sampling with the seeds fixed; the
    seed-to-seed spread is each row's own interval (:func:`mean_ci95`).
    """
    if not per_seed:
        raise ValueError("no seeds to compare")
    observed, boot = [], np.zeros(resamples, dtype=np.float64)
    for correct_a, tokens_a, correct_b, tokens_b in per_seed:
        arrays = [np.asarray(x, dtype=np.float64) for x in (correct_a, tokens_a, correct_b, tokens_b)]
        n = arrays[0].shape[0]
        if any(x.shape != (n,) for x in arrays) or n == 0:
            raise ValueError("per-user counts of the two methods must be non-empty and of the same length")
        ca, ta, cb, tb = arrays
        observed.append(micro_accuracy(ca, ta) - micro_accuracy(cb, tb))
        draws = rng.integers(0, n, size=(resamples, n))
        # counts of each user in each resample: (B, n) @ (n,) sums the resampled users' counts.
        weights = np.zeros((resamples, n), dtype=np.float64)
        np.add.at(weights, (np.arange(resamples)[:, None], draws), 1.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            boot += (weights @ ca) / (weights @ ta) - (weights @ cb) / (weights @ tb)
    boot /= len(per_seed)
    boot = boot[np.isfinite(boot)]
    low, high = np.percentile(boot, [2.5, 97.5])
    return float(np.mean(observed)), [float(low), float(high)]


def verdict(a: str, b: str, ci95: Sequence[float] | None) -> str:
    """'a better' / 'b better' only where the interval excludes zero; otherwise 'not resolved'."""
    if ci95 is None:
        return "not resolved"
    low, high = ci95
    if low > 0:
        return f"{a} better"
    if high < 0:
        return f"{b} better"
    return "not resolved"
