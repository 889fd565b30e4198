"""What the harness measures on: the models, prompts, samples and pairs (sizes: :mod:`benchmark.perf.schema`)."""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark.perf.schema import PerfSizes
from popri.checkpoint import atomic_write_text
from popri.config import GenerationConfig, TrainConfig, default_cache_dir
from popri.data import UserData
from popri.generation import sample_completions

logger = logging.getLogger(__name__)

EMBEDDING_DIM = 384  # all-MiniLM-L6-v2

# Public lines the prompts draw from when a tiny test model has no initial set of its own.
FIXED_LINES = (
    "Good morrow to you, friend; what news from the town?",
    "I will not stay the night, for the roads are long and cold.",
    "Speak softly, the king is sleeping in the next room.",
    "What light is this that breaks upon the garden wall?",
    "Bring me my cloak and sword, and saddle the grey horse.",
    "Thou art a fool to trust a merchant with a smiling face.",
    "The harvest failed and the people cry for bread.",
    "Let us be merry while the candles burn.",
)


@dataclass
class PerfAssets:
    """The models under test: a float32 base LM and its tokenizer, the embedder, where they come from."""

    model: Any
    tokenizer: Any
    embedder: Any
    generator_id: str = "smollm2"  # what PopriRun loads: 'smollm2' or a local HF folder
    model_dir: Path | None = None  # the same weights as a safetensors folder, for peers that convert them
    gguf_path: Path | None = None  # the same weights for llama.cpp, when available
    cache_users: UserData | None = None  # private users for the cache check
    round_data: str = "shakespeare"  # DataConfig.data of the round
    initial_set: list[str] | None = None  # the public initial set the prompts draw from (None: fixed lines)
    description: str = ""


def load_default_assets(*, cache_dir: Path | None, cache_users: int, seed: int) -> PerfAssets:
    """SmolLM2-135M-Instruct (float32, best device), all-MiniLM-L6-v2 and Shakespeare users, all packaged."""
    from popri.assets import generator_dir, load_generator, smollm2_gguf_path
    from popri.data import load_user_data
    from popri.embedding import load_embedder
    from popri.generation import make_initial_set

    model, tokenizer = load_generator(cache_dir=cache_dir, dtype=torch.float32)
    users = load_user_data("shakespeare", max_users=cache_users, seed=seed)
    g = GenerationConfig()
    # The initial set a default run uses (same key, so a run's cached set is reused; else made as a run makes it).
    initial_set = make_initial_set(
        copy.deepcopy(model).to(torch.bfloat16),
        tokenizer,
        instruction=g.initial_instruction,
        size=g.initial_set_size,
        max_new_tokens=g.max_new_tokens,
        token_budget=g.token_budget,
        seed=seed,
        cache_dir=default_cache_dir(cache_dir),
        model_id=g.model,
    )
    return PerfAssets(
        model=model,
        tokenizer=tokenizer,
        embedder=load_embedder(),
        model_dir=generator_dir(cache_dir=cache_dir),
        gguf_path=smollm2_gguf_path(),
        cache_users=users,
        initial_set=initial_set,
        description="SmolLM2-135M-Instruct (packaged GGUF, dequantized), all-MiniLM-L6-v2, Shakespeare",
    )


def perf_prompts(assets: PerfAssets, sizes: PerfSizes, *, seed: int) -> list[str]:
    """K prompts of the paper's template filled from the run's initial set, or from fixed lines (tiny models)."""
    from popri.generation import build_prompts

    lines = assets.initial_set or list(FIXED_LINES)
    prompts = build_prompts(lines, num_prompts=sizes.prompts, rng=np.random.default_rng([seed, 11]))
    lengths = [len(ids) for ids in assets.tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    logger.info("%d prompts of %.0f tokens on average", len(prompts), float(np.mean(lengths)))
    return prompts


def popri_sampler(model: Any, tokenizer: Any, dtype: torch.dtype) -> Any:
    """What a round samples with: ``LoraDPO.generation_model(dtype)`` (adapter merged, cast) on a copy of the base."""
    from popri.dpo import LoraDPO

    dpo = LoraDPO(copy.deepcopy(model), tokenizer, config=TrainConfig())
    sampler = dpo.generation_model(dtype)
    del dpo
    return sampler


def popri_samples(assets: PerfAssets, prompts: list[str], sizes: PerfSizes, *, seed: int) -> list[str]:
    """popri's samples for the DPO pairs, when no generation run left them."""
    return sample_completions(
        popri_sampler(assets.model, assets.tokenizer, torch.bfloat16),
        assets.tokenizer,
        prompts,
        samples_per_prompt=sizes.samples_per_prompt,
        max_new_tokens=sizes.max_new_tokens,
        token_budget=sizes.token_budget,
        batch_size=sizes.generation_batch,
        generator=torch.Generator().manual_seed(seed),
    )


def _samples_key(prompts: list[str], sizes: PerfSizes, seed: int) -> list[Any]:
    return [prompts, sizes.samples_per_prompt, sizes.max_new_tokens, sizes.token_budget, seed]


def save_samples(output: Path, prompts: list[str], samples: list[str], sizes: PerfSizes, *, seed: int) -> None:
    """popri's samples of the generation run, reused as DPO pairs by a later ``--only dpo`` run."""
    data = {"key": _samples_key(prompts, sizes, seed), "samples": samples}
    atomic_write_text(output / "samples.json", json.dumps(data, ensure_ascii=False))


def load_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; ``{}`` when the file is missing or unreadable (with a warning)."""
    if not path.exists():
        return {}
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        logger.warning("ignoring unreadable %s", path)
        return {}


def saved_samples(output: Path, prompts: list[str], sizes: PerfSizes, *, seed: int) -> list[str] | None:
    """The samples :func:`save_samples` left for exactly these prompts and sizes, else None."""
    saved = load_json(output / "samples.json")
    return list(saved["samples"]) if saved.get("key") == _samples_key(prompts, sizes, seed) else None


def preference_pairs(prompts: list[str], samples: list[str], sizes: PerfSizes, *, seed: int) -> list[Any]:
    """One preference pair per prompt from popri's own samples, ranked by random scores (as noisy scores would)."""
    from popri.preferences import build_pairs

    scores = np.random.default_rng([seed, 5]).standard_normal(len(samples))
    return build_pairs(
        prompts=prompts,
        samples=samples,
        dp_scores=scores,
        samples_per_prompt=sizes.samples_per_prompt,
        rejected_rank=min(sizes.rejected_rank, sizes.samples_per_prompt - 1),
    )
