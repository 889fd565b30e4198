"""The privacy audit: Clopper–Pearson bounds, the ε lower bound, its power on broken mechanisms, and the CLI."""

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
    play_game,
    run_audit,
)

SMALL = {"delta": 3e-6, "rounds": 5, "trials": 1000, "seed": 0, "progress": False, "samples": 64, "users": 10}


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (10, 10), (17, 250), (499, 1000)])
def test_clopper_pearson_matches_scipy_exact_interval(k: int, n: int) -> None:
    # prepare
    expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")

    # execute
    lower, upper = clopper_pearson(k, n, confidence=0.95)

    # assert
    assert float(lower) == pytest.approx(expected.low, abs=1e-12)
    assert float(upper) == pytest.approx(expected.high, abs=1e-12)


def test_clopper_pearson_zero_successes_has_closed_form_upper_end() -> None:
    # prepare: k = 0 of n = 10; the upper end is 1 − (α/2)^(1/n)
    k, n = np.array([0, 0]), 10

    # execute
    _, upper_95 = clopper_pearson(k, n, confidence=0.95)
    _, upper_90 = clopper_pearson(k, n, confidence=0.90)

    # assert: 0.3085 two-sided 95 %; 0.2589 two-sided 90 % (= one-sided 95 %)
    assert upper_95[0] == pytest.approx(0.3085, abs=1e-4)
    assert upper_90[0] == pytest.approx(0.2589, abs=1e-4)


def test_perfectly_separated_scores_reach_the_statistical_ceiling() -> None:
    # prepare
    with_canary, without_canary = np.arange(100.0, 600.0), np.arange(0.0, 500.0)
    with_canary[:] += 1000.0

    # execute
    found = empirical_epsilon(with_canary, without_canary, delta=1e-5, confidence=0.95)

    # assert
    ceiling = epsilon_lower_bound_ceiling(n_with=500, n_without=500, delta=1e-5, confidence=0.95)
    assert found["epsilon_lower_bound"] == pytest.approx(ceiling)
    assert ceiling == pytest.approx(math.log(((0.025 ** (1 / 500)) - 1e-5) / (1 - 0.025 ** (1 / 500))))
    assert (found["tpr"], found["fpr"]) == (1.0, 0.0)


def test_identical_score_distributions_give_no_privacy_loss() -> None:
    # prepare
    rng = np.random.Generator(np.random.PCG64(1))
    scores = rng.standard_normal(2000)

    # execute
    found = empirical_epsilon(scores[:1000], scores[1000:], delta=3e-6)

    # assert
    assert found["epsilon_lower_bound"] < 0.5


def test_exact_gdp_epsilon_matches_known_value_and_is_below_rdp_accountant() -> None:
    # prepare: the paper's ε=1 run: σ=19.3, T=20, δ=3e-6, RDP ε≈0.997
    mu = math.sqrt(20) / 19.3

    # execute
    eps = gdp_epsilon(mu=mu, delta=3e-6)

    # assert
    assert gdp_epsilon(mu=1.0, delta=1e-5) == pytest.approx(4.377, abs=1e-3)
    assert 0.8 < eps < 0.997


def test_audit_of_real_mechanism_stays_below_claimed_epsilon(tmp_path: Path) -> None:
    # execute
    result = run_audit(epsilon=1.0, break_mode="none", output_dir=tmp_path, **SMALL)

    # assert
    assert result["canary_norm"] == pytest.approx(1.0, abs=1e-9)
    assert 0.0 <= result["epsilon_lower_bound"] <= result["epsilon_claimed"] <= 1.0
    assert result["epsilon_exact_gdp"] <= result["epsilon_claimed"]
    assert not result["lower_bound_exceeds_claim"]


