"""A node's side: its users, the on-disk cache of private embeddings, and the clipped sum it returns."""

from __future__ import annotations

import copy
import hashlib
import hmac

import numpy as np
import pytest
import torch

import popri.embedding as embedding
from popri.config import ConfigError, config_from_flat
from popri.data import DataFormatError, read_user_file
from popri.node import (
    NODE_ERROR_REASONS,
    NodeConfigError,
    NodeErrorCode,
    NodePolicy,
    NodeRefusal,
    NodeScorer,
    NodeSource,
    check_round_request,
    check_secagg_setup,
    error_code_for,
    load_node_users,
    node_generators,
    project_to_box,
    secagg_box_bound,
    secure_node_vector,
    source_descriptor,
    source_tag,
)
from popri.privacy import compute_epsilon
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


def test_bf16_embedder_gives_unit_rows_close_to_the_fp32_ones(embedder):
    # Prepare
    texts = ["the ship sails at dawn", "warm bread on the table", "the king speaks", "a silver moon"]
    bf16 = copy.deepcopy(embedder).to(torch.bfloat16)

    # Execute
    full, half = embedding.embed_texts(embedder, texts), embedding.embed_texts(bf16, texts)

    # Assert: renormalised in float32, and each text's two embeddings almost the same direction
    np.testing.assert_allclose(np.linalg.norm(half, axis=1), 1.0, atol=1e-6)
    assert half.dtype == np.float32 and embedding.embedder_precision(bf16) == "bf16"
    assert np.min(np.sum(full * half, axis=1)) > 0.99


def test_a_cache_written_in_one_precision_is_never_read_in_the_other(embedder, user_file, tmp_path, monkeypatch):
    # Prepare
    users = read_user_file(user_file)
    bf16 = copy.deepcopy(embedder).to(torch.bfloat16)
    calls = []
    real = embedding.embed_texts
    monkeypatch.setattr(embedding, "embed_texts", lambda *a, **k: calls.append(1) or real(*a, **k))

    # Execute
    half = NodeScorer.from_users(bf16, users, cache_dir=tmp_path)
    full = NodeScorer.from_users(embedder, users, cache_dir=tmp_path)
    again = NodeScorer.from_users(bf16, users, cache_dir=tmp_path)

    # Assert: two embeddings (one per precision), then a hit; two cache files
    assert len(calls) == 2
    assert not np.array_equal(half.user_sums, full.user_sums)
    np.testing.assert_array_equal(half.user_sums, again.user_sums)
    assert len(list((tmp_path / "private-embeddings").glob("*.npy"))) == 2


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_the_device_computes_it_natively(native, monkeypatch):
    monkeypatch.setattr(embedding, "has_native_bf16", lambda device: native)
    assert embedding.resolve_embedding_precision("auto") == ("bf16" if native else "fp32")
    assert embedding.resolve_embedding_precision("fp32") == "fp32"
    assert embedding.resolve_embedding_precision("bf16") == "bf16"
    with pytest.raises(ValueError, match="unknown embedding precision"):
        embedding.resolve_embedding_precision("fp16")


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


# ---------------------------------------------------------------------------------------------------------------------
# Data source and its tag
# ---------------------------------------------------------------------------------------------------------------------


def test_node_with_neither_a_data_path_nor_a_partition_refuses_instead_of_taking_everyone(user_file):
    # Prepare
    config = config_from_flat({"data": str(user_file), "min-text-chars": 5})

    # Execute / Assert: never "partition 0 of 1"
    with pytest.raises(NodeRefusal) as info:
        load_node_users(config)
    assert info.value.code is NodeErrorCode.DATA_UNAVAILABLE
    with pytest.raises(NodeRefusal):
        NodeSource.from_node_config({})


def test_a_lone_partition_key_is_an_error_naming_the_missing_key():
    # Execute / Assert
    with pytest.raises(NodeConfigError, match="'num-partitions'"):
        NodeSource.from_node_config({"partition-id": 0})


def test_nodes_sharing_one_file_take_disjoint_shards_of_it(user_file):
    # Prepare
    config = config_from_flat({"min-text-chars": 5})

    # Execute
    shards = [load_node_users(config, partition_id=i, num_partitions=3, data_path=str(user_file)) for i in range(3)]

    # Assert: every user of the file once, on one node only
    names = [set(s.users) for s in shards]
    assert sum(len(n) for n in names) == 12
    assert len(set().union(*names)) == 12


