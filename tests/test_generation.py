"""Generation: the prompt template, cutting and truncation, the sampler, and batched KV-cache sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from popri.generation import (
    _sample_next,
    build_prompt,
    build_prompts,
    clean_completion,
    make_initial_set,
    next_sample_header,
    sample_completions,
    truncate_tokens,
)
from tests.tiny_models import byte_tokenizer, tiny_causal_lm


def test_prompt_follows_the_paper_template():
    assert build_prompt(["a", "b\nc", "d"]) == (
        "List of 6 diverse original text samples:\nOriginal Text Sample 1\na\nOriginal Text Sample 2\nb c\n"
        "Original Text Sample 3\nd\nOriginal Text Sample 4\n"
    )


def test_prompts_draw_three_distinct_initial_samples_reproducibly():
    initial = [f"sample {i}" for i in range(10)]
    a = build_prompts(initial, num_prompts=5, rng=np.random.default_rng(0))
    b = build_prompts(initial, num_prompts=5, rng=np.random.default_rng(0))
    assert a == b
    for prompt in a:
        used = [line for line in prompt.splitlines() if line.startswith("sample ")]
        assert len(set(used)) == 3


def test_completion_is_cut_at_the_next_header_and_flattened():
    assert clean_completion("Thou art\nmine own.\nOriginal Text Sample 5\nmore") == "Thou art mine own."
    assert clean_completion("  ok <|im_end|> junk") == "ok"


def test_next_sample_header_is_where_the_sampler_cuts_a_completion():
    # Prepare
    prompt = build_prompt(["a", "b", "c"])

    # Execute
    header = next_sample_header(prompt)

    # Assert: the header after sample 4 is sample 5's, and a completion that writes it is cut right there
    assert header == "Original Text Sample 5"
    assert clean_completion("Thou art mine own.\n" + header + "\nmore") == "Thou art mine own."


def test_next_sample_header_refuses_a_prompt_without_an_open_header():
    with pytest.raises(ValueError, match="open 'Original Text Sample N' header"):
        next_sample_header("Prompt: say something\n")


def test_truncation_respects_the_token_budget():
    tok = byte_tokenizer()
    out = truncate_tokens(["abcdefghij", "abc"], tok, 4)
    assert out == ["abcd", "abc"]


def test_sampler_draws_from_the_softmax_distribution():
    # Prepare
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(40_000, 1)

    # Execute
    draws = _sample_next(logits, temperature=1.0, top_p=1.0, generator=torch.Generator().manual_seed(0))

    # Assert: within 4 standard errors of the true probabilities
    freq = torch.bincount(draws, minlength=3).double() / len(draws)
    se = torch.sqrt(torch.tensor([0.5 * 0.5, 0.3 * 0.7, 0.2 * 0.8]) / len(draws))
    assert torch.all((freq - torch.tensor([0.5, 0.3, 0.2])).abs() < 4 * se)


def test_top_p_never_samples_outside_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).repeat(5000, 1)
    draws = _sample_next(logits, temperature=1.0, top_p=0.7, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) <= {0, 1}


def test_batched_sampling_returns_j_per_prompt_and_is_seed_reproducible():
    # Prepare
    tok = byte_tokenizer()
    model = tiny_causal_lm(tok)
    prompts = ["short prompt\n", "a much longer prompt that needs left padding\n", "third\n"]

    def run(seed: int) -> list[str]:
        return sample_completions(
            model,
            tok,
            prompts,
            samples_per_prompt=3,
            max_new_tokens=10,
            token_budget=8,
            batch_size=2,
            generator=torch.Generator().manual_seed(seed),
        )

    # Execute
    a, b, c = run(0), run(0), run(1)

    # Assert
    assert len(a) == 9
    assert a == b
    assert a != c
    assert all(len(tok(s, add_special_tokens=False)["input_ids"]) <= 8 for s in a)


def test_shared_prefill_cache_gives_the_same_logits_as_a_full_forward():
    # Prepare: a greedy continuation (temperature -> 0) through the expanded cache vs. plain forwards
    tok = byte_tokenizer()
    model = tiny_causal_lm(tok, seed=2)
    prompts = ["ab\n", "a longer one\n"]

    # Execute
    sampled = sample_completions(
        model,
        tok,
        prompts,
        samples_per_prompt=2,
        max_new_tokens=6,
        token_budget=64,
        temperature=1e-4,
        generator=torch.Generator().manual_seed(0),
    )
    expected = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            for _ in range(6):
                nxt = model(input_ids=ids).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        text = tok.decode(ids[0, -6:], skip_special_tokens=True)
        expected += [clean_completion(text)] * 2

    # Assert: left padding + positions + the J-fold cache expansion change nothing
    assert sampled == expected


def test_length_sorted_batches_return_each_prompts_samples_in_its_place():
    # Prepare: prompts out of length order across several batches; greedy decoding, so each sample is a known string
    tok = byte_tokenizer()
    model = tiny_causal_lm(tok, seed=3)
    prompts = ["a rather long prompt, the longest\n", "x\n", "medium length\n", "yz\n", "another long one here\n"]

    def greedy(prompt: str) -> str:
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            for _ in range(5):
                ids = torch.cat([ids, model(input_ids=ids).logits[0, -1].argmax().view(1, 1)], dim=1)
        return clean_completion(tok.decode(ids[0, -5:], skip_special_tokens=True))

    # Execute
    sampled = sample_completions(
        model,
        tok,
        prompts,
        samples_per_prompt=2,
        max_new_tokens=5,
        token_budget=64,
        temperature=1e-4,
        batch_size=2,
        generator=torch.Generator().manual_seed(0),
    )

    # Assert: prompt k's J samples sit at k·J .. k·J+J−1, whatever batch its length put it in
    assert sampled == [greedy(p) for p in prompts for _ in range(2)]


def test_initial_set_is_cached_and_reused(tmp_path):
    tok = byte_tokenizer()
    model = tiny_causal_lm(tok)
    kwargs = dict(instruction="Write a line.", size=4, max_new_tokens=12, token_budget=16, seed=0, cache_dir=tmp_path)
    first = make_initial_set(model, tok, **kwargs)
    second = make_initial_set(None, None, **kwargs)  # served from the cache: no model needed
    assert first == second and len(first) == 4


@pytest.mark.slow
def test_packaged_smollm2_writes_readable_completions(tmp_path):
    # The real embedded default: converted from the packaged GGUF once, cached afterwards.
    from popri.assets import load_generator

    model, tok = load_generator()
    prompt = build_prompt(["To be, or not to be.", "All the world's a stage.", "Now is the winter of our discontent."])
    out = sample_completions(
        model,
        tok,
        [prompt],
        samples_per_prompt=2,
        max_new_tokens=16,
        token_budget=64,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(out) == 2 and all(isinstance(s, str) for s in out)
    assert sum(ch.isalpha() for ch in "".join(out)) > 10
