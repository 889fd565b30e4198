"""Secure aggregation (``privacy-mode = secagg``): one SecAgg+ protocol run per POPri round.

Flower 1.42 offers SecAgg+ only as a legacy workflow, so a round drives ``SecAggPlusWorkflow`` directly with a
one-round ``LegacyContext`` and a strategy that only hands out the round's sample embeddings and captures the unmasked
sum. Each node uploads ``[1, x]`` with ``num_examples = 1`` (see ``client/app.py``); the workflow returns the mean over
the nodes whose masked vectors arrived, so their sum is ``mean × count``. The reconstruction threshold is
``min-replies``: unmasking needs that many surviving nodes, so any sum the server can see covers at least
``min-replies`` noise shares, which together carry the noise the accountant assumes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import parameters_to_arrayrecord
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from popri.release import SecureSum

logger = logging.getLogger(__name__)


class _RoundStrategy(FedAvg):
    """Sends the round's embeddings to every node and keeps the unmasked sum; it aggregates nothing itself."""

    def __init__(self, num_nodes: int, round_index: int, sample_rate: float) -> None:
        super().__init__(
            fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=num_nodes, min_available_clients=num_nodes
        )
        self.config = {"round": round_index, "sample-rate": float(sample_rate)}
        self.result: SecureSum | None = None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list[tuple[Any, FitIns]]:
        return [(client, FitIns(parameters, dict(self.config))) for client in client_manager.all().values()]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Any]]:
        # Every FitRes now carries the same unmasked mean Σx/n over the n nodes in the sum.
        mean = parameters_to_ndarrays(results[0][1].parameters)[0]
        self.result = SecureSum(np.asarray(mean, dtype=np.float64) * len(results), len(results), len(failures))
        return None, {}


class _ChargingSecAggPlus(SecAggPlusWorkflow):
    """SecAgg+ that charges the privacy ledger after the masked vectors are in and before their sum is unmasked."""

    def __init__(self, before_unmask: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.before_unmask = before_unmask

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        self.before_unmask()
        return bool(super().unmask_stage(grid, context, state))


def secure_sum(
    grid: Grid,
    context: Context,
    nodes: list[int],
    *,
    embeddings: np.ndarray,
    round_index: int,
    sample_rate: float,
    min_replies: int,
    clipping_range: float,
    timeout: float,
    charge: Callable[[], None],
) -> SecureSum:
    """One SecAgg+ run over ``nodes``; the result is None unless at least ``min_replies`` nodes are in the sum."""
    if len(nodes) < max(2, min_replies):
        logger.warning("secure aggregation needs %d nodes, %d online", max(2, min_replies), len(nodes))
        return SecureSum(None, 0, len(nodes))
    manager = SimpleClientManager()
    for node in nodes:
        manager.register(GridClientProxy(node_id=node, grid=grid, run_id=context.run_id))
    strategy = _RoundStrategy(len(nodes), round_index, sample_rate)
    legacy = LegacyContext(
        context=Context(
            run_id=context.run_id,
            node_id=context.node_id,
            node_config=context.node_config,
            state=RecordDict(),
            run_config=context.run_config,
        ),
        config=ServerConfig(num_rounds=1),
        strategy=strategy,
        client_manager=manager,
    )
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: round_index + 1})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = parameters_to_arrayrecord(
        ndarrays_to_parameters([embeddings.astype(np.float32)]), keep_input=True
    )
    workflow = _ChargingSecAggPlus(
        charge,
        num_shares=1.0,  # every node holds a share of every other node's secrets: small federations
        # Unmasking needs this many live nodes, each holding full-federation shares: any sum seen covers >= that many.
        reconstruction_threshold=max(2, min_replies),
        max_weight=1.0,  # num_examples = 1 per node: no weighting, so the mean times the count is the sum
        clipping_range=clipping_range,
        timeout=timeout,
    )
    workflow(grid, legacy)
    return strategy.result or SecureSum(None, 0, len(nodes))