@pytest.mark.parametrize("break_mode", ["no-clip", "low-noise"])
def test_audit_detects_broken_mechanism(tmp_path: Path, break_mode: str) -> None:
    # execute
    result = run_audit(epsilon=1.0, break_mode=break_mode, output_dir=tmp_path, **SMALL)

    # assert
    assert result["epsilon_lower_bound"] > result["epsilon_claimed"]
    assert result["lower_bound_exceeds_claim"]
    if break_mode == "no-clip":
        assert result["canary_norm"] == pytest.approx(8.0)  # z-scores of 64 samples have norm √64
    else:
        assert result["noise_multiplier_used"] == pytest.approx(result["noise_multiplier"] / 10)


def test_secagg_noise_shares_audit_like_the_central_draw(tmp_path: Path) -> None:
    # prepare: three nodes, shares calibrated for exactly three replies (the fewest a released sum can hold)
    game_args = {"noise_multiplier": 2.0, "rounds": 4, "trials": 4000, "samples": 32, "users": 30, "dim": 16}

    # execute
    central = play_game(break_mode="none", rng=np.random.default_rng(1), **game_args)
    secagg = play_game(
        break_mode="none", rng=np.random.default_rng(2), mode="secagg", nodes=3, min_replies=3, **game_args
    )
    audited = run_audit(
        epsilon=1.0, break_mode="none", output_dir=tmp_path, mode="secagg", nodes=3, min_replies=3, **SMALL
    )

    # assert: the attacker's statistic has the same spread (σ·sqrt(T), the canary at norm 1), and the bound holds
    expected_std = 2.0 * np.sqrt(4)
    for game in (central, secagg):
        assert game["scores_without"].std(ddof=1) == pytest.approx(expected_std, rel=0.06)
        assert game["scores_with"].mean() - game["scores_without"].mean() == pytest.approx(4.0, abs=0.5)
    assert audited["mode"] == "secagg" and audited["nodes"] == 3
    assert audited["epsilon_lower_bound"] <= audited["epsilon_claimed"]


def test_secagg_audit_detects_shares_that_are_too_small(tmp_path: Path) -> None:
    # execute: shares with a tenth of the noise; the audit must see the leak through the sum of node vectors
    result = run_audit(
        epsilon=1.0, break_mode="low-noise", output_dir=tmp_path, mode="secagg", nodes=2, min_replies=2, **SMALL
    )

    # assert
    assert result["lower_bound_exceeds_claim"]


def test_audit_is_reproducible_for_a_seed(tmp_path: Path) -> None:
    # execute
    first = run_audit(epsilon=1.0, break_mode="low-noise", output_dir=tmp_path / "a", **{**SMALL, "trials": 200})
    second = run_audit(epsilon=1.0, break_mode="low-noise", output_dir=tmp_path / "b", **{**SMALL, "trials": 200})

    # assert
    assert first["epsilon_lower_bound"] == second["epsilon_lower_bound"]
    assert first["threshold"] == second["threshold"]


def test_cli_handler_writes_audit_json_and_png(tmp_path: Path) -> None:
    # prepare
    parser = argparse.ArgumentParser(prog="popri")
    add_subparser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["audit", "--output", str(tmp_path), "--rounds", "3", "--trials", "200", "--samples", "16", "--users", "5",
         "--break", "low-noise", "--seed", "3", "--no-progress"]
    )  # fmt: skip

    # execute
    status = args.func(args)

    # assert
    assert status == 0
    report = json.loads((tmp_path / "audit.json").read_text())
    for key in ("epsilon_claimed", "epsilon_lower_bound", "confidence", "trials", "tpr", "fpr", "break"):
        assert key in report
    assert report["break"] == "low-noise"
    assert report["trials"] == 200
    assert (tmp_path / "audit.png").stat().st_size > 0


def test_cli_defaults_match_the_documented_ones() -> None:
    # prepare
    parser = argparse.ArgumentParser(prog="popri")
    add_subparser(parser.add_subparsers(dest="command"))

    # execute
    args = parser.parse_args(["audit", "--output", "x"])

    # assert
    assert (args.epsilon, args.delta, args.rounds, args.trials, args.break_mode) == (1.0, 3e-6, 20, 2000, "none")
