"""Run POPri on Flower's simulation engine (Ray) in this process: what ``popri run`` does."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from popri.config import RunConfig, config_to_app_config

logger = logging.getLogger(__name__)


def run_simulation(config: RunConfig, *, resume: bool = False, progress: bool = True) -> Path:
    """The real ServerApp and ClientApp on ``config.num_nodes`` virtual SuperNodes; returns the output folder."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from flwr.simulation import run_simulation as flwr_run_simulation

    from client.app import make_client_app
    from server.app import make_server_app

    overrides = config_to_app_config(config)  # every key, None as "": a dropped one would default
    overrides.update({"resume": resume, "progress": progress})
    errors: list[BaseException] = []
    flwr_run_simulation(
        server_app=make_server_app(overrides, errors),
        client_app=make_client_app(overrides),
        num_supernodes=config.num_nodes,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},  # 2 actors on 2 cores
            "init_args": {"num_cpus": max(2, os.cpu_count() or 2), "include_dashboard": False},
        },
    )
    if errors:
        raise errors[0]
    out = Path(config.output)
    if not (out / "privacy.json").exists():
        raise RuntimeError(f"the simulation ended without writing {out / 'privacy.json'}; see the log above")
    return out
