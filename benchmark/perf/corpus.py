"""Corpus sampling (``popri perf --only corpus``): what a LargeFedBench corpus costs per sample, side by side.

Variants, in this order: float32 weights with 1 sample per prompt (the old corpus setting, the baseline), bf16 weights
with 1 sample per prompt (the benchmark's corpus setting), then bf16 with J samples per prompt for every other J of
``corpus-per-prompt`` (``corpus.samples-per-prompt``, popri's ``final-samples-per-prompt``: each prompt is prefilled
once and its KV cache expanded for its J samples). The sampler is the benchmark's: the base model through
:func:`benchmark.perf.inputs.popri_sampler` in each dtype, then :func:`popri.generation.sample_completions` with the
run's new-token limit, token budget and batch size (prompts decoded together; a batch holds batch x J rows).

Every variant makes the same N = ``corpus-samples`` samples: N prompts of the paper's template are drawn once from
the run's initial set with a seeded rng, variant J samples the first ``prompts_for(N, samples_per_prompt=J)`` of them
and keeps the first N samples (as :func:`benchmark.corpus.generate_from_examples` drops the last prompt's surplus).

**What is timed:** sampling only, one ``sample_completions`` call per run, each with a fresh generator of the same
seed, every variant interleaved A B .. B A (:func:`benchmark.perf.timing.interleaved`) so that all see the same
machine state. The model conversion (a copy of the base cast to the dtype, once per dtype) and one short warm-up per
sampler are outside the timing; the conversions are reported separately as ``conversion_s``. Tokens per second count
the N kept samples' tokens (:func:`benchmark.perf.timing.count_tokens`), not the dropped surplus.

**Diversity indicator:** the mean pairwise cosine similarity of the N samples' embeddings
(:func:`popri.embedding.embed_texts`, off-diagonal mean; lower = more varied) and the number of distinct samples.
It is a coarse check over N samples that J samples of one prompt are not near-copies, not a distribution metric
(nothing here measures how close the corpus is to the private data, or its downstream value).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from benchmark.perf.inputs import FIXED_LINES, PerfAssets, PerfSizes, popri_sampler
from benchmark.perf.schema import size_list
from benchmark.perf.timing import count_tokens, interleaved, median, sig

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
READING_J = 4  # the reading compares this J with J = 1 (the largest measured J when 4 is not in the list)


def corpus_variants(per_prompt: str) -> list[tuple[str, int]]:
    """``[(dtype, J), ...]`` in table order: float32 J=1, bf16 J=1, then bf16 at each other J of ``per_prompt``."""
    return [("float32", 1)] + [("bfloat16", j) for j in size_list("corpus-per-prompt", per_prompt)]


def _name(dtype: str, j: int) -> str:
    return f"{dtype} J={j}"


def diversity(embedder: Any, samples: list[str]) -> dict[str, Any]:
    """Mean off-diagonal cosine similarity of the samples' unit embeddings (None under 2 samples), distinct count."""
    from popri.embedding import embed_texts

    emb = embed_texts(embedder, samples).astype(np.float64)
    n, sims = len(samples), emb @ emb.T
    mean_cos = float((sims.sum() - np.trace(sims)) / (n * (n - 1))) if n >= 2 else None
    return {"mean_pairwise_cosine": None if mean_cos is None else round(mean_cos, 4), "distinct": len(set(samples))}


