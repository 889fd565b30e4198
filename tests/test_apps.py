"""The real ServerApp and ClientApp, two rounds, on tiny models through an in-process grid (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from client.app import make_client_app
from popri.privacy import compute_epsilon
from tests.helpers import InProcessGrid, run_server, tiny_run_config

NODES = {101: {"partition-id": 0, "num-partitions": 2}, 102: {"partition-id": 1, "num-partitions": 2}}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _count_users_in_memory(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The user totals the server's re-clip worked with, one per release (they exist in memory only)."""
    import popri.release

    counted: list[int] = []
    real = popri.release.aggregate_replies

    def counting(replies, *, expected_len):
        summed, users, rejected = real(replies, expected_len=expected_len)
        counted.append(users)
        return summed, users, rejected

    monkeypatch.setattr(popri.release, "aggregate_replies", counting)
    return counted


def _score_replies_only(tamper):
    """A tamper that leaves the nodes' ``query.prepare`` replies alone (they prove the data source first)."""

    def only_scores(node_id, reply):
        return tamper(node_id, reply) if reply.metadata.message_type == "query.score" else reply

    return only_scores


def test_two_rounds_write_every_artifact_and_spend_the_accounted_epsilon(
    tiny_model_dir, user_file, tmp_path, monkeypatch
):
    # Prepare
    out = tmp_path / "run"
    cfg = tiny_run_config(tiny_model_dir, user_file, out)
    grid = InProcessGrid(make_client_app(), NODES, cfg)
    counted = _count_users_in_memory(monkeypatch)

    # Execute
    run_server(grid, cfg)

    # Assert
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["rounds_completed"] == 2
    expected = compute_epsilon(noise_multiplier=privacy["noise_multiplier"], delta=3e-6, sample_rate=1.0, rounds=2)
    assert privacy["epsilon"] == pytest.approx(expected)
    assert privacy["epsilon"] <= 7.0
    rounds = _read_jsonl(out / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["replies"] == 2 and r["pairs"] == 3 for r in rounds)
    assert counted == [9, 9]  # 12 users, 3 held out for validation: the re-clip's count, in memory only
    assert {"generate", "embed", "collect", "aggregate", "dpo"} <= set(rounds[0]["seconds"])
    assert len(_read_jsonl(out / "synthetic.jsonl")) == 4
    assert (out / "rounds.png").stat().st_size > 0
    assert json.loads((out / "config.json").read_text())["prompts"] == 3
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["round-0000", "round-0001"]


def test_adapter_trained_in_round_one_is_the_one_round_two_generates_with(tiny_model_dir, user_file, tmp_path):
    # Prepare
    import torch

    out = tmp_path / "run"
    cfg = tiny_run_config(tiny_model_dir, user_file, out, **{"learning-rate": 0.05})
    grid = InProcessGrid(make_client_app(), NODES, cfg)

    # Execute
    run_server(grid, cfg)

    # Assert: the LoRA weights moved away from the zero-initialised B matrices and were checkpointed
    state = torch.load(out / "checkpoints" / "round-0001" / "state.pt", weights_only=False)
    b_norm = sum(float(v.norm()) for k, v in state["dpo"]["adapter"].items() if "lora_B" in k)
    assert b_norm > 0
    assert state["dpo"]["steps_done"] == 4  # 2 rounds x ceil(3 pairs / batch 2)


