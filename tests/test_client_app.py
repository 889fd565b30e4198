"""The ClientApp as a server meets it: prepare, central scoring, refusals, and error replies with fixed codes only."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

import popri.embedding as embedding
import popri.node as node_module
from client.app import make_client_app
from popri.node import NodeErrorCode, source_descriptor, source_tag
from server.messages import parse_prepare_reply, parse_score_reply
from tests.helpers import InProcessGrid

DIM = 16
SALT = "run-salt"
SIMULATED = {101: {"partition-id": 0, "num-partitions": 2}}


class CountingEmbedder:
    """A deterministic unit-vector embedder (hash of the text) that counts its calls: fast and offline."""

    def __init__(self) -> None:
        self.calls = 0

    def get_sentence_embedding_dimension(self) -> int:
        return DIM

    def encode(self, texts: list[str], **_: Any) -> np.ndarray:
        self.calls += 1
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            rows.append(np.random.default_rng(seed).normal(size=DIM))
        x = np.array(rows)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def embedder(monkeypatch: pytest.MonkeyPatch) -> CountingEmbedder:
    fake = CountingEmbedder()
    monkeypatch.setattr(embedding, "load_embedder", lambda *a, **k: fake)
    return fake


def _run_config(user_file: Path, tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    return {
        "data": str(user_file),
        "min-text-chars": 5,
        "validation-fraction": 0.25,
        "noise-multiplier": 1.0,
        "cache-dir": str(tmp_path / "cache"),
        "num-nodes": 2,
        **overrides,
    }


def _samples(n: int = 6, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _score_message(node: int = 101, **config: Any) -> Message:
    round_config = {"round": 0, "sample-rate": 1.0, "source-salt": SALT, **config}
    content = RecordDict(
        {
            "embeddings": ArrayRecord({"embeddings": Array(_samples())}),
            "config": ConfigRecord({k: v for k, v in round_config.items() if v is not None}),
        }
    )
    return Message(content, dst_node_id=node, message_type="query.score", group_id="0")


def _prepare_message(node: int = 101, salt: str = SALT) -> Message:
    content = RecordDict({"config": ConfigRecord({"source-salt": salt})})
    return Message(content, dst_node_id=node, message_type="query.prepare", group_id="prepare")


def _ask(grid: InProcessGrid, message: Message) -> Message:
    (reply,) = grid.send_and_receive([message])
    return reply


def _grid(run_config: dict[str, Any], node_configs: dict[int, dict[str, Any]] | None = None) -> InProcessGrid:
    return InProcessGrid(make_client_app(), node_configs or SIMULATED, run_config)


# ---------------------------------------------------------------------------------------------------------------------
# Central scoring and prepare
# ---------------------------------------------------------------------------------------------------------------------


def test_score_reply_carries_the_clipped_sum_the_user_count_and_the_source_tag(embedder, user_file, tmp_path):
    # Prepare
    cfg = _run_config(user_file, tmp_path)
    grid = _grid(cfg)

    # Execute
    reply = _ask(grid, _score_message())

    # Assert
    assert not reply.has_error()
    scores = reply.content["scores"]["scores"].numpy()
    num_users = int(reply.content["meta"]["num-users"])
    assert scores.shape == (6,) and scores.dtype == np.float64
    assert 0 < num_users and np.linalg.norm(scores) <= num_users + 1e-9
    descriptor = source_descriptor(node_config=SIMULATED[101], data_setting=str(user_file))
    assert reply.content["source"]["tag"] == source_tag(salt=SALT, descriptor=descriptor)
    parsed = parse_score_reply(101, reply, expected_len=6, sources=None)  # the server reads it by the same contract
    assert parsed.error is None and parsed.num_users == num_users


def test_prepare_replies_only_the_source_tag(embedder, user_file, tmp_path):
    # Prepare
    grid = _grid(_run_config(user_file, tmp_path))

    # Execute
    reply = _ask(grid, _prepare_message())

    # Assert: one config record with one key; no array, no metric, nothing counted
    assert not reply.has_error()
    assert set(reply.content.keys()) == {"source"}
    assert set(reply.content["source"].keys()) == {"tag"}
    assert not reply.content.array_records and not reply.content.metric_records
    descriptor = source_descriptor(node_config=SIMULATED[101], data_setting=str(user_file))
    assert reply.content["source"]["tag"] == source_tag(salt=SALT, descriptor=descriptor)
    assert parse_prepare_reply(reply) == (reply.content["source"]["tag"], None)


def test_prepare_embeds_the_private_texts_so_a_round_does_not(embedder, user_file, tmp_path, monkeypatch):
    # Prepare: prepare once, then forget the in-process copy (a deployed node runs each message in a new process)
    grid = _grid(_run_config(user_file, tmp_path))
    assert not _ask(grid, _prepare_message()).has_error()
    calls_after_prepare = embedder.calls
    monkeypatch.setattr(node_module, "_PREPARED", {})

    # Execute
    reply = _ask(grid, _score_message())

    # Assert: the round read the disk cache and embedded nothing
    assert calls_after_prepare >= 1
    assert not reply.has_error() and embedder.calls == calls_after_prepare


def test_score_on_an_unprepared_node_prepares_first(embedder, user_file, tmp_path):
    # Prepare
    grid = _grid(_run_config(user_file, tmp_path))

    # Execute
    reply = _ask(grid, _score_message())

    # Assert
    assert not reply.has_error() and embedder.calls >= 1


def test_two_partitions_of_one_run_get_different_source_tags(embedder, user_file, tmp_path):
    # Prepare
    nodes = {101: {"partition-id": 0, "num-partitions": 2}, 102: {"partition-id": 1, "num-partitions": 2}}
    grid = _grid(_run_config(user_file, tmp_path), nodes)

    # Execute
    replies = [_ask(grid, _prepare_message(node)) for node in nodes]

    # Assert
    assert len({r.content["source"]["tag"] for r in replies}) == 2


# ---------------------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------------------


def test_node_with_no_data_source_refuses_to_score(embedder, user_file, tmp_path):
    # Prepare: a real SuperNode started without --node-config (no data-path, no partition)
    grid = _grid(_run_config(user_file, tmp_path), {101: {}})

    # Execute
    reply = _ask(grid, _score_message())

    # Assert: never "partition 0 of 1" of the default data set
    assert reply.has_error()
    assert (reply.error.code, reply.error.reason) == (int(NodeErrorCode.DATA_UNAVAILABLE), "popri/data-unavailable")
    assert embedder.calls == 0


@pytest.mark.parametrize("content", ['{"user": "a", "text": "fine line"}\n{"user": "b", "te', b"\xff\xfe not utf-8\n"])
def test_unreadable_device_data_gives_a_fixed_reason_and_keeps_the_details_local(
    embedder, user_file, tmp_path, caplog, content
):
    # Prepare: the device's own file, named so that a leak of its path would show
    path = tmp_path / "alice-private-diary.jsonl"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    grid = _grid(_run_config(user_file, tmp_path), {101: {"data-path": str(path)}})

    # Execute
    with caplog.at_level(logging.WARNING):
        reply = _ask(grid, _score_message())

    # Assert
    assert reply.has_error() and reply.error.reason == "popri/data-unavailable"
    assert "alice" not in reply.error.reason
    assert "alice-private-diary.jsonl" in caplog.text  # the operator can still find out what is wrong


def test_unexpected_failure_is_an_internal_error_without_its_text(embedder, user_file, tmp_path, monkeypatch):
    # Prepare: a library failure whose message holds device details
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("cannot open /home/alice/secret")

    monkeypatch.setattr(node_module, "clipped_scores_sum", broken)
    grid = _grid(_run_config(user_file, tmp_path))

    # Execute
    reply = _ask(grid, _score_message())

    # Assert
    assert reply.has_error()
    assert (reply.error.code, reply.error.reason) == (int(NodeErrorCode.INTERNAL_ERROR), "popri/internal-error")


def test_central_score_in_a_secagg_run_is_refused_and_no_sum_leaves(embedder, user_file, tmp_path):
    # Prepare: a secure-aggregation run whose server (wrongly) asks for the plain sum
    cfg = _run_config(user_file, tmp_path, **{"privacy-mode": "secagg", "min-replies": 2})
    grid = _grid(cfg)

    # Execute
    reply = _ask(grid, _score_message())

    # Assert
    assert reply.has_error() and reply.error.reason == "popri/policy-refused"
    assert embedder.calls == 0


def test_round_asking_for_another_sample_rate_than_the_run_s_is_refused(embedder, user_file, tmp_path):
    # Prepare: the run samples every user (q = 1); the round claims q = 0.5
    grid = _grid(_run_config(user_file, tmp_path))

    # Execute
    reply = _ask(grid, _score_message(**{"sample-rate": 0.5}))

    # Assert
    assert reply.has_error() and reply.error.reason == "popri/invalid-request"


@pytest.mark.parametrize(
    "config",
    [{"source-salt": None}, {"round": "first"}, {"round": -1}],
)
def test_malformed_score_request_is_an_invalid_request(embedder, user_file, tmp_path, config):
    # Prepare
    grid = _grid(_run_config(user_file, tmp_path))

    # Execute
    reply = _ask(grid, _score_message(**config))

    # Assert
    assert reply.has_error() and reply.error.reason == "popri/invalid-request"


def test_non_finite_sample_embeddings_are_an_invalid_request(embedder, user_file, tmp_path):
    # Prepare
    grid = _grid(_run_config(user_file, tmp_path))
    message = _score_message()
    bad = _samples()
    bad[2, 3] = np.nan
    message.content["embeddings"] = ArrayRecord({"embeddings": Array(bad)})

    # Execute
    reply = _ask(grid, message)

    # Assert
    assert reply.has_error() and reply.error.reason == "popri/invalid-request"


@pytest.mark.parametrize(
    "policy",
    [{"min-noise-multiplier": 5.0}, {"max-epsilon": 0.5}, {"privacy-modes": "secagg"}],
)
def test_node_policy_refuses_a_weaker_run_before_touching_its_data(embedder, user_file, tmp_path, policy):
    # Prepare: the run has sigma 1 over 6 rounds at q = 1 (epsilon well above 0.5)
    grid = _grid(_run_config(user_file, tmp_path), {101: {**SIMULATED[101], **policy}})

    # Execute
    replies = [_ask(grid, _prepare_message()), _ask(grid, _score_message())]

    # Assert
    assert [r.error.reason for r in replies if r.has_error()] == ["popri/policy-refused"] * 2
    assert embedder.calls == 0


def test_node_policy_admits_a_run_that_meets_it(embedder, user_file, tmp_path):
    # Prepare
    policy = {"min-noise-multiplier": 1.0, "max-epsilon": 1e4, "privacy-modes": "central"}
    grid = _grid(_run_config(user_file, tmp_path), {101: {**SIMULATED[101], **policy}})

    # Execute
    reply = _ask(grid, _score_message())

    # Assert
    assert not reply.has_error()


def test_unreadable_policy_value_fails_closed_and_names_the_key_in_the_local_log(embedder, user_file, tmp_path, caplog):
    # Prepare
    grid = _grid(_run_config(user_file, tmp_path), {101: {**SIMULATED[101], "max-epsilon": "small"}})

    # Execute
    with caplog.at_level(logging.WARNING):
        reply = _ask(grid, _score_message())

    # Assert
    assert reply.has_error() and reply.error.reason == "popri/policy-refused"
    assert "'max-epsilon'" in caplog.text


def test_prepare_in_a_secagg_run_with_a_noise_seed_is_refused_before_any_round(embedder, user_file, tmp_path):
    # Prepare
    cfg = _run_config(user_file, tmp_path, **{"privacy-mode": "secagg", "min-replies": 2, "noise-seed": 3})
    grid = _grid(cfg)

    # Execute
    reply = _ask(grid, _prepare_message())

    # Assert
    assert reply.has_error() and reply.error.reason == "popri/policy-refused"
    assert embedder.calls == 0


@pytest.mark.parametrize("node_config", [{"partition-id": "first", "num-partitions": 2}, {"partition-id": 0}])
def test_unreadable_data_source_key_is_data_unavailable(embedder, user_file, tmp_path, caplog, node_config):
    # Prepare
    grid = _grid(_run_config(user_file, tmp_path), {101: node_config})

    # Execute
    with caplog.at_level(logging.WARNING):
        reply = _ask(grid, _score_message())

    # Assert: a fixed reason for the server, the key for the node's operator
    assert reply.has_error() and reply.error.reason == "popri/data-unavailable"
    assert "node-config key" in caplog.text
