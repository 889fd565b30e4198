"""One harness run: measure the chosen comparisons, merge with an earlier perf.json, write perf.json and perf.md."""

from __future__ import annotations

import dataclasses
import datetime as dt
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmark.perf.corpus import bench_corpus
from benchmark.perf.growth import bench_growth
from benchmark.perf.inputs import (
    PerfAssets,
    PerfSizes,
    load_default_assets,
    load_json,
    perf_prompts,
    popri_samples,
    preference_pairs,
    save_samples,
    saved_samples,
)
from benchmark.perf.report import source_commit, write_report
from benchmark.perf.schema import COMPARISONS, DEFAULT_COMPARISONS
from benchmark.perf.stages import (
    GenerationPeers,
    bench_dpo,
    bench_embedding_cache,
    bench_generation,
    bench_round,
    bench_scoring,
    bench_shared_prompt,
    bench_threads,
    communication,
    dpo_first_step_losses,
    round_row,
)
from benchmark.perf.timing import blas_threads, machine_info, matmul_gflops, timed, when

_DPO = {"dpo", "dpo_fp32", "dpo_loss", "dpo_shared_prompt"}
_FIRST_ROWS = (
    "generation",
    "generation_llama_cpp",
    "generation_ctranslate2",
    "generation_openvino",
    "generation_vllm",
    "scoring",
    "dpo",
    "dpo_fp32",
    "round",
)


def row_order(rows: dict[str, Any]) -> list[str]:
    return [n for n in _FIRST_ROWS if n in rows] + sorted(n for n in rows if n not in _FIRST_ROWS)


def run_perf(
    output: Path,
    *,
    quick: bool = False,
    only: tuple[str, ...] = DEFAULT_COMPARISONS,
    assets: PerfAssets | None = None,
    sizes: PerfSizes | None = None,
    cache_dir: str = "",
    seed: int = 0,
    threads: int | None = None,
    peers: GenerationPeers | None = None,
) -> dict[str, Any]:
    """Measure, then write ``output/perf.json`` and ``output/perf.md``; returns perf.json's content.

    Comparisons not in ``only`` keep the values of an existing ``perf.json`` in ``output`` (each row carries the
    time it was measured), so the harness can be run one comparison at a time on a busy machine. ``threads`` sets
    torch's intra-op threads for popri and its peers alike (on a CPU shared with other busy processes, 1 thread can
    be several times faster than 2: the threads wait for each other at every parallel region). ``peers`` says which
    interpreters hold the optional generation peers. ``growth`` (how cost grows, :mod:`benchmark.perf.growth`) and
    ``corpus`` (corpus sampling, :mod:`benchmark.perf.corpus`) run only when named in ``only``: at default sizes they
    measure for minutes (growth for tens of minutes).
    """
    unknown = sorted(set(only) - set(COMPARISONS))
    if unknown:
        raise ValueError(f"unknown comparison {unknown[0]!r}; choose from {', '.join(COMPARISONS)}")
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_perf(
            output,
            quick=quick,
            only=only,
            assets=assets,
            sizes=sizes,
            cache_dir=cache_dir,
            seed=seed,
            peers=peers or GenerationPeers(),
        )
    finally:
        torch.set_num_threads(before)


