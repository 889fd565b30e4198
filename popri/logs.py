"""Logging for entry points (the command line, a Flower process), and optional per-round experiment tracking.

The console shows popri's own lines (INFO and up) and every other library's warnings and errors, except known
third-party noise (deprecation notices of APIs popri does not call itself, Ray's accelerator tip); those, and every
library's INFO lines, go to the run's log file only (``attach_log_file``), which keeps everything. Log lines are
written through tqdm, so they never break a progress bar. ``verbose`` shows everything on the console.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from popri.config import ConfigError

PROJECT_LOGGERS = ("popri", "server", "client", "benchmark", "__main__")
# Third-party messages that say nothing a popri user can act on: file only (unless verbose).
CONSOLE_NOISE = (
    "DEPRECATED FEATURE: The `run_simulation` function",  # Flower 1.42; why popri still calls it: server/simulation.py
    "is_gradient_checkpointing",  # transformers 5 / peft
    "past_key_values",  # transformers 5 renamed the kwarg; libraries still pass it
    "Tip: In future versions of Ray",  # Ray's accelerator-override notice
)
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_QUIET_LIBRARIES = ("httpx", "urllib3", "filelock", "sentence_transformers", "transformers", "datasets")


class ConsoleFilter(logging.Filter):
    """What reaches the console: popri's lines, others' warnings; never :data:`CONSOLE_NOISE` (unless verbose)."""

    def __init__(self, *, verbose: bool = False) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose:
            return True
        message = record.getMessage()
        if any(noise in message for noise in CONSOLE_NOISE):
            return False
        if record.name == "py.warnings":  # Python warnings from libraries: deprecations are not the user's to fix
            return not ("DeprecationWarning" in message or "FutureWarning" in message)
        if record.levelno >= logging.WARNING:
            return True
        return record.name.split(".")[0] in PROJECT_LOGGERS


class TqdmHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stderr handler that writes above the progress bars instead of through them."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging must never crash the run
            self.handleError(record)


def _is_ours(handler: logging.Handler) -> bool:
    return bool(getattr(handler, "_popri", False))


def setup_logging(verbose: bool = False) -> None:
    """One console handler on the root logger (idempotent), Python warnings captured into logging."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if _is_ours(h) and not isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
    console = TqdmHandler()
    console.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    console.addFilter(ConsoleFilter(verbose=verbose))
    console._popri = True  # type: ignore[attr-defined]
    root.addHandler(console)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)  # warnings.warn(...) -> the 'py.warnings' logger -> the filter and the file
    for noisy in _QUIET_LIBRARIES:
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("flwr").propagate = False  # Flower prints its own lines; do not print them twice
    if not verbose:
        # transformers' one-step "Loading weights" bars: one progress display for the run, popri's own
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "transformers" in sys.modules:
        route_transformers_logging()


def route_transformers_logging() -> None:
    """transformers prints through its own stderr handler ("[transformers] ..."): send its records through the root
    logger instead, so the console filter and the run's log file see them. Imports transformers' logging module
    (~1 s), so entry points that load a model call it, not every command."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


def attach_log_file(path: Path, *, loggers: tuple[str, ...] = ("",)) -> logging.Handler:
    """Append every record of ``loggers`` (default: the root) to ``path``; returns the handler to detach later.

    Pass Flower's logger name too ("flwr"): it does not propagate to the root.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(process)d]: %(message)s"))
    handler.setLevel(logging.DEBUG)
    handler._popri = True  # type: ignore[attr-defined]
    for name in loggers:
        logging.getLogger(name).addHandler(handler)
    return handler


def detach_log_file(handler: logging.Handler, *, loggers: tuple[str, ...] = ("",)) -> None:
    for name in loggers:
        logging.getLogger(name).removeHandler(handler)
    handler.close()


# -- experiment tracking -----------------------------------------------------------------------------------------


def flat_metrics(record: dict[str, Any]) -> dict[str, float]:
    """A rounds.jsonl record as scalar metrics under the same keys (``seconds`` -> ``seconds/<stage>``).

    Counts of users are left out: under user-level DP they are private and must not be published to a tracker.
    """
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("round", "users_sampled"):
            continue
        if isinstance(value, dict):
            for sub, v in value.items():
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                    out[f"{key}/{sub}"] = float(v)
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out


class MetricsTracker:
    """Per-round metrics to an experiment tracker: ``log(record)`` once a round, ``close()`` at the end.

    ``writer`` is anything with ``add_scalar(tag, value, step)`` (TensorBoard's SummaryWriter) or ``log(dict,
    step=)`` (a wandb run); :func:`make_tracker` builds the real ones.
    """

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def log(self, record: dict[str, Any]) -> None:
        step = int(record["round"])
        metrics = flat_metrics(record)
        if hasattr(self.writer, "add_scalar"):
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
            if hasattr(self.writer, "flush"):
                self.writer.flush()
        else:
            self.writer.log(metrics, step=step)

    def close(self) -> None:
        closer = getattr(self.writer, "close", None) or getattr(self.writer, "finish", None)
        if closer is not None:
            closer()


def make_tracker(report_to: str, run_dir: Path, *, config: dict[str, Any] | None = None) -> MetricsTracker | None:
    """``--report-to``: 'none', 'tensorboard' (event files in DIR/tensorboard) or 'wandb' (if installed)."""
    if report_to in ("", "none"):
        return None
    if report_to == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "invalid config key 'report-to': 'tensorboard' needs tensorboard (pip install -e '.[track]')"
            ) from None
        return MetricsTracker(SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard")))
    if report_to == "wandb":
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "invalid config key 'report-to': 'wandb' needs the wandb package (pip install wandb)"
            ) from None
        return MetricsTracker(wandb.init(project="popri", dir=str(run_dir), config=config or {}))
    raise ConfigError(f"invalid config key 'report-to': use 'none', 'tensorboard' or 'wandb', got {report_to!r}")
