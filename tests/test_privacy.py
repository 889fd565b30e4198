"""Privacy core: accountant known values, calibration, the ledger, the Gaussian mechanism, sampling, re-clipping."""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binom, chi2

from popri.privacy import (
    BudgetExceededError,
    InvalidReplyError,
    PrivacyLedger,
    add_noise_share,
    calibrate_noise,
    clip_l2,
    compute_epsilon,
    gaussian_mechanism,
    make_noise_rng,
    noise_share_std,
    poisson_sample,
    validate_node_sum,
)

# ---------------------------------------------------------------------------------------------------------------------
# Accountant known values
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("noise_multiplier", "expected_epsilon"),
    [(19.3, 0.997), (3.35, 6.962)],  # POPri paper runs: q = 1, T = 20, δ = 3e-6
)
def test_compute_epsilon_matches_popri_paper_values(noise_multiplier: float, expected_epsilon: float) -> None:
    # execute
    epsilon = compute_epsilon(noise_multiplier=noise_multiplier, delta=3e-6, sample_rate=1.0, rounds=20)

    # assert
    assert epsilon == pytest.approx(expected_epsilon, abs=1e-3)


def test_compute_epsilon_matches_opacus_rdp_known_value() -> None:
    # prepare: opacus' own test_rdp_accountant setting
    setting = {"noise_multiplier": 1.5, "sample_rate": 0.04, "rounds": 2250, "delta": 1e-5}

    # execute
    epsilon = compute_epsilon(**setting)

    # assert
    assert epsilon == pytest.approx(7.32911117143, abs=1e-9)


def test_compute_epsilon_is_zero_before_any_round_and_grows_with_rounds() -> None:
    # execute
    spent = [compute_epsilon(noise_multiplier=2.0, delta=1e-6, sample_rate=1.0, rounds=t) for t in (0, 1, 5, 10)]

    # assert
    assert spent[0] == 0.0
    assert spent[1] < spent[2] < spent[3]


def test_compute_epsilon_rejects_unknown_accountant() -> None:
    # execute / assert
    with pytest.raises(ValueError, match="'foo'"):
        compute_epsilon(noise_multiplier=2.0, delta=1e-6, sample_rate=1.0, rounds=3, accountant="foo")


# ---------------------------------------------------------------------------------------------------------------------
# Noise calibration
# ---------------------------------------------------------------------------------------------------------------------


@settings(max_examples=10, deadline=None, derandomize=True)  # the same examples on every run
@given(
    epsilon=st.floats(min_value=0.5, max_value=10.0),
    sample_rate=st.floats(min_value=0.01, max_value=1.0),
    rounds=st.integers(min_value=1, max_value=50),
)
def test_calibrated_noise_never_overshoots_and_is_tight(epsilon: float, sample_rate: float, rounds: int) -> None:
    # prepare
    delta, tolerance = 1e-5, 0.01

    # execute
    sigma = calibrate_noise(epsilon=epsilon, delta=delta, sample_rate=sample_rate, rounds=rounds, tolerance=tolerance)
    spent = compute_epsilon(noise_multiplier=sigma, delta=delta, sample_rate=sample_rate, rounds=rounds)
    spent_with_less_noise = compute_epsilon(
        noise_multiplier=0.95 * sigma, delta=delta, sample_rate=sample_rate, rounds=rounds
    )

    # assert: never above the target; either within the bisection tolerance of it, or 5 % less noise overshoots
    assert spent <= epsilon
    assert spent >= epsilon - tolerance - 1e-9 or spent_with_less_noise > epsilon


def test_calibrate_noise_reproduces_paper_sigma_for_epsilon_one() -> None:
    # execute: the paper's ε ≈ 1 run (q = 1, T = 20, δ = 3e-6) used σ = 19.3
    sigma = calibrate_noise(epsilon=1.0, delta=3e-6, sample_rate=1.0, rounds=20)

    # assert
    assert sigma == pytest.approx(19.3, rel=0.01)


