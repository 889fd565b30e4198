"""Differential privacy: noise calibration, the privacy ledger, the Gaussian mechanism and user sampling.

The release of one round is ``dp_scores = Σ_u clip(v_u) + N(0, σ² I)`` where every user vector is clipped to L2 norm
<= 1. Adding or removing one user moves the sum by at most 1 in L2 (user-level DP, add/remove adjacency), so the
noise multiplier is σ itself. Users are Poisson-sampled with rate q, which is what the Opacus accountants analyse
(Mironov, Talwar, Zhang 2019, "Rényi Differential Privacy of the Sampled Gaussian Mechanism").
"""

from __future__ import annotations

import functools
import logging
import secrets
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SENSITIVITY = 1.0  # L2 bound of one user's clipped score vector


def _accountant(name: str) -> Any:
    from opacus.accountants import PRVAccountant, RDPAccountant

    if name == "rdp":
        return RDPAccountant()
    if name == "prv":
        return PRVAccountant()
    raise ValueError(f"unknown accountant {name!r}; use 'rdp' or 'prv'")


def _epsilon_of(accountant: Any, delta: float) -> float:
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        # PRV warns about log(1 - q) at q = 1 and RDP about the optimal order; neither changes the result.
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=delta))


def compute_epsilon(
    *, noise_multiplier: float, delta: float, sample_rate: float, rounds: int, accountant: str = "rdp"
) -> float:
    """ε after ``rounds`` releases of the sampled Gaussian mechanism with multiplier σ at rate q.

    Paper values (POPri, q=1, T=20, δ=3e-6): σ=19.3 gives ε≈0.997 and σ=3.35 gives ε≈6.96 (RDP).

    >>> round(compute_epsilon(noise_multiplier=19.3, delta=3e-6, sample_rate=1.0, rounds=20), 3)
    0.997
    """
    if rounds == 0:
        return 0.0
    acc = _accountant(accountant)
    acc.history = [(noise_multiplier, sample_rate, rounds)]
    return _epsilon_of(acc, delta)


def calibrate_noise(
    *, epsilon: float, delta: float, sample_rate: float, rounds: int, accountant: str = "rdp", tolerance: float = 0.01
) -> float:
    """Smallest σ (to ``tolerance`` in ε) with ε(σ, q, T, δ) <= ``epsilon``; never overshoots.

    Opacus' ``get_noise_multiplier`` bisects and returns the upper end of the bracket, whose ε is <= target. We check
    that promise again, because every later privacy claim rests on it.
    """
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.simplefilter("ignore")
        sigma = float(
            get_noise_multiplier(
                target_epsilon=epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=rounds,
                accountant=accountant,
                epsilon_tolerance=tolerance,
            )
        )
    spent = compute_epsilon(
        noise_multiplier=sigma, delta=delta, sample_rate=sample_rate, rounds=rounds, accountant=accountant
    )
    if spent > epsilon:
        raise RuntimeError(f"calibration overshot: sigma={sigma} gives epsilon={spent} > {epsilon}")
    return sigma


@functools.lru_cache(maxsize=16)
def resolve_noise_multiplier(
    *,
    epsilon: float | None,
    noise_multiplier: float | None,
    delta: float,
    sample_rate: float,
    rounds: int,
    accountant: str = "rdp",
) -> float:
    """σ for a run: the one given, else calibrated to ``epsilon`` after ``rounds`` (:func:`calibrate_noise`).

    Server and nodes call this with the run's own settings; in secure-aggregation mode each node derives its noise
    share from it rather than from anything the server sends during a round.
    """
    if noise_multiplier is not None:
        return float(noise_multiplier)
    if epsilon is None:
        raise ValueError("give a target epsilon or a noise multiplier")
    return calibrate_noise(epsilon=epsilon, delta=delta, sample_rate=sample_rate, rounds=rounds, accountant=accountant)


class BudgetExceededError(RuntimeError):
    """Raised instead of starting a round that would spend more than the target ε."""


