"""The privacy audit: Clopper–Pearson and Gaussian-DP bounds, the held-out split, the node pipeline it plays through,
its power on broken mechanisms, and the CLI."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

from popri.audit import (
    add_subparser,
    clopper_pearson,
    empirical_epsilon,
    epsilon_lower_bound_ceiling,
    gdp_epsilon,
    gdp_mu_estimate,
    held_out_clopper_pearson,
    node_reply,
    per_test_confidence,
    play_game,
    run_audit,
    split_trials,
    subsampled_gaussian_epsilon_lower,
    subsampled_mu_estimate,
)
from popri.config import ConfigError
from popri.node import NodeScorer
from popri.privacy import compute_epsilon

SMALL = {"delta": 3e-6, "rounds": 5, "trials": 1000, "seed": 0, "progress": False, "samples": 64, "users": 10}


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (10, 10), (17, 250), (499, 1000)])
def test_clopper_pearson_matches_scipy_exact_interval(k: int, n: int) -> None:
    # Prepare
    expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")

    # Execute
    lower, upper = clopper_pearson(k, n, confidence=0.95)

    # Assert
    assert float(lower) == pytest.approx(expected.low, abs=1e-12)
    assert float(upper) == pytest.approx(expected.high, abs=1e-12)


def test_clopper_pearson_zero_successes_has_closed_form_upper_end() -> None:
    # Prepare: k = 0 of n = 10; the upper end is 1 − (α/2)^(1/n)
    k, n = np.array([0, 0]), 10

    # Execute
    _, upper_95 = clopper_pearson(k, n, confidence=0.95)
    _, upper_90 = clopper_pearson(k, n, confidence=0.90)

    # Assert: 0.3085 two-sided 95 %; 0.2589 two-sided 90 % (= one-sided 95 %)
    assert upper_95[0] == pytest.approx(0.3085, abs=1e-4)
    assert upper_90[0] == pytest.approx(0.2589, abs=1e-4)


def test_perfectly_separated_scores_reach_the_statistical_ceiling() -> None:
    # Prepare
    with_canary, without_canary = np.arange(100.0, 600.0), np.arange(0.0, 500.0)
    with_canary[:] += 1000.0

    # Execute
    found = empirical_epsilon(with_canary, without_canary, delta=1e-5, confidence=0.95)

    # Assert
    ceiling = epsilon_lower_bound_ceiling(n_with=500, n_without=500, delta=1e-5, confidence=0.95)
    assert found["epsilon_lower_bound"] == pytest.approx(ceiling)
    assert ceiling == pytest.approx(math.log(((0.025 ** (1 / 500)) - 1e-5) / (1 - 0.025 ** (1 / 500))))
    assert (found["tpr"], found["fpr"]) == (1.0, 0.0)


def test_identical_score_distributions_give_no_privacy_loss() -> None:
    # Prepare
    rng = np.random.Generator(np.random.PCG64(1))
    scores = rng.standard_normal(2000)

    # Execute
    found = empirical_epsilon(scores[:1000], scores[1000:], delta=3e-6)

    # Assert
    assert found["epsilon_lower_bound"] < 0.5


def test_exact_gdp_epsilon_matches_known_value_and_is_below_rdp_accountant() -> None:
    # Prepare: the paper's ε=1 run: σ=19.3, T=20, δ=3e-6, RDP ε≈0.997
    mu = math.sqrt(20) / 19.3

    # Execute
    eps = gdp_epsilon(mu=mu, delta=3e-6)

    # Assert
    assert gdp_epsilon(mu=1.0, delta=1e-5) == pytest.approx(4.377, abs=1e-3)
    assert 0.8 < eps < 0.997


def test_audit_of_real_mechanism_stays_below_claimed_epsilon(tmp_path: Path) -> None:
    # Execute
    result = run_audit(epsilon=1.0, break_mode="none", output_dir=tmp_path, **SMALL)

    # Assert
    assert result["canary_norm"] == pytest.approx(1.0, abs=1e-9)
    assert 0.0 <= result["epsilon_lower_bound"] <= result["epsilon_claimed"] <= 1.0
    assert result["epsilon_exact_gdp"] <= result["epsilon_claimed"]
    assert not result["lower_bound_exceeds_claim"]


@pytest.mark.parametrize("break_mode", ["no-clip", "low-noise"])
def test_audit_detects_broken_mechanism(tmp_path: Path, break_mode: str) -> None:
    # Execute
    result = run_audit(epsilon=1.0, break_mode=break_mode, output_dir=tmp_path, **SMALL)

    # Assert
    assert result["epsilon_lower_bound"] > result["epsilon_claimed"]
    assert result["lower_bound_exceeds_claim"]
    if break_mode == "no-clip":
        assert result["canary_norm"] == pytest.approx(8.0)  # z-scores of 64 samples have norm √64
    else:
        assert result["noise_multiplier_used"] == pytest.approx(result["noise_multiplier"] / 10)


def test_secagg_noise_shares_audit_like_the_central_draw(tmp_path: Path) -> None:
    # Prepare: three nodes, shares calibrated for exactly three replies (the fewest a released sum can hold)
    game_args = {"noise_multiplier": 2.0, "rounds": 4, "trials": 4000, "samples": 32, "users": 30, "dim": 16}

    # Execute
    central = play_game(break_mode="none", rng=np.random.default_rng(1), **game_args)
    secagg = play_game(
        break_mode="none", rng=np.random.default_rng(2), mode="secagg", nodes=3, min_replies=3, **game_args
    )
    audited = run_audit(
        epsilon=1.0, break_mode="none", output_dir=tmp_path, mode="secagg", nodes=3, min_replies=3, **SMALL
    )

    # Assert: the attacker's statistic has the same spread (σ·sqrt(T), the canary at norm 1), and the bound holds
    expected_std = 2.0 * np.sqrt(4)
    for game in (central, secagg):
        assert game["scores_without"].std(ddof=1) == pytest.approx(expected_std, rel=0.06)
        assert game["scores_with"].mean() - game["scores_without"].mean() == pytest.approx(4.0, abs=0.5)
    assert audited["mode"] == "secagg" and audited["nodes"] == 3
    assert audited["epsilon_lower_bound"] <= audited["epsilon_claimed"]


def test_secagg_audit_detects_shares_that_are_too_small(tmp_path: Path) -> None:
    # Execute: shares with a tenth of the noise; the audit must see the leak through the sum of node vectors
    result = run_audit(
        epsilon=1.0, break_mode="low-noise", output_dir=tmp_path, mode="secagg", nodes=2, min_replies=2, **SMALL
    )

    # Assert
    assert result["lower_bound_exceeds_claim"]


def test_audit_is_reproducible_for_a_seed(tmp_path: Path) -> None:
    # Execute
    first = run_audit(epsilon=1.0, break_mode="low-noise", output_dir=tmp_path / "a", **{**SMALL, "trials": 200})
    second = run_audit(epsilon=1.0, break_mode="low-noise", output_dir=tmp_path / "b", **{**SMALL, "trials": 200})

    # Assert
    assert first["epsilon_lower_bound"] == second["epsilon_lower_bound"]
    assert first["threshold"] == second["threshold"]


def test_cli_handler_writes_audit_json_and_png(tmp_path: Path) -> None:
    # Prepare
    parser = argparse.ArgumentParser(prog="popri")
    add_subparser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["audit", "--output", str(tmp_path), "--rounds", "3", "--trials", "200", "--samples", "16", "--users", "5",
         "--break", "low-noise", "--seed", "3", "--no-progress"]
    )  # fmt: skip

    # Execute
    status = args.func(args)

    # Assert
    assert status == 0
    report = json.loads((tmp_path / "audit.json").read_text())
    for key in ("epsilon_claimed", "epsilon_lower_bound", "confidence", "trials", "tpr", "fpr", "break"):
        assert key in report
    assert report["break"] == "low-noise"
    assert report["trials"] == 200
    assert (tmp_path / "audit.png").stat().st_size > 0


def test_cli_defaults_match_the_documented_ones() -> None:
    # Prepare
    parser = argparse.ArgumentParser(prog="popri")
    add_subparser(parser.add_subparsers(dest="command"))

    # Execute
    args = parser.parse_args(["audit", "--output", "x"])

    # Assert
    assert (args.epsilon, args.delta, args.rounds, args.trials, args.break_mode) == (1.0, 3e-6, 20, 2000, "none")


# ------------------------------------------------------------------------------------- the parametric (GDP) bound


def test_gdp_mu_estimate_recovers_a_known_mu_within_its_interval() -> None:
    # Prepare: scores of the two worlds, N(3, 2²) and N(3 + μ·2, 2²) with μ = 1.5
    rng = np.random.Generator(np.random.PCG64(7))
    mu, scale = 1.5, 2.0
    without_canary = rng.normal(3.0, scale, size=1500)
    with_canary = rng.normal(3.0 + mu * scale, scale, size=1500)

    # Execute
    found = gdp_mu_estimate(with_canary, without_canary, confidence=0.975)

    # Assert
    assert found["mu_lower"] < mu < found["mu_upper"]
    assert found["mu_lower"] < found["mu_hat"] < found["mu_upper"]
    assert found["mu_hat"] == pytest.approx(mu, abs=0.15)


def test_gdp_mu_lower_bound_covers_the_true_mu_at_its_confidence() -> None:
    # Prepare: 300 independent small experiments at μ = 0.8, one-sided 97.5 % bounds
    rng = np.random.Generator(np.random.PCG64(11))
    mu, reps = 0.8, 300

    # Execute
    lowers = [
        gdp_mu_estimate(rng.normal(mu, 1.0, 60), rng.normal(0.0, 1.0, 60), confidence=0.975)["mu_lower"]
        for _ in range(reps)
    ]

    # Assert: misses are Binomial(300, 0.025): mean 7.5, sd 2.7; 20 would be a broken interval
    misses = sum(low > mu for low in lowers)
    assert misses < 20
    assert misses > 0  # the bound is not vacuously low


def test_subsampled_mu_estimate_recovers_the_per_round_mu_of_a_gaussian_mixture() -> None:
    # Prepare: per round the canary is sampled with q = 0.3 and then shifts x_t by μ_r·s with μ_r = 2
    rng = np.random.Generator(np.random.PCG64(5))
    q, mu_round, s, trials, rounds = 0.3, 2.0, 0.7, 4000, 10
    without_canary = rng.normal(0.0, s, size=(trials, rounds))
    sampled = rng.random((trials, rounds)) < q
    with_canary = rng.normal(0.0, s, size=(trials, rounds)) + sampled * mu_round * s

    # Execute
    found = subsampled_mu_estimate(with_canary, without_canary, sample_rate=q, confidence=0.975)

    # Assert
    assert found["mu_lower"] < mu_round
    assert found["mu_hat"] == pytest.approx(mu_round, rel=0.05)


def test_subsampled_epsilon_lower_end_is_below_the_accountant_and_exact_at_q_one() -> None:
    # Prepare
    sigma, rounds, delta = 0.9, 20, 3e-6

    # Execute
    at_q = subsampled_gaussian_epsilon_lower(mu=1 / sigma, sample_rate=0.1, rounds=rounds, delta=delta)
    at_one = subsampled_gaussian_epsilon_lower(mu=1 / sigma, sample_rate=1.0, rounds=rounds, delta=delta)

    # Assert: the PRV bracket's lower end sits under both accountants' upper ends, and close to them
    prv = compute_epsilon(noise_multiplier=sigma, delta=delta, sample_rate=0.1, rounds=rounds, accountant="prv")
    rdp = compute_epsilon(noise_multiplier=sigma, delta=delta, sample_rate=0.1, rounds=rounds, accountant="rdp")
    assert 0.9 * prv < at_q <= prv <= rdp
    assert at_one == pytest.approx(gdp_epsilon(mu=math.sqrt(rounds) / sigma, delta=delta))


def test_bonferroni_splits_the_error_between_the_two_tests() -> None:
    # Execute
    per_test = per_test_confidence(0.95, tests=2)

    # Assert
    assert per_test == pytest.approx(0.975)
    with pytest.raises(ValueError, match="confidence"):
        per_test_confidence(1.5)


# ------------------------------------------------------------------------------------------ the held-out split


def test_split_never_puts_a_trial_in_both_halves_and_keeps_both_worlds_in_each() -> None:
    # Prepare
    present = np.zeros(101, dtype=bool)
    present[:40] = True

    # Execute
    tune, bound = split_trials(present, rng=np.random.Generator(np.random.PCG64(3)))

    # Assert
    assert np.intersect1d(tune, bound).size == 0
    assert np.array_equal(np.sort(np.concatenate([tune, bound])), np.arange(101))
    assert present[tune].sum() == 20 and present[bound].sum() == 20
    assert (~present[tune]).sum() + (~present[bound]).sum() == 61


def test_threshold_comes_from_the_tuning_half_and_the_bound_from_the_other_half_only() -> None:
    # Prepare: separated worlds; then the bound half replaced by identical worlds
    rng = np.random.Generator(np.random.PCG64(9))
    tune_with, tune_without = rng.normal(4.0, 1.0, 500), rng.normal(0.0, 1.0, 500)
    bound_with, bound_without = rng.normal(4.0, 1.0, 500), rng.normal(0.0, 1.0, 500)
    noise_with, noise_without = rng.normal(0.0, 1.0, 500), rng.normal(0.0, 1.0, 500)

    # Execute
    real = held_out_clopper_pearson(tune_with, tune_without, bound_with, bound_without, delta=1e-5, confidence=0.975)
    bound_is_noise = held_out_clopper_pearson(
        tune_with, tune_without, noise_with, noise_without, delta=1e-5, confidence=0.975
    )

    # Assert: the same threshold whatever the bound half holds; the bound follows the bound half alone
    tuned = empirical_epsilon(tune_with, tune_without, delta=1e-5, confidence=0.975)
    assert real["threshold"] == bound_is_noise["threshold"] == tuned["threshold"]
    assert real["epsilon_lower_bound"] > 1.0
    assert bound_is_noise["epsilon_lower_bound"] < 0.5
    assert real["tpr"] == pytest.approx(np.mean(bound_with >= real["threshold"]))


def test_audit_reports_the_split_it_used(tmp_path: Path) -> None:
    # Execute
    result = run_audit(epsilon=1.0, break_mode="none", output_dir=tmp_path, **{**SMALL, "trials": 400})

    # Assert
    assert result["tuning_trials"] + result["bound_trials"] == 400
    assert result["bound_trials_with_canary"] + result["bound_trials_without_canary"] == result["bound_trials"]
    assert result["per_test_confidence"] == pytest.approx(0.975)


# -------------------------------------------------------------------------------- the node pipeline and sampling


def test_node_reply_adds_the_noise_share_only_in_secure_aggregation_mode() -> None:
    # Prepare
    rng = np.random.Generator(np.random.PCG64(2))
    scorer = NodeScorer(rng.standard_normal((6, 8)))
    embeddings = rng.standard_normal((5, 8))
    clean, users = scorer.score(embeddings, sample_rate=1.0, rng=rng)

    # Execute
    central, central_users = node_reply(scorer, embeddings, sample_rate=1.0, rng=rng)
    shares = np.stack(
        [node_reply(scorer, embeddings, sample_rate=1.0, rng=rng, noise_share=(2.0, 4))[0] for _ in range(4000)]
    )

    # Assert: the share's std is σ/sqrt(min_replies) = 1
    assert np.array_equal(central, clean) and central_users == users == 6
    assert (shares - clean).std() == pytest.approx(1.0, rel=0.03)


def test_poisson_sampled_canary_moves_the_statistic_by_q_per_round() -> None:
    # Prepare
    game_args = {"noise_multiplier": 0.5, "rounds": 6, "trials": 3000, "samples": 32, "users": 8, "dim": 16}

    # Execute
    game = play_game(break_mode="none", rng=np.random.default_rng(4), sample_rate=0.25, **game_args)

    # Assert: E[with] − E[without] = q Σ_t a_t
    shift = game["scores_with"].mean() - game["scores_without"].mean()
    assert shift == pytest.approx(0.25 * game["shifts"].sum(), rel=0.2)
    assert np.all(game["shifts"] > 0)


@pytest.mark.parametrize("mode", ["central", "secagg"])
def test_audit_of_poisson_sampled_real_mechanism_stays_below_claim(tmp_path: Path, mode: str) -> None:
    # Execute
    result = run_audit(
        epsilon=1.0, break_mode="none", output_dir=tmp_path, mode=mode, nodes=2, sample_rate=0.2, **SMALL
    )

    # Assert
    assert result["sample_rate"] == 0.2 and result["parametric_model"] == "subsampled Gaussian at rate q"
    assert result["epsilon_lower_bound"] <= result["epsilon_claimed"]
    assert not result["lower_bound_exceeds_claim"]


def test_audit_detects_poisson_sampled_mechanism_with_a_tenth_of_the_noise(tmp_path: Path) -> None:
    # Execute
    result = run_audit(epsilon=1.0, break_mode="low-noise", output_dir=tmp_path, sample_rate=0.2, **SMALL)

    # Assert
    assert result["lower_bound_exceeds_claim"]


# ------------------------------------------------------------------------------ half the noise, and --noise-scale


def test_audit_flags_half_the_noise_at_epsilon_seven_beyond_the_clopper_pearson_ceiling(tmp_path: Path) -> None:
    # Execute
    result = run_audit(epsilon=7.0, break_mode="low-noise", noise_scale=0.5, output_dir=tmp_path, **SMALL)

    # Assert: no Clopper–Pearson bound on this many trials could reach the claim; the GDP bound does
    assert result["noise_multiplier_used"] == pytest.approx(result["noise_multiplier"] / 2)
    assert result["epsilon_lower_bound_ceiling"] < result["epsilon_claimed"]
    assert result["epsilon_lower_bound_gdp"] > result["epsilon_claimed"]
    assert result["lower_bound_exceeds_claim"] and result["bound_source"] == "gdp"


def test_audit_of_real_mechanism_at_epsilon_seven_is_not_flagged(tmp_path: Path) -> None:
    # Execute
    result = run_audit(epsilon=7.0, break_mode="none", output_dir=tmp_path, **SMALL)

    # Assert
    assert result["gdp_mu_lower"] <= result["gdp_mu"]
    assert result["epsilon_lower_bound"] <= result["epsilon_exact_gdp"] <= result["epsilon_claimed"]


def test_cli_noise_scale_runs_the_given_fraction_of_sigma(tmp_path: Path) -> None:
    # Prepare
    parser = argparse.ArgumentParser(prog="popri")
    add_subparser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["audit", "--output", str(tmp_path), "--rounds", "2", "--trials", "100", "--samples", "8", "--users", "4",
         "--break", "low-noise", "--noise-scale", "0.5", "--no-progress"]
    )  # fmt: skip

    # Execute
    status = args.func(args)

    # Assert
    report = json.loads((tmp_path / "audit.json").read_text())
    assert status == 0
    assert report["noise_scale"] == 0.5
    assert report["noise_multiplier_used"] == pytest.approx(report["noise_multiplier"] * 0.5)


def test_noise_scale_without_low_noise_break_is_refused_with_the_fix(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="noise-scale applies only with --break low-noise"):
        run_audit(epsilon=1.0, break_mode="none", noise_scale=0.5, output_dir=tmp_path, **SMALL)
    assert not (tmp_path / "audit.json").exists()