# ---------------------------------------------------------------------------------------------------------------------
# Gaussian mechanism and the noise generator
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("noise_multiplier", [0.5, 3.35, 19.3])
def test_gaussian_mechanism_noise_has_std_sigma_and_mean_zero(noise_multiplier: float) -> None:
    # prepare
    n = 200_000
    rng = np.random.Generator(np.random.PCG64(1234))

    # execute
    noisy = gaussian_mechanism(summed_scores=np.zeros(n), noise_multiplier=noise_multiplier, sensitivity=1.0, rng=rng)

    # assert: (n-1)·s²/σ² ~ χ²(n-1); a two-sided 1e-6 interval fails a correct mechanism once in 10^6 seeds,
    # and is about ±1.1 % on the std at this n, so a σ·C/n or σ² mix-up cannot pass
    sample_var = noisy.var(ddof=1)
    low, high = chi2.ppf([1e-6, 1 - 1e-6], df=n - 1) * noise_multiplier**2 / (n - 1)
    assert low <= sample_var <= high
    # the sample mean is N(0, σ²/n): |mean| < 5 standard errors
    assert abs(noisy.mean()) < 5 * noise_multiplier / np.sqrt(n)


@pytest.mark.parametrize(("min_replies", "replies"), [(2, 2), (5, 5), (5, 8)])
def test_noise_shares_of_min_replies_nodes_sum_to_at_least_the_central_noise(min_replies: int, replies: int) -> None:
    # prepare
    n, sigma = 100_000, 3.35
    rng = np.random.Generator(np.random.PCG64(99))

    # execute: what the secure sum holds when `replies` nodes each add their share
    shares = [
        add_noise_share(node_sum=np.zeros(n), noise_multiplier=sigma, min_replies=min_replies, rng=rng)
        for _ in range(replies)
    ]
    total = np.sum(shares, axis=0)

    # assert: variance (replies / min_replies)·σ², in the same 1e-6 χ² interval as the central test
    expected_var = sigma**2 * replies / min_replies
    low, high = chi2.ppf([1e-6, 1 - 1e-6], df=n - 1) * expected_var / (n - 1)
    assert low <= total.var(ddof=1) <= high
    share_std = noise_share_std(noise_multiplier=sigma, min_replies=min_replies)
    assert share_std == pytest.approx(sigma / np.sqrt(min_replies))


def test_gaussian_mechanism_adds_noise_to_the_sum_and_keeps_shape() -> None:
    # prepare
    summed = np.linspace(-3.0, 3.0, 50_000).astype(np.float32)
    rng = np.random.Generator(np.random.PCG64(5))

    # execute
    noisy = gaussian_mechanism(summed_scores=summed, noise_multiplier=2.0, sensitivity=1.0, rng=rng)

    # assert: the output is centred on the sum, in float64
    assert noisy.shape == summed.shape
    assert noisy.dtype == np.float64
    assert abs((noisy - summed).mean()) < 5 * 2.0 / np.sqrt(summed.size)


def test_gaussian_mechanism_with_zero_multiplier_returns_the_sum() -> None:
    # prepare
    summed = np.array([1.0, -2.0, 0.5])

    # execute
    rng = np.random.Generator(np.random.PCG64(0))
    out = gaussian_mechanism(summed_scores=summed, noise_multiplier=0.0, sensitivity=1.0, rng=rng)

    # assert
    np.testing.assert_array_equal(out, summed)


def test_gaussian_mechanism_rejects_negative_multiplier() -> None:
    # execute / assert
    with pytest.raises(ValueError, match="noise_multiplier"):
        gaussian_mechanism(
            summed_scores=np.zeros(3),
            noise_multiplier=-1.0,
            sensitivity=1.0,
            rng=np.random.Generator(np.random.PCG64(0)),
        )


@pytest.mark.parametrize("sensitivity", [2.5, 0.1])
def test_gaussian_mechanism_noise_std_scales_with_the_sensitivity(sensitivity: float) -> None:
    # prepare
    n, sigma = 200_000, 1.5
    rng = np.random.Generator(np.random.PCG64(77))

    # execute
    noisy = gaussian_mechanism(summed_scores=np.zeros(n), noise_multiplier=sigma, sensitivity=sensitivity, rng=rng)

    # assert: variance (σ·Δ)², in the same 1e-6 χ² interval as the sensitivity-1 test
    low, high = chi2.ppf([1e-6, 1 - 1e-6], df=n - 1) * (sigma * sensitivity) ** 2 / (n - 1)
    assert low <= noisy.var(ddof=1) <= high


