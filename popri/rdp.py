"""A torch-free RDP accountant for the (Poisson-)sampled Gaussian mechanism, with numpy and scipy only.

The release of one round is ``Σ_{u ∈ S} clip(v_u) + N(0, σ² I)`` where every user enters ``S`` independently with
probability q and every user vector has L2 norm <= 1 (sensitivity Δ = 1, add/remove-one-user adjacency).

* RDP of one release at order α (Mironov, Talwar, Zhang 2019, "Rényi Differential Privacy of the Sampled Gaussian
  Mechanism", arXiv 1908.10530, Sec. 3.3): ``rdp(α) = log(A_α) / (α - 1)`` with
  ``A_α = E_{z ~ μ0}[((1 - q) + q·μ1(z)/μ0(z))^α]``, μ0 = N(0, σ²), μ1 = N(1, σ²). For q = 1 this is the plain
  Gaussian mechanism, ``rdp(α) = α / (2σ²)``.
* Composition over T releases adds RDP order by order: ``rdp_T(α) = Σ_t rdp_t(α)``.
* Conversion to (ε, δ)-DP (Balle, Barthe, Gaboardi, Hsu, Sato 2020, "Hypothesis Testing Interpretations and Rényi
  Differential Privacy", arXiv 1905.09982, Thm. 21):
  ``ε = min_α [ rdp_T(α) + log((α - 1)/α) - (log δ + log α) / (α - 1) ]``.

The orders searched are Opacus' defaults (1.1, 1.2, ..., 10.9 and 12, ..., 63), so the results agree with
``opacus.accountants.RDPAccountant`` (tests check 1e-6 relative agreement); importing this module loads no torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import special

ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)])

# Series terms of A_α below exp(-30) of the leading one change ε far below any printed digit.
_TAIL_LOG = -30.0
_MAX_SIGMA = 1e8


def _logsumexp(log_terms: np.ndarray) -> float:
    """``log Σ exp(x_k)`` (-inf for no terms); plain numpy, as scipy's version costs more than the sum itself here."""
    if log_terms.size == 0:
        return -math.inf
    top = float(np.max(log_terms))
    if top == -math.inf:
        return top
    return top + math.log(float(np.sum(np.exp(log_terms - top))))


def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    """``log A_α`` for integer α: ``A_α = Σ_{i=0..α} binom(α, i) (1-q)^(α-i) q^i exp((i² - i) / (2σ²))``.

    Source: Mironov, Talwar, Zhang 2019, Sec. 3.3 (the binomial expansion of the moment, all terms positive).
    """
    i = np.arange(alpha + 1, dtype=np.float64)
    log_terms = (
        special.gammaln(alpha + 1)
        - special.gammaln(i + 1)
        - special.gammaln(alpha - i + 1)
        + i * math.log(q)
        + (alpha - i) * math.log1p(-q)
        + (i * i - i) / (2.0 * sigma * sigma)
    )
    return _logsumexp(log_terms)


def _log_a_fractional(q: float, sigma: float, alpha: float) -> float:
    """``log A_α`` for fractional α, as the two series of Mironov, Talwar, Zhang 2019, Sec. 3.3:

    ``A_α = Σ_{i>=0} binom(α, i) [ q^i (1-q)^(α-i) e^((i²-i)/(2σ²)) · erfc((i - z0)/(√2 σ)) / 2
    + q^(α-i) (1-q)^i e^(((α-i)²-(α-i))/(2σ²)) · erfc((z0 - (α-i))/(√2 σ)) / 2 ]``, with
    ``z0 = σ² log(1/q - 1) + 1/2`` (where the likelihood ratio crosses 1). binom(α, i) changes sign for i > α, so the
    sums are kept as signed values in log space; the series stops once both terms fall below exp(-30).
    """
    z0 = sigma * sigma * math.log(1.0 / q - 1.0) + 0.5
    log_q, log_1mq = math.log(q), math.log1p(-q)
    log_s0_parts, log_s1_parts, sign_parts = [], [], []
    start = 0
    while True:  # terms in chunks of 64 indices, vectorised; stop at the first index whose two terms are negligible
        i = np.arange(start, start + 64, dtype=np.float64)
        j = alpha - i
        coef = special.binom(alpha, i)
        with np.errstate(divide="ignore"):
            log_coef = np.log(np.abs(coef))
        log_s0 = log_coef + i * log_q + j * log_1mq + (i * i - i) / (2 * sigma * sigma)
        log_s0 += special.log_ndtr((z0 - i) / sigma)  # log(erfc((i - z0)/(√2σ))/2)
        log_s1 = log_coef + j * log_q + i * log_1mq + (j * j - j) / (2 * sigma * sigma)
        log_s1 += special.log_ndtr((j - z0) / sigma)
        tail = np.flatnonzero(np.maximum(log_s0, log_s1) < _TAIL_LOG)
        stop = int(tail[0]) + 1 if tail.size else 64
        log_s0_parts.append(log_s0[:stop])
        log_s1_parts.append(log_s1[:stop])
        sign_parts.append(np.sign(coef[:stop]))
        if tail.size:
            break
        start += 64
    sign = np.concatenate(sign_parts)
    return float(
        np.logaddexp(
            _signed_logsumexp(np.concatenate(log_s0_parts), sign), _signed_logsumexp(np.concatenate(log_s1_parts), sign)
        )
    )


def _signed_logsumexp(log_terms: np.ndarray, sign: np.ndarray) -> float:
    """``log Σ sign_k · exp(log_terms_k)`` for a sum known to be >= 0 (rounding below zero gives -inf)."""
    pos = log_terms[sign > 0]
    neg = log_terms[sign < 0]
    lp = _logsumexp(pos)
    ln = _logsumexp(neg)
    if ln == -math.inf:
        return lp
    if lp <= ln:  # each part of A_α is a probability-weighted moment, never negative: only rounding gets here
        return -math.inf
    return lp + math.log(-math.expm1(ln - lp))