@dataclass
class PrivacyLedger:
    """Every release charged so far; ε is always recomputed from this history, so a restored ledger continues.

    A round is charged *before* its noisy result is used, and the ledger travels with every checkpoint.
    """

    delta: float
    accountant: str = "rdp"
    target_epsilon: float | None = None
    history: list[tuple[float, float, int]] = field(default_factory=list)

    @property
    def rounds_charged(self) -> int:
        return sum(steps for _, _, steps in self.history)

    def epsilon(self) -> float:
        if not self.history:
            return 0.0
        acc = _accountant(self.accountant)
        acc.history = list(self.history)
        return _epsilon_of(acc, self.delta)

    def epsilon_after(self, *, noise_multiplier: float, sample_rate: float) -> float:
        """ε if one more round with these parameters were charged."""
        acc = _accountant(self.accountant)
        acc.history = [*self.history, (noise_multiplier, sample_rate, 1)]
        return _epsilon_of(acc, self.delta)

    def charge(self, *, noise_multiplier: float, sample_rate: float) -> float:
        """Record one release; refuse if it would take ε past the target. Returns ε spent so far."""
        after = self.epsilon_after(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
        if self.target_epsilon is not None and after > self.target_epsilon:
            raise BudgetExceededError(
                f"round {self.rounds_charged + 1} would spend epsilon={after:.4f} > target {self.target_epsilon}"
            )
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            sigma, q, steps = self.history[-1]
            self.history[-1] = (sigma, q, steps + 1)
        else:
            self.history.append((noise_multiplier, sample_rate, 1))
        return after

    def state_dict(self) -> dict[str, Any]:
        return {
            "delta": self.delta,
            "accountant": self.accountant,
            "target_epsilon": self.target_epsilon,
            "history": [list(h) for h in self.history],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> PrivacyLedger:
        return cls(
            delta=float(state["delta"]),
            accountant=str(state["accountant"]),
            target_epsilon=state.get("target_epsilon"),
            history=[(float(s), float(q), int(n)) for s, q, n in state["history"]],
        )


def make_noise_rng(seed: int | None) -> tuple[np.random.Generator, bool]:
    """The noise generator: seeded from the OS CSPRNG (``secrets``) unless the user asked for a reproducible seed.

    Returns ``(rng, reproducible)``. A reproducible seed makes the noise predictable to anyone who knows it: only
    for experiments. As in Opacus, floating-point Gaussian sampling is not hardened against side-channel attacks.
    """
    if seed is None:
        return np.random.Generator(np.random.PCG64(secrets.randbits(128))), False
    logger.warning("noise seed %d given: the DP noise is reproducible (experiments only, not for real privacy)", seed)
    return np.random.Generator(np.random.PCG64(seed)), True


def gaussian_mechanism(
    *, summed_scores: np.ndarray, noise_multiplier: float, sensitivity: float, rng: np.random.Generator
) -> np.ndarray:
    """``dp_scores = summed_scores + N(0, (σ·Δ)² I)``: the Gaussian mechanism on a sum of L2 sensitivity Δ.

    ``sensitivity`` is Δ, the most one unit of privacy (one user) can move ``summed_scores`` in L2: 1 for POPri's sum
    of clipped user vectors (:data:`SENSITIVITY`), the clipping norm for DP-FedAvg's sum of clipped updates. The
    standard deviation is σ·Δ, so ε depends on σ alone (what the accountant is given).
    Source: the Gaussian mechanism (Dwork & Roth 2014, App. A) as used on the sum by POPri (Hou et al. 2025, Alg. 1)
    and by DP-FedAvg (McMahan et al. 2018).
    """
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if not np.isfinite(sensitivity) or sensitivity <= 0:
        raise ValueError(f"sensitivity must be a finite number > 0, got {sensitivity}")
    noise = rng.normal(0.0, noise_multiplier * sensitivity, size=summed_scores.shape)
    return (summed_scores.astype(np.float64) + noise).astype(np.float64)


def noise_share_std(*, noise_multiplier: float, min_replies: int) -> float:
    """Standard deviation of one node's share of the noise in secure-aggregation mode: ``σ·Δ / √n_min``.

    ``n`` independent shares N(0, σ²Δ²/n_min) sum to N(0, (n/n_min)·σ²Δ²), so any sum over n >= n_min nodes carries at
    least the noise N(0, σ²Δ²) that the accountant assumes for the central mechanism; the sum is the only thing the
    server sees. Sensitivity Δ = 1 per user, as in :func:`gaussian_mechanism`. Source: distributed Gaussian noise
    under secure aggregation (Truex et al. 2019, "A Hybrid Approach to Privacy-Preserving Federated Learning";
    Kairouz, Liu, Steinke 2021, "The Distributed Discrete Gaussian Mechanism").
    """
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if min_replies < 1:
        raise ValueError(f"min_replies must be >= 1, got {min_replies}")
    return noise_multiplier * SENSITIVITY / float(np.sqrt(min_replies))


def add_noise_share(
    *, node_sum: np.ndarray, noise_multiplier: float, min_replies: int, rng: np.random.Generator
) -> np.ndarray:
    """``node_sum + N(0, (σ·Δ)²/n_min · I)``: what a node sends into the secure sum (see :func:`noise_share_std`)."""
    std = noise_share_std(noise_multiplier=noise_multiplier, min_replies=min_replies)
    return node_sum.astype(np.float64) + rng.normal(0.0, std, size=node_sum.shape)


def poisson_sample(*, num_users: int, sample_rate: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of users included independently with probability q (the sampling the accountant assumes)."""
    if sample_rate >= 1.0:
        return np.arange(num_users)
    return np.flatnonzero(rng.random(num_users) < sample_rate)


def clip_l2(vector: np.ndarray, *, max_norm: float = SENSITIVITY) -> np.ndarray:
    """Scale ``vector`` down so its L2 norm is at most ``max_norm`` (unchanged if already inside)."""
    norm = float(np.linalg.norm(vector))
    if norm > max_norm:
        return vector * (max_norm / norm)
    return vector


class InvalidReplyError(ValueError):
    """A node's reply that the server must not use."""


def validate_node_sum(node_sum: np.ndarray, *, expected_len: int, num_users: int) -> np.ndarray:
    """Check a node's summed score vector and re-clip it to ``num_users`` (each user contributes norm <= 1).

    Central mode: the server never trusts a reply. Wrong shape, NaN or inf is rejected; a norm above the bound is
    scaled back, so no node can move the aggregate by more than its users' total sensitivity.
    """
    arr = np.asarray(node_sum)
    if arr.ndim != 1 or arr.shape[0] != expected_len:
        raise InvalidReplyError(f"reply has shape {arr.shape}, expected ({expected_len},)")
    if not np.issubdtype(arr.dtype, np.floating):
        raise InvalidReplyError(f"reply has dtype {arr.dtype}, expected a float vector")
    if not np.all(np.isfinite(arr)):
        raise InvalidReplyError("reply contains NaN or inf")
    # The count is a private value: the messages name the check that failed, never the count itself.
    if isinstance(num_users, bool) or not isinstance(num_users, (int, np.integer)):
        raise InvalidReplyError(f"reply's user count has type {type(num_users).__name__}, expected an int")
    if num_users < 0:
        raise InvalidReplyError(f"reply claims {num_users} users")  # an impossible claim, not a real count
    return clip_l2(arr.astype(np.float64), max_norm=SENSITIVITY * num_users)
