"""The one door to private data: a release strategy turns a round's sample embeddings into DP scores.

Two strategies sit behind one :class:`ReleaseStrategy` protocol:

- :class:`CentralRelease`: each node returns its users' clipped sum; the server validates and re-clips every reply,
  sums them, charges the ledger, and only then adds the Gaussian noise.
- :class:`SecureRelease`: each node noises its own sum and the transport returns only the secure sum; the transport
  calls ``charge`` once enough masked vectors are in and before the sum can be unmasked.

Either way the ledger is charged before the noisy result exists, and a round that releases nothing is not charged
(except a secure round that could have been unmasked). User counts stay in memory: re-clipping needs each node's
count, but no count is ever part of a :class:`Release` (it is what differs between neighbouring data sets).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from popri.privacy import SENSITIVITY, InvalidReplyError, gaussian_mechanism, validate_node_sum

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeReply:
    """One node's answer: its clipped sum over sampled users, or the error that replaced it.

    ``num_users`` is private: it is used to re-clip ``node_sum`` and never written anywhere. ``error`` is text the
    server wrote itself (a fixed error code, a failed check), never free text copied from the node's reply.
    """

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


@dataclass(frozen=True)
class Release:
    """What a round released: ``dp_scores`` (None when the round was discarded), and what is safe to publish about
    it: how many node replies were used and rejected, the reason it was discarded, and the stage timings."""

    dp_scores: np.ndarray | None
    replies: int
    rejected: int
    discarded_reason: str | None = None
    charged: bool = False
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def discarded(self) -> bool:
        return self.dp_scores is None


class ReleaseStrategy(Protocol):
    """Turns one round's sample embeddings into DP scores, charging the ledger before the noisy result exists."""

    def release(self, embeddings: np.ndarray, round_index: int) -> Release: ...


# (sample embeddings, round, sample rate) -> each node's reply                                    (central mode)
Collect = Callable[[np.ndarray, int, float], list[NodeReply]]
# (sample embeddings, round, sample rate, charge) -> the secure sum; ``charge()`` must run before the sum can be
# unmasked                                                                                         (secagg mode)
SecureCollect = Callable[[np.ndarray, int, float, Callable[[], None]], SecureSum]
# Charges one release in the ledger (and makes it durable); raises BudgetExceededError instead of overspending.
Charge = Callable[[], float]


def aggregate_replies(replies: list[NodeReply], *, expected_len: int) -> tuple[np.ndarray | None, int, list[str]]:
    """Validate and re-clip every reply; sum the good ones. Returns (sum or None, users, rejection reasons).

    The user total is private: callers keep it in memory only.
    """
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
        users += int(reply.num_users)
        accepted += 1
    for reason in rejected:
        logger.warning("rejected reply from %s", reason)
    return (total if accepted else None), users, rejected


class CentralRelease:
    """Central mode: the nodes' clipped sums, validated and re-clipped here, summed, charged, then noised once.

    Sensitivity of the sum: 1 per user (:data:`popri.privacy.SENSITIVITY`), so the noise is N(0, σ²).
    """

    def __init__(
        self,
        collect: Collect,
        *,
        charge: Charge,
        noise_multiplier: float,
        sample_rate: float,
        min_replies: int,
        rng: np.random.Generator,
    ) -> None:
        self.collect = collect
        self.charge = charge
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.min_replies = min_replies
        self.rng = rng

    def release(self, embeddings: np.ndarray, round_index: int) -> Release:
        seconds: dict[str, float] = {}
        start = time.perf_counter()
        replies = self.collect(embeddings, round_index, self.sample_rate)
        seconds["collect"] = time.perf_counter() - start
        start = time.perf_counter()
        summed, _users_in_memory_only, rejected = aggregate_replies(replies, expected_len=len(embeddings))
        accepted = len(replies) - len(rejected)
        if summed is None or accepted < self.min_replies:
            # Nothing is released, so nothing is charged: the noisy sum is never computed.
            reason = f"{accepted} valid replies < min-replies {self.min_replies}"
            return Release(None, accepted, len(rejected), discarded_reason=reason, seconds=seconds)
        self.charge()
        dp_scores = gaussian_mechanism(
            summed_scores=summed, noise_multiplier=self.noise_multiplier, sensitivity=SENSITIVITY, rng=self.rng
        )
        seconds["aggregate"] = time.perf_counter() - start
        return Release(dp_scores, accepted, len(rejected), charged=True, seconds=seconds)


class SecureRelease:
    """Secure-aggregation mode: the nodes noise their own sums; the server only ever sees their total.

    The transport calls ``charge`` once enough masked vectors are in and before it unmasks their sum, so a round
    whose protocol stops earlier is not charged, and one that could have been seen always is.
    """

    def __init__(self, collect: SecureCollect, *, charge: Charge, sample_rate: float, min_replies: int) -> None:
        self.collect = collect
        self.charge = charge
        self.sample_rate = sample_rate
        self.min_replies = min_replies

    def release(self, embeddings: np.ndarray, round_index: int) -> Release:
        charged: list[float] = []
        start = time.perf_counter()
        result = self.collect(embeddings, round_index, self.sample_rate, lambda: charged.append(self.charge()))
        seconds = {"collect": time.perf_counter() - start}
        if result.dp_sum is not None and not charged:
            raise RuntimeError("the secure sum was released without charging the privacy ledger")
        discarded = Release(None, result.replies, result.failures, charged=bool(charged), seconds=seconds)
        if result.dp_sum is None or result.replies < self.min_replies:
            note = " (charged: the sum could have been unmasked)" if charged else ""
            reason = f"the secure sum covers {result.replies} nodes < min-replies {self.min_replies}{note}"
            return _with_reason(discarded, reason)
        dp_sum = np.asarray(result.dp_sum, dtype=np.float64)
        if dp_sum.shape != (len(embeddings),) or not np.all(np.isfinite(dp_sum)):
            return _with_reason(discarded, f"the secure sum has shape {dp_sum.shape} or non-finite values")
        return Release(dp_sum, result.replies, result.failures, charged=True, seconds=seconds)


def _with_reason(release: Release, reason: str) -> Release:
    return dataclasses.replace(release, dp_scores=None, discarded_reason=reason)
