"""Server-side generation of candidate samples (step 1) and of the public initial set.

Prompts follow the paper's template: three random samples of a public initial set, then the header of the fourth,
which the model completes. Each prompt is prefilled once and its KV cache expanded for its J samples (prefill
dominates on CPU: prompts are ~180 tokens, completions ~48). Completions are cut at the model's next sample header and
truncated to a token budget.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from popri.assets import autocast_dtype
from popri.checkpoint import atomic_write_json

logger = logging.getLogger(__name__)

HEADER = "List of 6 diverse original text samples:"
SAMPLE_HEADER = "Original Text Sample"
_CUT = re.compile(r"Original Text Sample|List of \d+ diverse|<\|im_(?:start|end)\|>")
_OPEN_HEADER = re.compile(rf"{SAMPLE_HEADER} (\d+)\n?\Z")


def build_prompt(examples: list[str]) -> str:
    """The paper's template with ``len(examples)`` filled samples and the open header of the next one."""
    lines = [HEADER]
    for i, example in enumerate(examples, start=1):
        lines += [f"{SAMPLE_HEADER} {i}", " ".join(example.split())]
    lines.append(f"{SAMPLE_HEADER} {len(examples) + 1}")
    return "\n".join(lines) + "\n"


def next_sample_header(prompt: str) -> str:
    """The header the model writes once it has completed ``prompt``'s open sample: "Original Text Sample 5" after a
    prompt that ends with "Original Text Sample 4". The sampler stops there (:func:`clean_completion`)."""
    match = _OPEN_HEADER.search(prompt)
    if match is None:
        raise ValueError(f"the prompt does not end with an open '{SAMPLE_HEADER} N' header: ...{prompt[-60:]!r}")
    return f"{SAMPLE_HEADER} {int(match.group(1)) + 1}"


def build_prompts(initial_set: list[str], *, num_prompts: int, rng: np.random.Generator) -> list[str]:
    """K prompts, each filled with 3 distinct random samples of the public initial set."""
    if len(initial_set) < 3:
        raise ValueError(f"the initial set needs at least 3 samples, has {len(initial_set)}")
    return [
        build_prompt([initial_set[i] for i in rng.choice(len(initial_set), size=3, replace=False)])
        for _ in range(num_prompts)
    ]


def prompts_for(count: int, *, samples_per_prompt: int) -> int:
    """Prompts that give at least ``count`` samples at ``samples_per_prompt`` each; callers drop the last prompt's
    surplus. Several samples per prompt share one prefill of the prompt, the longer part of a short sample's cost."""
    if count < 0 or samples_per_prompt < 1:
        raise ValueError(f"need count >= 0 and samples_per_prompt >= 1, got {count} and {samples_per_prompt}")
    return -(-count // samples_per_prompt)


def clean_completion(text: str) -> str:
    """Keep the text before the model's next header (it continues the numbered list ~40 % of the time)."""
    return " ".join(_CUT.split(text, maxsplit=1)[0].split())


def truncate_tokens(texts: list[str], tokenizer: Any, budget: int) -> list[str]:
    """Cut each text to at most ``budget`` tokens of the generator's tokenizer: the one truncation rule.

    It serves synthetic samples and private texts alike (the benchmark's ``truncate_users``), so a private text and a
    sample of the same content are cut the same way. A text within the budget is returned unchanged; a longer one is
    decoded from its first tokens and stripped. Decoding a cut that splits a multi-byte character can re-encode to
    more tokens, so the cut shrinks until the text round-trips within the budget.
    """
    out = []
    for text, ids in zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"], strict=True):
        if len(ids) > budget:
            for keep in range(budget, -1, -1):
                text = tokenizer.decode(ids[:keep]).strip()
                if len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= budget:
                    break
        out.append(text)
    return out


def _sample_next(logits: torch.Tensor, *, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row from softmax(logits / T), restricted to the nucleus of mass ``top_p``.

    Exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) picks i with probability p_i (the same draw as
    ``torch.multinomial``, which measured ~40x slower on a 49k vocabulary).
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True, dim=-1)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set with mass >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(dim=-1)


