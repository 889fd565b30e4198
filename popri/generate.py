"""``popri generate``: more synthetic text from the tuned generator of a finished run.

The same prompt template and public initial set, sampling settings, stop rule, clean-up and token budget as the
run's final corpus (:mod:`popri.generation`). It reads only the run folder — never private data — and charges
nothing: sampling a DP-trained generator is post-processing. The run's privacy card is copied next to the output.

Resumable and deterministic: batch b (``batch_size`` samples, ``samples_per_prompt`` of them per prompt, the run's
final-corpus setting unless given) draws its prompts and tokens from generators seeded with (seed, b) alone, so the
file holds the same lines whether it was written in one go or over several interrupted calls. A call appends the
missing lines to FILE; ``FILE.meta.json`` records the run, seed, batch size and samples per prompt, and a call with
other values is refused rather than mixing two streams in one file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from popri.export import RunFolderError, check_generator

logger = logging.getLogger(__name__)

INITIAL_SET = "initial_set.json"


def meta_path(output: Path) -> Path:
    return output.with_name(output.name + ".meta.json")


def card_path(output: Path) -> Path:
    return output.with_name(output.name + ".card.md")


def batch_seeds(seed: int, batch: int) -> tuple[np.random.Generator, int]:
    """(prompt rng, torch seed) of batch ``batch``: a function of (seed, batch) only, so resuming is exact."""
    sequence = np.random.SeedSequence([seed, batch])
    prompt_state, torch_state = sequence.spawn(2)
    return np.random.default_rng(prompt_state), int(torch_state.generate_state(1, dtype=np.uint64)[0] >> 1)


def count_complete_lines(path: Path) -> int:
    """Lines of ``path`` that end in a newline and parse as JSON; a torn last line (a crash mid-write) is cut off."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        logger.warning("%s ends in a partial line (an interrupted write): dropping it", path)
        with path.open("r+b") as fh:
            fh.truncate(keep)
    lines = data[:keep].splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise RunFolderError(f"{path}: line {number} is not JSON; it is not a popri generate file") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise RunFolderError(f"{path}: line {number} lacks a 'text' string; it is not a popri generate file")
    return len(lines)


def load_initial_set(run_dir: Path, config: Any, base_model: Any, tokenizer: Any) -> list[str]:
    """The run's public initial set: saved in the run folder, else re-made from the base model (same cache key)."""
    from popri.generation import make_initial_set

    path = run_dir / INITIAL_SET
    if path.exists():
        try:
            initial = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise RunFolderError(f"{path}: corrupt, not valid JSON (line {err.lineno})") from None
        if not isinstance(initial, list) or len(initial) < 3 or not all(isinstance(t, str) for t in initial):
            raise RunFolderError(f"{path}: corrupt, expected a list of at least 3 texts")
        return initial
    g = config.generation
    logger.info("%s missing: re-making the public initial set from the base model", path)
    return make_initial_set(
        base_model,
        tokenizer,
        instruction=g.initial_instruction,
        size=g.initial_set_size,
        max_new_tokens=g.max_new_tokens,
        token_budget=g.token_budget,
        seed=config.seed,
        cache_dir=config.resolved_cache_dir(),
        model_id=g.model,
    )


def _load_run_config(run_dir: Path) -> Any:
    from popri.config import ConfigError, load_config

    path = run_dir / "config.json"
    if not path.is_file():
        raise RunFolderError(f"{path}: missing; give the --output folder of a finished popri run")
    try:
        return load_config(path)
    except ConfigError as err:
        raise RunFolderError(f"{path}: {err}") from None


