"""One definition each, used by every caller: upload/download byte counts, token truncation, the cache folder, the
LoRA config, the in-process launcher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


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


def test_every_cache_default_is_the_one_default_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    from benchmark.config import BenchConfig
    from popri.config import RunConfig, default_cache_dir

    monkeypatch.setenv("POPRI_CACHE", str(tmp_path / "env-cache"))

    # Execute
    defaults = {default_cache_dir(), RunConfig().resolved_cache_dir(), BenchConfig().resolved_cache_dir()}
    configured = {
        default_cache_dir(str(tmp_path / "mine")),
        RunConfig(cache_dir=str(tmp_path / "mine")).resolved_cache_dir(),
        BenchConfig(cache_dir=str(tmp_path / "mine")).resolved_cache_dir(),
    }

    # Assert: the environment names the default, a configured folder wins over it
    assert defaults == {tmp_path / "env-cache"}
    assert configured == {tmp_path / "mine"}


def test_the_default_cache_dir_without_the_environment_is_under_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    from popri.config import default_cache_dir

    monkeypatch.delenv("POPRI_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))

    # Execute
    default, tilde = default_cache_dir(), default_cache_dir("~/elsewhere")

    # Assert
    assert default == tmp_path / ".cache" / "popri"
    assert tilde == tmp_path / "elsewhere"


def test_the_policy_the_trl_peer_and_the_lora_downstream_share_one_lora_config() -> None:
    # Prepare
    import copy

    from benchmark.config import DownstreamConfig
    from benchmark.downstream import with_lora
    from benchmark.perf.peers import popri_lora_config
    from popri.config import TrainConfig
    from popri.dpo import LoraDPO
    from tests.tiny_models import byte_tokenizer, tiny_causal_lm

    tokenizer = byte_tokenizer()
    base = tiny_causal_lm(tokenizer)
    policy = LoraDPO(copy.deepcopy(base), tokenizer, config=TrainConfig(lora_r=8, lora_alpha=4))
    downstream = with_lora(copy.deepcopy(base), DownstreamConfig(lora_r=8, lora_alpha=4, dropout=0.0), seed=0)

    # Execute
    configs = [
        policy.policy.peft_config["default"],
        popri_lora_config(policy),
        downstream.peft_config["default"],
    ]

    # Assert: the same rank, scale, dropout, bias and task; the policy and the downstream adapt the same modules
    fields = [(c.r, c.lora_alpha, c.lora_dropout, c.bias, str(c.task_type)) for c in configs]
    assert fields == [(8, 4, 0.0, "none", "CAUSAL_LM")] * 3
    assert popri_lora_config(policy).target_modules == "all-linear"
    adapted = [set(c.target_modules) for c in (configs[0], configs[2])]
    assert adapted[0] == adapted[1] and adapted[0]


def test_run_in_process_runs_the_apps_on_simulated_nodes_and_raises_the_server_error(
    tiny_model_dir: Path, user_file: Path, tmp_path: Path
) -> None:
    # Prepare
    from client.app import make_client_app
    from server.grid import run_in_process, simulated_node_configs
    from tests.helpers import tiny_run_config

    out = tmp_path / "run"
    cfg = tiny_run_config(tiny_model_dir, user_file, out, rounds=1, **{"final-samples": 0})
    nodes = simulated_node_configs(2)

    # Execute
    grid = run_in_process(make_client_app(), nodes, cfg)

    # Assert: both nodes were asked (prepare, then score), the run finished, and a second run into the same folder
    # raises the ServerApp's own error here
    assert nodes == {100: {"partition-id": 0, "num-partitions": 2}, 101: {"partition-id": 1, "num-partitions": 2}}
    assert set(grid.contexts) == set(nodes) and grid.sent >= 2 * len(nodes)
    assert (out / "privacy.json").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        run_in_process(make_client_app(), nodes, cfg)