@pytest.mark.parametrize(
    "tamper_kind",
    ["nan", "wrong_shape", "inf", "missing_key", "error", "num_users_inf", "wrong_tag"],
    ids=lambda k: f"reply_{k}_rejected",
)
def test_broken_reply_is_rejected_logged_and_the_round_goes_on(
    tiny_model_dir, user_file, tmp_path, caplog, tamper_kind
):
    # Prepare: node 102 answers with garbage every round
    from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

    def tamper(node_id, reply):
        if node_id != 102:
            return reply
        if tamper_kind == "error":
            error = Message(Error(code=2, reason="boom"), reply_to=reply)
            error.metadata._reply_to_message_id = reply.metadata.reply_to_message_id  # answer the original message
            return error
        if tamper_kind in ("num_users_inf", "wrong_tag"):
            content = reply.content
            if tamper_kind == "num_users_inf":
                content["meta"] = MetricRecord({"num-users": float("inf")})
            else:
                content["source"] = ConfigRecord({"tag": "ab" * 32})
            return reply
        vec = np.full(9, np.nan) if tamper_kind == "nan" else np.zeros(5) if tamper_kind == "wrong_shape" else None
        vec = np.full(9, np.inf) if tamper_kind == "inf" else vec
        content = {"meta": MetricRecord({"num-users": 4})}
        if vec is not None:
            content["scores"] = ArrayRecord({"scores": Array(vec)})
        reply.content = RecordDict(content)
        return reply

    out = tmp_path / "run"
    cfg = tiny_run_config(tiny_model_dir, user_file, out, rounds=1, **{"final-samples": 0, "reply-timeout": 30.0})
    grid = InProcessGrid(make_client_app(), NODES, cfg, tamper=_score_replies_only(tamper))

    # Execute
    run_server(grid, cfg)

    # Assert
    record = _read_jsonl(out / "rounds.jsonl")[0]
    assert record["replies"] == 1 and record["rejected_replies"] == 1
    assert "rejected reply from node 102" in caplog.text
    assert json.loads((out / "privacy.json").read_text())["rounds_completed"] == 1


def test_round_with_too_few_replies_is_discarded_and_not_charged(tiny_model_dir, user_file, tmp_path, caplog):
    # Prepare: one of two nodes proves its source, then never answers a round, and the round needs both
    out = tmp_path / "run"
    cfg = tiny_run_config(tiny_model_dir, user_file, out, rounds=1, **{"min-replies": 2, "reply-timeout": 1.0})
    silent_102 = _score_replies_only(lambda node_id, reply: None if node_id == 102 else reply)
    grid = InProcessGrid(make_client_app(), NODES, cfg, tamper=silent_102)

    # Execute
    run_server(grid, cfg)

    # Assert: redone max-discarded-rounds (3) times, then the run stopped cleanly with its artifacts
    record = _read_jsonl(out / "rounds.jsonl")[0]
    assert record["discarded"] is True
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["rounds_completed"] == 0 and privacy["epsilon"] == 0.0
    assert [(r["round"], r["discarded"]) for r in _read_jsonl(out / "rounds.jsonl")] == [(1, True)] * 4
    assert "discarded 4 times in a row" in privacy["stop_reason"]
    assert "stopping the run: round 1 was discarded 4 times in a row" in caplog.text


def test_a_discarded_round_is_redone_and_the_requested_private_rounds_are_kept(
    tiny_model_dir, user_file, tmp_path, caplog
):
    # Prepare: node 102 misses round 1's first attempt only; the round needs both nodes (the in-process grid
    # delivers at once, so a short reply deadline loses no reply that would come)
    out = tmp_path / "run"
    cfg = tiny_run_config(
        tiny_model_dir, user_file, out, **{"min-replies": 2, "final-samples": 0, "reply-timeout": 1.0}
    )
    missed = {"n": 0}

    def miss_once(node_id, reply):
        if node_id == 102 and missed["n"] == 0:
            missed["n"] += 1
            return None
        return reply

    grid = InProcessGrid(make_client_app(), NODES, cfg, tamper=_score_replies_only(miss_once))

    # Execute
    with caplog.at_level("INFO"):
        run_server(grid, cfg)

    # Assert: round 1 discarded, then redone; both requested private rounds ran and were charged
    rounds = _read_jsonl(out / "rounds.jsonl")
    assert [(r["round"], r.get("discarded", False)) for r in rounds] == [(1, True), (1, False), (2, False)]
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["rounds_completed"] == 2 and privacy["stop_reason"] is None
    assert "round 1/2 is redone" in caplog.text and "round 2/2: epsilon=" in caplog.text


