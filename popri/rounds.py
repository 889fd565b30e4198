"""The names this module used to hold, kept importable: the loop is :mod:`popri.loop`, the release strategies
:mod:`popri.release`, the run state :mod:`popri.run_state`, the published files :mod:`popri.artifacts`."""

from __future__ import annotations

from popri.artifacts import plot_rounds
from popri.loop import PopriRun, ServerParts, load_parts
from popri.release import Collect, NodeReply, Release, ReleaseStrategy, SecureCollect, SecureSum, aggregate_replies

__all__ = [
    "Collect",
    "NodeReply",
    "PopriRun",
    "Release",
    "ReleaseStrategy",
    "SecureCollect",
    "SecureSum",
    "ServerParts",
    "aggregate_replies",
    "load_parts",
    "plot_rounds",
]
