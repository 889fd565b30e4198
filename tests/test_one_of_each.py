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