def test_too_few_ready_nodes_is_a_clear_error_and_nothing_is_charged(tiny_model_dir, user_file, tmp_path):
    # Prepare: node 102 is down before the run, and a round needs both nodes
    from server.app import NotEnoughNodesError

    out = tmp_path / "run"
    cfg = tiny_run_config(
        tiny_model_dir, user_file, out, rounds=1, **{"min-replies": 2, "prepare-timeout": 1.0, "reply-timeout": 1.0}
    )
    grid = InProcessGrid(make_client_app(), NODES, cfg)
    grid.dead.add(102)

    # Execute / Assert
    with pytest.raises(NotEnoughNodesError, match="min-replies"):
        run_server(grid, cfg)
    assert not (out / "ledger.json").exists()
    assert grid.sent == 1  # the prepare to node 101; no round was started


def test_a_node_with_a_duplicate_data_source_is_excluded_and_counted_once(
    tiny_model_dir, user_file, tmp_path, monkeypatch, caplog
):
    # Prepare: nodes 101 and 103 hold the same partition; 102 holds the other
    out = tmp_path / "run"
    nodes = {**NODES, 103: dict(NODES[101])}
    cfg = tiny_run_config(tiny_model_dir, user_file, out, rounds=1, **{"num-nodes": 3, "final-samples": 0})
    grid = InProcessGrid(make_client_app(), nodes, cfg)
    counted = _count_users_in_memory(monkeypatch)

    # Execute
    run_server(grid, cfg)

    # Assert: the first node with the source is kept, the duplicate takes no part, the users count once
    (record,) = _read_jsonl(out / "rounds.jsonl")
    assert record["replies"] == 2 and record["rejected_replies"] == 0
    assert "node 103 excluded: it has the same data source as node 101" in caplog.text
    assert counted == [9]


