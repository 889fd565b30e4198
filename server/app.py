"""Flower ServerApp: hosts the LLM and runs POPri rounds; it only translates messages to ``popri`` calls."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from popri.config import config_from_flat, split_run_options
from popri.logs import setup_logging
from popri.rounds import NodeReply, PopriRun, SecureSum
from server.secagg import secure_sum

logger = logging.getLogger(__name__)

run_options = split_run_options  # Flower's run config -> (popri keys, resume, progress)

MESSAGE_TYPE = "query.score"
_NODE_WAIT_S = 120.0


def wait_for_nodes(grid: Grid, wanted: int, timeout: float = _NODE_WAIT_S) -> list[int]:
    """Nodes may register after the ServerApp starts: wait for ``wanted`` of them, or go on with those there."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < wanted and time.monotonic() < deadline:
        time.sleep(0.5)
    if len(nodes) < wanted:
        logger.warning("only %d of %d nodes connected after %.0fs; continuing with them", len(nodes), wanted, timeout)
    return sorted(nodes)


def _to_reply(node_id: int, message: Message) -> NodeReply:
    if message.has_error():
        return NodeReply(node_id, None, 0, f"error {message.error.code}: {message.error.reason}")
    try:
        node_sum = message.content["scores"]["scores"].numpy()
        num_users = int(message.content["meta"]["num-users"])
    except (KeyError, TypeError, ValueError) as err:
        return NodeReply(node_id, None, 0, f"malformed reply: {err!r}")
    return NodeReply(node_id, node_sum, num_users)


def query_nodes(
    grid: Grid, nodes: list[int], embeddings: np.ndarray, round_index: int, sample_rate: float, timeout: float
) -> list[NodeReply]:
    """Send the sample embeddings to every node; collect the replies that arrive before the deadline."""
    content = RecordDict(
        {
            "embeddings": ArrayRecord({"embeddings": Array(embeddings.astype(np.float32))}),
            "config": ConfigRecord({"round": round_index, "sample-rate": float(sample_rate)}),
        }
    )
    messages = [
        Message(content, dst_node_id=node, message_type=MESSAGE_TYPE, group_id=str(round_index)) for node in nodes
    ]
    pending = {mid: node for mid, node in zip(grid.push_messages(messages), nodes, strict=True)}
    replies: list[NodeReply] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for message in grid.pull_messages(list(pending)):
            node = pending.pop(message.metadata.reply_to_message_id, None)
            if node is not None:  # NODE_UNAVAILABLE errors come from the SuperLink: map them by message id
                replies.append(_to_reply(node, message))
        if pending:
            time.sleep(0.1)
    replies += [NodeReply(node, None, 0, f"no reply within {timeout:.0f}s") for node in pending.values()]
    return replies


def make_server_app(overrides: dict[str, Any] | None = None, errors: list[BaseException] | None = None) -> ServerApp:
    """A ServerApp whose config is Flower's run config updated with ``overrides`` (used by ``popri run``).

    A failure is appended to ``errors`` (when given) before it propagates, because Flower's simulation only logs it.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            _main(grid, context, overrides)
        except BaseException as err:
            if errors is not None:
                errors.append(err)
            raise

    return app


def _main(grid: Grid, context: Context, overrides: dict[str, Any] | None) -> None:
    if not logging.getLogger().handlers:  # flwr-serverapp process: make the per-round log lines visible
        setup_logging()
    flat, resume, progress = run_options({**context.run_config, **(overrides or {})})
    config = config_from_flat(flat)
    run = PopriRun(config, resume=resume, progress=progress)
    nodes = wait_for_nodes(grid, config.num_nodes, timeout=min(_NODE_WAIT_S, config.reply_timeout))

    def collect(embeddings: np.ndarray, round_index: int, sample_rate: float) -> list[NodeReply]:
        live = sorted(grid.get_node_ids()) or nodes
        return query_nodes(grid, live, embeddings, round_index, sample_rate, config.reply_timeout)

    def collect_secure(
        embeddings: np.ndarray, round_index: int, sample_rate: float, charge: Callable[[], None]
    ) -> SecureSum:
        return secure_sum(
            grid,
            context,
            sorted(grid.get_node_ids()),
            embeddings=embeddings,
            round_index=round_index,
            sample_rate=sample_rate,
            min_replies=config.privacy.min_replies,
            clipping_range=config.privacy.secagg_clipping_range,
            timeout=config.reply_timeout,
            charge=charge,
        )

    run.run(collect_secure if config.privacy.privacy_mode == "secagg" else collect)


app = make_server_app()
