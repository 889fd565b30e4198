"""Secure-aggregation mode: the real ClientApp under Flower's SecAgg+ mod and the real SecAgg+ workflow, in-process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.app import make_client_app
from server.app import query_nodes
from server.secagg import secure_sum
from tests.helpers import InProcessGrid, run_server, tiny_run_config

NODES = {
    101: {"partition-id": 0, "num-partitions": 3},
    102: {"partition-id": 1, "num-partitions": 3},
    103: {"partition-id": 2, "num-partitions": 3},
}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _server_context(cfg: dict[str, Any]) -> Any:
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(cfg))


SECAGG = {"privacy-mode": "secagg", "min-replies": 2, "noise-multiplier": 1e-4, "secagg-clipping-range": 16.0}


def _secure_sum(grid: InProcessGrid, cfg: dict[str, Any], embeddings: np.ndarray, **overrides: Any) -> Any:
    """One SecAgg+ round over every node, as the ServerApp runs it (min-replies 2, range ±16)."""
    kwargs: dict[str, Any] = {
        "embeddings": embeddings,
        "round_index": 0,
        "sample_rate": 1.0,
        "min_replies": 2,
        "clipping_range": 16.0,
        "timeout": 30.0,
        "charge": lambda: None,
        **overrides,
    }
    return secure_sum(grid, _server_context(cfg), sorted(NODES), **kwargs)


def _unit_rows(n: int, dim: int = 384, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _plain_node_sums(cfg: dict[str, Any], embeddings: np.ndarray) -> dict[int, np.ndarray]:
    """Each node's clipped sum as central mode would send it (q = 1, so user sampling is deterministic)."""
    grid = InProcessGrid(make_client_app(), NODES, {**cfg, "privacy-mode": "central"})
    replies = query_nodes(grid, sorted(NODES), embeddings, 0, 1.0, timeout=30)
    return {r.node_id: np.asarray(r.node_sum) for r in replies}


def _arrays_in(message: Any) -> list[np.ndarray]:
    """Every array a reply carries: its ArrayRecords and any bytes-encoded arrays in its ConfigRecords."""
    from flwr.common import bytes_to_ndarray

    found = [arr.numpy() for rec in message.content.array_records.values() for arr in rec.values()]
    for record in message.content.config_records.values():
        for value in record.values():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, bytes):
                    try:
                        found.append(np.asarray(bytes_to_ndarray(item), dtype=np.float64).ravel())
                    except Exception:  # keys and shares are not arrays
                        pass
    return found


def test_secure_sum_is_the_nodes_total_and_no_reply_shows_a_node_vector(tiny_model_dir, user_file, tmp_path):
    # Prepare: a tiny noise share so that the sum can be checked against the plaintext node sums
    cfg = tiny_run_config(tiny_model_dir, user_file, tmp_path / "run", **SECAGG)
    embeddings = _unit_rows(200)
    plain = _plain_node_sums(cfg, embeddings)
    seen: list[Any] = []
    grid = InProcessGrid(make_client_app(), NODES, cfg, tamper=lambda nid, reply: seen.append(reply) or reply)
    charged: list[int] = []

    # Execute
    result = _secure_sum(grid, cfg, embeddings, charge=lambda: charged.append(1))

    # Assert: the sum of all three, charged once; quantisation step 2·16/2²² and the noise are far below 1e-3
    total = sum(plain.values())
    assert result.replies == 3 and charged == [1]
    assert result.dp_sum is not None
    np.testing.assert_allclose(result.dp_sum, total, atol=1e-3)
    assert min(np.abs(result.dp_sum - v).max() for v in plain.values()) > 0.1  # a sum, not one node's vector
    # Nothing the server received is (or correlates with) a node's own vector
    arrays = [a for reply in seen for a in _arrays_in(reply) if a.size == embeddings.shape[0]]
    assert arrays, "the masked vectors should have been seen"
    for arr in arrays:
        for vector in plain.values():
            assert not np.allclose(arr, vector, atol=1e-2)
            assert abs(np.corrcoef(arr, vector)[0, 1]) < 0.35