@pytest.mark.parametrize("sensitivity", [0.0, -1.0, float("inf"), float("nan")])
def test_gaussian_mechanism_rejects_a_sensitivity_that_is_not_a_positive_number(sensitivity: float) -> None:
    # execute / assert
    with pytest.raises(ValueError, match="sensitivity"):
        gaussian_mechanism(
            summed_scores=np.zeros(3), noise_multiplier=1.0, sensitivity=sensitivity, rng=np.random.default_rng(0)
        )


def test_unseeded_noise_rng_gives_a_fresh_stream_each_call() -> None:
    # execute
    rng_a, reproducible_a = make_noise_rng(None)
    rng_b, reproducible_b = make_noise_rng(None)

    # assert: 128-bit OS seeds; equal streams would mean a fixed seed
    assert not reproducible_a and not reproducible_b
    assert not np.array_equal(rng_a.standard_normal(16), rng_b.standard_normal(16))


def test_seeded_noise_rng_reproduces_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    # execute
    with caplog.at_level(logging.WARNING, logger="popri.privacy"):
        rng_a, reproducible = make_noise_rng(42)
    rng_b, _ = make_noise_rng(42)
    rng_c, _ = make_noise_rng(43)

    # assert
    assert reproducible
    first = rng_a.standard_normal(16)
    np.testing.assert_array_equal(first, rng_b.standard_normal(16))
    assert not np.array_equal(first, rng_c.standard_normal(16))
    assert "reproducible" in caplog.text


# ---------------------------------------------------------------------------------------------------------------------
# Privacy ledger
# ---------------------------------------------------------------------------------------------------------------------


def _charge(ledger: PrivacyLedger, rounds: int, *, sigma: float = 3.35, q: float = 1.0) -> float:
    spent = 0.0
    for _ in range(rounds):
        spent = ledger.charge(noise_multiplier=sigma, sample_rate=q)
    return spent


def test_ledger_charging_t_rounds_equals_compute_epsilon_for_t() -> None:
    # prepare
    ledger = PrivacyLedger(delta=3e-6)

    # execute
    spent = _charge(ledger, 20)

    # assert
    expected = compute_epsilon(noise_multiplier=3.35, delta=3e-6, sample_rate=1.0, rounds=20)
    assert ledger.rounds_charged == 20
    assert spent == pytest.approx(expected, rel=1e-12)
    assert ledger.epsilon() == pytest.approx(expected, rel=1e-12)


def test_empty_ledger_has_spent_nothing() -> None:
    # execute / assert
    assert PrivacyLedger(delta=1e-5).epsilon() == 0.0


def test_ledger_with_changing_parameters_keeps_each_run_of_rounds() -> None:
    # prepare
    ledger = PrivacyLedger(delta=1e-5)

    # execute: 2 rounds at (2.0, 1.0), 1 at (3.0, 1.0), 2 more at (2.0, 1.0)
    _charge(ledger, 2, sigma=2.0)
    _charge(ledger, 1, sigma=3.0)
    _charge(ledger, 2, sigma=2.0)

    # assert: RDP composes additively, so order does not matter for ε
    assert ledger.history == [(2.0, 1.0, 2), (3.0, 1.0, 1), (2.0, 1.0, 2)]
    reordered = PrivacyLedger(delta=1e-5, history=[(2.0, 1.0, 4), (3.0, 1.0, 1)])
    assert ledger.epsilon() == pytest.approx(reordered.epsilon(), rel=1e-9)


