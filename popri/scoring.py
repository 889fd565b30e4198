"""Client-side scoring of synthetic samples against private texts (step 3 of the algorithm).

For user u with private texts D_u and unit-norm sample embeddings e_j:

    raw_u[j] = Σ_{x ∈ D_u} cos(e_j, x) = e_j · (Σ_{x ∈ D_u} x)         (unit vectors: cosine = dot product)

so one matrix product with the per-user *sum* of private embeddings scores every user at once. Each raw vector is
centred and scaled, z_u = (raw_u − mean) / std, then clipped to L2 norm <= 1 (POPri, Hou et al. 2025, Sec. 3; the
reference code's ``neural_scores_for_policy``). A user whose raw scores have zero variance contributes a zero vector,
never NaN. The clip bounds one user's contribution to the sum by 1: the sensitivity the accountant assumes.
"""

from __future__ import annotations

import logging

import numpy as np

from popri.privacy import SENSITIVITY

logger = logging.getLogger(__name__)


def user_embedding_sums(private_embeddings: np.ndarray, user_index: np.ndarray, num_users: int) -> np.ndarray:
    """Sum each user's private text embeddings: (M, d) texts with owner ids (M,) -> (num_users, d)."""
    if private_embeddings.shape[0] != user_index.shape[0]:
        raise ValueError(f"{private_embeddings.shape[0]} embeddings but {user_index.shape[0]} owner ids")
    sums = np.zeros((num_users, private_embeddings.shape[1]), dtype=np.float64)
    np.add.at(sums, user_index, private_embeddings.astype(np.float64))
    return sums


def raw_user_scores(sample_embeddings: np.ndarray, user_sums: np.ndarray) -> np.ndarray:
    """raw_scores[u, j] = Σ_{x ∈ D_u} cos(e_j, x), shape (users, samples). Private: never leaves the client."""
    with np.errstate(over="ignore", invalid="ignore"):  # a broken user's NaN/inf row is zeroed by the clip
        return user_sums @ sample_embeddings.astype(np.float64).T


def _clip_rows(raw_scores: np.ndarray, *, max_norm: float, eps: float) -> tuple[np.ndarray, bool]:
    """(clipped rows, whether any row was non-finite and zeroed)."""
    finite = np.all(np.isfinite(raw_scores), axis=1)
    raw = np.where(finite[:, None], raw_scores, 0.0)
    with np.errstate(over="ignore", invalid="ignore"):  # a finite but huge row may overflow: caught below
        centred = raw - raw.mean(axis=1, keepdims=True)
        std = centred.std(axis=1, keepdims=True)
        flat = ~(std[:, 0] > eps)  # also catches a NaN std
        z = np.divide(centred, std, out=np.zeros_like(centred), where=~flat[:, None])
        norms = np.linalg.norm(z, axis=1, keepdims=True)
        scale = np.minimum(1.0, max_norm / np.maximum(norms, eps))
        clipped = z * scale
    overflowed = ~np.all(np.isfinite(clipped), axis=1) | ~np.isfinite(std[:, 0])
    clipped[overflowed] = 0.0
    return clipped, bool((~finite).any() or overflowed.any())


def clip_user_scores(raw_scores: np.ndarray, *, max_norm: float = SENSITIVITY, eps: float = 1e-12) -> np.ndarray:
    """Centre and scale each row, then clip it to L2 norm <= ``max_norm``; zero-variance rows become zeros.

    clipped_u = z_u · min(1, max_norm / ||z_u||),  z_u = (raw_u − mean(raw_u)) / std(raw_u).

    A row with a NaN or inf (a user whose private embedding sum is not finite) becomes a zero vector, like a
    zero-variance row, so one broken user cannot poison the node's sum; each row still has norm <= ``max_norm``.
    """
    clipped, broken = _clip_rows(raw_scores, max_norm=max_norm, eps=eps)
    if broken:
        _warn_non_finite()
    return clipped


def _warn_non_finite() -> None:
    # No count and no values: the log of a simulated node is the server's log.
    logger.warning("some users' private embeddings are not finite: they contribute a zero vector")


def clipped_scores_sum(
    sample_embeddings: np.ndarray, user_sums: np.ndarray, *, users: np.ndarray | None = None, chunk: int = 512
) -> np.ndarray:
    """Σ_u clip(z_u) over the rows ``users`` of ``user_sums`` (all rows when None), vectorised in chunks of users to
    bound memory: only one chunk of rows is gathered at a time, never a copy of the node's whole table. Shape
    (samples,).

    Sensitivity: adding or removing one user moves the sum by at most ``SENSITIVITY`` (= 1) in L2.
    """
    total = np.zeros(sample_embeddings.shape[0], dtype=np.float64)
    broken = False
    count = user_sums.shape[0] if users is None else users.shape[0]
    for start in range(0, count, chunk):
        block = user_sums[start : start + chunk] if users is None else user_sums[users[start : start + chunk]]
        raw = raw_user_scores(sample_embeddings, block)
        rows, chunk_broken = _clip_rows(raw, max_norm=SENSITIVITY, eps=1e-12)
        total += rows.sum(axis=0)
        broken = broken or chunk_broken
    if broken:
        _warn_non_finite()
    return total