def _autocast(device: torch.device, enabled: bool | None) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision on CUDA by default; on CPU bf16 autocast measured 3x slower than fp32 here, so off."""
    if not (device.type == "cuda" if enabled is None else enabled):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=autocast_dtype(device))


def _last_logits(model: Any) -> dict[str, int]:
    """``logits_to_keep=1`` where the model takes it: the prefill then skips the output layer on every prompt position
    but the last (a 576 x 49,152 matmul per token for SmolLM2; measured ~15 % of a 32-prompt prefill on CPU)."""
    forward = getattr(model, "forward", None)
    try:
        takes = forward is not None and "logits_to_keep" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        takes = False
    return {"logits_to_keep": 1} if takes else {}


@torch.no_grad()
def _sample_batch(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    generator: torch.Generator,
    autocast: bool | None,
) -> list[str]:
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with _autocast(device, autocast):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **_last_logits(model))
    cache = out.past_key_values
    cache.batch_repeat_interleave(samples_per_prompt)  # prefill once, decode J samples from the same cache
    logits = out.logits[:, -1].repeat_interleave(samples_per_prompt, dim=0)
    mask = mask.repeat_interleave(samples_per_prompt, dim=0)
    position = positions[:, -1].repeat_interleave(samples_per_prompt, dim=0)
    n = logits.shape[0]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    tokens: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        nxt = _sample_next(logits, temperature=temperature, top_p=top_p, generator=generator).to(device)
        nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        tokens.append(nxt)
        finished |= nxt == eos
        if step % 8 == 7:  # stop rows that already wrote the next header: they will be cut there anyway
            texts = tokenizer.batch_decode(torch.stack(tokens, 1), skip_special_tokens=True)
            finished |= torch.tensor([bool(_CUT.search(t)) for t in texts], device=device)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(n, 1, dtype=mask.dtype, device=device)], dim=1)
        position = position + 1
        with _autocast(device, autocast):
            out = model(
                input_ids=nxt[:, None],
                attention_mask=mask,
                position_ids=position[:, None],
                cache=cache,
                use_cache=True,
            )
        logits = out.logits[:, -1]
    return tokenizer.batch_decode(torch.stack(tokens, 1), skip_special_tokens=True)


def sample_completions(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    samples_per_prompt: int,
    max_new_tokens: int,
    token_budget: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    generator: torch.Generator,
    autocast: bool | None = None,
    progress: bool = False,
    desc: str = "generate",
) -> list[str]:
    """K·J cleaned completions, the J samples of prompt k at positions k·J .. k·J+J−1.

    Prompts are decoded in batches of similar token length (a left-padded batch computes every row at the length of
    its longest prompt); the samples come back in the prompts' order.
    """
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]] if prompts else []
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])  # stable: equal lengths keep their order
    by_length = [prompts[i] for i in order]
    samples_sorted: list[str] = []
    batches = range(0, len(prompts), batch_size)
    # Progress in samples; a single batch gets no bar (it would jump from 0 to done in one step).
    bar = tqdm(
        total=len(prompts) * samples_per_prompt,
        desc=desc,
        disable=not progress or len(batches) <= 1,
        unit="sample",
        leave=False,
    )
    for start in batches:
        raw = _sample_batch(
            model,
            tokenizer,
            by_length[start : start + batch_size],
            samples_per_prompt=samples_per_prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            generator=generator,
            autocast=autocast,
        )
        samples_sorted += [clean_completion(t) for t in raw]
        bar.update(len(raw))
    bar.close()
    samples = [""] * len(samples_sorted)
    for rank, i in enumerate(order):  # prompt i's J samples were decoded at sorted position ``rank``
        samples[i * samples_per_prompt : (i + 1) * samples_per_prompt] = samples_sorted[
            rank * samples_per_prompt : (rank + 1) * samples_per_prompt
        ]
    return truncate_tokens(samples, tokenizer, token_budget)


def _chat_prompt(tokenizer: Any, instruction: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
            )
        )
    return instruction + "\n"


def make_initial_set(
    model: Any,
    tokenizer: Any,
    *,
    instruction: str,
    size: int,
    max_new_tokens: int,
    token_budget: int,
    seed: int,
    cache_dir: Path | None = None,
    model_id: str = "",
    progress: bool = False,
) -> list[str]:
    """The public initial set: ``size`` answers of the base generator to a public instruction (no private data).

    Cached under ``cache_dir`` keyed by everything that determines it, so every round and every resumed run uses
    the same set.
    """
    key = hashlib.sha256(json.dumps([model_id, instruction, size, max_new_tokens, token_budget, seed]).encode())
    path = cache_dir / "initial-sets" / f"{key.hexdigest()[:16]}.json" if cache_dir else None
    if path and path.exists():
        return list(json.loads(path.read_text()))
    generator = torch.Generator().manual_seed(seed)
    prompt = _chat_prompt(tokenizer, instruction)
    initial: list[str] = []
    for _ in range(20):  # short or empty answers are dropped; ask again until the set is full
        want = size - len(initial)
        batch = sample_completions(
            model,
            tokenizer,
            [prompt],
            samples_per_prompt=max(2 * want, 2),
            max_new_tokens=max_new_tokens,
            token_budget=token_budget,
            generator=generator,
            progress=progress,
            desc="initial set",
        )
        initial += [t.strip("\"' ") for t in batch if len(t.strip("\"' ")) >= 8][:want]
        if len(initial) >= size:
            break
    if len(initial) < 3:
        raise RuntimeError(f"the generator wrote only {len(initial)} usable initial samples; check the model")
    if path:
        atomic_write_json(path, initial)
    return initial


def iter_chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
