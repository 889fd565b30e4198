"""Secure-aggregation mode: the real ClientApp under Flower's SecAgg+ mod and the real SecAgg+ workflow, in-process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.app import make_client_app
from popri.node import NodeErrorCode, secagg_box_bound
from popri.privacy import noise_share_std
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


# No noise-seed: a secure run refuses one (the server would know every noise share).
SECAGG = {
    "privacy-mode": "secagg",
    "min-replies": 2,
    "noise-multiplier": 1e-4,
    "secagg-clipping-range": 16.0,
    "noise-seed": None,
}


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
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

    grid = InProcessGrid(make_client_app(), NODES, {**cfg, "privacy-mode": "central"})
    content = RecordDict(
        {
            "embeddings": ArrayRecord({"embeddings": Array(embeddings.astype(np.float32))}),
            "config": ConfigRecord({"round": 0, "sample-rate": 1.0, "source-salt": "test-salt"}),
        }
    )
    messages = [Message(content, dst_node_id=n, message_type="query.score", group_id="0") for n in sorted(NODES)]
    replies = list(grid.send_and_receive(messages))
    assert not any(r.has_error() for r in replies)
    return {r.metadata.src_node_id: np.asarray(r.content["scores"]["scores"].numpy()) for r in replies}


def _error_reasons(seen: list[Any]) -> list[str]:
    return [reply.error.reason for reply in seen if reply.has_error()]


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
        tiny_model_dir,
        user_file,
        out,
        **{"privacy-mode": "secagg", "min-replies": 2, "num-nodes": 3, "noise-seed": None},
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
        **{"privacy-mode": "secagg", "min-replies": 3, "num-nodes": 3, "reply-timeout": 5.0, "noise-seed": None},
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


def test_range_too_small_for_the_noise_is_refused_with_a_fixed_code_and_no_value(tiny_model_dir, user_file, tmp_path):
    # Prepare: a range no noise share fits in (a property of the settings, never of the data)
    cfg = tiny_run_config(tiny_model_dir, user_file, tmp_path / "run", **{**SECAGG, "secagg-clipping-range": 1e-6})
    seen: list[Any] = []
    grid = InProcessGrid(make_client_app(), NODES, cfg, tamper=lambda nid, reply: seen.append(reply) or reply)

    # Execute
    result = _secure_sum(grid, cfg, _unit_rows(9), clipping_range=1e-6, charge=lambda: pytest.fail("nothing unmasked"))

    # Assert: every node refused; the error replies carry a fixed code and no value
    assert result.dp_sum is None
    assert _error_reasons(seen) == [NodeErrorCode.INVALID_REQUEST.reason] * 3


def test_node_whose_sum_is_huge_still_replies_with_its_sum_projected_into_the_range(
    tiny_model_dir, user_file, tmp_path
):
    # Prepare: a range far below the node sums (each node holds 3 users: entries up to ~3), so the old node dropped out
    clipping_range = 0.25
    cfg = tiny_run_config(
        tiny_model_dir, user_file, tmp_path / "run", **{**SECAGG, "secagg-clipping-range": clipping_range}
    )
    embeddings = _unit_rows(40)
    plain = _plain_node_sums(cfg, embeddings)
    std = noise_share_std(noise_multiplier=SECAGG["noise-multiplier"], min_replies=2)
    bound = secagg_box_bound(clipping_range=clipping_range, noise_std=std, dimension=40)
    grid = InProcessGrid(make_client_app(), NODES, cfg)

    # Execute
    result = _secure_sum(grid, cfg, embeddings, clipping_range=clipping_range)

    # Assert: all three in the sum, each node's vector clamped to the box [-B, B]
    assert max(np.abs(v).max() for v in plain.values()) > clipping_range
    assert result.replies == 3 and result.dp_sum is not None
    expected = sum(np.clip(v, -bound, bound) for v in plain.values())
    np.testing.assert_allclose(result.dp_sum, expected, atol=1e-3)


def test_secure_round_in_a_run_with_a_noise_seed_is_refused(tiny_model_dir, user_file, tmp_path):
    # Prepare: a known seed would let the server subtract every node's noise share
    cfg = tiny_run_config(tiny_model_dir, user_file, tmp_path / "run", **{**SECAGG, "noise-seed": 7})
    seen: list[Any] = []
    grid = InProcessGrid(make_client_app(), NODES, cfg, tamper=lambda nid, reply: seen.append(reply) or reply)

    # Execute
    result = _secure_sum(grid, cfg, _unit_rows(9), charge=lambda: pytest.fail("nothing may be unmasked"))

    # Assert
    assert result.dp_sum is None
    assert _error_reasons(seen) == [NodeErrorCode.POLICY_REFUSED.reason] * 3


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"min_replies": 2}, NodeErrorCode.POLICY_REFUSED.reason),  # threshold 2 < the run's min-replies 3
        ({"min_replies": 3, "clipping_range": 8.0}, NodeErrorCode.INVALID_REQUEST.reason),  # range below the run's
    ],
)
def test_secure_round_set_up_weaker_than_the_run_is_refused(tiny_model_dir, user_file, tmp_path, overrides, reason):
    # Prepare: the run needs 3 replies and a range of 16; the server sets SecAgg+ up otherwise
    cfg = tiny_run_config(tiny_model_dir, user_file, tmp_path / "run", **{**SECAGG, "min-replies": 3, "num-nodes": 3})
    seen: list[Any] = []
    grid = InProcessGrid(make_client_app(), NODES, cfg, tamper=lambda nid, reply: seen.append(reply) or reply)

    # Execute
    result = _secure_sum(grid, cfg, _unit_rows(9), charge=lambda: pytest.fail("nothing unmasked"), **overrides)

    # Assert
    assert result.dp_sum is None
    assert _error_reasons(seen) == [reason] * 3
