"""The baselines' DP mechanisms and accountants: known values, sensitivities, and what the server accepts."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import compute_stdv

from benchmark.dpfedavg import UserLevelDPFedAvg, clip_update, l2_norm
from benchmark.pe import nearest_sample, user_vote_sum
from popri.privacy import PrivacyLedger, calibrate_noise, compute_epsilon
from server.grid import set_task_identity


def test_popri_and_pe_accountant_known_values() -> None:
    # POPri's paper runs (q=1, T=20, δ=3e-6): σ=19.3 -> ε≈0.997 and σ=3.35 -> ε≈6.96 (Opacus RDP).
    assert compute_epsilon(noise_multiplier=19.3, delta=3e-6, sample_rate=1.0, rounds=20) == pytest.approx(
        0.997, abs=1e-3
    )
    assert compute_epsilon(noise_multiplier=3.35, delta=3e-6, sample_rate=1.0, rounds=20) == pytest.approx(
        6.96, abs=0.01
    )
    # PE calibrates the same way (q=1): ε=1 over 20 rounds needs σ just above 19.2, never overshooting.
    sigma = calibrate_noise(epsilon=1.0, delta=3e-6, sample_rate=1.0, rounds=20)
    assert 19.0 < sigma < 19.6
    assert compute_epsilon(noise_multiplier=sigma, delta=3e-6, sample_rate=1.0, rounds=20) <= 1.0


def test_dpfedavg_accountant_known_value() -> None:
    # Opacus 1.6.0 RDP with Poisson sampling: σ=1.5, q=0.04, 2250 steps, δ=1e-5 -> ε=7.3291111714386545.
    eps = compute_epsilon(noise_multiplier=1.5, delta=1e-5, sample_rate=0.04, rounds=2250)
    assert eps == pytest.approx(7.3291111714386545, rel=1e-9)


def test_pe_votes_have_user_level_sensitivity_one() -> None:
    # Prepare: 3 samples; user 0 has texts nearest to samples 0, 0, 1; user 1 one text nearest to sample 2.
    nearest = np.array([0, 0, 1, 2])
    owner = np.array([0, 0, 0, 1])

    # Execute
    votes = user_vote_sum(nearest, owner, num_samples=3)
    without_user_1 = user_vote_sum(nearest[:3], owner[:3], num_samples=3)

    # Assert: user 0 votes (2, 1, 0)/√5, user 1 votes (0, 0, 1); removing a user moves the sum by exactly 1.
    np.testing.assert_allclose(votes, [2 / np.sqrt(5), 1 / np.sqrt(5), 1.0])
    assert np.linalg.norm(votes - without_user_1) == pytest.approx(1.0)


def test_pe_votes_user_with_many_texts_still_counts_once() -> None:
    rng = np.random.default_rng(0)
    nearest = rng.integers(0, 10, size=500)
    owner = np.zeros(500, dtype=np.int64)  # one user, 500 texts
    assert np.linalg.norm(user_vote_sum(nearest, owner, num_samples=10)) == pytest.approx(1.0)


def test_nearest_sample_is_cosine_argmax() -> None:
    samples = np.eye(3, dtype=np.float32)
    private = np.array([[0.1, 0.9, 0.0], [0.0, 0.2, 0.8]], dtype=np.float32)
    assert nearest_sample(private, samples, chunk=1).tolist() == [1, 2]


def test_clip_update_is_flat_l2() -> None:
    update = [np.array([3.0, 0.0]), np.array([[4.0]])]
    clipped = clip_update(update, clip_norm=1.0)
    assert l2_norm(clipped) == pytest.approx(1.0)
    np.testing.assert_allclose(clipped[0], [0.6, 0.0])
    assert clip_update(update, clip_norm=10.0)[0] is not None and l2_norm(clip_update(update, clip_norm=10.0)) == 5.0


class _ZeroRng:
    """Stands in for the noise generator when a test checks the arithmetic around the noise."""

    def normal(self, loc: float, scale: float, size: Any) -> np.ndarray:
        return np.zeros(size)


def _strategy(**kw: Any) -> UserLevelDPFedAvg:
    args: dict[str, Any] = {
        "num_users": 4,
        "noise_multiplier": 1.0,
        "clip_norm": 1.0,
        "sample_rate": 1.0,
        "server_learning_rate": 1.0,
        "ledger": PrivacyLedger(delta=1e-5),
        "user_rng": np.random.default_rng(0),
        "noise_rng": _ZeroRng(),
    }
    args.update(kw)
    return UserLevelDPFedAvg(**args)


def _reply(to: Message, update: np.ndarray, users: list[int]) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(update.astype(np.float32))}),
            "metrics": MetricRecord({"num-examples": 1, "users": users, "num-users": len(users)}),
        }
    )
    return Message(content, reply_to=to)


def _round(strategy: UserLevelDPFedAvg, replies: list[tuple[np.ndarray, list[int]]]) -> tuple[np.ndarray, Any]:
    set_task_identity()
    current = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    strategy.current = current
    strategy.sampled = {0, 1, 2, 3}
    ask = Message(RecordDict({"arrays": current, "config": ConfigRecord({})}), dst_node_id=5, message_type="train")
    arrays, metrics = strategy.aggregate_train(1, [_reply(ask, u, users) for u, users in replies])
    assert arrays is not None
    return arrays["w"].numpy(), metrics


def test_server_sums_user_updates_and_divides_by_fixed_denominator() -> None:
    # Prepare: node A returns the sum of 2 clipped users (norm <= 2), node B one user. q=1, N=4.
    strategy = _strategy()

    # Execute
    new, metrics = _round(strategy, [(np.array([1.2, 1.6]), [0, 1]), (np.array([0.0, 1.0]), [2])])

    # Assert: θ + (S_A + S_B)/(q·N); a node's reply of norm 2 is NOT clipped to C=1 (it holds 2 users).
    np.testing.assert_allclose(new, [1.2 / 4, 2.6 / 4], rtol=1e-6)
    assert strategy.last_round_users == 3 and "users" not in metrics  # the count stays in the server's memory


def test_server_reclips_and_rejects_bad_replies() -> None:
    strategy = _strategy()
    new, metrics = _round(
        strategy,
        [
            (np.array([30.0, 40.0]), [0]),  # one user claiming norm 50: re-clipped to C=1
            (np.array([1.0, 0.0]), [0]),  # claims user 0 again: rejected
            (np.array([1.0, 0.0]), [9]),  # claims a user that was not sampled: rejected
            (np.array([np.nan, 0.0]), [1]),  # not finite: rejected
        ],
    )
    np.testing.assert_allclose(new, [0.6 / 4, 0.8 / 4], rtol=1e-6)
    assert metrics["rejected-replies"] == 3


def test_every_round_is_charged_and_matches_the_accountant() -> None:
    strategy = _strategy(noise_multiplier=2.0, sample_rate=1.0)
    for _ in range(3):
        _round(strategy, [(np.array([0.1, 0.1]), [0])])
    expected = compute_epsilon(noise_multiplier=2.0, delta=1e-5, sample_rate=1.0, rounds=3)
    assert strategy.ledger.epsilon() == pytest.approx(expected)


def test_noise_scale_matches_flower_dp_wrapper_with_one_user_per_node() -> None:
    # With one user per node and every node in every round, Flower's wrapper adds z·C/n to the mean of n replies.
    n, sigma, clip = 8, 1.3, 0.7
    strategy = _strategy(num_users=n, noise_multiplier=sigma, clip_norm=clip, noise_rng=np.random.default_rng(1))
    assert strategy.noise_std_on_mean == pytest.approx(compute_stdv(sigma, clip, n))

    # ... and the noise actually drawn has that scale (a zero update leaves only the noise).
    set_task_identity()
    current = ArrayRecord({"w": Array(np.zeros(200_000, dtype=np.float32))})
    strategy.current, strategy.sampled = current, set()
    arrays, _ = strategy.aggregate_train(1, [])
    assert arrays is not None
    assert arrays["w"].numpy().std() == pytest.approx(compute_stdv(sigma, clip, n), rel=0.01)


def test_client_returns_the_sum_of_its_users_clipped_updates() -> None:
    # Prepare: one node holding users 0, 2 and 4 (round-robin of 6 users over 2 nodes); users 0 and 4 are sampled.
    from flwr.app import Context

    from benchmark.config import DownstreamConfig
    from benchmark.downstream import SpecialIds, build_model
    from benchmark.dpfedavg import NodeData, make_client_app, model_arrays

    set_task_identity()
    special = SpecialIds(bos=0, eos=9, pad=9, vocab_size=10)
    factory = lambda: build_model(DownstreamConfig(n_embd=8, n_layer=1, n_head=2), special, max_positions=8, seed=0)  # noqa: E731
    texts = {u: [[0, 1 + u % 5, 2, 9], [0, 3, 9]] for u in (0, 2, 4)}
    app = make_client_app(lambda ctx: NodeData(user_ids=np.array([0, 2, 4]), sequences=texts), factory, pad=9, seed=0)
    arrays = model_arrays(factory())
    config = ConfigRecord(
        {
            "sampled-users": [0, 1, 4],
            "clip-norm": 0.01,
            "server-round": 1,
            "local-steps": 2,
            "local-batch-size": 2,
            "local-learning-rate": 1.0,
        }
    )
    msg = Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=101, message_type="train")
    ctx = Context(run_id=1, node_id=101, node_config={"partition-id": 0}, state=RecordDict(), run_config={})

    # Execute
    reply = app(msg, ctx)

    # Assert: it trained exactly its sampled users; the sum of 2 updates clipped to 0.01 has norm <= 0.02.
    assert list(reply.content["metrics"]["users"]) == [0, 4]
    update = reply.content["arrays"].to_numpy_ndarrays()
    assert 0 < l2_norm(update) <= 0.02 + 1e-6
    # an update (θ_u − θ summed), not weights: same parameters, tiny norm compared with θ itself
    assert list(reply.content["arrays"].keys()) == list(arrays.keys())
    assert l2_norm(arrays.to_numpy_ndarrays()) > 100 * l2_norm(update)


def test_dpfedavg_sends_and_trains_only_a_lora_adapter() -> None:
    # Prepare: a LoRA downstream on a tiny Llama (the pretrained-lora kind).
    import torch

    from benchmark.config import DownstreamConfig
    from benchmark.downstream import SpecialIds, build_downstream, trainable_parameters
    from benchmark.dpfedavg import local_update, model_arrays
    from tests.tiny_models import byte_tokenizer, tiny_causal_lm

    tok = byte_tokenizer()
    eos = tok.eos_token_id
    special = SpecialIds(bos=eos, eos=eos, pad=eos, vocab_size=len(tok))
    config = DownstreamConfig(kind="pretrained-lora", lora_r=2, dropout=0.0)
    model = build_downstream(config, special, max_positions=16, seed=0, pretrained=lambda: tiny_causal_lm(tok))

    # Execute
    arrays = model_arrays(model)
    update = local_update(
        model,
        arrays,
        [[eos, 5, 6, 7, eos]] * 4,
        local_steps=2,
        batch_size=2,
        learning_rate=0.5,
        pad=eos,
        generator=torch.Generator().manual_seed(0),
    )

    # Assert: the message holds the adapter only, and the update has one nonzero array per adapter tensor.
    assert list(arrays.keys()) == [n for n, _ in trainable_parameters(model)]
    assert all("lora_" in k for k in arrays.keys())
    assert len(update) == len(arrays.keys()) and l2_norm(update) > 0
