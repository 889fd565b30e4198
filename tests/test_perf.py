"""The performance harness end to end in its --quick form, on tiny models built in code (no targets enforced)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.perf import (
    PerfAssets,
    PerfSizes,
    interleaved,
    reference_loop_scores,
    run_perf,
    synthetic_private_embeddings,
)
from popri.data import read_user_file
from popri.embedding import load_embedder
from popri.scoring import clipped_scores_sum, user_embedding_sums
from tests.tiny_models import byte_tokenizer, tiny_causal_lm


def test_reference_loop_and_vectorised_scoring_agree():
    # Prepare: 50 users with random unit embeddings
    private, owner, samples = synthetic_private_embeddings(users=50, texts_per_user=5, samples=24, seed=0)
    bounds = np.searchsorted(owner, np.arange(51))
    per_user = [torch.from_numpy(private[bounds[u] : bounds[u + 1]]) for u in range(50)]

    # Execute
    ours = clipped_scores_sum(samples, user_embedding_sums(private, owner, 50))
    loop = reference_loop_scores(torch.from_numpy(samples), per_user)

    # Assert
    assert np.allclose(ours, loop, atol=1e-4)


def test_interleaved_alternates_the_order():
    calls: list[str] = []
    times, _ = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert len(times["a"]) == len(times["b"]) == 3


def test_quick_perf_writes_every_comparison(tiny_model_dir: Path, user_file: Path, tmp_path: Path):
    # Prepare: the tiny LM in memory and on disk (the round loads it as a local folder), tiny private users
    tok = byte_tokenizer()
    users = read_user_file(user_file)
    assets = PerfAssets(
        model=tiny_causal_lm(tok),
        tokenizer=tok,
        embedder=load_embedder(),
        generator_id=str(tiny_model_dir),
        cache_users=users,
        round_data=str(user_file),
    )
    sizes = dataclasses.replace(PerfSizes.quick(), users=400, repeats_scoring=2)  # 2,000 in the CLI's --quick
    out = tmp_path / "perf"

    # Execute
    result = run_perf(out, quick=True, assets=assets, sizes=sizes, cache_dir=str(tmp_path / "cache"), threads=1)

    # Assert: both files, every comparison with positive times, a ratio = peer/popri
    saved = json.loads((out / "perf.json").read_text())
    assert saved["comparisons"] == result["comparisons"]
    rows = {r["name"]: r for r in saved["comparisons"]}
    assert {"generation", "generation_llama_cpp", "scoring", "dpo", "dpo_fp32", "round"} <= set(rows)
    for name in ("generation", "scoring", "dpo", "dpo_fp32", "round"):
        row = rows[name]
        assert row["popri_s"] > 0 and row["peer_s"] > 0
        assert row["ratio"] == pytest.approx(row["peer_s"] / row["popri_s"], rel=0.02)
    assert rows["generation_llama_cpp"]["measured"] is False  # no GGUF for the tiny model
    for peer in ("ctranslate2", "openvino", "vllm"):  # installed in their own venvs, not in the test interpreter
        assert rows[f"generation_{peer}"]["measured"] is False and rows[f"generation_{peer}"]["why"]
        assert saved["peers"][peer]["available"] is False
    assert saved["commit"] and saved["machine"]["processor"]
    assert rows["scoring"]["users"] == sizes.users and rows["scoring"]["max_abs_difference"] < 1e-4
    assert rows["generation"]["popri_detail"]["tokens"] > 0
    first = saved["dpo_first_step_fp32"]
    assert first["abs_difference"] <= 1e-5 and not math.isclose(first["popri_loss"], math.log(2), abs_tol=1e-6)
    cache = saved["embedding_cache"]
    assert cache["private_texts"] == len(users.texts)
    # the second call, as in every later round, hits the cache: it embeds nothing
    assert cache["first_call_embedded_texts"] == len(users.texts) and cache["second_call_embedded_texts"] == 0
    stages = saved["stages"]
    assert {"generate", "embed", "collect", "dpo"} <= set(stages["seconds"]) and stages["peak_rss_mib"] > 0
    comm = saved["communication"]
    assert comm["popri"]["down_bytes"] >= sizes.prompts * sizes.samples_per_prompt * 384 * 4
    assert comm["popri"]["up_bytes"] >= sizes.prompts * sizes.samples_per_prompt * 8
    assert comm["dpfedavg"]["down_bytes"] >= 4 * comm["dpfedavg"]["parameters"]
    text = (out / "perf.md").read_text()
    assert "| generation |" in text and "Communication per client per round" in text


def test_rerun_of_one_comparison_keeps_the_others(tmp_path: Path):
    # Prepare: a perf.json holding a generation row from an earlier run
    out = tmp_path / "perf"
    out.mkdir()
    old = {"name": "generation", "popri_s": 1.0, "peer": "x", "peer_s": 2.0, "ratio": 2.0, "target": 1.5}
    (out / "perf.json").write_text(json.dumps({"comparisons": [old]}))
    tok = byte_tokenizer()
    assets = PerfAssets(model=tiny_causal_lm(tok), tokenizer=tok, embedder=None)
    sizes = PerfSizes(users=20, texts_per_user=3, repeats_scoring=1)

    # Execute: only communication
    result = run_perf(out, quick=True, only=("communication",), assets=assets, sizes=sizes, threads=1)

    # Assert
    assert result["comparisons"] == [old]
    assert result["communication"]["popri"]["down_bytes"] > 0


def test_size_overrides_parse_and_reject_unknown_fields():
    from benchmark.perf import sizes_with_overrides

    sizes = sizes_with_overrides(PerfSizes(), ["prompts=16", "texts-per-user=7.5"])
    assert sizes.prompts == 16 and sizes.texts_per_user == 7.5
    with pytest.raises(ValueError, match="invalid --perf-size"):
        sizes_with_overrides(PerfSizes(), ["nope=1"])
