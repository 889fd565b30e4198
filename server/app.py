"""Flower ServerApp: hosts the LLM and runs POPri rounds; it only translates messages to ``popri`` calls.

Before the first round of a run (or of a resume) every node proves its data source (``query.prepare``, see
:mod:`server.messages`); the rounds then go to the nodes that proved a distinct one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp
from tqdm.auto import tqdm

from popri.config import RunConfig, config_from_flat, split_run_options
from popri.logs import attach_log_file, detach_log_file, setup_logging
from popri.loop import PopriRun
from popri.release import NodeReply, SecureSum
from popri.sources import SourceRegistry
from server import messages
from server.secagg import secure_sum

logger = logging.getLogger(__name__)

run_options = split_run_options  # Flower's run config -> (popri keys, resume, progress)

MESSAGE_TYPE = messages.SCORE
_NODE_WAIT_S = 120.0


class NotEnoughNodesError(RuntimeError):
    """Fewer nodes proved a distinct data source than a round needs; nothing was charged."""


def wait_for_nodes(grid: Grid, wanted: int, timeout: float = _NODE_WAIT_S) -> list[int]:
    """Nodes may register after the ServerApp starts: wait for ``wanted`` of them, or go on with those there."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < wanted and time.monotonic() < deadline:
        time.sleep(0.5)
    if len(nodes) < wanted:
        logger.warning("only %d of %d nodes connected after %.0fs; continuing with them", len(nodes), wanted, timeout)
    return sorted(nodes)


def _exchange(
    grid: Grid, nodes: list[int], messages_out: list[Message], timeout: float, on_reply: Callable[[int, Message], None]
) -> list[int]:
    """Push one message per node; hand each reply that arrives before the deadline to ``on_reply``. Returns the
    nodes that did not answer in time."""
    pending = {mid: node for mid, node in zip(grid.push_messages(messages_out), nodes, strict=True)}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for message in grid.pull_messages(list(pending)):
            node = pending.pop(message.metadata.reply_to_message_id, None)
            if node is not None:  # NODE_UNAVAILABLE errors come from the SuperLink: map them by message id
                on_reply(node, message)
        if pending:
            time.sleep(0.1)
    return sorted(pending.values())


def prepare_nodes(
    grid: Grid, nodes: list[int], *, source_salt: str, timeout: float, progress: bool = False
) -> SourceRegistry:
    """``query.prepare`` to every node: each proves its data source; duplicates and broken replies are excluded."""
    registry = SourceRegistry()
    content = messages.prepare_content(source_salt=source_salt)
    out = [Message(content, dst_node_id=n, message_type=messages.PREPARE, group_id="prepare") for n in nodes]
    bar = tqdm(total=len(nodes), desc="nodes ready", disable=not progress, unit="node")

    def on_reply(node: int, message: Message) -> None:
        tag, why = messages.parse_prepare_reply(message)
        if why is not None:
            registry.exclude(node, f"prepare reply rejected: {why}")
        elif registry.register(node, tag):
            bar.update(1)
            logger.info("node %d ready (%d of %d)", node, len(registry.tags), len(nodes))

    late = _exchange(grid, nodes, out, timeout, on_reply)
    bar.close()
    for node in late:
        registry.exclude(node, f"not ready within prepare-timeout={timeout:g}s")
    return registry


def query_nodes(
    grid: Grid,
    nodes: list[int],
    embeddings: np.ndarray,
    round_index: int,
    sample_rate: float,
    timeout: float,
    *,
    source_salt: str = "",
    sources: SourceRegistry | None = None,
) -> list[NodeReply]:
    """Send the sample embeddings to every node; collect the type-checked replies that arrive before the deadline."""
    content = messages.query_content(
        embeddings, round_index=round_index, sample_rate=sample_rate, source_salt=source_salt
    )
    out = [Message(content, dst_node_id=node, message_type=MESSAGE_TYPE, group_id=str(round_index)) for node in nodes]
    replies: list[NodeReply] = []

    def on_reply(node: int, message: Message) -> None:
        replies.append(messages.parse_score_reply(node, message, expected_len=len(embeddings), sources=sources))

    late = _exchange(grid, nodes, out, timeout, on_reply)
    replies += [NodeReply(node, None, 0, f"no reply within {timeout:.0f}s") for node in late]
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
    own_process = not logging.getLogger().handlers  # a flwr-serverapp process (`flwr run .`, a deployment)
    if own_process:
        setup_logging()  # make the per-round log lines visible
    flat, resume, progress = run_options({**context.run_config, **(overrides or {})})
    config = config_from_flat(flat)
    # `popri run` keeps DIR/run.log itself (server/simulation.py); a Flower-launched ServerApp keeps its own.
    log_file = attach_log_file(Path(config.output) / "run.log", loggers=("", "flwr")) if own_process else None
    try:
        _serve(grid, context, config, resume=resume, progress=progress)
    finally:
        if log_file is not None:
            detach_log_file(log_file, loggers=("", "flwr"))


def _serve(grid: Grid, context: Context, config: RunConfig, *, resume: bool, progress: bool) -> None:
    with PopriRun(config, resume=resume, progress=progress) as run:
        if config.control:  # random pairs: no node is ever asked anything
            run.run(lambda embeddings, round_index, sample_rate: [])
            return
        nodes = wait_for_nodes(grid, config.num_nodes, timeout=min(_NODE_WAIT_S, config.reply_timeout))
        sources = prepare_nodes(
            grid, nodes, source_salt=run.source_salt, timeout=config.prepare_timeout, progress=progress
        )
        p = config.privacy
        needed = max(2, p.min_replies) if p.privacy_mode == "secagg" else p.min_replies
        if len(sources.ready) < needed:
            raise NotEnoughNodesError(
                f"only {len(sources.ready)} of {len(nodes)} nodes proved a distinct data source within "
                f"prepare-timeout={config.prepare_timeout:g}s, and a round needs {needed} (min-replies): start more "
                "nodes or lower min-replies. Nothing was charged."
            )
        logger.info("%d node(s) ready: %s", len(sources.ready), ", ".join(map(str, sources.ready)))

        def ready_and_live() -> list[int]:
            live = set(grid.get_node_ids())
            return [node for node in sources.ready if node in live]

        def collect(embeddings: np.ndarray, round_index: int, sample_rate: float) -> list[NodeReply]:
            return query_nodes(
                grid,
                ready_and_live(),
                embeddings,
                round_index,
                sample_rate,
                config.reply_timeout,
                source_salt=run.source_salt,
                sources=sources,
            )

        def collect_secure(
            embeddings: np.ndarray, round_index: int, sample_rate: float, charge: Callable[[], None]
        ) -> SecureSum:
            return secure_sum(
                grid,
                context,
                ready_and_live(),
                embeddings=embeddings,
                round_index=round_index,
                sample_rate=sample_rate,
                min_replies=p.min_replies,
                clipping_range=p.secagg_clipping_range,
                timeout=config.reply_timeout,
                charge=charge,
            )

        run.run(collect_secure if p.privacy_mode == "secagg" else collect)


app = make_server_app()