def bench_corpus(assets: PerfAssets, sizes: PerfSizes, *, seed: int) -> dict[str, Any]:
    """perf.json's ``corpus``: one row per (dtype, J) variant, each making the same N samples; the reading."""
    from popri.embedding import load_embedder
    from popri.generation import build_prompts, prompts_for, sample_completions

    tok, n = assets.tokenizer, sizes.corpus_samples
    variants = corpus_variants(sizes.corpus_per_prompt)
    lines = assets.initial_set or list(FIXED_LINES)
    prompts = build_prompts(lines, num_prompts=n, rng=np.random.default_rng([seed, 13]))
    samplers: dict[str, Any] = {}
    conversion_s: dict[str, float] = {}
    for dtype in dict.fromkeys(d for d, _ in variants):
        start = time.perf_counter()
        samplers[dtype] = popri_sampler(assets.model, tok, DTYPES[dtype])
        conversion_s[dtype] = sig(time.perf_counter() - start, 4)
    k = dict(max_new_tokens=sizes.max_new_tokens, token_budget=sizes.token_budget, batch_size=sizes.generation_batch)

    def sample(dtype: str, j: int) -> Callable[[], list[str]]:
        mine = prompts[: prompts_for(n, samples_per_prompt=j)]
        gen = samplers[dtype]
        return lambda: sample_completions(
            gen, tok, mine, samples_per_prompt=j, generator=torch.Generator().manual_seed(seed), **k
        )[:n]

    warm = dict(samples_per_prompt=2, max_new_tokens=2, token_budget=4)
    for dtype, sampler in samplers.items():  # one-time allocations and lazy init, outside the timed runs
        sample_completions(sampler, tok, prompts[:1], generator=torch.Generator().manual_seed(0), **warm)
        logger.info("corpus: %s sampler warmed up", dtype)
    runs = {_name(d, j): sample(d, j) for d, j in variants}
    times, results = interleaved(runs, sizes.repeats_corpus)
    embedder = assets.embedder if assets.embedder is not None else load_embedder()
    med = {name: median(t) for name, t in times.items()}
    fp32, bf16 = med[_name("float32", 1)], med[_name("bfloat16", 1)]
    rows = []
    for dtype, j in variants:
        name = _name(dtype, j)
        samples, seconds = results[name], med[name]
        tokens = count_tokens(tok, samples)
        rows.append(
            {
                "dtype": dtype,
                "samples_per_prompt": j,
                "prompts": prompts_for(n, samples_per_prompt=j),
                "samples": len(samples),
                "seconds": sig(seconds),
                "runs_s": [sig(t) for t in times[name]],
                "samples_per_s": sig(len(samples) / seconds, 4),
                "tokens": tokens,
                "tokens_per_s": sig(tokens / seconds, 4),
                "speedup_vs_bf16_j1": sig(bf16 / seconds, 4),
                "speedup_vs_fp32_j1": sig(fp32 / seconds, 4),
                **diversity(embedder, samples),
            }
        )
    section: dict[str, Any] = {
        "what": "sampling only (sample_completions), the same N samples per variant, variants interleaved ABBA; "
        "model conversion once per dtype and a warm-up, untimed (conversion_s)",
        "diversity_note": "mean pairwise cosine similarity of the N samples' embeddings (embed_texts, off-diagonal; "
        "lower = more varied) and distinct samples: a coarse check over N samples, not a distribution metric",
        "corpus_samples": n,
        "max_new_tokens": sizes.max_new_tokens,
        "token_budget": sizes.token_budget,
        "generation_batch": sizes.generation_batch,
        "repeats": sizes.repeats_corpus,
        "prompt_tokens_mean": round(
            float(np.mean([len(i) for i in tok(prompts, add_special_tokens=False)["input_ids"]])), 1
        ),
        "conversion_s": conversion_s,
        "rows": rows,
    }
    section["reading"] = corpus_reading(section)
    return section


def corpus_reading(section: Mapping[str, Any]) -> str:
    """One sentence from the rows: J=4 (else the largest J) bf16 against bf16 J=1 and float32 J=1, and diversity."""
    rows = section["rows"]
    bf16 = {r["samples_per_prompt"]: r for r in rows if r["dtype"] == "bfloat16"}
    j = READING_J if READING_J in bf16 else max(bf16)
    row, base = bf16[j], bf16[1]

    def cos(r: Mapping[str, Any]) -> str:
        return "-" if r["mean_pairwise_cosine"] is None else f"{r['mean_pairwise_cosine']:.3f}"

    change = (
        ""
        if row["mean_pairwise_cosine"] is None or base["mean_pairwise_cosine"] is None
        else f" ({row['mean_pairwise_cosine'] - base['mean_pairwise_cosine']:+.3f})"
    )
    return (
        f"bf16 with J={j} samples per prompt made its {row['samples']} samples "
        f"×{row['speedup_vs_bf16_j1']:.2f} as fast as bf16 with J=1 and ×{row['speedup_vs_fp32_j1']:.2f} as fast as "
        f"float32 with J=1 (bf16 J=1 alone: ×{base['speedup_vs_fp32_j1']:.2f}); mean pairwise cosine (lower = more "
        f"varied) {cos(base)} at J=1 → {cos(row)} at J={j}{change}, distinct samples {base['distinct']} → "
        f"{row['distinct']} of {row['samples']}."
    )


def corpus_markdown(section: Mapping[str, Any]) -> list[str]:
    """perf.md's "Corpus sampling" section: one row per variant, then the generated reading."""
    conv = ", ".join(f"{d} {s} s" for d, s in section["conversion_s"].items())
    lines = [
        "",
        "## Corpus sampling",
        "",
        f"{section['corpus_samples']} samples per variant ({section['prompt_tokens_mean']}-token prompts, "
        f"≤ {section['max_new_tokens']} new tokens, token budget {section['token_budget']}, "
        f"{section['generation_batch']} prompts per batch); medians of {section['repeats']} run(s). Timed: "
        f"{section['what']}; conversion: {conv}. Diversity: {section['diversity_note']}.",
        "",
        "| dtype | J | prompts | samples | seconds | samples/s | tokens/s | × bf16 J=1 | × float32 J=1 | "
        "mean cosine | distinct |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in section["rows"]:
        cos = "-" if r["mean_pairwise_cosine"] is None else f"{r['mean_pairwise_cosine']:.3f}"
        lines.append(
            f"| {r['dtype']} | {r['samples_per_prompt']} | {r['prompts']} | {r['samples']} | {r['seconds']:.3g} | "
            f"{r['samples_per_s']} | {r['tokens_per_s']} | {r['speedup_vs_bf16_j1']:.2f} | "
            f"{r['speedup_vs_fp32_j1']:.2f} | {cos} | {r['distinct']} |"
        )
    return [*lines, "", f"Reading (generated from the rows above): {corpus_reading(section)}"]
