"""Flower ClientApp: holds private users, caches their embeddings, returns the sum of their clipped score vectors.

Private data leaves this node only as that sum. Central mode (``query.score``): the server noises the total.
Secure-aggregation mode (``train``, wrapped by Flower's SecAgg+ mod): the node adds its own share of the noise and the
vector leaves masked; the server can unmask only the sum over at least ``min-replies`` nodes. ``query.prepare``
builds the node's private embeddings before the first round and answers only a data-independent source tag.

This module only unpacks messages, calls :mod:`popri.node` (every privacy step lives there) and packs replies. Any
failure becomes ``Error(code, reason)`` with one of the fixed codes of :class:`popri.node.NodeErrorCode`; the details
stay in this node's log.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

from popri.config import RunConfig, config_from_flat, split_run_options
from popri.node import (
    NodeErrorCode,
    NodePolicy,
    NodeRefusal,
    NodeScorer,
    NodeSource,
    check_round_request,
    check_run_settings,
    check_sample_embeddings,
    check_secagg_setup,
    error_code_for,
    node_generators,
    prepare_node,
    secagg_box_bound,
    secure_node_vector,
    source_tag,
)
from popri.privacy import noise_share_std

logger = logging.getLogger(__name__)


def fixed_error_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Outermost mod: any exception becomes an error reply with a fixed code; its text goes to the local log only.

    Flower's own error reply would carry the exception's text (paths, library messages) to the server.
    """
    try:
        return call_next(msg, context)
    except Exception as err:
        code = error_code_for(err)
        detail = err.detail if isinstance(err, NodeRefusal) else f"{type(err).__name__}: {err}"
        logger.warning(
            "%s refused (%s): %s",
            msg.metadata.message_type,
            code.reason,
            detail,
            exc_info=not isinstance(err, NodeRefusal),
        )
        return Message(Error(code=int(code), reason=code.reason), reply_to=msg)


def _invalid(what: str) -> NodeRefusal:
    return NodeRefusal(NodeErrorCode.INVALID_REQUEST, f"malformed message: {what}")


def _round_config(msg: Message) -> ConfigRecord:
    try:
        return msg.content["config"]
    except (KeyError, TypeError):
        raise _invalid("no 'config' record") from None


def _round_index(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _invalid(f"'round' must be an integer >= 0, got {value!r}")
    return value


class _Node:
    """One node's view of the run: its settings, its data source and policy, its prepared scorer."""

    def __init__(self, context: Context, overrides: dict[str, Any] | None) -> None:
        flat, _, _ = split_run_options({**context.run_config, **(overrides or {})})
        self.config: RunConfig = config_from_flat(flat)
        node_config = dict(context.node_config)
        # The device owner's floor comes first: a refused run never touches the data.
        NodePolicy.from_node_config(node_config).check(self.config)
        self.source = NodeSource.from_node_config(node_config)
        self.cache_dir = Path(str(node_config.get("cache-dir", "") or self.config.resolved_cache_dir())).expanduser()
        self.node_id = context.node_id

    def tag(self, salt: Any) -> str:
        return source_tag(salt=salt, descriptor=self.source.descriptor(data_setting=self.config.data.data))

    def scorer(self) -> NodeScorer:
        return prepare_node(self.config, self.source, cache_dir=self.cache_dir)

    def generators(self, round_index: int) -> tuple[np.random.Generator, np.random.Generator]:
        return node_generators(noise_seed=self.config.privacy.noise_seed, node_id=self.node_id, round_index=round_index)


def make_client_app(overrides: dict[str, Any] | None = None) -> ClientApp:
    app = ClientApp(mods=[fixed_error_mod])

    @app.query("prepare")
    def prepare(msg: Message, context: Context) -> Message:
        """Build (and cache) the private embeddings before any round deadline; answer the source tag only."""
        node = _Node(context, overrides)
        check_run_settings(node.config)  # refuse early what every round would refuse
        tag = node.tag(_round_config(msg).get("source-salt"))
        node.scorer()
        return Message(RecordDict({"source": ConfigRecord({"tag": tag})}), reply_to=msg)

    @app.query("score")
    def score(msg: Message, context: Context) -> Message:
        """privacy-mode = central: the clipped sum over this node's sampled users; the server adds the noise."""
        node = _Node(context, overrides)
        round_config = _round_config(msg)
        check_round_request(node.config, mode="central", sample_rate=round_config.get("sample-rate"))
        round_index = _round_index(round_config.get("round"))
        tag = node.tag(round_config.get("source-salt"))
        try:
            raw = msg.content["embeddings"]["embeddings"].numpy()
        except (KeyError, TypeError, AttributeError):
            raise _invalid("no 'embeddings' array") from None
        embeddings = check_sample_embeddings(raw)
        sampling_rng, _ = node.generators(round_index)
        node_sum, num_users = node.scorer().score(
            embeddings, sample_rate=node.config.privacy.sample_rate, rng=sampling_rng
        )
        content = RecordDict(
            {
                "scores": ArrayRecord({"scores": Array(node_sum.astype(np.float64))}),
                "meta": MetricRecord({"num-users": num_users}),
                "source": ConfigRecord({"tag": tag}),
            }
        )
        return Message(content, reply_to=msg)

    @app.train(mods=[secaggplus_mod])
    def secure_score(msg: Message, context: Context) -> Message:
        """privacy-mode = secagg: the clipped sum in the SecAgg+ box plus this node's noise share; the mod masks it."""
        node = _Node(context, overrides)
        p = node.config.privacy
        try:
            fitins = recorddict_to_fitins(msg.content, keep_input=True)
            raw = parameters_to_ndarrays(fitins.parameters)[0]
        except (KeyError, TypeError, ValueError, IndexError):
            raise _invalid("not a SecAgg+ fit instruction") from None
        check_round_request(node.config, mode="secagg", sample_rate=fitins.config.get("sample-rate"))
        round_index = _round_index(fitins.config.get("round"))
        setup = context.state.config_records.get(RECORD_KEY_STATE)
        if setup is None:
            raise _invalid("no SecAgg+ set-up before the masked-vector stage")
        check_secagg_setup(
            node.config,
            clipping_range=float(setup["clipping_range"]),
            threshold=int(setup["threshold"]),
            max_weight=float(setup["max_weight"]),
        )
        embeddings = check_sample_embeddings(raw)
        sigma = node.config.resolved_noise_multiplier()
        # Settings only: a range too small for the noise is refused before the data is touched.
        secagg_box_bound(
            clipping_range=p.secagg_clipping_range,
            noise_std=noise_share_std(noise_multiplier=sigma, min_replies=p.min_replies),
            dimension=embeddings.shape[0],
        )
        sampling_rng, noise_rng = node.generators(round_index)
        node_sum, _ = node.scorer().score(embeddings, sample_rate=p.sample_rate, rng=sampling_rng)
        noisy = secure_node_vector(
            node_sum=node_sum,
            noise_multiplier=sigma,
            min_replies=p.min_replies,
            clipping_range=p.secagg_clipping_range,
            rng=noise_rng,
        )
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([noisy]), num_examples=1, metrics={})
        return Message(fitres_to_recorddict(res, keep_input=True), reply_to=msg)

    return app


app = make_client_app()
