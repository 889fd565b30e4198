"""``popri perf --only growth``: how cost grows, on tiny models built in code and tiny sizes (no timed assertions)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmark.perf.growth import (
    EXTRAPOLATED,
    PAPER_CLIENTS,
    PAPER_NODES,
    PAPER_SAMPLES,
    ROUND_PLOT,
    SCORING_PLOT,
    STAGES,
    extrapolate,
    fit_linear,
    fit_power_law,
    synthetic_user_sums,
    traced_peak_bytes,
)
from benchmark.perf.schema import COMPARISONS, DEFAULT_COMPARISONS, PerfSizes, sizes_with_overrides
from popri.config import ConfigError
from tests.helpers import tiny_perf_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def growth_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One ``run_perf(only=("growth",))`` on the tiny LM and MiniLM at tiny sizes; (output folder, perf.json)."""
    out = tmp_path_factory.mktemp("perf-growth")
    saved = tiny_perf_run(
        out,
        "growth",
        growth_users="40,120,600",
        growth_users_samples=8,
        growth_scoring_samples="8,32",
        growth_scoring_users=60,
        growth_texts_per_user=3.0,
        growth_kj="4,8,16",
        growth_round_users=20,
        repeats_growth_scoring=1,
    )
    return out, saved


def test_growth_section_has_every_stage_and_rows_in_increasing_size(growth_run: tuple[Path, dict[str, Any]]):
    # Prepare
    out, saved = growth_run

    # Execute
    growth = saved["growth"]
    rows, scoring = growth["round"]["rows"], growth["scoring"]

    # Assert: the keys perf.json promises, one row per size, sizes increasing, every stage timed
    assert {"scoring", "round", "extrapolated", "reading", "measured_at"} <= set(growth)
    assert [r["samples"] for r in rows] == [4, 8, 16]
    assert [r["prompts"] for r in rows] == [1, 2, 4]  # J = 4 fixed, K = K·J / 4
    assert [r["pairs"] for r in rows] == [1, 2, 4]
    for row in rows:
        assert set(row["seconds"]) == set(STAGES) and all(v > 0 for v in row["seconds"].values())
        assert row["dominant"] in STAGES and sum(row["shares"].values()) == pytest.approx(1.0, abs=1e-3)
    assert [p["users"] for p in scoring["by_users"]] == [40, 120, 600]
    assert {p["samples"] for p in scoring["by_users"]} == {8}
    assert [p["samples"] for p in scoring["by_samples"]] == [8, 32]
    assert {p["users"] for p in scoring["by_samples"]} == {60}
    assert all(p["seconds"] > 0 and p["peak_call_mib"] > 0 for p in scoring["by_users"] + scoring["by_samples"])
    assert [p["user_sums_mib"] for p in scoring["by_users"]] == sorted(p["user_sums_mib"] for p in scoring["by_users"])
    assert set(growth["round"]["fits"]) == set(STAGES) and len(scoring["time_fit"]["exponents"]) == 2
    assert saved["comparisons"] == []  # nothing but growth was measured
    text = (out / "perf.md").read_text()
    assert "## How cost grows" in text and "GPU: not measured" in growth["reading"][-2]


def test_growth_plots_are_png_files_beside_perf_md(growth_run: tuple[Path, dict[str, Any]]):
    # Prepare
    out, _ = growth_run

    # Execute
    written = [out / ROUND_PLOT, out / SCORING_PLOT]
    text = (out / "perf.md").read_text()

    # Assert
    for path in written:
        assert path.read_bytes()[:8] == PNG_MAGIC
        assert f"]({path.name})" in text


def test_paper_size_rows_are_labelled_extrapolated(growth_run: tuple[Path, dict[str, Any]]):
    # Prepare
    out, saved = growth_run

    # Execute
    extra = saved["growth"]["extrapolated"]
    text = (out / "perf.md").read_text()

    # Assert: one row per node count, each labelled, at the paper's size; the markdown says so on every such row
    assert extra["label"] == EXTRAPOLATED
    assert [r["nodes"] for r in extra["rows"]] == list(PAPER_NODES)
    for row in extra["rows"]:
        assert row["label"] == EXTRAPOLATED and row["samples"] == PAPER_SAMPLES
        assert row["users_per_node"] == pytest.approx(PAPER_CLIENTS / row["nodes"])
    marked = [line for line in text.splitlines() if f"| {PAPER_SAMPLES:,} |" in line or "| 72,000 |" in line]
    assert marked and all(f"**{EXTRAPOLATED}**" in line for line in marked)


def test_power_law_fit_recovers_a_known_slope_from_noisy_timings():
    # Prepare: t = 2e-3 · x^1.3 with ±5 % multiplicative noise
    rng = np.random.default_rng(0)
    x = np.array([128, 256, 512, 1024, 2048], dtype=float)
    t = 2e-3 * x**1.3 * np.exp(rng.normal(0.0, 0.05, x.size))

    # Execute
    fit = fit_power_law(x={"samples": x}, y=t)

    # Assert
    assert fit.exponents[0] == pytest.approx(1.3, abs=0.1)
    assert fit.predict(samples=18_000) == pytest.approx(2e-3 * 18_000**1.3, rel=0.35)