def test_restored_ledger_continues_where_it_stopped() -> None:
    # prepare: 7 rounds, checkpointed as JSON (the ledger travels in meta.json), restored
    ledger = PrivacyLedger(delta=3e-6, target_epsilon=7.0)
    _charge(ledger, 7)
    state = json.loads(json.dumps(ledger.state_dict()))

    # execute
    restored = PrivacyLedger.from_state_dict(state)

    # assert: nothing is forgotten on restore...
    assert restored.rounds_charged == 7
    assert restored.epsilon() == pytest.approx(ledger.epsilon(), rel=1e-12)
    assert restored.target_epsilon == 7.0

    # ...and 13 more rounds cost exactly what an uninterrupted 20-round run costs
    spent_after_resume = _charge(restored, 13)
    uninterrupted = PrivacyLedger(delta=3e-6)
    spent_uninterrupted = _charge(uninterrupted, 20)
    assert restored.rounds_charged == 20
    assert spent_after_resume == pytest.approx(spent_uninterrupted, rel=1e-12)
    assert spent_after_resume > compute_epsilon(noise_multiplier=3.35, delta=3e-6, sample_rate=1.0, rounds=13)


def test_charge_refuses_a_round_past_the_target_and_leaves_history_unchanged() -> None:
    # prepare: a budget that fits exactly 3 rounds
    budget = compute_epsilon(noise_multiplier=2.0, delta=1e-5, sample_rate=1.0, rounds=3)
    ledger = PrivacyLedger(delta=1e-5, target_epsilon=budget * (1 + 1e-9))
    _charge(ledger, 3, sigma=2.0)
    history_before = copy.deepcopy(ledger.history)
    epsilon_before = ledger.epsilon()

    # execute / assert
    with pytest.raises(BudgetExceededError, match="round 4"):
        ledger.charge(noise_multiplier=2.0, sample_rate=1.0)
    assert ledger.history == history_before
    assert ledger.rounds_charged == 3
    assert ledger.epsilon() == epsilon_before


def test_charge_allows_a_different_round_that_still_fits_after_a_refusal() -> None:
    # prepare: the budget is spent by 3 rounds at σ=2, but a much noisier round still fits
    budget = compute_epsilon(noise_multiplier=2.0, delta=1e-5, sample_rate=1.0, rounds=3) + 0.05
    ledger = PrivacyLedger(delta=1e-5, target_epsilon=budget)
    _charge(ledger, 3, sigma=2.0)
    with pytest.raises(BudgetExceededError):
        ledger.charge(noise_multiplier=2.0, sample_rate=1.0)

    # execute
    spent = ledger.charge(noise_multiplier=200.0, sample_rate=1.0)

    # assert
    assert spent <= budget
    assert ledger.history == [(2.0, 1.0, 3), (200.0, 1.0, 1)]


# ---------------------------------------------------------------------------------------------------------------------
# User sampling
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sample_rate", [0.01, 0.3, 0.9])
def test_poisson_sample_includes_users_at_rate_q(sample_rate: float) -> None:
    # prepare
    num_users = 50_000
    rng = np.random.Generator(np.random.PCG64(7))

    # execute
    picked = poisson_sample(num_users=num_users, sample_rate=sample_rate, rng=rng)

    # assert: distinct valid indices; the count is Binomial(n, q), inside its central 1 - 1e-6 interval
    assert np.array_equal(picked, np.unique(picked))
    assert picked.min() >= 0 and picked.max() < num_users
    low, high = binom.ppf([5e-7, 1 - 5e-7], num_users, sample_rate)
    assert low <= picked.size <= high


def test_poisson_sample_is_independent_per_user() -> None:
    # prepare: 2000 draws over 10 users; each user's inclusion count is Binomial(2000, 0.25)
    rng = np.random.Generator(np.random.PCG64(11))
    counts = np.zeros(10, dtype=int)

    # execute
    for _ in range(2000):
        counts[poisson_sample(num_users=10, sample_rate=0.25, rng=rng)] += 1

    # assert: every user (not only the first ones) is sampled at rate q
    low, high = binom.ppf([5e-7, 1 - 5e-7], 2000, 0.25)
    assert np.all((counts >= low) & (counts <= high))


def test_poisson_sample_with_q_one_returns_everyone() -> None:
    # execute
    picked = poisson_sample(num_users=37, sample_rate=1.0, rng=np.random.Generator(np.random.PCG64(0)))

    # assert
    np.testing.assert_array_equal(picked, np.arange(37))