def test_source_descriptor_names_the_file_and_partition_or_the_simulated_partition(tmp_path):
    # Prepare
    path = tmp_path / "me.jsonl"

    # Execute
    device = source_descriptor(node_config={"data-path": str(path)}, data_setting="shakespeare")
    shared = source_descriptor(
        node_config={"data-path": str(path), "partition-id": 1, "num-partitions": 4}, data_setting="x"
    )
    simulated = source_descriptor(node_config={"partition-id": 2, "num-partitions": 5}, data_setting="shakespeare")

    # Assert
    assert device == f"file:{path.resolve()}"
    assert shared == f"file:{path.resolve()}#1/4"
    assert simulated == "partition:shakespeare:2/5"


def test_source_tag_is_the_salted_hmac_of_the_descriptor_and_not_of_the_data(tmp_path):
    # Prepare: the same file path holding different content at two times
    path = tmp_path / "me.jsonl"
    descriptor = source_descriptor(node_config={"data-path": str(path)}, data_setting="shakespeare")
    path.write_text('{"user": "a", "text": "first content here"}\n')
    before = source_tag(salt="salt-1", descriptor=descriptor)
    path.write_text('{"user": "b", "text": "other content entirely"}\n')

    # Execute
    after = source_tag(salt="salt-1", descriptor=descriptor)
    other_salt = source_tag(salt="salt-2", descriptor=descriptor)

    # Assert
    assert before == after == hmac.new(b"salt-1", descriptor.encode(), hashlib.sha256).hexdigest()
    assert other_salt != before


def test_source_tag_without_a_salt_is_an_invalid_request():
    # Execute / Assert
    with pytest.raises(NodeRefusal) as info:
        source_tag(salt="", descriptor="file:/x")
    assert info.value.code is NodeErrorCode.INVALID_REQUEST


# ---------------------------------------------------------------------------------------------------------------------
# The device owner's policy and the checks every round passes
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("node_config", "key"),
    [
        ({"min-noise-multiplier": "strong"}, "min-noise-multiplier"),
        ({"min-noise-multiplier": -1.0}, "min-noise-multiplier"),
        ({"max-epsilon": 0}, "max-epsilon"),
        ({"max-epsilon": True}, "max-epsilon"),
        ({"max-delta": 2.0}, "max-delta"),
        ({"privacy-modes": "central,local"}, "privacy-modes"),
        ({"privacy-modes": ""}, "privacy-modes"),
    ],
)
def test_bad_policy_value_is_an_error_naming_the_node_config_key(node_config, key):
    # Execute / Assert
    with pytest.raises(NodeConfigError, match=f"node-config key '{key}'"):
        NodePolicy.from_node_config(node_config)


@pytest.mark.parametrize(
    ("node_config", "run"),
    [
        ({"min-noise-multiplier": 2.0}, {"noise-multiplier": 1.5}),
        ({"max-epsilon": 1.0}, {"noise-multiplier": 1.5}),
        ({"max-delta": 1e-6}, {"noise-multiplier": 30.0, "delta": 1e-5}),
        ({"privacy-modes": "secagg"}, {"noise-multiplier": 30.0}),
        ({"privacy-modes": "central"}, {"noise-multiplier": 30.0, "privacy-mode": "secagg", "min-replies": 2}),
    ],
)
def test_policy_refuses_a_run_weaker_than_the_device_floor(node_config, run):
    # Prepare
    policy = NodePolicy.from_node_config(node_config)
    config = config_from_flat(run)

    # Execute / Assert
    with pytest.raises(NodeRefusal) as info:
        policy.check(config)
    assert info.value.code is NodeErrorCode.POLICY_REFUSED


def test_policy_accepts_a_run_at_least_as_strong_as_its_floor():
    # Prepare: the run's planned epsilon, as the accountant computes it
    config = config_from_flat({"noise-multiplier": 2.0, "rounds": 6})
    planned = compute_epsilon(noise_multiplier=2.0, delta=config.privacy.delta, sample_rate=1.0, rounds=6)
    policy = NodePolicy.from_node_config(
        {"min-noise-multiplier": 2.0, "max-epsilon": planned * 1.001, "privacy-modes": "central"}
    )

    # Execute / Assert: no refusal
    policy.check(config)