def test_two_variable_power_law_recovers_both_exponents():
    # Prepare: t = 1e-7 · U^1.0 · (K·J)^0.8 measured on two sweeps that share one point, as the harness measures
    users = [1_000, 10_000, 100_000, 10_000, 10_000]
    samples = [128, 128, 128, 512, 2048]
    t = [1e-7 * u * kj**0.8 for u, kj in zip(users, samples, strict=True)]

    # Execute
    fit = fit_power_law(x={"users": users, "samples": samples}, y=t)

    # Assert
    assert fit.exponents == pytest.approx((1.0, 0.8), abs=1e-9)
    assert fit.predict(users=72_000, samples=18_000) == pytest.approx(1e-7 * 72_000 * 18_000**0.8, rel=1e-9)


def test_linear_memory_fit_recovers_its_slopes():
    # Prepare: m = 5 + 0.003·U + 0.02·K·J MiB
    users, samples = [1_000, 10_000, 100_000, 10_000], [128, 128, 128, 2048]
    mib = [5 + 0.003 * u + 0.02 * kj for u, kj in zip(users, samples, strict=True)]

    # Execute
    fit = fit_linear(x={"users": users, "samples": samples}, y=mib)

    # Assert
    assert fit.slopes == pytest.approx((0.003, 0.02)) and fit.intercept == pytest.approx(5.0)


def test_extrapolation_divides_only_node_scoring_among_nodes():
    # Prepare: measured fits (t = c·x^b) for every stage and node scoring linear in U
    fit = {"variables": ["samples"], "exponents": [1.0], "coefficient": 0.1}
    growth = {
        "round": {"samples_per_prompt": 4, "rows": [{"samples": 2048}], "fits": dict.fromkeys(STAGES, fit)},
        "scoring": {
            "time_fit": {"variables": ["users", "samples"], "exponents": [1.0, 1.0], "coefficient": 1e-9},
            "memory_fit": {"variables": ["users", "samples"], "slopes": [0.003, 0.02], "intercept": 1.0},
            "by_users": [{"users": 1_000_000}],
            "by_samples": [{"users": 10_000}],
        },
    }

    # Execute
    extra = extrapolate(growth)

    # Assert: server stages are the same for any number of nodes; one node's scoring falls as 1/nodes
    rows = extra["rows"]
    assert [r["seconds"]["generate"] for r in rows] == pytest.approx([0.1 * PAPER_SAMPLES] * len(PAPER_NODES))
    assert [r["seconds"]["dpo"] for r in rows] == pytest.approx([0.1 * 1_800 * 4] * len(PAPER_NODES))  # K pairs, J=4
    scores = [r["seconds"]["score"] for r in rows]
    assert scores == pytest.approx([1e-9 * PAPER_CLIENTS / n * PAPER_SAMPLES for n in PAPER_NODES], rel=1e-3)
    assert all(r["label"] == EXTRAPOLATED for r in rows)


def test_synthetic_user_sums_do_not_depend_on_the_chunk_size():
    # Prepare
    def build(chunk: int) -> tuple[np.ndarray, int]:
        return synthetic_user_sums(users=50, texts_per_user=4.0, rng=np.random.default_rng(3), chunk_texts=chunk)

    # Execute
    small, texts = build(7)
    whole, texts_whole = build(10**6)

    # Assert: same values, float64 (U, 384); squared norms average about the texts per user (unit vectors, E x·y = 0)
    assert small.shape == (50, 384) and small.dtype == np.float64
    assert texts == texts_whole and np.array_equal(small, whole)
    assert float(np.mean(np.sum(small**2, axis=1))) == pytest.approx(texts / 50, rel=0.2)


def test_traced_peak_counts_what_the_call_allocates_not_its_inputs():
    # Prepare: an 8 MiB input allocated before the call
    data = np.ones(2**20)

    # Execute: the call allocates one 8 MiB copy
    peak = traced_peak_bytes(lambda: data.copy())

    # Assert
    assert 2**23 <= peak < 2**23 + 2**20


def test_growth_runs_only_when_named_and_its_sizes_are_lists():
    # Prepare / Execute
    sizes = sizes_with_overrides(PerfSizes(), ["growth-kj=512,128,256", "growth-users=1000,100000"])

    # Assert: a plain `popri perf` leaves growth out; the lists parse; a K·J that J=4 does not divide, or a single
    # size (no slope), is refused naming the key
    assert "growth" in COMPARISONS and "growth" not in DEFAULT_COMPARISONS
    assert sizes.growth_kj == "512,128,256"
    with pytest.raises(ConfigError, match="growth-kj"):
        sizes_with_overrides(PerfSizes(), ["growth-kj=128,130"])
    with pytest.raises(ConfigError, match="two distinct sizes"):
        sizes_with_overrides(PerfSizes(), ["growth-users=1000"])
