"""``popri perf --only corpus``: corpus sampling on tiny models built in code and tiny sizes (no timed assertions)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from benchmark.perf.schema import DEFAULT_COMPARISONS, OPT_IN_COMPARISONS, PerfSizes, sizes_with_overrides
from popri.config import ConfigError
from tests.helpers import tiny_perf_run

N = 6
VARIANTS = [("float32", 1), ("bfloat16", 1), ("bfloat16", 3)]


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One ``run_perf(only=("corpus",))`` on the tiny LM and MiniLM, N=6 samples, J in 1, 3; (output, perf.json)."""
    out = tmp_path_factory.mktemp("perf-corpus")
    return out, tiny_perf_run(out, "corpus", corpus_samples=N, corpus_per_prompt="1,3", repeats_corpus=1)


def test_corpus_section_has_one_row_per_variant_in_order_each_with_n_samples(corpus_run: tuple[Path, dict[str, Any]]):
    # Prepare
    _, saved = corpus_run

    # Execute
    corpus = saved["corpus"]
    rows = corpus["rows"]

    # Assert: float32 J=1, bf16 J=1, bf16 J=3; ceil(N/J) prompts, N samples kept, positive times and throughputs
    assert [(r["dtype"], r["samples_per_prompt"]) for r in rows] == VARIANTS
    assert [r["prompts"] for r in rows] == [math.ceil(N / j) for _, j in VARIANTS] == [6, 6, 2]
    assert all(r["samples"] == N for r in rows)
    for row in rows:
        assert row["seconds"] > 0 and len(row["runs_s"]) == 1 and all(t > 0 for t in row["runs_s"])
        assert row["samples_per_s"] > 0 and row["tokens_per_s"] >= 0 and row["tokens"] >= 0
    assert set(corpus["conversion_s"]) == {"float32", "bfloat16"}
    assert all(s > 0 for s in corpus["conversion_s"].values())
    assert {"measured_at", "reading"} <= set(corpus)
    assert saved["comparisons"] == []  # nothing but corpus was measured


def test_corpus_speedups_are_ratios_of_the_baseline_medians(corpus_run: tuple[Path, dict[str, Any]]):
    # Prepare
    _, saved = corpus_run
    rows = saved["corpus"]["rows"]

    # Execute
    fp32, bf16 = rows[0]["seconds"], rows[1]["seconds"]

    # Assert: each row's speed-ups are the baselines' medians over its own; the baselines are 1 against themselves
    for row in rows:
        assert row["speedup_vs_fp32_j1"] == pytest.approx(fp32 / row["seconds"], rel=1e-2)
        assert row["speedup_vs_bf16_j1"] == pytest.approx(bf16 / row["seconds"], rel=1e-2)
    assert rows[0]["speedup_vs_fp32_j1"] == rows[1]["speedup_vs_bf16_j1"] == 1.0


def test_corpus_diversity_is_a_cosine_and_a_distinct_count(corpus_run: tuple[Path, dict[str, Any]]):
    # Prepare
    _, saved = corpus_run

    # Execute
    rows = saved["corpus"]["rows"]

    # Assert
    for row in rows:
        assert -1.0 <= row["mean_pairwise_cosine"] <= 1.0
        assert 1 <= row["distinct"] <= N


def test_perf_md_renders_the_corpus_section_with_every_row_and_a_reading(corpus_run: tuple[Path, dict[str, Any]]):
    # Prepare
    out, saved = corpus_run

    # Execute
    text = (out / "perf.md").read_text()
    section = text.split("## Corpus sampling", 1)[1]

    # Assert: one table row per variant, and a reading built from the J=3 row (J=4 was not measured)
    table = [line for line in section.splitlines() if line.startswith(("| float32 |", "| bfloat16 |"))]
    assert [tuple(cell.strip() for cell in line.split("|")[1:3]) for line in table] == [
        (d, str(j)) for d, j in VARIANTS
    ]
    j3 = saved["corpus"]["rows"][2]
    assert "Reading (generated from the rows above): bf16 with J=3" in section
    assert f"×{j3['speedup_vs_bf16_j1']:.2f} as fast as bf16 with J=1" in section


def test_corpus_is_opt_in_and_a_bad_per_prompt_list_is_refused_naming_the_key():
    # Prepare
    bad = ["corpus-per-prompt=2,4", "corpus-per-prompt=1", "corpus-per-prompt=0,1", "corpus-per-prompt=1,x"]

    # Execute / Assert
    assert "corpus" in OPT_IN_COMPARISONS and "corpus" not in DEFAULT_COMPARISONS
    for item in bad:
        with pytest.raises(ConfigError, match="corpus-per-prompt"):
            sizes_with_overrides(PerfSizes(), [item])
    with pytest.raises(ConfigError, match="corpus-samples"):
        sizes_with_overrides(PerfSizes(), ["corpus-samples=0"])