def test_node_dropping_out_before_its_masked_vector_is_left_out_of_the_sum(tiny_model_dir, user_file, tmp_path):
    # Prepare: node 103 dies in the masked-vector stage; two of three are enough (min-replies = 2)
    def drop_masked_vector(node_id: int, reply: Any) -> Any:
        configs = reply.content.config_records.get("secaggplus_configs")
        return None if node_id == 103 and configs is not None and "masked_params" in configs else reply

    cfg = tiny_run_config(tiny_model_dir, user_file, tmp_path / "run", **SECAGG)
    embeddings = _unit_rows(50)
    plain = _plain_node_sums(cfg, embeddings)
    grid = InProcessGrid(make_client_app(), NODES, cfg, tamper=drop_masked_vector)

    # Execute
    result = _secure_sum(grid, cfg, embeddings)

    # Assert
    assert result.replies == 2 and result.dp_sum is not None
    np.testing.assert_allclose(result.dp_sum, plain[101] + plain[102], atol=1e-3)


def test_secagg_run_charges_every_round_and_never_learns_user_counts(tiny_model_dir, user_file, tmp_path):
    # Prepare
    out = tmp_path / "run"
    cfg = tiny_run_config(
        tiny_model_dir, user_file, out, **{"privacy-mode": "secagg", "min-replies": 2, "num-nodes": 3}
    )
    grid = InProcessGrid(make_client_app(), NODES, cfg)

    # Execute
    run_server(grid, cfg)

    # Assert
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["rounds_completed"] == 2 and privacy["privacy_mode"] == "secagg" and privacy["epsilon"] <= 7.0
    rounds = _read_jsonl(out / "rounds.jsonl")
    assert all(r["replies"] == 3 and r["pairs"] == 3 and "users_sampled" not in r for r in rounds)
    samples = _read_jsonl(out / "checkpoints" / "round-0001" / "samples.jsonl")
    assert all(np.isfinite(s["dp_score"]) for s in samples)


def test_secagg_round_with_too_few_nodes_is_discarded_and_not_charged(tiny_model_dir, user_file, tmp_path):
    # Prepare: three nodes, the round needs all three, one is gone
    out = tmp_path / "run"
    cfg = tiny_run_config(
        tiny_model_dir,
        user_file,
        out,
        rounds=1,
        **{"privacy-mode": "secagg", "min-replies": 3, "num-nodes": 3, "reply-timeout": 5.0},
    )
    grid = InProcessGrid(make_client_app(), NODES, cfg)
    real_push = grid.push_messages

    def gone_after_prepare(messages):  # node 103 proves its source, then goes away before round 1
        ids = real_push(messages)
        grid.dead.add(103)
        return ids

    grid.push_messages = gone_after_prepare

    # Execute
    run_server(grid, cfg)

    # Assert
    assert _read_jsonl(out / "rounds.jsonl")[0]["discarded"] is True
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["rounds_completed"] == 0 and privacy["epsilon"] == 0.0


def test_node_refuses_a_secure_round_in_a_central_run(tiny_model_dir, user_file, tmp_path):
    # Prepare: a central-mode run whose server (wrongly) starts SecAgg+
    cfg = tiny_run_config(tiny_model_dir, user_file, tmp_path / "run", **{"min-replies": 2})
    grid = InProcessGrid(make_client_app(), NODES, cfg)

    # Execute
    result = _secure_sum(grid, cfg, _unit_rows(9), timeout=5.0, charge=lambda: pytest.fail("nothing may be unmasked"))

    # Assert
    assert result.dp_sum is None


def test_node_whose_noisy_score_exceeds_the_range_drops_out_without_revealing_it(tiny_model_dir, user_file, tmp_path):
    # Prepare: a range no noisy score fits in
    cfg = tiny_run_config(tiny_model_dir, user_file, tmp_path / "run", **{**SECAGG, "secagg-clipping-range": 1e-6})
    seen: list[Any] = []
    grid = InProcessGrid(make_client_app(), NODES, cfg, tamper=lambda nid, reply: seen.append(reply) or reply)

    # Execute
    result = _secure_sum(grid, cfg, _unit_rows(9), charge=lambda: pytest.fail("nothing may be unmasked"))

    # Assert: every node dropped out; the error replies say why but carry no value
    errors = [reply.error.reason for reply in seen if reply.has_error()]
    assert result.dp_sum is None
    expected = "ValueError: a noisy score exceeds secagg-clipping-range; this node drops out of the round"
    assert errors == [expected] * 3
