"""The server's messages to the nodes and its reading of their replies (the message contract), and their sizes.

- ``query.prepare`` (once before the first round of a run or a resume; no privacy cost): content
  ``{"config": ConfigRecord({"source-salt": str})}``; reply ``{"source": ConfigRecord({"tag": hex str})}``.
- ``query.score`` (central mode, every round): content ``{"embeddings": ArrayRecord({"embeddings": (N, d)
  float32})}, "config": ConfigRecord({"round", "sample-rate", "source-salt"})}``; reply ``{"scores":
  ArrayRecord({"scores": (N,) float}), "meta": MetricRecord({"num-users": int}), "source": ConfigRecord({"tag"})}``.

Nothing a node writes as free text reaches an artifact or a log: an error reply is logged by its code and, when it
is one of :data:`ERROR_REASONS`, by that reason; any other reason reads "unrecognised error". A reply that is not
exactly what the contract says is rejected with the server's own description of the failed check.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from popri.node import NODE_ERROR_REASONS
from popri.release import NodeReply
from popri.sources import SourceRegistry, is_valid_tag

PREPARE = "query.prepare"
SCORE = "query.score"
EMBEDDING_DIM = 384  # all-MiniLM-L6-v2
# The error reasons a node may send (popri's node side); anything else is logged as "unrecognised error".
ERROR_REASONS = frozenset(NODE_ERROR_REASONS.values())  # the node's fixed codes (popri.node.NodeErrorCode)


def describe_error(message: Message) -> str:
    """An error reply in the server's words: its code and a known reason, never the node's free text."""
    error = message.error
    reason = error.reason if error.reason in ERROR_REASONS else "unrecognised error"
    code = error.code if isinstance(error.code, int) and not isinstance(error.code, bool) else "?"
    return f"error code {code} ({reason})"


def prepare_content(*, source_salt: str) -> RecordDict:
    return RecordDict({"config": ConfigRecord({"source-salt": source_salt})})


def parse_prepare_reply(message: Message) -> tuple[str | None, str | None]:
    """(tag, None) for a well-formed ``query.prepare`` reply, else (None, why it is rejected)."""
    if message.has_error():
        return None, describe_error(message)
    try:
        record = message.content.config_records.get("source")
        tag = record.get("tag") if isinstance(record, ConfigRecord) else None
    except Exception as err:  # a broken reply must never stop the server
        return None, f"malformed prepare reply ({type(err).__name__})"
    if not is_valid_tag(tag):
        return None, "the prepare reply has no hex source tag under 'source'/'tag'"
    return str(tag), None


def query_content(embeddings: np.ndarray, *, round_index: int, sample_rate: float, source_salt: str) -> RecordDict:
    """The ``query.score`` content: the round's sample embeddings (float32, never the texts or the model)."""
    return RecordDict(
        {
            "embeddings": ArrayRecord({"embeddings": Array(np.asarray(embeddings, dtype=np.float32))}),
            "config": ConfigRecord(
                {"round": int(round_index), "sample-rate": float(sample_rate), "source-salt": source_salt}
            ),
        }
    )


def score_reply_content(node_sum: np.ndarray, *, num_users: int, tag: str) -> RecordDict:
    """A ``query.score`` reply as the contract spells it (the node side may build its reply with this)."""
    return RecordDict(
        {
            "scores": ArrayRecord({"scores": Array(np.asarray(node_sum, dtype=np.float64))}),
            "meta": MetricRecord({"num-users": int(num_users)}),
            "source": ConfigRecord({"tag": tag}),
        }
    )


def content_bytes(content: RecordDict) -> int:
    """Payload bytes of a message's content (the records' own count, no transport framing)."""
    return int(sum(record.count_bytes() for record in content.values()))


def query_bytes(*, num_samples: int, dim: int = EMBEDDING_DIM, source_salt: str = "0" * 32) -> int:
    """Download bytes per node per round: one ``query.score`` for ``num_samples`` = K·J sample embeddings."""
    return content_bytes(
        query_content(np.zeros((num_samples, dim)), round_index=0, sample_rate=1.0, source_salt=source_salt)
    )


def score_reply_bytes(*, num_samples: int, tag: str = "0" * 64) -> int:
    """Upload bytes per node per round: one ``query.score`` reply (float64 scores, the count, the source tag)."""
    return content_bytes(score_reply_content(np.zeros(num_samples), num_users=0, tag=tag))


def _num_users(meta: Any) -> int | str:
    """The reply's user count, or why it is unusable (a count must be a non-negative int; inf/NaN are floats)."""
    if not isinstance(meta, MetricRecord):
        return "'meta' is not a MetricRecord"
    if "num-users" not in meta:
        return "'meta' has no 'num-users'"
    value = meta["num-users"]
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "a non-finite number" if isinstance(value, float) and not math.isfinite(value) else type(value).__name__
        return f"'num-users' is {kind}, expected an int"
    if value < 0:
        return "'num-users' is negative"
    return value


def parse_score_reply(
    node_id: int, message: Message, *, expected_len: int, sources: SourceRegistry | None
) -> NodeReply:
    """A ``query.score`` reply, type-checked, as a :class:`NodeReply` (with ``error`` set when it is unusable).

    Checks: no error; ``scores`` an ArrayRecord whose ``scores`` is a 1-d float array of ``expected_len`` finite
    values; ``meta`` a MetricRecord whose ``num-users`` is an int >= 0; ``source`` a ConfigRecord whose ``tag`` is
    the tag this node proved before the run (when ``sources`` is given). The server still re-clips the vector.
    """
    if message.has_error():
        return NodeReply(node_id, None, 0, describe_error(message))
    try:
        content = message.content
        scores_record = content.get("scores")
        if not isinstance(scores_record, ArrayRecord) or not isinstance(scores_record.get("scores"), Array):
            return NodeReply(node_id, None, 0, "malformed reply: 'scores' is not an ArrayRecord holding 'scores'")
        scores = scores_record["scores"].numpy()
        if scores.ndim != 1 or scores.shape[0] != expected_len:
            return NodeReply(
                node_id, None, 0, f"malformed reply: scores of shape {scores.shape}, expected ({expected_len},)"
            )
        if not np.issubdtype(scores.dtype, np.floating) or not np.all(np.isfinite(scores)):
            return NodeReply(node_id, None, 0, "malformed reply: scores are not finite floats")
        num_users = _num_users(content.get("meta"))
        if isinstance(num_users, str):
            return NodeReply(node_id, None, 0, f"malformed reply: {num_users}")
        if sources is not None:
            source = content.get("source")
            tag = source.get("tag") if isinstance(source, ConfigRecord) else None
            why = sources.check_reply(node_id, tag)
            if why is not None:
                return NodeReply(node_id, None, 0, f"rejected source: {why}")
    except Exception as err:  # a broken reply must never stop the server
        return NodeReply(node_id, None, 0, f"malformed reply ({type(err).__name__})")
    return NodeReply(node_id, scores, num_users)
