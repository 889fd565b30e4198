"""Sentence embeddings (all-MiniLM-L6-v2 by default), unit-normalised, and the client's cache of private ones."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from popri.assets import best_device, has_native_bf16, minilm_path
from popri.checkpoint import atomic_write_npy
from popri.config import EMBEDDING_PRECISIONS
from popri.data import UserData
from popri.scoring import user_embedding_sums

logger = logging.getLogger(__name__)


def resolve_embedding_precision(precision: str, device: torch.device | None = None) -> str:
    """``bf16`` or ``fp32`` for a configured ``embedding-precision``; ``auto`` is bf16 where ``device`` (the best one
    here by default) computes bf16 natively (:func:`popri.assets.has_native_bf16`), else fp32.

    bf16 weights move each score of a node's clipped sum by far less than the DP noise does (docs/perf.md, "Private
    embedding"), and they cost the guarantee nothing: the sensitivity comes from clipping the final vector.
    """
    if precision not in EMBEDDING_PRECISIONS:
        raise ValueError(f"unknown embedding precision {precision!r}; use {', '.join(EMBEDDING_PRECISIONS)}")
    if precision != "auto":
        return precision
    return "bf16" if has_native_bf16(device or best_device()) else "fp32"


def load_embedder(path: str | Path | None = None, *, precision: str = "fp32") -> Any:
    """The sentence embedder, on the best device this machine has (a node's own GPU when it has one), with its
    weights in ``precision`` (:func:`resolve_embedding_precision`)."""
    from sentence_transformers import SentenceTransformer

    device = best_device()
    embedder = SentenceTransformer(str(path or minilm_path()), device=str(device))
    if resolve_embedding_precision(precision, device) == "bf16":
        embedder = embedder.to(torch.bfloat16)
    return embedder


def embedder_precision(embedder: Any) -> str:
    """``bf16`` or ``fp32``: the precision of the embedder's weights (part of the embedding cache's key)."""
    params = getattr(embedder, "parameters", None)
    dtype = next(iter(params()), torch.zeros(0)).dtype if callable(params) else torch.float32
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def embed_texts(embedder: Any, texts: list[str], *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """(len(texts), d) float32, each row of unit L2 norm (so cosine similarity = dot product).

    Rows are normalised again in float32: a bf16 embedder's own normalisation leaves norms ~1e-3 away from 1.
    """
    if not texts:
        return np.zeros((0, embedder.get_sentence_embedding_dimension()), dtype=np.float32)
    emb = embedder.encode(
        texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=progress
    )
    emb = np.asarray(emb, dtype=np.float32)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.where(norms > 0, norms, 1.0)


def _embed_with_progress(embedder: Any, texts: list[str], *, chunk: int = 1024) -> np.ndarray:
    """Embed in chunks and log progress as tenths of the work: the log lines are the same for any data size."""
    parts: list[np.ndarray] = []
    logged = 0
    for start in range(0, len(texts), chunk):
        parts.append(embed_texts(embedder, texts[start : start + chunk]))
        done = (10 * min(start + chunk, len(texts))) // max(len(texts), 1)
        for tenth in range(logged + 1, done + 1):
            logger.info("embedding private texts: %d%%", 10 * tenth)
        logged = max(logged, done)
    return np.concatenate(parts) if parts else embed_texts(embedder, [])


def _load_cached(path: Path, num_users: int) -> np.ndarray | None:
    """The cached sums, or None when missing, unreadable (a torn write, a full disk) or of the wrong shape."""
    if not path.exists():
        return None
    try:
        sums = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        logger.warning("%s: unreadable embedding cache (%s); recomputing it", path, type(err).__name__)
        return None
    if sums.ndim != 2 or sums.shape[0] != num_users or not np.issubdtype(sums.dtype, np.floating):
        logger.warning("%s: embedding cache of an unexpected shape; recomputing it", path)
        return None
    return sums


def cached_user_sums(
    embedder: Any | None,
    data: UserData,
    *,
    cache_dir: Path,
    embedder_id: str = "all-MiniLM-L6-v2",
    precision: str = "fp32",
    progress: bool = False,
) -> np.ndarray:
    """Per-user sums of private text embeddings, computed once and cached on the client's own disk.

    The cache holds private-derived data: it lives on the device that owns the data and never leaves it. Keyed by the
    data's content hash, the embedder and its precision, so a changed file, model or precision never reuses stale
    sums; an unreadable cache is recomputed. ``embedder=None`` loads the default embedder in ``precision``
    (:func:`resolve_embedding_precision`) only on a cache miss (a deployed node runs each message in a fresh
    process); a given embedder keeps its own precision. ``progress`` logs the embedding's progress in tenths (no
    counts: they are private).
    """
    resolved = embedder_precision(embedder) if embedder is not None else resolve_embedding_precision(precision)
    suffix = "" if resolved == "fp32" else f"-{resolved}"  # fp32 caches keep the key they had before precisions
    key = f"{data.fingerprint()}-{embedder_id.replace('/', '_')}{suffix}"
    path = cache_dir / "private-embeddings" / f"{key}.npy"
    sums = _load_cached(path, data.num_users)
    if sums is not None:
        return sums
    logger.info("embedding this node's private texts in %s (cached afterwards)", resolved)
    if embedder is None:
        embedder = load_embedder(precision=resolved)
    embedded = _embed_with_progress(embedder, data.texts) if progress else embed_texts(embedder, data.texts)
    sums = user_embedding_sums(embedded, data.owner, data.num_users)
    try:
        atomic_write_npy(path, sums)
    except OSError as err:  # a full or read-only disk costs the cache, not the round
        logger.warning("%s: cannot write the embedding cache (%s); continuing without it", path, type(err).__name__)
    return sums
