"""Flower ClientApp: holds private users, caches their embeddings, returns the sum of their clipped score vectors.

Private data leaves this node only as that sum. Central mode (``query.score``): the server noises the total.
Secure-aggregation mode (``train``, wrapped by Flower's SecAgg+ mod): the node adds its own share of the noise and the
vector leaves masked; the server can unmask only the sum over at least ``min-replies`` nodes. Nothing else is sent.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

from popri.config import RunConfig, config_from_flat, split_run_options
from popri.node import NodeScorer, load_node_users
from popri.privacy import add_noise_share, make_noise_rng

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

    def run_config(context: Context) -> RunConfig:
        flat, _, _ = split_run_options({**context.run_config, **(overrides or {})})
        return config_from_flat(flat)

    @app.query("prepare")
    def prepare(msg: Message, context: Context) -> Message:
        """Prove this node's data source: a salted hash of what it holds (duplicates are excluded by the server)."""
        tag = _source_tag(run_config(context), dict(context.node_config), str(msg.content["config"]["source-salt"]))
        return Message(RecordDict({"source": ConfigRecord({"tag": tag})}), reply_to=msg)

    @app.query("score")
    def score(msg: Message, context: Context) -> Message:
        config = run_config(context)
        embeddings = np.asarray(msg.content["embeddings"]["embeddings"].numpy(), dtype=np.float64)
        sample_rate = float(msg.content["config"]["sample-rate"])
        round_index = int(msg.content["config"]["round"])
        rng = _node_rng(config, context.node_id, round_index, stream=0)
        node_sum, num_users = _scorer(config, dict(context.node_config)).score(
            embeddings, sample_rate=sample_rate, rng=rng
        )
        content = RecordDict(
            {
                "scores": ArrayRecord({"scores": _array(node_sum)}),
                "meta": MetricRecord({"num-users": num_users}),
                "source": ConfigRecord(
                    {"tag": _source_tag(config, dict(context.node_config), str(msg.content["config"]["source-salt"]))}
                ),
            }
        )
        return Message(content, reply_to=msg)

    @app.train(mods=[secaggplus_mod])
    def secure_score(msg: Message, context: Context) -> Message:
        """privacy-mode = secagg: the clipped sum plus this node's noise share; ``secaggplus_mod`` masks it."""
        config = run_config(context)
        p = config.privacy
        if p.privacy_mode != "secagg":
            raise ValueError(f"this run is in privacy-mode {p.privacy_mode!r}: it takes no secure-aggregation round")
        fitins = recorddict_to_fitins(msg.content, keep_input=True)
        embeddings = np.asarray(parameters_to_ndarrays(fitins.parameters)[0], dtype=np.float64)
        round_index = int(fitins.config["round"])
        # Sampling rate and noise come from the run's settings, never from the round's message.
        asked = float(fitins.config["sample-rate"])
        if asked != p.sample_rate:
            raise ValueError(f"the server asked for sample rate {asked}; the run's is {p.sample_rate}")
        scorer = _scorer(config, dict(context.node_config))
        node_sum, _ = scorer.score(
            embeddings, sample_rate=p.sample_rate, rng=_node_rng(config, context.node_id, round_index, stream=0)
        )
        noisy = add_noise_share(
            node_sum=node_sum,
            noise_multiplier=config.resolved_noise_multiplier(),
            min_replies=p.min_replies,
            rng=_node_rng(config, context.node_id, round_index, stream=1),
        )
        largest = float(np.max(np.abs(noisy), initial=0.0))
        if largest >= p.secagg_clipping_range:
            # SecAgg+ would clip the entry and the noise would stop being Gaussian: drop out of the round instead.
            # The value stays in this node's log: the error reply goes to the server, which must not see it.
            logger.warning("noisy score %.1f >= secagg-clipping-range %s: raise it", largest, p.secagg_clipping_range)
            raise ValueError("a noisy score exceeds secagg-clipping-range; this node drops out of the round")
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([noisy]), num_examples=1, metrics={})
        return Message(fitres_to_recorddict(res, keep_input=True), reply_to=msg)

    return app


def _source_tag(config: RunConfig, node_config: dict[str, Any], salt: str) -> str:
    """The salted hash of this node's data source (its file or its partition of the configured data set)."""
    data_path = str(node_config.get("data-path", "") or "")
    pid, parts = int(node_config.get("partition-id", 0)), int(node_config.get("num-partitions", 1))
    source = f"{data_path or config.data.data}|{pid}|{parts}"
    return hashlib.sha256(f"{salt}|{source}".encode()).hexdigest()


def _node_rng(config: RunConfig, node_id: int, round_index: int, *, stream: int) -> np.random.Generator:
    """User sampling (stream 0) and the noise share (stream 1) must be unpredictable to others: OS entropy unless a
    reproducible noise seed was asked for (experiments only)."""
    seed = config.privacy.noise_seed
    rng, _ = make_noise_rng(
        None if seed is None else seed + 7919 * (node_id % 100_000) + round_index + 104_729 * stream
    )
    return rng


def _array(vector: np.ndarray) -> Any:
    from flwr.app import Array

    return Array(vector.astype(np.float64))


app = make_client_app()