@pytest.mark.parametrize(
    ("run", "mode", "rate", "code"),
    [
        ({"privacy-mode": "secagg", "min-replies": 2}, "central", 1.0, NodeErrorCode.POLICY_REFUSED),
        ({}, "secagg", 1.0, NodeErrorCode.POLICY_REFUSED),
        ({"privacy-mode": "secagg", "min-replies": 2, "noise-seed": 5}, "secagg", 1.0, NodeErrorCode.POLICY_REFUSED),
        ({"sample-rate": 0.5}, "central", 1.0, NodeErrorCode.INVALID_REQUEST),
        ({}, "central", "1.0", NodeErrorCode.INVALID_REQUEST),
    ],
)
def test_round_request_must_match_the_run_s_mode_rate_and_unseeded_secure_noise(run, mode, rate, code):
    # Prepare
    config = config_from_flat({"noise-multiplier": 1.0, **run})

    # Execute / Assert
    with pytest.raises(NodeRefusal) as info:
        check_round_request(config, mode=mode, sample_rate=rate)
    assert info.value.code is code


def test_round_request_with_the_run_s_settings_passes():
    # Prepare
    config = config_from_flat(
        {"noise-multiplier": 1.0, "sample-rate": 0.25, "privacy-mode": "secagg", "min-replies": 2}
    )

    # Execute / Assert: no refusal
    check_round_request(config, mode="secagg", sample_rate=0.25)


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (NodeRefusal(NodeErrorCode.POLICY_REFUSED, "x"), NodeErrorCode.POLICY_REFUSED),
        (NodeConfigError("x"), NodeErrorCode.POLICY_REFUSED),
        (NodeConfigError("x", code=NodeErrorCode.DATA_UNAVAILABLE), NodeErrorCode.DATA_UNAVAILABLE),
        (ConfigError("x"), NodeErrorCode.INVALID_REQUEST),
        (DataFormatError("x"), NodeErrorCode.DATA_UNAVAILABLE),
        (FileNotFoundError("x"), NodeErrorCode.DATA_UNAVAILABLE),
        (RuntimeError("x"), NodeErrorCode.INTERNAL_ERROR),
    ],
)
def test_every_failure_maps_to_one_fixed_code(err, code):
    # Execute / Assert
    assert error_code_for(err) is code
    assert NODE_ERROR_REASONS[int(code)] == code.reason and code.reason.startswith("popri/")


# ---------------------------------------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------------------------------------


def test_generators_come_from_os_entropy_without_a_noise_seed():
    # Execute
    first = [g.random(4) for g in node_generators(noise_seed=None, node_id=1, round_index=0)]
    second = [g.random(4) for g in node_generators(noise_seed=None, node_id=1, round_index=0)]

    # Assert: the same node and round never repeat their draws
    assert not np.array_equal(first[0], second[0]) and not np.array_equal(first[1], second[1])


def test_seeded_generators_are_reproducible_and_independent_per_node_round_and_stream():
    # Execute
    draws = {
        (node, rnd): [g.random(4) for g in node_generators(noise_seed=7, node_id=node, round_index=rnd)]
        for node in (1, 2)
        for rnd in (0, 1)
    }
    again = [g.random(4) for g in node_generators(noise_seed=7, node_id=1, round_index=0)]

    # Assert
    np.testing.assert_array_equal(again[0], draws[1, 0][0])
    np.testing.assert_array_equal(again[1], draws[1, 0][1])
    streams = [tuple(d) for pair in draws.values() for d in pair]
    assert len(set(streams)) == len(streams)


# ---------------------------------------------------------------------------------------------------------------------
# Secure-aggregation vector
# ---------------------------------------------------------------------------------------------------------------------


def test_box_bound_leaves_z_noise_stds_below_the_range():
    # Prepare
    dimension, std, failure = 384, 0.7, 2.0**-40

    # Execute
    bound = secagg_box_bound(clipping_range=64.0, noise_std=std, dimension=dimension, failure_probability=failure)

    # Assert: the union bound d·exp(-z²/2) at z = (R - B)/s is the failure probability
    z = (64.0 - bound) / std
    assert 0 < bound < 64.0
    assert dimension * np.exp(-(z**2) / 2) == pytest.approx(failure)


def test_a_range_too_small_for_the_noise_is_an_invalid_request():
    # Execute / Assert
    with pytest.raises(NodeRefusal) as info:
        secagg_box_bound(clipping_range=1.0, noise_std=1.0, dimension=10)
    assert info.value.code is NodeErrorCode.INVALID_REQUEST


