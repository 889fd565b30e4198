"""The server's reading of node replies: every reply is type-checked, error text is never copied, sizes are counted."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from popri.sources import SourceRegistry
from server import messages
from server.grid import set_task_identity

TAG = "ab" * 32
OTHER_TAG = "cd" * 32
N = 6


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    set_task_identity()  # Messages can only be built inside a Flower task


def _query(node_id: int = 7) -> Message:
    content = messages.query_content(np.zeros((N, 4)), round_index=0, sample_rate=1.0, source_salt="00")
    return Message(content, dst_node_id=node_id, message_type=messages.SCORE, group_id="0")


def _reply(content: RecordDict) -> Message:
    return Message(content, reply_to=_query())


def _registry() -> SourceRegistry:
    registry = SourceRegistry()
    registry.register(7, TAG)
    return registry


def _good() -> RecordDict:
    return messages.score_reply_content(np.linspace(-0.1, 0.1, N), num_users=3, tag=TAG)


def _with(**records: Any) -> RecordDict:
    content = _good()
    for key, record in records.items():
        if record is None:
            del content[key]
        else:
            content[key] = record
    return content


def test_a_well_formed_reply_is_accepted_with_its_vector_and_count() -> None:
    # Execute
    reply = messages.parse_score_reply(7, _reply(_good()), expected_len=N, sources=_registry())

    # Assert
    assert reply.error is None and reply.num_users == 3
    np.testing.assert_allclose(reply.node_sum, np.linspace(-0.1, 0.1, N))


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (_with(meta=MetricRecord({"num-users": float("inf")})), "non-finite"),
        (_with(meta=MetricRecord({"num-users": -2})), "negative"),
        (_with(meta=MetricRecord({"num-users": 2.0})), "float"),
        (_with(meta=MetricRecord({})), "no 'num-users'"),
        (_with(meta=ConfigRecord({"num-users": 2})), "not a MetricRecord"),
        (_with(meta=None), "not a MetricRecord"),
        (_with(scores=MetricRecord({"scores": 1.0})), "not an ArrayRecord"),
        (_with(scores=None), "not an ArrayRecord"),
        (_with(scores=ArrayRecord({"scores": Array(np.zeros(N + 1))})), "shape"),
        (_with(scores=ArrayRecord({"scores": Array(np.zeros((N, 2)))})), "shape"),
        (_with(scores=ArrayRecord({"scores": Array(np.full(N, np.nan))})), "not finite"),
        (_with(scores=ArrayRecord({"scores": Array(np.full(N, -np.inf))})), "not finite"),
        (_with(scores=ArrayRecord({"scores": Array(np.arange(N))})), "not finite floats"),
        (_with(source=None), "differs"),
        (_with(source=ConfigRecord({"tag": OTHER_TAG})), "differs"),
        (_with(source=ConfigRecord({"tag": 5})), "differs"),
    ],
    ids=[
        "num_users_inf",
        "num_users_negative",
        "num_users_float",
        "num_users_missing",
        "meta_wrong_record_type",
        "meta_missing",
        "scores_wrong_record_type",
        "scores_missing",
        "scores_too_long",
        "scores_2d",
        "scores_nan",
        "scores_inf",
        "scores_int",
        "source_missing",
        "source_other_tag",
        "source_tag_not_str",
    ],
)
def test_an_unexpected_reply_is_rejected_with_the_servers_own_reason(content: RecordDict, why: str) -> None:
    # Execute
    reply = messages.parse_score_reply(7, _reply(content), expected_len=N, sources=_registry())

    # Assert
    assert reply.node_sum is None and why in (reply.error or "")


def test_a_reply_from_a_node_that_proved_no_source_is_rejected() -> None:
    # Execute
    reply = messages.parse_score_reply(8, _reply(_good()), expected_len=N, sources=_registry())

    # Assert
    assert reply.node_sum is None and "proved no data source" in (reply.error or "")


def test_an_error_reply_keeps_a_known_reason_and_never_copies_free_text() -> None:
    # Prepare
    known = Message(Error(code=2, reason="popri/policy-refused"), reply_to=_query())
    free = Message(Error(code=2, reason="user alice has 17 texts"), reply_to=_query())

    # Execute
    known_reply = messages.parse_score_reply(7, known, expected_len=N, sources=_registry())
    free_reply = messages.parse_score_reply(7, free, expected_len=N, sources=_registry())

    # Assert
    assert known_reply.error == "error code 2 (popri/policy-refused)"
    assert free_reply.error == "error code 2 (unrecognised error)"
    assert "alice" not in free_reply.error and "17" not in free_reply.error


def test_a_prepare_reply_needs_a_hex_tag() -> None:
    # Prepare
    good = _reply(RecordDict({"source": ConfigRecord({"tag": TAG})}))
    bad = _reply(RecordDict({"source": ConfigRecord({"tag": "not hex!"})}))
    wrong_type = _reply(RecordDict({"source": MetricRecord({"tag": 1})}))

    # Execute / Assert
    assert messages.parse_prepare_reply(good) == (TAG, None)
    assert messages.parse_prepare_reply(bad)[0] is None
    assert messages.parse_prepare_reply(wrong_type)[0] is None


def test_a_duplicate_source_is_excluded_and_the_first_node_kept() -> None:
    # Prepare
    registry = SourceRegistry()

    # Execute
    first, duplicate, other, malformed = (
        registry.register(3, TAG),
        registry.register(1, TAG),
        registry.register(2, OTHER_TAG),
        registry.register(4, "xyz"),
    )

    # Assert
    assert (first, duplicate, other, malformed) == (True, False, True, False)
    assert registry.ready == [2, 3]
    assert "same data source as node 3" in registry.excluded[1]
    assert registry.check_reply(1, TAG) is not None  # the excluded node's replies are rejected


def test_message_sizes_are_the_records_payload_bytes() -> None:
    # Prepare: K·J = 128 samples of 384-d float32 down, 128 float64 scores up
    num_samples = 128

    # Execute
    down = messages.query_bytes(num_samples=num_samples)
    up = messages.score_reply_bytes(num_samples=num_samples)

    # Assert: the arrays dominate; the small records add a few bytes each
    assert num_samples * 384 * 4 <= down < num_samples * 384 * 4 + 1024
    assert num_samples * 8 <= up < num_samples * 8 + 1024
    assert messages.score_reply_bytes(num_samples=2 * num_samples) - up == num_samples * 8
