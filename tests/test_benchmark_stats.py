"""Statistics and distribution metrics of LargeFedBench: known cases, formulas, and the report's use of them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmark import report
from benchmark.distribution import (
    distribution_metrics,
    equal_counts,
    frechet_distance,
    knn_precision_recall,
    mean_words,
)
from benchmark.stats import mean_ci95, micro_accuracy, paired_bootstrap_difference, verdict


def test_fid_of_identical_sets_is_zero() -> None:
    # Prepare
    x = np.random.default_rng(0).normal(size=(400, 5))

    # Execute
    fid = frechet_distance(x, x.copy())

    # Assert
    assert fid == pytest.approx(0.0, abs=1e-8)


def test_fid_of_shifted_and_scaled_gaussians_matches_the_closed_form() -> None:
    # Prepare: N(0, I) and N(μ, s² I) in d dims: FID = ||μ||² + d (1 − s)² (Dowson & Landau).
    rng = np.random.default_rng(1)
    d, n, shift, scale = 4, 20000, np.array([1.0, -2.0, 0.5, 0.0]), 2.0
    a = rng.normal(size=(n, d))
    b = shift + scale * rng.normal(size=(n, d))
    expected = float(shift @ shift) + d * (1 - scale) ** 2

    # Execute
    fid = frechet_distance(a, b)

    # Assert: within the sampling error of 20k draws.
    assert fid == pytest.approx(expected, rel=0.05)


def test_fid_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same d"):
        frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))


def test_precision_recall_of_disjoint_clusters_is_zero_and_of_one_cluster_is_high() -> None:
    # Prepare: two tight clusters far apart, and a second draw from the first cluster.
    rng = np.random.default_rng(2)
    real = rng.normal(scale=0.1, size=(200, 3))
    far = 10.0 + rng.normal(scale=0.1, size=(200, 3))
    near = rng.normal(scale=0.1, size=(200, 3))

    # Execute
    disjoint = knn_precision_recall(real, far, k=3)
    same = knn_precision_recall(real, near, k=3)

    # Assert
    assert disjoint == (0.0, 0.0)
    assert same[0] > 0.8 and same[1] > 0.8


def test_precision_and_recall_differ_for_a_collapsed_fake_set() -> None:
    # Prepare: fake samples all in one small region of the real distribution (mode collapse).
    rng = np.random.default_rng(3)
    real = rng.normal(size=(300, 2))
    fake = 0.05 * rng.normal(size=(300, 2))

    # Execute
    precision, recall = knn_precision_recall(real, fake, k=3)

    # Assert: what the fake set makes looks real, but it covers little of the real set.
    assert precision > 0.9 and recall < 0.2


def test_equal_counts_subsamples_the_larger_side_with_the_given_generator() -> None:
    # Prepare
    a, b = np.arange(20.0).reshape(10, 2), np.arange(8.0).reshape(4, 2)

    # Execute
    a1, b1 = equal_counts(a, b, rng=np.random.default_rng(5))
    a2, _ = equal_counts(a, b, rng=np.random.default_rng(5))

    # Assert: same size, rows of the original, the smaller side untouched, reproducible from the seed.
    assert a1.shape == b1.shape == (4, 2)
    assert np.array_equal(b1, b) and np.array_equal(a1, a2)
    assert all(any(np.array_equal(row, orig) for orig in a) for row in a1)


def test_distribution_metrics_report_the_equal_count() -> None:
    rng = np.random.default_rng(6)
    out = distribution_metrics(rng.normal(size=(30, 4)), rng.normal(size=(100, 4)), rng=rng)
    assert out["metric_samples"] == 30 and out["fid"] >= 0
    assert 0 <= out["knn_precision"] <= 1 and 0 <= out["knn_recall"] <= 1


def test_mean_words_counts_whitespace_words_and_is_none_without_texts() -> None:
    assert mean_words(["To be, or", "not  to be: that is\nthe question"]) == 5.0
    assert mean_words([]) is None


def test_mean_ci95_is_the_student_t_interval() -> None:
    # Prepare: 3 values, mean 2, s = 1; t_{0.975, 2} = 4.302653.
    values = [1.0, 2.0, 3.0]

    # Execute
    mean, ci = mean_ci95(values)

    # Assert
    assert mean == pytest.approx(2.0)
    assert ci == pytest.approx([2.0 - 4.302653 / math.sqrt(3), 2.0 + 4.302653 / math.sqrt(3)], rel=1e-5)
    assert mean_ci95([0.5]) == (0.5, None)
    assert mean_ci95([]) == (None, None)


def test_paired_bootstrap_detects_a_consistent_difference() -> None:
    # Prepare: 50 test users; method a gets one more token right per user than b, at two seeds.
    rng = np.random.default_rng(7)
    tokens = rng.integers(10, 30, size=50).astype(float)
    correct_b = np.floor(tokens * 0.3)
    per_seed = [(correct_b + 1, tokens, correct_b, tokens)] * 2

    # Execute
    diff, ci = paired_bootstrap_difference(per_seed, rng=np.random.default_rng(0), resamples=500)

    # Assert: the observed difference, and an interval that excludes zero.
    assert diff == pytest.approx(micro_accuracy(correct_b + 1, tokens) - micro_accuracy(correct_b, tokens))
    assert 0 < ci[0] <= diff <= ci[1]
    assert verdict("a", "b", ci) == "a better"


def test_paired_bootstrap_does_not_resolve_noise() -> None:
    # Prepare: two methods that differ only by per-user noise of both signs.
    rng = np.random.default_rng(8)
    tokens = np.full(60, 20.0)
    correct_a = rng.integers(4, 8, size=60).astype(float)
    correct_b = np.clip(correct_a + rng.choice([-2.0, 2.0], size=60), 0, None)

    # Execute
    _, ci = paired_bootstrap_difference([(correct_a, tokens, correct_b, tokens)], rng=np.random.default_rng(1))

    # Assert
    assert ci[0] < 0 < ci[1]
    assert verdict("a", "b", ci) == "not resolved"


def test_paired_bootstrap_rejects_unpaired_counts() -> None:
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap_difference([(np.ones(3), np.ones(3), np.ones(4), np.ones(4))], rng=np.random.default_rng(0))


def _row(method: str, epsilon: float, seed: int, correct: list[int]) -> dict[str, object]:
    tokens = [10] * len(correct)
    return {
        "method": method,
        "epsilon": epsilon,
        "seed": seed,
        "accuracy": sum(correct) / sum(tokens),
        "cross_entropy": 3.0,
        "test_user_correct": correct,
        "test_user_tokens": tokens,
    }


def test_summary_and_comparisons_pair_rows_by_seed() -> None:
    # Prepare: eps0, epsinf and two private methods at two seeds; popri beats pe on every test user.
    rows = []
    for seed in (0, 1):
        rows += [
            _row("eps0", 0.0, seed, [1, 1, 1, 1]),
            _row("epsinf", math.inf, seed, [5, 5, 5, 5]),
            _row("pe", 1.0, seed, [2, 2, 2, 3 - seed]),
            _row("popri", 1.0, seed, [4, 4, 4, 4]),
        ]

    # Execute
    rows = report.with_gap_closure(rows)
    summary = {(e["method"], e["epsilon"]): e for e in report.summarise(rows)}
    comps = {(c["a"], c["b"]): c for c in report.comparisons(rows, resamples=300, seed=0)}

    # Assert: gap closure per seed from that seed's references; means over seeds; differences in points.
    assert summary[("popri", 1.0)]["gap_closure_mean"] == pytest.approx(0.75)
    assert summary[("pe", 1.0)]["accuracy_mean"] == pytest.approx((0.225 + 0.2) / 2)
    assert summary[("popri", 1.0)]["seeds"] == [0, 1]
    assert comps[("popri", "pe")]["diff_mean"] == pytest.approx(100 * (0.4 - (0.225 + 0.2) / 2))
    assert comps[("popri", "pe")]["diff_ci95"][0] > 0 and comps[("popri", "pe")]["reading"] == "POPri better"
    assert comps[("popri", "eps0")]["epsilon"] == 1.0 and ("epsinf", "eps0") in comps
    assert ("popri", "dpfedavg") not in comps  # no DP-FedAvg rows


def test_markdown_says_better_only_where_the_interval_excludes_zero(tmp_path: object) -> None:
    # Prepare: popri ahead of pe on every user; pe and dpfedavg equal.
    rows = []
    for seed in (0, 1):
        rows += [
            _row("eps0", 0.0, seed, [1, 1, 1, 1]),
            _row("pe", 1.0, seed, [2, 2, 2, 2]),
            _row("dpfedavg", 1.0, seed, [2, 2, 2, 2]),
            _row("popri", 1.0, seed, [4, 4, 4, 4]),
        ]
    results = {"preset": "quick", "delta": 3e-6, "accountant": "rdp", "datasets": {"s": {"results": rows}}}

    # Execute
    report.write_all(tmp_path, results)  # type: ignore[arg-type]
    table = (tmp_path / "results.md").read_text()  # type: ignore[operator]

    # Assert
    assert "| POPri − PE | 1 | 2 | +20.00 | [+20.00, +20.00] | POPri better |" in table
    assert "| PE − DP-FedAvg | 1 | 2 | +0.00 | [+0.00, +0.00] | not resolved |" in table
    assert "| POPri | " in table and "[40.00, 40.00]" in table