def test_no_exact_user_count_reaches_an_artifact_or_a_server_log_line(tiny_model_dir, user_file, tmp_path, caplog):
    # Prepare
    import re

    out = tmp_path / "run"
    cfg = tiny_run_config(tiny_model_dir, user_file, out, **{"diagnostics": False})
    grid = InProcessGrid(make_client_app(), NODES, cfg)

    # Execute
    with caplog.at_level("DEBUG"):
        run_server(grid, cfg)

    # Assert: no JSON artifact (rounds, privacy, ledger, checkpoints' meta) has a key naming users; no server log
    # line (the nodes' own logs stay on the nodes) mentions a number of users
    def keys(obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield k
                yield from keys(v)
        elif isinstance(obj, list):
            for v in obj:
                yield from keys(v)

    docs = [json.loads(p.read_text()) for p in out.rglob("*.json") if p.name != "config.json"]  # settings only
    docs += [row for p in out.rglob("*.jsonl") for row in _read_jsonl(p)]
    assert docs and not [k for doc in docs for k in keys(doc) if "user" in str(k).lower()]
    node_side = ("client", "popri.node", "popri.embedding", "popri.scoring", "popri.data")  # logged on the node
    server_lines = [r.getMessage() for r in caplog.records if not r.name.startswith(node_side)]
    assert server_lines and not [line for line in server_lines if re.search(r"users?\W*\d|\d+\W*users?", line)]


def test_crash_mid_round_then_resume_continues_the_ledger(tiny_model_dir, user_file, tmp_path):
    # Prepare: the server dies in round 2 while collecting (node replies raise at the grid level)
    out = tmp_path / "run"
    cfg = tiny_run_config(tiny_model_dir, user_file, out, rounds=3)
    grid = InProcessGrid(make_client_app(), NODES, cfg)
    pushes = {"n": 0}
    real_push = grid.push_messages

    def dying_push(messages):
        pushes["n"] += 1
        if pushes["n"] == 3:  # push 1 is query.prepare, pushes 2 and 3 are rounds 1 and 2
            raise KeyboardInterrupt("server killed")
        return real_push(messages)

    grid.push_messages = dying_push
    with pytest.raises(KeyboardInterrupt):
        run_server(grid, cfg)
    after_crash = json.loads((out / "privacy.json").read_text())

    # Execute: resume through the same ServerApp
    grid.push_messages = real_push
    run_server(grid, {**cfg, "resume": True})

    # Assert: round 1 was kept, rounds 2-3 added; epsilon is that of 3 rounds, never recounted from fewer
    assert after_crash["rounds_completed"] == 1
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["rounds_completed"] == 3
    sigma = privacy["noise_multiplier"]
    assert privacy["epsilon"] == pytest.approx(
        compute_epsilon(noise_multiplier=sigma, delta=3e-6, sample_rate=1.0, rounds=3)
    )
    assert [r["round"] for r in _read_jsonl(out / "rounds.jsonl")] == [1, 2, 3]


def test_new_run_refuses_to_overwrite_an_existing_one(tiny_model_dir, user_file, tmp_path):
    # Prepare
    out = tmp_path / "run"
    cfg = tiny_run_config(tiny_model_dir, user_file, out, rounds=1, **{"final-samples": 0})
    run_server(InProcessGrid(make_client_app(), NODES, cfg), cfg)

    # Execute / Assert
    with pytest.raises(FileExistsError, match="--resume"):
        run_server(InProcessGrid(make_client_app(), NODES, cfg), cfg)


def test_resume_with_a_changed_privacy_setting_is_refused(tiny_model_dir, user_file, tmp_path):
    # Prepare
    from popri.config import ConfigError

    out = tmp_path / "run"
    cfg = tiny_run_config(tiny_model_dir, user_file, out, rounds=1, **{"final-samples": 0})
    run_server(InProcessGrid(make_client_app(), NODES, cfg), cfg)

    # Execute / Assert
    changed = {**cfg, "delta": 1e-5, "resume": True}
    with pytest.raises(ConfigError, match="'delta'"):
        run_server(InProcessGrid(make_client_app(), NODES, changed), changed)


def test_control_run_uses_no_private_data_and_spends_no_epsilon(tiny_model_dir, user_file, tmp_path):
    # Prepare: every node would fail if asked
    out = tmp_path / "run"
    cfg = tiny_run_config(tiny_model_dir, user_file, out, rounds=1, control=True, **{"final-samples": 0})
    grid = InProcessGrid(make_client_app(), NODES, cfg, tamper=lambda nid, reply: pytest.fail("node queried"))

    # Execute
    run_server(grid, cfg)

    # Assert
    assert grid.sent == 0
    assert json.loads((out / "privacy.json").read_text())["epsilon"] == 0.0


def test_round_released_after_the_last_checkpoint_stays_charged_on_resume(
    tiny_model_dir, user_file, tmp_path, monkeypatch, caplog
):
    # Prepare: the server dies in round 2 *after* the noisy sum was released (during DPO)
    from popri.dpo import LoraDPO

    out = tmp_path / "run"
    cfg = tiny_run_config(tiny_model_dir, user_file, out, rounds=3, **{"final-samples": 0})
    real_train = LoraDPO.train_round
    calls = {"n": 0}

    def dying_train(self, pairs, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("server killed during DPO")
        return real_train(self, pairs, **kwargs)

    monkeypatch.setattr(LoraDPO, "train_round", dying_train)
    with pytest.raises(KeyboardInterrupt):
        run_server(InProcessGrid(make_client_app(), NODES, cfg), cfg)
    monkeypatch.setattr(LoraDPO, "train_round", real_train)

    # Execute
    run_server(InProcessGrid(make_client_app(), NODES, cfg), {**cfg, "resume": True})

    # Assert: 3 releases were charged (round 2 twice), so the budget for 3 rounds ends the run after round 2's redo
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["rounds_completed"] == 3
    assert privacy["epsilon"] <= 7.0
    assert [r["round"] for r in _read_jsonl(out / "rounds.jsonl")] == [1, 2]
    assert "stay charged" in caplog.text and "budget exhausted" in caplog.text