def generate_more(
    run_dir: Path,
    *,
    samples: int,
    output: Path,
    seed: int = 0,
    batch_size: int | None = None,
    samples_per_prompt: int | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> int:
    """Make ``output`` hold ``samples`` JSONL rows ``{"text": ...}`` from the run's generator; returns lines added."""
    import torch
    from tqdm.auto import tqdm

    from popri.card import PrivacyCard, write_card
    from popri.checkpoint import atomic_write_json
    from popri.export import base_model_dir
    from popri.generation import build_prompts, prompts_for, sample_completions

    run_dir, output = Path(run_dir), Path(output)
    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    config = _load_run_config(run_dir)
    manifest = check_generator(run_dir)
    card = PrivacyCard.from_run_dir(run_dir)  # refuses a run without a privacy summary
    g = config.generation
    batch = g.generation_batch_size if batch_size is None else batch_size
    if batch < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch}")
    per = config.final_samples_per_prompt if samples_per_prompt is None else samples_per_prompt
    if per < 1:
        raise ValueError(f"--samples-per-prompt must be >= 1, got {per}")
    settings = {"run": str(run_dir.resolve()), "seed": seed, "batch_size": batch, "samples_per_prompt": per}
    if output.exists() and meta_path(output).exists():
        before = {"samples_per_prompt": 1, **json.loads(meta_path(output).read_text())}  # older files: one each
        changed = [k for k in settings if before.get(k) != settings[k]]
        if changed:
            raise ValueError(
                f"{output} was written with {changed[0]}={before.get(changed[0])!r}, not {settings[changed[0]]!r}; "
                "resume with the same settings or pick a new --output"
            )
    elif output.exists() and output.stat().st_size > 0:
        raise FileExistsError(f"{output} exists but was not written by popri generate; pick a new --output")
    done = count_complete_lines(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(meta_path(output), settings)
    write_card(
        card_path(output),
        card,
        title="POPri synthetic corpus (popri generate)",
        description=f'`{output.name}`: JSONL rows `{{"text": ...}}` sampled after the run from its tuned generator '
        f"(seed {seed}). Post-processing of the DP release: no further privacy cost.",
    )
    if done >= samples:
        logger.info("%s already holds %d samples (>= %d): nothing to do", output, done, samples)
        return 0

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from popri.assets import best_device, load_tokenizer

    base_dir = base_model_dir(manifest, cache_dir=cache_dir or config.resolved_cache_dir())
    tokenizer = load_tokenizer(str(base_dir))
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(best_device())
    base.eval()
    base.generation_config.pad_token_id = tokenizer.pad_token_id
    initial_set = load_initial_set(run_dir, config, base, tokenizer)
    # As the run samples: the adapter merged in, bf16 weights.
    sampler = PeftModel.from_pretrained(base, str(run_dir / "generator")).merge_and_unload().to(torch.bfloat16)
    sampler.eval()

    added = 0
    first_batch = done // batch
    with (
        output.open("a", encoding="utf-8") as fh,
        tqdm(total=samples, initial=done, desc="generate", unit="sample", disable=not progress) as bar,
    ):
        for b in range(first_batch, (samples + batch - 1) // batch):
            prompt_rng, torch_seed = batch_seeds(seed, b)
            prompts = build_prompts(initial_set, num_prompts=prompts_for(batch, samples_per_prompt=per), rng=prompt_rng)
            texts = sample_completions(
                sampler,
                tokenizer,
                prompts,
                samples_per_prompt=per,
                max_new_tokens=g.max_new_tokens,
                token_budget=g.token_budget,
                temperature=g.temperature,
                top_p=g.top_p,
                batch_size=len(prompts),
                generator=torch.Generator().manual_seed(torch_seed),
            )[:batch]
            start = max(done - b * batch, 0)  # lines of this batch already in the file
            rows = texts[start : samples - b * batch]
            fh.write("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in rows))
            fh.flush()
            os.fsync(fh.fileno())
            added += len(rows)
            bar.update(len(rows))
    return added


def _cmd_generate(args: argparse.Namespace) -> int:
    from popri.logs import route_transformers_logging

    route_transformers_logging()
    try:
        added = generate_more(
            Path(args.run),
            samples=args.samples,
            output=Path(args.output),
            seed=args.seed,
            batch_size=args.batch_size,
            samples_per_prompt=args.samples_per_prompt,
            cache_dir=Path(args.cache_dir) if args.cache_dir else None,
            progress=not args.no_progress,
        )
    except (RunFolderError, FileExistsError, ValueError) as err:
        logger.error("popri generate: %s", err)
        return 2
    logger.info("%d sample(s) added to %s (privacy card: %s)", added, args.output, card_path(Path(args.output)))
    return 0


def add_subparser(subparsers: Any) -> None:
    """``popri generate --run DIR --samples N --output FILE``."""
    p = subparsers.add_parser(
        "generate",
        help="sample more synthetic text from a finished run's generator (no privacy cost)",
        description="Append samples from the tuned generator of --run to --output (JSONL) until it holds --samples "
        "lines, with the run's prompts, sampling settings and clean-up. Resumable: rerun the same command to "
        "continue. Reads no private data and spends no privacy budget; the run's privacy card is written to "
        "FILE.card.md.",
    )
    p.add_argument("--run", required=True, help="the --output folder of a finished popri run")
    p.add_argument("--samples", type=int, required=True, help="how many samples FILE should hold")
    p.add_argument("--output", required=True, help="JSONL file to append to")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0); the same seed gives the same file")
    p.add_argument("--batch-size", type=int, help="samples decoded together (default: the run's batch size)")
    p.add_argument(
        "--samples-per-prompt",
        type=int,
        help="completions per prompt, sharing its prefill (default: the run's final-samples-per-prompt)",
    )
    p.add_argument("--cache-dir", help="where the packaged base model is converted (default: the run's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_generate)