# ---------------------------------------------------------------------------------------------------------------------
# Clipping and validation of node replies
# ---------------------------------------------------------------------------------------------------------------------


def test_clip_l2_scales_a_long_vector_to_the_bound_keeping_direction() -> None:
    # prepare
    vector = np.array([3.0, 4.0])

    # execute
    clipped = clip_l2(vector)
    clipped_to_two = clip_l2(vector, max_norm=2.0)

    # assert
    np.testing.assert_allclose(clipped, [0.6, 0.8], rtol=1e-12)
    np.testing.assert_allclose(clipped_to_two, [1.2, 1.6], rtol=1e-12)


@pytest.mark.parametrize("vector", [np.array([0.3, -0.4]), np.zeros(4), np.array([0.6, 0.8])])
def test_clip_l2_leaves_a_vector_inside_the_bound_unchanged(vector: np.ndarray) -> None:
    # execute
    clipped = clip_l2(vector)

    # assert
    np.testing.assert_array_equal(clipped, vector)


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        (np.zeros(4), "shape"),  # too short
        (np.zeros((5, 1)), "shape"),  # 2-D
        (np.zeros(6), "shape"),  # too long
        (np.array([0.0, np.nan, 0.0, 0.0, 0.0]), "NaN"),
        (np.array([0.0, 0.0, np.inf, 0.0, 0.0]), "inf"),
        (np.array([0.0, 0.0, 0.0, -np.inf, 0.0]), "inf"),
        (np.zeros(5, dtype=np.int64), "dtype"),
        (np.zeros(5, dtype=bool), "dtype"),
        (np.array(["0"] * 5), "dtype"),
    ],
)
def test_validate_node_sum_rejects_malformed_replies(reply: np.ndarray, why: str) -> None:
    # execute / assert
    with pytest.raises(InvalidReplyError, match=why):
        validate_node_sum(reply, expected_len=5, num_users=3)


def test_validate_node_sum_rejects_a_negative_user_count() -> None:
    # execute / assert
    with pytest.raises(InvalidReplyError, match="-1 users"):
        validate_node_sum(np.zeros(5), expected_len=5, num_users=-1)


@pytest.mark.parametrize("num_users", [2.0, True, "3", None], ids=["float", "bool", "str", "none"])
def test_validate_node_sum_rejects_a_user_count_that_is_not_an_int(num_users: object) -> None:
    # execute / assert
    with pytest.raises(InvalidReplyError, match="expected an int"):
        validate_node_sum(np.zeros(5), expected_len=5, num_users=num_users)  # type: ignore[arg-type]


def test_validate_node_sum_passes_an_honest_reply_through_as_float64() -> None:
    # prepare: 3 users' clipped vectors summed; norm <= 3
    rng = np.random.Generator(np.random.PCG64(2))
    users = rng.standard_normal((3, 8))
    honest = (users / np.linalg.norm(users, axis=1, keepdims=True)).sum(axis=0).astype(np.float32)

    # execute
    accepted = validate_node_sum(honest, expected_len=8, num_users=3)

    # assert
    assert accepted.dtype == np.float64
    np.testing.assert_array_equal(accepted, honest.astype(np.float64))


@pytest.mark.parametrize("num_users", [0, 1, 4])
def test_malicious_node_cannot_move_the_sum_beyond_its_users_sensitivity(num_users: int) -> None:
    # prepare: an honest aggregate and a huge reply from a node that claims num_users users
    rng = np.random.Generator(np.random.PCG64(3))
    honest_total = rng.standard_normal(16)
    malicious = 1e6 * rng.standard_normal(16)

    # execute
    accepted = validate_node_sum(malicious, expected_len=16, num_users=num_users)
    total = honest_total + accepted

    # assert: re-clipped to exactly num_users · 1 in L2, same direction
    assert np.linalg.norm(total - honest_total) <= num_users + 1e-9
    assert np.linalg.norm(accepted) == pytest.approx(num_users, abs=1e-9)
    if num_users:
        np.testing.assert_allclose(accepted / num_users, malicious / np.linalg.norm(malicious), rtol=1e-9)
