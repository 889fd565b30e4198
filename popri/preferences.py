"""Preference pairs from noisy scores (step 5): post-processing of the DP release, so it costs no privacy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str

    def to_dict(self) -> dict[str, str]:
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}


def rank_within_prompts(dp_scores: np.ndarray, samples_per_prompt: int) -> np.ndarray:
    """Per prompt, sample indices (within the block of J) sorted by descending noisy score. Shape (K, J).

    Ties are broken by position (stable sort), never by text, unlike the reference code's ``list.index``.
    """
    if dp_scores.ndim != 1 or dp_scores.shape[0] % samples_per_prompt:
        raise ValueError(f"{dp_scores.shape} scores do not split into blocks of {samples_per_prompt}")
    blocks = dp_scores.reshape(-1, samples_per_prompt)
    return np.argsort(-blocks, axis=1, kind="stable")


def build_pairs(
    *, prompts: list[str], samples: list[str], dp_scores: np.ndarray, samples_per_prompt: int, rejected_rank: int
) -> list[PreferencePair]:
    """One pair per prompt: chosen = best by noisy score, rejected = the sample at ``rejected_rank`` (0 = best).

    ``samples`` holds K blocks of J consecutive completions, block k belonging to ``prompts[k]``.
    """
    if len(samples) != len(prompts) * samples_per_prompt:
        raise ValueError(f"{len(samples)} samples for {len(prompts)} prompts x {samples_per_prompt}")
    if dp_scores.shape != (len(samples),):
        raise ValueError(f"dp_scores has shape {dp_scores.shape}, expected one score per sample ({len(samples)},)")
    if not 1 <= rejected_rank < samples_per_prompt:
        raise ValueError(f"rejected_rank must be in [1, {samples_per_prompt - 1}], got {rejected_rank}")
    order = rank_within_prompts(dp_scores, samples_per_prompt)
    pairs = []
    for k, prompt in enumerate(prompts):
        block = samples[k * samples_per_prompt : (k + 1) * samples_per_prompt]
        pairs.append(PreferencePair(prompt, block[order[k, 0]], block[order[k, rejected_rank]]))
    return pairs


def random_pairs(
    *, prompts: list[str], samples: list[str], samples_per_prompt: int, rng: np.random.Generator
) -> list[PreferencePair]:
    """Control arm: chosen and rejected drawn at random within each prompt (no private signal at all)."""
    if len(samples) != len(prompts) * samples_per_prompt:
        raise ValueError(f"{len(samples)} samples for {len(prompts)} prompts x {samples_per_prompt}")
    pairs = []
    for k, prompt in enumerate(prompts):
        a, b = rng.choice(samples_per_prompt, size=2, replace=False)
        block = samples[k * samples_per_prompt : (k + 1) * samples_per_prompt]
        pairs.append(PreferencePair(prompt, block[a], block[b]))
    return pairs
