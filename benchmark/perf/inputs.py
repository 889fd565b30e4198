"""What the harness measures on: its sizes (from the run schema's defaults), the models, prompts, samples and pairs."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from popri.config import ConfigError, GenerationConfig, TrainConfig
from popri.data import UserData
from popri.generation import sample_completions

logger = logging.getLogger(__name__)

EMBEDDING_DIM = 384  # all-MiniLM-L6-v2

# A default run's settings: the harness measures what `popri run` does unless told otherwise.
_GENERATION = GenerationConfig()
_TRAIN = TrainConfig()

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


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"invalid perf size '{key}': {why}")


@dataclass(frozen=True)
class PerfSizes:
    """How big each measurement is. The generation and DPO sizes default to a default round of ``popri run``
    (:class:`popri.config.GenerationConfig`, :class:`popri.config.TrainConfig`); the rest are the harness's own.
    ``quick`` is a smoke size. Validated when built: the run-schema sizes through the run schema itself.
    """

    prompts: int = _GENERATION.prompts  # K
    samples_per_prompt: int = _GENERATION.samples_per_prompt  # J
    max_new_tokens: int = _GENERATION.max_new_tokens
    token_budget: int = _GENERATION.token_budget
    generation_batch: int = _GENERATION.generation_batch_size
    rejected_rank: int = _TRAIN.rejected_rank
    dpo_batch: int = _TRAIN.batch_size
    dpo_pairs: int = 16  # a default round trains on K pairs; 16 (4 steps) keeps TRL's side short (0 = all K)
    users: int = 2000
    texts_per_user: float = 50.0  # mean; Shakespeare's 200-user sample has ~54
    cache_users: int = 20
    round_max_users: int = 200  # a default run uses all ~1,400 users; 200 keeps the one-off embedding short
    round_initial_set: int = _GENERATION.initial_set_size
    repeats_generation: int = 2
    repeats_scoring: int = 5
    repeats_dpo: int = 1

    def __post_init__(self) -> None:
        # The sizes a run also has are checked by the run's own dataclasses (their errors name the run key).
        GenerationConfig(
            prompts=self.prompts,
            samples_per_prompt=self.samples_per_prompt,
            max_new_tokens=self.max_new_tokens,
            token_budget=self.token_budget,
            generation_batch_size=self.generation_batch,
            initial_set_size=self.round_initial_set,
        )
        TrainConfig(rejected_rank=self.rejected_rank, batch_size=self.dpo_batch)
        _check(self.dpo_pairs >= 0, "dpo-pairs", f"must be >= 0 (0 = all), got {self.dpo_pairs}")
        _check(self.users >= 1, "users", f"must be >= 1, got {self.users}")
        _check(self.texts_per_user >= 1, "texts-per-user", f"a mean of >= 1 text, got {self.texts_per_user}")
        _check(self.cache_users >= 1, "cache-users", f"must be >= 1, got {self.cache_users}")
        _check(self.round_max_users >= 0, "round-max-users", f"must be >= 0 (0 = all), got {self.round_max_users}")
        for key in ("repeats_generation", "repeats_scoring", "repeats_dpo"):
            _check(getattr(self, key) >= 1, key.replace("_", "-"), f"must be >= 1, got {getattr(self, key)}")

    @classmethod
    def quick(cls) -> PerfSizes:
        return cls(
            prompts=4,
            max_new_tokens=16,
            token_budget=24,
            generation_batch=4,
            dpo_pairs=4,
            texts_per_user=20.0,
            cache_users=5,
            round_max_users=10,
            round_initial_set=6,
            repeats_scoring=3,
        )


def parse_assignments(items: list[str], *, flag: str) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` -> ``{"key": "value"}`` (keys in kebab-case; ``_`` is read as ``-``).

    A stand-in for the project's one KEY=VALUE parser (``popri.config.parse_assignments``) until it is in this tree.
    """
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("_", "-")
        if not sep or not key:
            raise ConfigError(f"invalid {flag} {item!r}: write KEY=VALUE, e.g. {flag} prompts=16")
        out[key] = value.strip()
    return out


def sizes_with_overrides(sizes: PerfSizes, overrides: list[str], *, flag: str = "--perf-size") -> PerfSizes:
    """``KEY=VALUE`` strings (kebab- or snake-case field names) applied to ``sizes``, each parsed as its field's type.

    Raises :class:`popri.config.ConfigError` (a ``ValueError``) naming the flag, the key and the known fields.
    """
    types = {f.name.replace("_", "-"): type(getattr(sizes, f.name)) for f in dataclasses.fields(sizes)}
    changes: dict[str, Any] = {}
    for key, value in parse_assignments(overrides, flag=flag).items():
        if key not in types:
            raise ConfigError(f"invalid {flag} {key}={value}: unknown size; known: {', '.join(types)}")
        try:
            changes[key.replace("-", "_")] = types[key](value)
        except ValueError:
            raise ConfigError(f"invalid {flag} {key}={value}: expected {types[key].__name__}") from None
    return dataclasses.replace(sizes, **changes)


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
    from popri.config import RunConfig
    from popri.data import load_user_data
    from popri.embedding import load_embedder
    from popri.generation import make_initial_set

    model, tokenizer = load_generator(cache_dir=cache_dir, dtype=torch.float32)
    users = load_user_data("shakespeare", max_users=cache_users, seed=seed)
    g = _GENERATION
    # The initial set a default run uses (same key, so a run's cached set is reused; else made as a run makes it).
    initial_set = make_initial_set(
        copy.deepcopy(model).to(torch.bfloat16),
        tokenizer,
        instruction=g.initial_instruction,
        size=g.initial_set_size,
        max_new_tokens=g.max_new_tokens,
        token_budget=g.token_budget,
        seed=seed,
        cache_dir=cache_dir or RunConfig().resolved_cache_dir(),
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
    (output / "samples.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


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