def _run_perf(
    output: Path,
    *,
    quick: bool,
    only: tuple[str, ...],
    assets: PerfAssets | None,
    sizes: PerfSizes | None,
    cache_dir: str,
    seed: int,
    peers: GenerationPeers,
) -> dict[str, Any]:
    output.mkdir(parents=True, exist_ok=True)
    sizes = sizes or (PerfSizes.quick() if quick else PerfSizes())
    harness: dict[str, Any] = {}
    with timed(harness, "load_assets_s"):
        assets = assets or load_default_assets(
            cache_dir=Path(cache_dir) if cache_dir else None, cache_users=sizes.cache_users, seed=seed
        )
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    previous = load_json(output / "perf.json")
    peak = {"float32": matmul_gflops(torch.float32), "bfloat16": matmul_gflops(torch.bfloat16)}
    result: dict[str, Any] = {
        "date": now,
        "commit": source_commit(),
        "quick": quick,
        "machine": machine_info(),
        "models": assets.description or "tiny models built in code",
        "sizes": dataclasses.asdict(sizes),
        "matmul_peak_gflops": {k: round(v, 1) for k, v in peak.items()},
        "peers": previous.get("peers", {}),
        "stages": previous.get("stages", {}),
        "comparisons": [],
        "embedding_cache": previous.get("embedding_cache"),
        "dpo_first_step_fp32": previous.get("dpo_first_step_fp32"),
        "threads_check": previous.get("threads_check"),
        "ablations": previous.get("ablations") or {},
        "communication": previous.get("communication"),
        "growth": previous.get("growth"),
        "corpus": previous.get("corpus"),
    }
    rows: dict[str, dict[str, Any]] = {r["name"]: r for r in previous.get("comparisons", [])}
    prompts = perf_prompts(assets, sizes, seed=seed)
    samples: list[str] | None = None
    with tempfile.TemporaryDirectory(prefix="popri-perf-") as tmp, blas_threads(torch.get_num_threads()):
        workdir = Path(tmp)
        if "round" in only:  # first, so that the peak memory is the round's (plus the harness's own fp32 model)
            round_result = bench_round(assets, sizes, seed=seed, cache_dir=cache_dir, workdir=workdir)
            result["stages"] = {**round_result, **when(now)}
        if "generation" in only:
            gen_rows, samples, statuses = bench_generation(
                assets, sizes, prompts, seed=seed, peak_gflops=peak, peers=peers
            )
            rows.update({row["name"]: {**row, **when(now)} for row in gen_rows})
            result["peers"] = {**result["peers"], **{n: {**s.to_dict(), **when(now)} for n, s in statuses.items()}}
            save_samples(output, prompts, samples, sizes, seed=seed)
        if "scoring" in only:
            rows["scoring"] = {**bench_scoring(sizes, seed=seed), **when(now)}
            result["embedding_cache"] = {**bench_embedding_cache(assets, sizes), **when(now)}
        if _DPO & set(only):
            if samples is None:
                samples = saved_samples(output, prompts, sizes, seed=seed)
                if samples is None:
                    samples = popri_samples(assets, prompts, sizes, seed=seed)
                    save_samples(output, prompts, samples, sizes, seed=seed)
            pairs = preference_pairs(prompts, samples, sizes, seed=seed)[: sizes.dpo_pairs or None]
            for name in ("dpo", "dpo_fp32"):
                if name in only:
                    row = bench_dpo(assets, pairs, sizes, seed=seed, workdir=workdir, fp32=name == "dpo_fp32")
                    rows[name] = {**row, **when(now)}
            if "dpo_shared_prompt" in only:
                result["ablations"]["shared_prompt_dpo"] = {**bench_shared_prompt(assets, pairs, sizes), **when(now)}
            if "dpo_loss" in only:
                check = dpo_first_step_losses(assets.model, assets.tokenizer, pairs, workdir=workdir)
                result["dpo_first_step_fp32"] = {**check, **when(now)}
        if "threads" in only:
            result["threads_check"] = {**bench_threads(assets), **when(now)}
        if "communication" in only:
            comm = communication(
                assets.tokenizer,
                prompts=sizes.prompts,
                samples_per_prompt=sizes.samples_per_prompt,
                token_budget=sizes.token_budget,
            )
            result["communication"] = {**comm, **when(now)}
        if "corpus" in only:
            result["corpus"] = {**bench_corpus(assets, sizes, seed=seed), **when(now)}
        if "growth" in only:  # last: its 10^6-user node holds GiBs that no other measurement should share
            result["growth"] = {**bench_growth(assets, sizes, seed=seed), **when(now)}
    result["matmul_peak_gflops"]["float32_after"] = round(matmul_gflops(torch.float32), 1)
    if result["stages"]:
        rows["round"] = round_row(result["stages"], rows)
    result["comparisons"] = [rows[n] for n in row_order(rows)]
    result["harness"] = harness
    write_report(output, result)
    return result