def rdp_sampled_gaussian(*, noise_multiplier: float, sample_rate: float, order: float) -> float:
    """RDP at ``order`` α of one release of the sampled Gaussian mechanism with multiplier σ on a sensitivity-1 sum.

    ``rdp(α) = log(A_α) / (α - 1)`` (see :func:`_log_a_integer`, :func:`_log_a_fractional`); q = 1 gives
    ``α / (2σ²)``; q = 0 releases nothing (0); σ = 0 gives no privacy (inf). Source: Mironov, Talwar, Zhang 2019.
    """
    sigma, q, alpha = float(noise_multiplier), float(sample_rate), float(order)
    if not alpha > 1:
        raise ValueError(f"RDP order must be > 1, got {order}")
    if not 0 <= q <= 1:
        raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate}")
    if sigma < 0 or math.isnan(sigma):
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if q == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    if q == 1:
        return alpha / (2.0 * sigma * sigma)
    if alpha.is_integer():
        return _log_a_integer(q, sigma, int(alpha)) / (alpha - 1)
    return _log_a_fractional(q, sigma, alpha) / (alpha - 1)


def rdp_curve(history: Iterable[tuple[float, float, int]], orders: Sequence[float] = ORDERS) -> np.ndarray:
    """Composed RDP ``Σ_t steps_t · rdp(σ_t, q_t, α)`` at every order, for ``history = [(σ, q, steps), ...]``."""
    total = np.zeros(len(orders), dtype=np.float64)
    for sigma, q, steps in history:
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if steps == 0:
            continue
        total += steps * np.array(
            [rdp_sampled_gaussian(noise_multiplier=sigma, sample_rate=q, order=a) for a in orders]
        )
    return total


def epsilon_from_rdp(rdp: np.ndarray, *, delta: float, orders: Sequence[float] = ORDERS) -> float:
    """(ε, δ) from RDP (Balle et al. 2020, Thm. 21): ``ε = min_α [rdp(α) + log((α-1)/α) - (log δ + log α)/(α-1)]``."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    a = np.asarray(orders, dtype=np.float64)
    with np.errstate(invalid="ignore"):  # inf RDP (σ = 0) gives inf, never a NaN that wins the minimum
        eps = np.asarray(rdp, dtype=np.float64) + np.log((a - 1) / a) - (math.log(delta) + np.log(a)) / (a - 1)
    eps = np.where(np.isnan(eps), np.inf, eps)
    return float(np.min(eps))


def epsilon_floor(*, delta: float, orders: Sequence[float] = ORDERS) -> float:
    """The smallest ε this accountant can certify at ``delta`` with any σ: the conversion term at zero RDP.

    As σ -> inf the RDP vanishes and ε tends to ``min_α [log((α-1)/α) - (log δ + log α)/(α-1)]`` > 0 (Balle et al.
    2020, Thm. 21 over the finite set of orders). A target at or below it cannot be calibrated.
    """
    return epsilon_from_rdp(np.zeros(len(orders)), delta=delta, orders=orders)


def compute_epsilon(*, noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """ε after ``rounds`` releases with multiplier σ at sampling rate q (RDP, Balle et al. 2020 conversion).

    Paper values (POPri, q = 1, T = 20, δ = 3e-6): σ = 19.3 gives ε ≈ 0.9973; σ = 3.35 gives ε ≈ 6.962.

    >>> round(compute_epsilon(noise_multiplier=19.3, sample_rate=1.0, rounds=20, delta=3e-6), 4)
    0.9973
    """
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if rounds == 0:
        return 0.0
    return epsilon_from_rdp(rdp_curve([(noise_multiplier, sample_rate, rounds)]), delta=delta)


def calibrate_noise_multiplier(
    *, epsilon: float, sample_rate: float, rounds: int, delta: float, rel_tolerance: float = 1e-6
) -> float:
    """The smallest σ (to ``rel_tolerance`` relative) with ``compute_epsilon(σ, q, T, δ) <= epsilon``; never overshoots.

    ε is decreasing in σ, so bisection keeps a bracket ``[lo, hi]`` with ε(lo) > target >= ε(hi) and returns ``hi``
    once ``hi - lo <= rel_tolerance · hi``: the result always meets the target, and σ·(1 - rel_tolerance) does not.
    Raises ValueError for a target at or below :func:`epsilon_floor` (no σ reaches it).
    """
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not 0 < rel_tolerance < 1:
        raise ValueError(f"rel_tolerance must be in (0, 1), got {rel_tolerance}")
    floor = epsilon_floor(delta=delta)
    if epsilon <= floor:
        raise ValueError(
            f"epsilon={epsilon:g} is at or below {floor:.4f}, the smallest epsilon the RDP accountant can certify at "
            f"delta={delta:g} with any noise; raise epsilon or delta"
        )

    def spent(sigma: float) -> float:
        return compute_epsilon(noise_multiplier=sigma, sample_rate=sample_rate, rounds=rounds, delta=delta)

    lo, hi = 0.0, 1.0
    while spent(hi) > epsilon:
        lo, hi = hi, 2.0 * hi
        if hi > _MAX_SIGMA:
            raise ValueError(
                f"epsilon={epsilon:g} needs a noise multiplier above {_MAX_SIGMA:g} (delta={delta:g}, "
                f"T={rounds}, q={sample_rate:g}); raise epsilon or delta"
            )
    while hi - lo > rel_tolerance * hi:
        mid = 0.5 * (lo + hi)
        if spent(mid) > epsilon:
            lo = mid
        else:
            hi = mid
    return hi
