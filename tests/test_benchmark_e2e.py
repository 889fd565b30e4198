"""End to end: every method through the benchmark driver (tiny models), and the quick preset on the real ones."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest

from benchmark.config import (
    CorpusConfig,
    DataSpec,
    DownstreamConfig,
    DPFedAvgConfig,
    PEConfig,
    PopriMethodConfig,
    preset_config,
)
from benchmark.run import run_benchmark


def _tiny_config(model_dir: Path, tmp_path: Path) -> object:
    return preset_config(
        "quick",
        output=str(tmp_path / "out"),
        cache_dir=str(tmp_path / "cache"),
        progress=False,
        noise_seed=1,
        epsilons=(2.0,),
        corpus=CorpusConfig(
            generator=str(model_dir),
            samples=8,
            public_samples=8,
            max_new_tokens=12,
            initial_set_size=6,
            generation_batch_size=8,
        ),
        datasets=(
            DataSpec(
                max_users=24,
                token_budget=16,
                validation_fraction=0.2,
                test_fraction=0.2,
                max_validation_texts=40,
                max_test_texts=60,
            ),
        ),
        downstream=DownstreamConfig(
            n_embd=16, n_layer=1, n_head=2, batch_size=16, pretrain_epochs=1, epochs=1, eval_every=10
        ),
        dpfedavg=DPFedAvgConfig(rounds=2, sample_rate=1.0, local_steps=1, num_nodes=2),
        pe=PEConfig(rounds=1, population=6, keep=3),
        popri=PopriMethodConfig(
            settings=(("rounds", 1), ("prompts", 3), ("samples-per-prompt", 3), ("rejected-rank", 1), ("batch-size", 2))
        ),
        seeds=2,
        bootstrap_resamples=200,
    )


def test_every_method_end_to_end_on_tiny_models(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare: a random 2-layer Llama with a byte tokenizer as the generator; 24 Shakespeare users; 2 seeds.
    config = _tiny_config(tiny_model_dir, tmp_path)

    # Execute
    results = run_benchmark(config)  # type: ignore[arg-type]

    # Assert: one row per (method, ε, seed), within budget, scored, and the three outputs on disk.
    out = tmp_path / "out"
    ds = results["datasets"]["shakespeare"]
    all_rows = {(r["method"], r["epsilon"], r["seed"]): r for r in ds["results"]}
    jobs = {("eps0", 0.0), ("epsinf", math.inf), ("oracle", math.inf), ("dpfedavg", 2.0), ("pe", 2.0), ("popri", 2.0)}
    assert set(all_rows) == {(m, e, s) for m, e in jobs for s in (0, 1)}
    rows = {(m, e): r for (m, e, s), r in all_rows.items() if s == 0}
    for (method, eps, _seed), row in all_rows.items():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["cross_entropy"] > 0, method
        assert row["test_tokens"] > 0 and row["wall_seconds"] > 0
        assert sum(row["test_user_tokens"]) == row["test_tokens"]
        assert sum(row["test_user_correct"]) == round(row["accuracy"] * row["test_tokens"])
        if method in ("dpfedavg", "pe", "popri"):
            assert 0 < row["epsilon_spent"] <= eps, method
            assert row["delta"] == config.delta  # type: ignore[attr-defined]
            assert row["bytes_down_per_client_round"] > 0 and row["bytes_up_per_client_round"] > 0
        if method in ("eps0", "oracle", "pe", "popri"):
            assert row["fid"] is not None and row["fid"] >= 0, method
            assert 0.0 <= row["knn_precision"] <= 1.0 and 0.0 <= row["knn_recall"] <= 1.0, method
            assert row["mean_words"] > 0 and row["reference_mean_words"] > 0, method
    assert all_rows[("oracle", math.inf, 0)]["non_private"] is True
    assert [m["round"] for m in all_rows[("popri", 2.0, 0)]["round_metrics"]] == [1]
    report = (out / "results.md").read_text()
    assert "POPri's progress: FID of each round's samples to the validation users" in report
    assert "| words per text |" in report and "The test users' texts have" in report
    assert {
        rows[(m, e)]["corpus_size"] for m, e in [("eps0", 0.0), ("pe", 2.0), ("popri", 2.0), ("oracle", math.inf)]
    } == {8}
    base = ds["base_model"]
    assert base["corpus_size"] == 8 and 0.0 <= base["accuracy"] <= 1.0
    assert rows[("eps0", 0.0)]["gap_closure"] in (0.0, None)
    # Assert: the summary over seeds and the paired comparisons.
    summary = {(e["method"], e["epsilon"]): e for e in ds["summary"]}
    assert set(summary) == jobs
    for entry in summary.values():
        assert entry["seeds"] == [0, 1]
        low, high = entry["accuracy_ci95"]
        assert low <= entry["accuracy_mean"] <= high
    assert summary[("popri", 2.0)]["fid"] is not None
    pairs = {(c["a"], c["b"], c["epsilon"]) for c in ds["comparisons"]}
    assert {
        ("popri", "pe", 2.0),
        ("popri", "dpfedavg", 2.0),
        ("pe", "dpfedavg", 2.0),
        ("oracle", "eps0", math.inf),
    } <= pairs
    for c in ds["comparisons"]:
        assert c["diff_ci95"][0] <= c["diff_ci95"][1] and c["seeds"] == [0, 1]
    saved = json.loads((out / "results.json").read_text())
    assert saved["datasets"]["shakespeare"]["splits"]["held_out"] == "users"
    assert (out / "results.md").read_text().count("| POPri |") == 1 + 1 + 2  # accuracy, distribution, one per seed
    assert (out / "privacy_utility.png").exists()
    assert (out / "shakespeare" / "seed0" / "popri-eps2" / "privacy.json").exists()
    # every private corpus travels with its privacy card: POPri's run writes one, PE's is written beside its corpus
    assert (
        "Gaussian mechanism" in (out / "shakespeare" / "seed0" / "popri-eps2" / "synthetic" / "README.md").read_text()
    )
    pe_card = (out / "shakespeare" / "seed0" / "pe-eps2.card.md").read_text()
    assert "nearest-neighbour vote vectors" in pe_card and "epsilon: " in pe_card

    # Execute again with resume: nothing runs again, the table is unchanged.
    again = run_benchmark(dataclasses.replace(config, resume=True))  # type: ignore[type-var]
    rerun = {
        (r["method"], r["epsilon"], r["seed"]): r["wall_seconds"] for r in again["datasets"]["shakespeare"]["results"]
    }
    assert rerun == {key: row["wall_seconds"] for key, row in all_rows.items()}


def test_pretrained_lora_downstream_end_to_end_on_tiny_models(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare: the tiny generator is also the "public pretrained" downstream; DP-FedAvg trains its adapter.
    base = _tiny_config(tiny_model_dir, tmp_path)
    config = dataclasses.replace(
        base,  # type: ignore[type-var]
        methods=("eps0", "epsinf", "dpfedavg"),
        seeds=1,
        downstream=DownstreamConfig(
            kind="pretrained-lora", lora_r=2, batch_size=16, pretrain_epochs=1, epochs=1, eval_every=10
        ),
    )

    # Execute
    results = run_benchmark(config)

    # Assert: every row scored; only the adapter trains, and DP-FedAvg sends exactly it.
    ds = results["datasets"]["shakespeare"]
    assert ds["downstream_kind"] == "pretrained-lora"
    assert 0 < ds["downstream_trainable_parameters"] < ds["downstream_parameters"]
    rows = {r["method"]: r for r in ds["results"]}
    assert set(rows) == {"eps0", "epsinf", "dpfedavg"}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows.values())
    sent = rows["dpfedavg"]["bytes_down_per_client_round"]  # float32 payload plus Flower's per-array metadata
    assert 4 * ds["downstream_trainable_parameters"] <= sent < 4 * ds["downstream_parameters"]


def test_public_corpus_resumes_where_it_stopped(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare: the tiny generator, and a run "interrupted" after 2 chunks of 2 samples.
    from benchmark.corpus import Generator, generate_corpus_resumable, read_seconds
    from popri.assets import load_generator

    model, tokenizer = load_generator(str(tiny_model_dir))
    gen = Generator(model, tokenizer, CorpusConfig(generator=str(tiny_model_dir), max_new_tokens=8), 16, "Say hi.")
    examples = ["first example text", "second example text", "third example text"]
    kwargs = {"count": 5, "seed": 3, "chunk": 2}
    whole = generate_corpus_resumable(gen, examples, path=tmp_path / "whole.jsonl", **kwargs)
    part = generate_corpus_resumable(gen, examples, path=tmp_path / "cut.jsonl", **{**kwargs, "count": 4})
    (tmp_path / "cut.jsonl").rename(tmp_path / "cut.jsonl.partial")
    (tmp_path / "cut.jsonl.seconds.json").rename(tmp_path / "cut.jsonl.partial.seconds.json")

    # Execute: the resumed run makes only the missing chunk.
    resumed = generate_corpus_resumable(gen, examples, path=tmp_path / "cut.jsonl", **kwargs)

    # Assert: the same corpus as an uninterrupted run, the partial file gone, the time of both invocations kept.
    assert resumed == whole and resumed[:4] == part and len(whole) == 5
    assert not (tmp_path / "cut.jsonl.partial").exists()
    assert read_seconds(tmp_path / "cut.jsonl") > 0


def test_a_corpus_with_several_samples_per_prompt_prefills_fewer_prompts(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the tiny generator at 3 samples per prompt; the sampler's calls are recorded
    import popri.generation
    from benchmark.corpus import Generator, generate_corpus_resumable
    from popri.assets import load_generator

    calls: list[tuple[int, int]] = []
    real = popri.generation.sample_completions

    def recording(model: Any, tokenizer: Any, prompts: list[str], **kwargs: Any) -> list[str]:
        calls.append((len(prompts), kwargs["samples_per_prompt"]))
        return real(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(popri.generation, "sample_completions", recording)
    model, tokenizer = load_generator(str(tiny_model_dir))
    config = CorpusConfig(generator=str(tiny_model_dir), max_new_tokens=6, samples_per_prompt=3)
    gen = Generator(model, tokenizer, config, 16, "Say hi.")
    examples = ["first example text", "second example text", "third example text", "fourth example text"]

    # Execute: 7 samples in chunks of 4
    corpus = generate_corpus_resumable(gen, examples, path=tmp_path / "c.jsonl", count=7, seed=1, chunk=4)

    # Assert: 2 prompts for the first chunk of 4 and 1 for the last 3 (a retry for an empty sample may follow each)
    assert len(corpus) == 7
    assert (2, 3) == calls[0] and (1, 3) in calls[1:]
    assert all(per == 3 for _, per in calls)


def test_a_generator_that_writes_only_empty_samples_stops_with_an_error(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a sampler whose every completion is empty (the model wrote only the next header)
    import popri.generation
    from benchmark.corpus import Generator, generate_corpus_resumable
    from popri.assets import load_generator

    def empty(model: Any, tokenizer: Any, prompts: list[str], **kwargs: Any) -> list[str]:
        return [""] * (len(prompts) * kwargs["samples_per_prompt"])

    monkeypatch.setattr(popri.generation, "sample_completions", empty)
    model, tokenizer = load_generator(str(tiny_model_dir))
    gen = Generator(model, tokenizer, CorpusConfig(generator=str(tiny_model_dir), max_new_tokens=4), 16, "Say hi.")

    # Execute / Assert: an error that names the chunk, not an endless retry of the same seeds
    with pytest.raises(RuntimeError, match="chunk 0 has 0 of 2 non-empty samples"):
        generate_corpus_resumable(gen, ["a b c", "d e f", "g h i"], path=tmp_path / "c.jsonl", count=2, seed=0, chunk=2)


@pytest.mark.slow
def test_quick_preset_on_the_real_models(tmp_path: Path) -> None:
    """The CI check of the real pipeline: SmolLM2, MiniLM and Shakespeare, every method, two ε, two seeds, with the
    intervals, the oracle row and the distribution metrics."""
    config = preset_config("quick", output=str(tmp_path / "quick"), progress=False)
    results = run_benchmark(config)
    ds = results["datasets"]["shakespeare"]
    rows = ds["results"]
    assert len(rows) == config.seeds * (3 + 3 * 2)
    for row in rows:
        if row["method"] in ("dpfedavg", "pe", "popri"):
            assert row["epsilon_spent"] <= row["epsilon"]
    summary = {(e["method"], e["epsilon"]): e for e in ds["summary"]}
    assert summary[("oracle", math.inf)]["accuracy_ci95"] is not None
    assert all(summary[(m, 1.0)]["fid"] is not None for m in ("pe", "popri"))
    assert any(c["a"] == "popri" and c["b"] == "pe" for c in ds["comparisons"])
    assert (tmp_path / "quick" / "results.md").exists()


def test_grid_search_scores_on_validation_users_and_never_reads_test(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare: two sampling temperatures for eps0, one seed; the split the search would score on if it used test.
    from benchmark.datasets import load_splits
    from benchmark.search import parse_grid, run_search
    from popri.assets import load_tokenizer

    config = dataclasses.replace(_tiny_config(tiny_model_dir, tmp_path), methods=("eps0",), seeds=1)  # type: ignore[type-var]
    grid = parse_grid(["corpus.temperature=0.7,1.0"])
    splits = load_splits(config.datasets[0], load_tokenizer(str(tiny_model_dir)), seed=config.seed)

    # Execute
    search = run_search(config, grid)

    # Assert: one row per point, each scored on validation users only, the best one named, both pages written.
    assert [r["point"] for r in search["rows"]] == [["corpus.temperature=0.7"], ["corpus.temperature=1.0"]]
    assert len(search["best"]) == 1 and search["best"][0]["point"] in ([p["point"] for p in search["rows"]])
    out = tmp_path / "out"
    for point in ("corpus.temperature=0.7", "corpus.temperature=1.0"):
        results = json.loads((out / point / "results.json").read_text())
        ds = results["datasets"]["shakespeare"]
        assert ds["scored_on"].startswith("validation") and results["config"]["tune"] is True
        assert ds["splits"]["test"]["texts"] + ds["splits"]["validation"]["texts"] == len(splits.validation.texts)
        (row,) = ds["results"]
        assert sum(row["test_user_tokens"]) == row["test_tokens"]
        assert len(row["test_user_tokens"]) == ds["splits"]["test"]["users"] < splits.validation.num_users
        assert not list((out / point / "shakespeare" / "private").glob(f"test-embeddings-{splits.test.fingerprint()}*"))
    assert "the test split was not read" in (out / "search.md").read_text()
    assert json.loads((out / "search.json").read_text())["rows"] == search["rows"]


def test_grid_points_that_share_a_public_corpus_reuse_it_with_the_same_result(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a grid over a PE setting, which leaves the public corpus, base model and eps0 row unchanged.
    from benchmark.search import parse_grid, run_search

    config = dataclasses.replace(_tiny_config(tiny_model_dir, tmp_path), methods=("eps0",), seeds=1)  # type: ignore[type-var]

    # Execute
    with caplog.at_level("INFO", logger="benchmark.search"):
        search = run_search(config, parse_grid(["pe.keep=3,4"]))

    # Assert: the second point reused the first one's public corpus and got the same eps0 score as computing it.
    out = tmp_path / "out"
    first, second = (out / p / "shakespeare" / "seed0" / "public.jsonl" for p in ("pe.keep=3", "pe.keep=4"))
    assert first.read_text() == second.read_text()
    a, b = search["rows"]
    assert a["accuracy_mean"] == b["accuracy_mean"] and a["point"] != b["point"]
    assert [r.message for r in caplog.records if "shared from" in r.message] == [
        f"pe.keep=4: public corpora, base models and embeddings shared from {out / 'pe.keep=3'}"
    ]
