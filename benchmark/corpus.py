"""Synthetic corpora from the generator: the public (ε = 0) corpus, and the sampling PE and POPri share.

Every corpus is written the way POPri writes its final corpus: prompts of the paper's template, each filled with 3
random examples, one completion per prompt, cleaned and cut to the token budget (:mod:`popri.generation`). The public
corpus uses the *untuned* generator and the *public* initial set (answers of the generator to a public instruction),
so it carries no private signal: the model trained on it is the ε = 0 reference.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark.config import CorpusConfig
from popri.checkpoint import atomic_write_text

logger = logging.getLogger(__name__)


@dataclass
class Generator:
    """The generator LLM and what it needs to write samples (held for the whole benchmark, loaded once)."""

    model: Any
    tokenizer: Any
    config: CorpusConfig
    token_budget: int
    instruction: str
    cache_dir: Path | None = None


def initial_set(gen: Generator, *, seed: int, progress: bool = False) -> list[str]:
    """The public initial set (cached by popri under ``cache_dir``; POPri's own run derives the same one)."""
    from popri.generation import make_initial_set

    return make_initial_set(
        gen.model,
        gen.tokenizer,
        instruction=gen.instruction,
        size=gen.config.initial_set_size,
        max_new_tokens=gen.config.max_new_tokens,
        token_budget=gen.token_budget,
        seed=seed,
        cache_dir=gen.cache_dir,
        model_id=gen.config.generator,
        progress=progress,
    )


def generate_from_examples(
    gen: Generator,
    examples: list[str],
    *,
    count: int,
    rng: np.random.Generator,
    generator: torch.Generator,
    progress: bool = False,
    desc: str = "generate",
    max_tries: int = 3,
    samples_per_prompt: int = 1,
) -> list[str]:
    """``count`` non-empty samples, completions of prompts filled with 3 random ``examples`` each,
    ``samples_per_prompt`` completions per prompt.

    An empty completion (the model wrote only a header) is replaced by a fresh one, up to ``max_tries`` passes.
    """
    from popri.generation import build_prompts, prompts_for, sample_completions

    samples: list[str] = []
    for _ in range(max_tries):
        want = count - len(samples)
        if want <= 0:
            break
        prompts = build_prompts(examples, num_prompts=prompts_for(want, samples_per_prompt=samples_per_prompt), rng=rng)
        batch = sample_completions(
            gen.model,
            gen.tokenizer,
            prompts,
            samples_per_prompt=samples_per_prompt,
            max_new_tokens=gen.config.max_new_tokens,
            token_budget=gen.token_budget,
            temperature=gen.config.temperature,
            top_p=gen.config.top_p,
            batch_size=gen.config.generation_batch_size,
            generator=generator,
            progress=progress,
            desc=desc,
        )
        samples += [s for s in batch[:want] if s.strip()]
    if len(samples) < count:
        logger.warning("%s: only %d of %d samples are non-empty", desc, len(samples), count)
    return samples[:count]


def generate_corpus_resumable(
    gen: Generator,
    examples: list[str],
    *,
    count: int,
    seed: int,
    path: Path,
    chunk: int = 64,
    progress: bool = False,
    desc: str = "corpus",
) -> list[str]:
    """``count`` samples written to ``path`` chunk by chunk, so an interrupted run continues where it stopped.

    Chunk i uses its own seeds (``[seed, i]``), so the corpus is the same whether or not the run was interrupted.
    The partial file is ``path`` + ``.partial``; it becomes ``path`` when complete. The seconds spent, over all
    invocations, are kept beside it (:func:`read_seconds`).
    """
    partial = path.with_name(path.name + ".partial")
    done = read_corpus(partial) if partial.exists() else []
    done = done[: (len(done) // chunk) * chunk]  # a half-written chunk is redone
    earlier, start = read_seconds(partial), time.time()
    while len(done) < count:
        i = len(done) // chunk
        want = min(chunk, count - len(done))
        batch = generate_from_examples(
            gen,
            examples,
            count=want,
            rng=np.random.default_rng([seed, i]),
            generator=torch.Generator().manual_seed(int(np.random.SeedSequence([seed, i]).generate_state(1)[0])),
            progress=progress,
            desc=f"{desc} {len(done)}/{count}",
            samples_per_prompt=gen.config.samples_per_prompt,
        )
        if len(batch) < want:  # chunk i's seeds would give the same short chunk again: stop, do not loop
            raise RuntimeError(
                f"{desc}: chunk {i} has {len(batch)} of {want} non-empty samples after retries; the generator "
                "writes empty completions (check corpus.generator and corpus.instruction)"
            )
        done += batch
        write_corpus(done, partial)
        write_seconds(partial, earlier + time.time() - start)
    write_corpus(done, path)
    write_seconds(path, earlier + time.time() - start)
    partial.unlink(missing_ok=True)
    partial.with_name(partial.name + ".seconds.json").unlink(missing_ok=True)
    return done


def write_seconds(artifact: Path, seconds: float) -> None:
    """Remember how long an artifact took, so a resumed run still reports honest wall seconds."""
    atomic_write_text(artifact.with_name(artifact.name + ".seconds.json"), json.dumps({"seconds": seconds}) + "\n")


def read_seconds(artifact: Path) -> float:
    path = artifact.with_name(artifact.name + ".seconds.json")
    return float(json.loads(path.read_text())["seconds"]) if path.exists() else 0.0


def write_corpus(texts: list[str], path: Path) -> Path:
    atomic_write_text(path, "".join(json.dumps({"text": text}) + "\n" for text in texts))  # ASCII-escaped, as before
    return path


def read_corpus(path: Path) -> list[str]:
    """Texts of a ``{"text": ...}`` JSONL file (POPri's ``synthetic.jsonl`` and the benchmark's own corpora)."""
    texts = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.strip():
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f'{path}:{lineno}: expected {{"text": "..."}}')
                texts.append(record["text"])
    return texts
