"""Submitting a run with ``flwr run`` and following it with ``flwr ls`` until it is finished."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deploy.commands import DEFAULT_FEDERATION, list_runs_command, parse_json_output, run_command
from deploy.environment import flower_env
from deploy.errors import DeployError

logger = logging.getLogger(__name__)

FINISHED = "finished"  # every final status starts with it: finished:completed / finished:failed / finished:stopped


def submit_run(
    app: Path,
    federation: str = DEFAULT_FEDERATION,
    overrides: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 300.0,
) -> int:
    """Submit a run with ``flwr run`` and return its run id."""
    argv = run_command(app, federation, overrides)
    proc = subprocess.run(
        argv, env=dict(env or flower_env()), capture_output=True, text=True, timeout=timeout, check=False
    )
    try:
        out = parse_json_output(proc.stdout)
    except DeployError:
        tail = (proc.stdout + proc.stderr).strip()[-2000:]
        raise DeployError(f"flwr run failed (exit {proc.returncode}): {tail}") from None
    if not out.get("success", True) or "run-id" not in out:
        raise DeployError(f"flwr run refused the run: {out}")
    return int(out["run-id"])


def run_status(federation: str, run_id: int, *, env: Mapping[str, str] | None = None) -> str:
    """The run's status, e.g. ``running`` or ``finished:completed`` / ``finished:failed`` / ``finished:stopped``."""
    proc = subprocess.run(
        list_runs_command(federation, run_id),
        env=dict(env or flower_env()),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    out = parse_json_output(proc.stdout)
    runs = out.get("runs") or []
    if not out.get("success", True) or not runs:
        raise DeployError(f"flwr ls found no run {run_id}: {out}")
    return str(runs[0]["status"])


def wait_for_run(
    federation: str,
    run_id: int,
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    poll: float = 2.0,
) -> str:
    """Poll ``flwr ls`` until the run is finished; returns its final status (raises after ``timeout`` seconds).

    A failed poll (the SuperLink restarting, a network blip) is logged and retried until the deadline.
    """
    deadline = time.monotonic() + timeout
    status = "unknown"
    while time.monotonic() < deadline:
        try:
            status = run_status(federation, run_id, env=env)
        except (DeployError, subprocess.TimeoutExpired) as err:
            logger.warning("could not read the status of run %d (%s); retrying", run_id, err)
        else:
            if status.startswith(FINISHED):
                return status
        time.sleep(poll)
    raise DeployError(f"run {run_id} still '{status}' after {timeout:.0f}s")
