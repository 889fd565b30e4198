"""Flower ClientApp: holds private users, caches their embeddings, returns the sum of their clipped score vectors.

Private data leaves this node only as that sum, which the server noises (central mode). Nothing else is sent back.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from popri.config import RunConfig, config_from_flat, split_run_options
from popri.node import NodeScorer, load_node_users
from popri.privacy import make_noise_rng

logger = logging.getLogger(__name__)

# In simulation one Ray actor serves several virtual nodes: caches are keyed by the node's data, never shared blindly.
_SCORERS: dict[tuple[str, int, int, str], NodeScorer] = {}


def _scorer(config: RunConfig, node_config: dict[str, Any]) -> NodeScorer:
    data_path = str(node_config.get("data-path", "") or "")
    pid, parts = int(node_config.get("partition-id", 0)), int(node_config.get("num-partitions", 1))
    cache_dir = Path(str(node_config.get("cache-dir", "") or config.resolved_cache_dir()))
    key = (data_path or config.data.data, pid, parts, str(cache_dir))
    if key not in _SCORERS:
        users = load_node_users(config, partition_id=pid, num_partitions=parts, data_path=data_path or None)
        _SCORERS[key] = NodeScorer.from_users(None, users, cache_dir=cache_dir)  # embedder loaded on a miss
        logger.info("node partition %d/%d: %d private users", pid, parts, _SCORERS[key].num_users)
    return _SCORERS[key]


def make_client_app(overrides: dict[str, Any] | None = None) -> ClientApp:
    app = ClientApp()

    @app.query("score")
    def score(msg: Message, context: Context) -> Message:
        flat, _, _ = split_run_options({**context.run_config, **(overrides or {})})
        config = config_from_flat(flat)
        embeddings = np.asarray(msg.content["embeddings"]["embeddings"].numpy(), dtype=np.float64)
        sample_rate = float(msg.content["config"]["sample-rate"])
        round_index = int(msg.content["config"]["round"])
        seed = config.privacy.noise_seed
        # User sampling must be unpredictable to others, like the noise: OS entropy unless a seed was asked for.
        rng, _ = make_noise_rng(None if seed is None else seed + 7919 * (context.node_id % 100_000) + round_index)
        node_sum, num_users = _scorer(config, dict(context.node_config)).score(
            embeddings, sample_rate=sample_rate, rng=rng
        )
        content = RecordDict(
            {"scores": ArrayRecord({"scores": _array(node_sum)}), "meta": MetricRecord({"num-users": num_users})}
        )
        return Message(content, reply_to=msg)

    return app


def _array(vector: np.ndarray) -> Any:
    from flwr.app import Array

    return Array(vector.astype(np.float64))


app = make_client_app()
