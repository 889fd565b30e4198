"""popri.rdp, the torch-free RDP accountant: agreement with Opacus, the paper's values, calibration, edge cases."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popri import rdp


def _opacus_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha" is a hint, not an error
        return float(accountant.get_epsilon(delta=delta))


@pytest.mark.parametrize("sigma", [0.7, 1.67, 3.35, 19.3])
@pytest.mark.parametrize("sample_rate", [0.01, 0.3, 1.0])
@pytest.mark.parametrize("rounds", [1, 20])
def test_epsilon_matches_opacus_rdp_to_1e6_relative(sigma: float, sample_rate: float, rounds: int) -> None:
    for delta in (1e-5, 3e-6):
        # Execute
        ours = rdp.compute_epsilon(noise_multiplier=sigma, sample_rate=sample_rate, rounds=rounds, delta=delta)
        theirs = _opacus_epsilon([(sigma, sample_rate, rounds)], delta)

        # Assert
        assert ours == pytest.approx(theirs, rel=1e-6)


def test_composition_of_mixed_rounds_matches_opacus() -> None:
    # Prepare: a run whose sigma changed once (e.g. a resumed run), with two sampling rates
    history = [(2.0, 0.5, 3), (1.2, 1.0, 2), (5.0, 0.05, 10)]

    # Execute
    ours = rdp.epsilon_from_rdp(rdp.rdp_curve(history), delta=1e-5)

    # Assert
    assert ours == pytest.approx(_opacus_epsilon(history, 1e-5), rel=1e-6)


@pytest.mark.parametrize(("sigma", "expected"), [(19.3, 0.9973), (3.35, 6.962)])
def test_paper_noise_multipliers_give_the_known_epsilons(sigma: float, expected: float) -> None:
    # Execute: POPri's runs, q=1, T=20, delta=3e-6
    epsilon = rdp.compute_epsilon(noise_multiplier=sigma, sample_rate=1.0, rounds=20, delta=3e-6)

    # Assert
    assert epsilon == pytest.approx(expected, abs=1e-3 if expected > 1 else 1e-4)


def test_degenerate_mechanisms() -> None:
    # Execute / Assert: nothing released, no noise, no rounds
    assert rdp.rdp_sampled_gaussian(noise_multiplier=1.0, sample_rate=0.0, order=2.0) == 0.0
    assert rdp.rdp_sampled_gaussian(noise_multiplier=0.0, sample_rate=0.5, order=2.0) == math.inf
    assert rdp.compute_epsilon(noise_multiplier=0.0, sample_rate=1.0, rounds=1, delta=1e-5) == math.inf
    assert rdp.compute_epsilon(noise_multiplier=1.0, sample_rate=1.0, rounds=0, delta=1e-5) == 0.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"noise_multiplier": -1.0, "sample_rate": 0.5, "order": 2.0},
        {"noise_multiplier": 1.0, "sample_rate": 1.5, "order": 2.0},
        {"noise_multiplier": 1.0, "sample_rate": 0.5, "order": 1.0},
    ],
)
def test_invalid_mechanism_parameters_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        rdp.rdp_sampled_gaussian(**kwargs)


def test_epsilon_decreases_with_noise() -> None:
    # Prepare
    sigmas = [0.5, 1.0, 2.0, 4.0, 8.0]

    # Execute
    eps = [rdp.compute_epsilon(noise_multiplier=s, sample_rate=0.2, rounds=10, delta=1e-5) for s in sigmas]

    # Assert
    assert all(a > b for a, b in itertools.pairwise(eps))


def test_calibration_reproduces_the_paper_sigma_without_overshooting() -> None:
    # Execute
    sigma = rdp.calibrate_noise_multiplier(epsilon=1.0, sample_rate=1.0, rounds=20, delta=3e-6)

    # Assert: the paper's sigma=19.3 gives 0.9973; the smallest sigma for 1.0 is a little below it
    assert rdp.compute_epsilon(noise_multiplier=sigma, sample_rate=1.0, rounds=20, delta=3e-6) <= 1.0
    assert 19.0 < sigma < 19.3


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    epsilon=st.floats(min_value=0.3, max_value=30.0),
    sample_rate=st.sampled_from([1.0, 1.0, 0.5, 0.05]),
    rounds=st.integers(min_value=1, max_value=50),
    delta=st.sampled_from([1e-5, 3e-6]),
)
def test_calibrated_sigma_is_the_smallest_that_meets_the_target(
    epsilon: float, sample_rate: float, rounds: int, delta: float
) -> None:
    # Prepare
    tol = 1e-6
    spent = lambda s: rdp.compute_epsilon(noise_multiplier=s, sample_rate=sample_rate, rounds=rounds, delta=delta)  # noqa: E731

    # Execute
    sigma = rdp.calibrate_noise_multiplier(
        epsilon=epsilon, sample_rate=sample_rate, rounds=rounds, delta=delta, rel_tolerance=tol
    )

    # Assert: never over the target, and a sigma smaller by more than the tolerance would be
    assert spent(sigma) <= epsilon
    assert spent(sigma * (1 - 2 * tol)) > epsilon


def test_target_below_the_accountants_floor_is_refused_with_the_floor() -> None:
    # Prepare
    floor = rdp.epsilon_floor(delta=3e-6)

    # Execute / Assert
    assert 0 < floor < rdp.compute_epsilon(noise_multiplier=1e6, sample_rate=1.0, rounds=1, delta=3e-6)
    with pytest.raises(ValueError, match=r"smallest epsilon"):
        rdp.calibrate_noise_multiplier(epsilon=1e-9, sample_rate=1.0, rounds=20, delta=3e-6)
    with pytest.raises(ValueError, match="epsilon"):
        rdp.calibrate_noise_multiplier(epsilon=math.inf, sample_rate=1.0, rounds=20, delta=3e-6)


def test_conversion_never_picks_a_nan_order() -> None:
    # Prepare: infinite RDP at every order (no noise)
    curve = np.full(len(rdp.ORDERS), np.inf)

    # Execute / Assert
    assert rdp.epsilon_from_rdp(curve, delta=1e-5) == math.inf