@pytest.mark.parametrize("seed", range(5))
def test_box_projection_never_increases_the_distance_between_neighbouring_sums(seed):
    # Prepare: a node sum (some entries far outside the box) and a neighbour that differs by one clipped user
    rng = np.random.default_rng(seed)
    node_sum = rng.normal(0, 50, size=64)
    user = rng.normal(size=64)
    neighbour = node_sum + user / max(1.0, np.linalg.norm(user))

    # Execute
    a, b = project_to_box(node_sum, bound=10.0), project_to_box(neighbour, bound=10.0)

    # Assert
    assert np.linalg.norm(a - b) <= np.linalg.norm(node_sum - neighbour) + 1e-12
    assert np.abs(a).max() <= 10.0


def test_secure_vector_of_a_huge_sum_stays_inside_the_secagg_range():
    # Prepare: a clipped sum far beyond the range (many users agreeing)
    node_sum = np.full(200, 1e6)
    node_sum[::2] = -1e6

    # Execute
    noisy = secure_node_vector(
        node_sum=node_sum, noise_multiplier=1.0, min_replies=2, clipping_range=16.0, rng=np.random.default_rng(0)
    )

    # Assert
    assert np.all(np.isfinite(noisy)) and np.abs(noisy).max() < 16.0


def test_secure_vector_refuses_non_finite_values_before_quantisation():
    # Prepare
    node_sum = np.array([0.5, np.nan, 1.0])

    # Execute / Assert
    with pytest.raises(NodeRefusal):
        secure_node_vector(
            node_sum=node_sum, noise_multiplier=1.0, min_replies=2, clipping_range=16.0, rng=np.random.default_rng(0)
        )


@pytest.mark.parametrize(
    ("clipping_range", "threshold", "max_weight"),
    [(16.0, 1, 1.0), (8.0, 3, 1.0), (16.0, 3, 0.5)],
)
def test_secagg_setup_weaker_than_the_run_is_refused(clipping_range, threshold, max_weight):
    # Prepare: the run needs 3 replies and a range of 16
    config = config_from_flat(
        {
            "noise-multiplier": 1.0,
            "privacy-mode": "secagg",
            "min-replies": 3,
            "num-nodes": 3,
            "secagg-clipping-range": 16,
        }
    )

    # Execute / Assert
    with pytest.raises(NodeRefusal):
        check_secagg_setup(config, clipping_range=clipping_range, threshold=threshold, max_weight=max_weight)


def test_node_with_one_broken_user_still_replies_a_finite_sum_of_the_others():
    # Prepare: three users, the second one's private embedding sum is NaN (a broken text on the device)
    rng = np.random.default_rng(0)
    sums = rng.normal(size=(3, 8))
    samples = rng.normal(size=(5, 8))
    healthy = NodeScorer(sums[[0, 2]]).score(samples, sample_rate=1.0, rng=np.random.default_rng(0))[0]
    sums[1] = np.nan

    # Execute
    node_sum, n = NodeScorer(sums).score(samples, sample_rate=1.0, rng=np.random.default_rng(0))

    # Assert
    assert n == 3 and np.all(np.isfinite(node_sum))
    np.testing.assert_allclose(node_sum, healthy, rtol=0, atol=1e-12)


def test_two_names_of_one_file_give_one_source_descriptor(tmp_path):
    # Prepare: a symlink to the device's file, as a second node might be pointed at it
    path = tmp_path / "me.jsonl"
    path.write_text('{"user": "a", "text": "some text here"}\n')
    link = tmp_path / "alias.jsonl"
    link.symlink_to(path)

    # Execute
    direct = source_descriptor(node_config={"data-path": str(path)}, data_setting="x")
    aliased = source_descriptor(node_config={"data-path": str(link)}, data_setting="x")

    # Assert: the server sees the overlap
    assert direct == aliased


def test_a_node_warns_in_its_own_log_when_delta_is_not_below_one_over_its_users(tmp_path, caplog) -> None:
    # Prepare: 3 users on this node and delta = 0.5 >= 1/3 (so delta >= 1/(every user in the federation) too)
    import logging

    from popri.config import config_from_flat
    from popri.node import NodeSource, prepare_node

    data = tmp_path / "users.jsonl"
    data.write_text("".join(f'{{"user": "u{i}", "text": "a line of text number {i} here"}}\n' for i in range(3)))
    config = config_from_flat({"data": str(data), "delta": 0.5, "min-text-chars": 5})
    source = NodeSource.from_node_config({"data-path": str(data)})

    # Execute
    with caplog.at_level(logging.WARNING, logger="popri.node"):
        prepare_node(config, source, cache_dir=tmp_path / "cache", progress=False)

    # Assert: the warning names delta and states no count
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("delta=0.5 is not below 1/(number of users)" in w for w in warnings)
    assert not any("3" in w.replace("delta=0.5", "") for w in warnings)
