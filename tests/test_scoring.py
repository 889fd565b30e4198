"""Client scoring: the vectorised scores equal the per-user definition, and one user moves the sum by at most 1."""

from __future__ import annotations

import numpy as np
import pytest

from popri.scoring import clip_user_scores, clipped_scores_sum, raw_user_scores, user_embedding_sums


def _unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _random_users(seed: int, *, num_users: int = 9, num_samples: int = 12, dim: int = 16):
    """Unit-norm sample and private embeddings; users own 0..5 texts (user 0 owns none)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    samples = _unit_rows(rng, num_samples, dim)
    counts = rng.integers(1, 6, size=num_users)
    counts[0] = 0
    owner = np.repeat(np.arange(num_users), counts)
    rng.shuffle(owner)
    private = _unit_rows(rng, owner.size, dim)
    return samples, private, owner


def _naive_clipped_rows(samples: np.ndarray, private: np.ndarray, owner: np.ndarray, num_users: int) -> np.ndarray:
    """The definition, one user and one sample at a time: Σ cos, then z-score, then clip to L2 norm 1."""
    rows = []
    for u in range(num_users):
        texts = [private[i] for i in range(len(owner)) if owner[i] == u]
        raw = np.array(
            [sum(float(e @ x) / (np.linalg.norm(e) * np.linalg.norm(x)) for x in texts) for e in samples], dtype=float
        )
        std = raw.std()
        if std == 0 or not texts:
            rows.append(np.zeros(len(samples)))
            continue
        z = (raw - raw.mean()) / std
        rows.append(z * min(1.0, 1.0 / np.linalg.norm(z)))
    return np.array(rows)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_scores_equal_the_per_user_loop(seed: int) -> None:
    # prepare
    samples, private, owner = _random_users(seed)
    expected_rows = _naive_clipped_rows(samples, private, owner, num_users=9)

    # execute
    sums = user_embedding_sums(private, owner, num_users=9)
    rows = clip_user_scores(raw_user_scores(samples, sums))
    total = clipped_scores_sum(samples, sums)

    # assert
    np.testing.assert_allclose(rows, expected_rows, rtol=0, atol=1e-10)
    np.testing.assert_allclose(total, expected_rows.sum(axis=0), rtol=0, atol=1e-10)


def test_raw_scores_are_sums_of_cosines_per_user() -> None:
    # prepare
    samples, private, owner = _random_users(3)

    # execute
    raw = raw_user_scores(samples, user_embedding_sums(private, owner, num_users=9))

    # assert: the (u, j) entry is Σ_{x ∈ D_u} cos(e_j, x)
    for u, j in [(1, 0), (4, 7), (8, 11)]:
        texts = private[owner == u]
        assert raw[u, j] == pytest.approx(sum(float(samples[j] @ x) for x in texts), abs=1e-12)
    np.testing.assert_array_equal(raw[0], np.zeros(12))  # user 0 has no texts


def test_user_embedding_sums_rejects_mismatched_owner_ids() -> None:
    # execute / assert
    with pytest.raises(ValueError, match="owner ids"):
        user_embedding_sums(np.zeros((4, 3)), np.zeros(5, dtype=np.int64), num_users=2)


def test_every_clipped_row_has_unit_norm_when_its_scores_vary() -> None:
    # prepare: a z-scored row with population std has norm sqrt(N) >= sqrt(2) > 1, so the clip always binds
    rng = np.random.Generator(np.random.PCG64(4))
    raw = rng.standard_normal((50, 7)) * rng.uniform(1e-3, 1e3, size=(50, 1)) + rng.uniform(-5, 5, size=(50, 1))

    # execute
    clipped = clip_user_scores(raw)

    # assert
    np.testing.assert_allclose(np.linalg.norm(clipped, axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(clipped.mean(axis=1), 0.0, atol=1e-12)  # still centred


@pytest.mark.parametrize("max_norm", [0.5, 2.0, 10.0])
def test_clipped_rows_never_exceed_max_norm(max_norm: float) -> None:
    # prepare: N = 4 samples, so an unclipped z-score row has norm 2
    raw = np.random.Generator(np.random.PCG64(5)).standard_normal((20, 4))

    # execute
    norms = np.linalg.norm(clip_user_scores(raw, max_norm=max_norm), axis=1)

    # assert
    np.testing.assert_allclose(norms, min(max_norm, 2.0), rtol=1e-12)


def test_zero_variance_users_contribute_a_zero_row_never_nan() -> None:
    # prepare: no texts (zero sum), identical scores for every sample, a single sample, and a normal user
    raw = np.array(
        [
            [0.0, 0.0, 0.0],
            [0.7, 0.7, 0.7],
            [0.2, 0.5, 0.1],
        ]
    )
    single_sample = np.array([[3.0], [0.0]])

    # execute
    clipped = clip_user_scores(raw)
    clipped_single = clip_user_scores(single_sample)

    # assert
    assert np.all(np.isfinite(clipped)) and np.all(np.isfinite(clipped_single))
    np.testing.assert_array_equal(clipped[0], 0.0)
    np.testing.assert_array_equal(clipped[1], 0.0)
    assert np.linalg.norm(clipped[2]) == pytest.approx(1.0)
    np.testing.assert_array_equal(clipped_single, 0.0)


def test_identical_sample_embeddings_give_zero_rows() -> None:
    # prepare: every sample is the same text, so no user can prefer one
    rng = np.random.Generator(np.random.PCG64(6))
    sample = _unit_rows(rng, 1, 8)
    samples = np.repeat(sample, 5, axis=0)
    sums = rng.standard_normal((4, 8))

    # execute
    total = clipped_scores_sum(samples, sums)

    # assert
    np.testing.assert_array_equal(total, np.zeros(5))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_adding_or_removing_one_user_moves_the_sum_by_at_most_one(seed: int) -> None:
    # prepare: neighbouring data sets differ in exactly one user
    samples, private, owner = _random_users(seed, num_users=30, num_samples=20)
    sums = user_embedding_sums(private, owner, num_users=30)
    removed = int(np.random.Generator(np.random.PCG64(seed + 100)).integers(30))
    without = np.delete(sums, removed, axis=0)
    extra_user = 50.0 * np.random.Generator(np.random.PCG64(seed + 200)).standard_normal((1, 16))  # an outlier
    with_extra = np.vstack([sums, extra_user])

    # execute
    base = clipped_scores_sum(samples, sums)
    removed_sum = clipped_scores_sum(samples, without)
    added_sum = clipped_scores_sum(samples, with_extra)

    # assert: the sensitivity the accountant assumes
    assert np.linalg.norm(base - removed_sum) <= 1.0 + 1e-12
    assert np.linalg.norm(added_sum - base) <= 1.0 + 1e-12


@pytest.mark.parametrize("chunk", [1, 2, 7, 40, 512])
def test_chunking_does_not_change_the_sum(chunk: int) -> None:
    # prepare
    samples, private, owner = _random_users(7, num_users=40, num_samples=15)
    sums = user_embedding_sums(private, owner, num_users=40)
    unchunked = clip_user_scores(raw_user_scores(samples, sums)).sum(axis=0)

    # execute
    total = clipped_scores_sum(samples, sums, chunk=chunk)

    # assert
    np.testing.assert_allclose(total, unchunked, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 3, 512])
def test_a_subset_of_rows_sums_exactly_those_users(chunk: int) -> None:
    # prepare: 40 users, of which a sampled subset (repeats allowed in the index, as numpy indexing allows)
    samples, private, owner = _random_users(9, num_users=40, num_samples=15)
    sums = user_embedding_sums(private, owner, num_users=40)
    users = np.array([0, 3, 4, 17, 39, 21])

    # execute
    total = clipped_scores_sum(samples, sums, users=users, chunk=chunk)

    # assert: the same as summing a gathered copy of those rows
    np.testing.assert_allclose(total, clipped_scores_sum(samples, sums[users]), rtol=0, atol=1e-12)


def test_scores_do_not_depend_on_the_dtype_of_the_embeddings() -> None:
    # prepare: embedders return float32; the scores are computed in float64 either way
    samples, private, owner = _random_users(8)
    samples32, private32 = samples.astype(np.float32), private.astype(np.float32)

    # execute
    total64 = clipped_scores_sum(
        samples32.astype(np.float64), user_embedding_sums(private32.astype(np.float64), owner, 9)
    )
    total32 = clipped_scores_sum(samples32, user_embedding_sums(private32, owner, 9))

    # assert
    assert total32.dtype == np.float64
    np.testing.assert_allclose(total32, total64, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e308])
def test_a_user_with_non_finite_embeddings_contributes_zero_and_does_not_poison_the_sum(
    bad: float, caplog: pytest.LogCaptureFixture
) -> None:
    # prepare: user 3's embedding sum is broken (NaN, inf, or so large that its scores overflow)
    samples, private, owner = _random_users(9)
    sums = user_embedding_sums(private, owner, num_users=9)
    healthy = clipped_scores_sum(samples, np.delete(sums, 3, axis=0))
    sums[3] = bad

    # execute
    with caplog.at_level("WARNING", logger="popri.scoring"):
        total = clipped_scores_sum(samples, sums)
        rows = clip_user_scores(raw_user_scores(samples, sums))

    # assert: the others' sum is intact, the broken user's row is zero, and the warning names no value or count
    assert np.all(np.isfinite(total))
    np.testing.assert_allclose(total, healthy, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(rows[3], 0.0)
    assert "not finite" in caplog.text
    assert not any(ch.isdigit() for record in caplog.records for ch in record.getMessage())
