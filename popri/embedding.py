"""Sentence embeddings (all-MiniLM-L6-v2 by default), unit-normalised, and the client's cache of private ones."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from popri.assets import best_device, minilm_path
from popri.data import UserData
from popri.scoring import user_embedding_sums

logger = logging.getLogger(__name__)


def load_embedder(path: str | Path | None = None) -> Any:
    """The sentence embedder, on the best device this machine has (a node's own GPU when it has one)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path or minilm_path()), device=str(best_device()))


def embed_texts(embedder: Any, texts: list[str], *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """(len(texts), d) float32, each row of unit L2 norm (so cosine similarity = dot product)."""
    if not texts:
        return np.zeros((0, embedder.get_sentence_embedding_dimension()), dtype=np.float32)
    emb = embedder.encode(
        texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=progress
    )
    return np.asarray(emb, dtype=np.float32)


def cached_user_sums(
    embedder: Any | None,
    data: UserData,
    *,
    cache_dir: Path,
    embedder_id: str = "all-MiniLM-L6-v2",
    progress: bool = False,
) -> np.ndarray:
    """Per-user sums of private text embeddings, computed once and cached on the client's own disk.

    The cache holds private-derived data: it lives on the device that owns the data and never leaves it. Keyed by the
    data's content hash and the embedder, so a changed file or model never reuses stale sums. ``embedder=None`` loads
    the default embedder only on a cache miss (a deployed node runs each round in a fresh process).
    """
    key = f"{data.fingerprint()}-{embedder_id.replace('/', '_')}"
    path = cache_dir / "private-embeddings" / f"{key}.npy"
    if path.exists():
        sums = np.load(path)
        if sums.shape[0] == data.num_users:
            return sums
    logger.info("embedding %d private texts of %d users (cached afterwards)", len(data.texts), data.num_users)
    if embedder is None:
        embedder = load_embedder()
    sums = user_embedding_sums(embed_texts(embedder, data.texts, progress=progress), data.owner, data.num_users)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy")
    with os.fdopen(fd, "wb") as fh:
        np.save(fh, sums)
    os.replace(tmp, path)
    return sums
