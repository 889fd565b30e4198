"""Run POPri on Flower's simulation engine (Ray) in this process: what ``popri run`` does.

Why ``flwr.simulation.run_simulation``, which Flower 1.42 marks deprecated ("use flwr run"): in flwr 1.42.0 it is
the only public API that runs a ServerApp and ClientApps in the calling process (``run_simulation_process``, the
other public entry, is the ``flwr-simulation`` process that needs a running SuperLink). ``flwr run`` is the
supported path for a Flower *project*: it packages a folder holding ``pyproject.toml`` with ``[tool.flwr.app]`` into
a FAB, starts a managed local SuperLink and a SuperExec, installs the app's dependencies with ``uv sync`` unless
told not to, and passes settings only as strings through ``--run-config``. ``popri run`` is an installed console
script that must work from any directory and offline, with a validated :class:`popri.config.RunConfig` handed to the
apps as Python objects, and report a ServerApp failure as its own exit status; ``flwr run`` can do none of these
from a wheel. ``flwr run .`` in a checkout stays supported for the project itself (``[tool.flwr.app]`` in
pyproject.toml).
Flower's deprecation notice is kept out of the console (it stays in ``DIR/run.log``; the other console rules are in
:mod:`popri.logs`).

Console: Ray's actor output is not forwarded to this terminal (``log_to_driver`` off) so it cannot break the
progress display; it stays in Ray's session logs (``/tmp/ray/session_latest/logs``). ``-v`` forwards it again.
Every log record of this process, Flower's included, is appended to ``DIR/run.log``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from popri.config import RunConfig, config_to_app_config
from popri.logs import ConsoleFilter, attach_log_file, detach_log_file, route_transformers_logging

logger = logging.getLogger(__name__)


def _quiet_flower_console(verbose: bool) -> logging.Filter | None:
    """Flower's own console handler gets popri's console filter (its deprecation notice goes to the file only)."""
    from flwr.supercore.logger import console_handler

    if verbose:
        return None
    console_filter = ConsoleFilter(verbose=False)
    console_handler.addFilter(console_filter)
    return console_filter


def run_simulation(config: RunConfig, *, resume: bool = False, progress: bool = True) -> Path:
    """The real ServerApp and ClientApp on ``config.num_nodes`` virtual SuperNodes; returns the output folder."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from flwr.simulation import run_simulation as flwr_run_simulation
    from flwr.supercore.logger import console_handler

    from client.app import make_client_app
    from server.app import make_server_app

    verbose = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
    route_transformers_logging()
    out = Path(config.output)
    log_file = attach_log_file(out / "run.log", loggers=("", "flwr"))
    console_filter = _quiet_flower_console(verbose)
    overrides = config_to_app_config(config)  # every key, None as "": a dropped one would take its default
    overrides.update({"resume": resume, "progress": progress})
    errors: list[BaseException] = []
    try:
        flwr_run_simulation(
            server_app=make_server_app(overrides, errors),
            client_app=make_client_app(overrides),
            num_supernodes=config.num_nodes,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},  # 2 actors on 2 cores
                "init_args": {
                    "num_cpus": max(2, os.cpu_count() or 2),
                    "include_dashboard": False,
                    "log_to_driver": verbose,  # actor prints would tear the progress bars
                    "logging_level": logging.DEBUG if verbose else logging.WARNING,
                },
            },
            verbose_logging=verbose,
        )
    finally:
        if console_filter is not None:
            console_handler.removeFilter(console_filter)
        detach_log_file(log_file, loggers=("", "flwr"))
    if errors:
        raise errors[0]
    if not (out / "privacy.json").exists():
        raise RuntimeError(f"the simulation ended without writing {out / 'privacy.json'}; see {out / 'run.log'}")
    return out
