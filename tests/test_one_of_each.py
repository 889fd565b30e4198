"""One definition each, used by every caller: upload/download byte counts, token truncation, the cache folder, the
LoRA config, the in-process launcher."""

from __future__ import annotations

import numpy as np


def test_benchmark_bytes_per_round_are_the_bytes_of_the_messages_the_apps_send() -> None:
    # Prepare
    from benchmark.popri_method import client_bytes_per_round
    from server.messages import content_bytes, query_content, score_reply_content

    prompts, samples_per_prompt, dim = 3, 5, 16
    n = prompts * samples_per_prompt
    query = query_content(np.ones((n, dim)), round_index=7, sample_rate=0.5, source_salt="ab" * 16)
    reply = score_reply_content(np.ones(n), num_users=12, tag="cd" * 32)

    # Execute
    down, up = client_bytes_per_round(prompts=prompts, samples_per_prompt=samples_per_prompt, embedding_dim=dim)

    # Assert
    assert (down, up) == (content_bytes(query), content_bytes(reply))
    assert down >= n * dim * 4 and up >= n * 8


def test_private_texts_and_synthetic_samples_are_cut_by_the_same_rule() -> None:
    # Prepare: a cut inside 'é' (two bytes) decodes to a replacement character that re-encodes longer than the budget
    from benchmark.datasets import truncate_users
    from popri.data import UserData
    from popri.generation import truncate_tokens
    from tests.tiny_models import byte_tokenizer

    tokenizer = byte_tokenizer()
    texts = ["héllo wörld", "short", "x" * 40, "  spaced out words  "]
    budget = 2
    private = UserData(users=["a", "b"], texts=texts, owner=np.array([0, 0, 1, 1], dtype=np.int64))

    # Execute
    private_cut = truncate_users(private, tokenizer, budget).texts
    synthetic_cut = truncate_tokens(texts, tokenizer, budget)

    # Assert
    assert private_cut == synthetic_cut
    assert private_cut[0] == "h"  # shrunk to a cut that round-trips, not 'h' plus a broken byte
    assert all(len(tokenizer(t, add_special_tokens=False)["input_ids"]) <= budget for t in private_cut)
