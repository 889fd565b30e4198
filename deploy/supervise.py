"""Process supervision: restart a SuperNode that the SuperLink refuses for a while after a crash."""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def supervise(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    retry_for: float,
    backoff: float = 3.0,
    healthy_after: float = 60.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Run ``argv`` and restart it after a failure, until it has failed for ``retry_for`` seconds in a row.

    Why a SuperNode needs this: after a crash (power loss, ``kill -9``) the SuperLink keeps the node "online" until
    two heartbeats are missed (up to 60 s) and refuses to activate the same node id again before that; Flower's
    SuperNode then exits (code 305, "Failed to activate SuperNode") instead of retrying. A child that ran for
    ``healthy_after`` seconds resets the clock. SIGINT / SIGTERM are passed on to the child and end the loop.
    ``clock`` and ``sleep`` measure and wait (seconds); a test passes its own to count restarts exactly.
    Returns the child's last exit code.
    """
    stopping: list[int] = []
    child: list[subprocess.Popen[bytes]] = []

    def forward(signum: int, _frame: Any) -> None:
        stopping.append(signum)
        if child and child[-1].poll() is None:
            child[-1].send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        failing_since: float | None = None
        while True:
            started = clock()
            child.append(subprocess.Popen(list(argv), env=dict(env)))
            code = child[-1].wait()
            child.pop(0)
            now = clock()
            if stopping or code == 0:
                return code
            if failing_since is None or now - started >= healthy_after:
                failing_since = now  # a first failure, or one after a healthy run: the clock starts now
            if now - failing_since >= retry_for:
                logger.error("%s kept failing for %.0fs (exit %d); giving up", Path(argv[0]).name, retry_for, code)
                return code
            logger.warning("%s exited with %d; restarting in %.0fs", Path(argv[0]).name, code, backoff)
            sleep(backoff)
            if stopping:
                return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
