"""Distribution metrics between a corpus and the test users' texts, on sentence embeddings (benchmark diagnostics).

Private Evolution (Lin et al. 2024) and Aug-PE (Xie et al. 2024) report, beside downstream accuracy, how close the
synthetic texts lie to the private ones in an embedding space: FID and k-NN precision/recall. Here both are computed on
all-MiniLM-L6-v2 embeddings (the embedder POPri and PE use) against the *test* users' texts. They read private text, so
they are non-private benchmark diagnostics, never part of a normal run.

FID is biased when the sample count is small relative to the dimension (384), so sets are compared at equal counts:
:func:`equal_counts` subsamples the larger side with a seeded generator.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import linalg
from scipy.spatial.distance import cdist


def equal_counts(a: np.ndarray, b: np.ndarray, *, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``a`` and ``b`` with the larger one subsampled without replacement to the size of the smaller one."""
    n = min(a.shape[0], b.shape[0])
    if a.shape[0] > n:
        a = a[np.sort(rng.choice(a.shape[0], size=n, replace=False))]
    if b.shape[0] > n:
        b = b[np.sort(rng.choice(b.shape[0], size=n, replace=False))]
    return a, b


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to the rows of ``a`` and ``b`` (FID on embeddings).

    ``d² = ||μ_a − μ_b||² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2})`` with sample means and covariances (ddof = 1).

    Source: Fréchet (1957); Dowson & Landau (1982) for the Gaussian closed form; Heusel et al. (2017), "GANs Trained
    by a Two Time-Scale Update Rule ..." (FID). As in their reference code, a singular product gets ``1e-6·I`` added to
    both covariances before the square root, and the tiny imaginary part of ``sqrtm`` is dropped.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two (n, d) arrays of the same d, got {a.shape} and {b.shape}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("FID needs at least 2 rows on each side")
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.all(np.isfinite(covmean)):
        offset = 1e-6 * np.eye(cov_a.shape[0])
        covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = np.real(covmean)
    diff = mu_a - mu_b
    return float(max(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean), 0.0))


def _kth_neighbour_radius(x: np.ndarray, k: int) -> np.ndarray:
    """Distance of each row of ``x`` to its k-th nearest other row (itself excluded)."""
    d = cdist(x, x)
    np.fill_diagonal(d, np.inf)
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def _coverage(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> float:
    """Fraction of ``points`` inside at least one ball ``B(centres[i], radii[i])``."""
    return float(np.mean((cdist(points, centres) <= radii[None, :]).any(axis=1)))


def knn_precision_recall(real: np.ndarray, fake: np.ndarray, *, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for Assessing
    Generative Models", NeurIPS), Euclidean distance, k-NN manifolds:

        manifold(X) = ∪_{x ∈ X} B(x, ||x − NN_k(x, X)||)
        precision   = (1/|fake|) Σ_{y ∈ fake} 1[y ∈ manifold(real)]    (fake samples that look real)
        recall      = (1/|real|) Σ_{x ∈ real} 1[x ∈ manifold(fake)]    (real samples the fake set covers)

    Aug-PE reports these with k = 3.
    """
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"need two (n, d) arrays of the same d, got {real.shape} and {fake.shape}")
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"k-NN precision/recall with k={k} needs more than {k} rows on each side")
    real, fake = real.astype(np.float64), fake.astype(np.float64)
    precision = _coverage(fake, real, _kth_neighbour_radius(real, k))
    recall = _coverage(real, fake, _kth_neighbour_radius(fake, k))
    return precision, recall


def mean_words(texts: list[str]) -> float | None:
    """Mean whitespace-separated words per text (None for no texts): a corpus whose samples drift longer or shorter
    than the private texts shows it here, whatever the embedding metrics say."""
    return float(np.mean([len(t.split()) for t in texts])) if texts else None


def distribution_metrics(
    corpus_embeddings: np.ndarray, reference_embeddings: np.ndarray, *, rng: np.random.Generator, k: int = 3
) -> dict[str, Any]:
    """``fid``, ``knn_precision``, ``knn_recall`` (and the equal ``metric_samples`` count) of a corpus against the
    reference (test users') embeddings, after :func:`equal_counts`."""
    corpus, reference = equal_counts(corpus_embeddings, reference_embeddings, rng=rng)
    out: dict[str, Any] = {"metric_samples": int(corpus.shape[0])}
    out["fid"] = frechet_distance(corpus, reference) if corpus.shape[0] >= 2 else None
    if corpus.shape[0] > k:
        out["knn_precision"], out["knn_recall"] = knn_precision_recall(reference, corpus, k=k)
    else:
        out["knn_precision"] = out["knn_recall"] = None
    return out
