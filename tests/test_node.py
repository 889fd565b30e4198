"""A node's side: its users, the on-disk cache of private embeddings, and the clipped sum it returns."""

from __future__ import annotations

import numpy as np
import pytest

import popri.embedding as embedding
from popri.config import config_from_flat
from popri.data import read_user_file
from popri.node import NodeScorer, load_node_users
from popri.scoring import clip_user_scores, raw_user_scores


@pytest.fixture(scope="module")
def embedder():
    return embedding.load_embedder()


def test_second_round_reuses_cached_private_embeddings(embedder, user_file, tmp_path, monkeypatch):
    # Prepare: count calls to the embedder
    users = read_user_file(user_file)
    calls = []
    real = embedding.embed_texts
    monkeypatch.setattr(embedding, "embed_texts", lambda *a, **k: calls.append(1) or real(*a, **k))

    # Execute: two nodes' lifetimes (deployment starts a fresh process per message)
    first = NodeScorer.from_users(embedder, users, cache_dir=tmp_path)
    second = NodeScorer.from_users(embedder, users, cache_dir=tmp_path)

    # Assert
    assert len(calls) == 1
    np.testing.assert_array_equal(first.user_sums, second.user_sums)


def test_changed_data_never_reuses_a_stale_cache(embedder, user_file, tmp_path):
    users = read_user_file(user_file)
    a = NodeScorer.from_users(embedder, users, cache_dir=tmp_path)
    fewer = users.subset([0, 1, 2])
    b = NodeScorer.from_users(embedder, fewer, cache_dir=tmp_path)
    assert b.num_users == 3 and a.num_users == 12


def test_node_returns_the_sum_of_its_users_clipped_vectors(embedder, user_file, tmp_path):
    # Prepare
    users = read_user_file(user_file)
    scorer = NodeScorer.from_users(embedder, users, cache_dir=tmp_path)
    samples = embedding.embed_texts(embedder, ["the ship sails", "warm bread", "the king speaks", "a silver moon"])

    # Execute
    node_sum, n = scorer.score(samples, sample_rate=1.0, rng=np.random.default_rng(0))

    # Assert
    expected = clip_user_scores(raw_user_scores(samples, scorer.user_sums)).sum(axis=0)
    assert n == 12
    np.testing.assert_allclose(node_sum, expected)
    assert np.linalg.norm(node_sum) <= n + 1e-9


def test_node_refuses_embeddings_of_another_dimension(embedder, user_file, tmp_path):
    scorer = NodeScorer.from_users(embedder, read_user_file(user_file), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="dimension 384"):
        scorer.score(np.zeros((4, 8)), sample_rate=1.0, rng=np.random.default_rng(0))


def test_simulated_nodes_split_training_users_and_never_hold_validation_users(user_file):
    # Prepare
    config = config_from_flat({"data": str(user_file), "validation-fraction": 0.25, "min-text-chars": 5})

    # Execute
    shards = [load_node_users(config, partition_id=i, num_partitions=2) for i in range(2)]

    # Assert: 12 users, 3 held out, 9 split over two nodes without overlap
    names = [set(s.users) for s in shards]
    assert len(names[0]) + len(names[1]) == 9
    assert not names[0] & names[1]


def test_device_with_a_data_path_keeps_all_its_users(user_file):
    config = config_from_flat({"validation-fraction": 0.5, "min-text-chars": 5})
    users = load_node_users(config, partition_id=0, num_partitions=1, data_path=str(user_file))
    assert users.num_users == 12
