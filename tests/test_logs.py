"""The console shows popri's lines and real warnings; third-party noise goes to the log file only; trackers."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest

from popri.config import ConfigError
from popri.logs import (
    CONSOLE_NOISE,
    ConsoleFilter,
    MetricsTracker,
    attach_log_file,
    detach_log_file,
    flat_metrics,
    make_tracker,
    setup_logging,
)

NOISE = {
    "py.warnings": "/site-packages/transformers/modeling_utils.py:3312: FutureWarning: `is_gradient_checkpointing` "
    "is deprecated and will be removed in v6.",
    "alembic.runtime.plugins": "setup plugin alembic.autogenerate.schemas",
    "ray": "Tip: In future versions of Ray, Ray will no longer override accelerator visible devices env var",
}


@pytest.fixture
def clean_logging():
    """Put the process-wide logging state back after a test that configures it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    names = ("flwr", "transformers", "datasets", "sentence_transformers", "httpx", "urllib3", "filelock")
    levels = {n: (logging.getLogger(n).level, logging.getLogger(n).propagate) for n in names}
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)
    for n, (lvl, propagate) in levels.items():
        logging.getLogger(n).setLevel(lvl)
        logging.getLogger(n).propagate = propagate
    logging.captureWarnings(False)


def _emit_noise_and_news() -> None:
    for name, message in NOISE.items():
        logging.getLogger(name).log(logging.WARNING if name != "alembic.runtime.plugins" else logging.INFO, message)
    logging.getLogger("popri.rounds").info("round 1/6: epsilon=2.1 pairs=32")
    logging.getLogger("peft.tuners").warning("adapter weights do not match the base")


def test_third_party_noise_stays_off_the_console_but_is_kept_in_the_log_file(clean_logging, capsys, tmp_path):
    # Prepare
    setup_logging()
    handler = attach_log_file(tmp_path / "run.log")

    # Execute
    _emit_noise_and_news()
    detach_log_file(handler)

    # Assert
    console, log = capsys.readouterr().err, (tmp_path / "run.log").read_text()
    assert "round 1/6: epsilon=2.1" in console
    assert "adapter weights do not match the base" in console  # a real warning of another library still shows
    for message in NOISE.values():
        assert message not in console
        assert message in log
    assert "round 1/6" in log


def test_python_warnings_are_captured_into_the_log_file(clean_logging, capsys, tmp_path):
    # Prepare
    setup_logging()
    handler = attach_log_file(tmp_path / "run.log")

    # Execute: what warnings.warn hands to the handler once logging captures warnings
    warnings.showwarning("`past_key_values` is deprecated, use `cache`", FutureWarning, "generation/utils.py", 666)
    warnings.showwarning("a library's own warning", UserWarning, "lib.py", 1)
    detach_log_file(handler)

    # Assert
    console, log = capsys.readouterr().err, (tmp_path / "run.log").read_text()
    assert "past_key_values" not in console and "past_key_values" in log
    assert "a library's own warning" in console


def test_verbose_shows_everything_on_the_console(clean_logging, capsys):
    # Prepare
    setup_logging(verbose=True)

    # Execute
    _emit_noise_and_news()

    # Assert
    console = capsys.readouterr().err
    for message in NOISE.values():
        assert message in console


def test_setting_up_twice_prints_each_line_once(clean_logging, capsys):
    # Prepare
    setup_logging()
    setup_logging()

    # Execute
    logging.getLogger("popri").info("only once")

    # Assert
    assert capsys.readouterr().err.count("only once") == 1


def test_flowers_run_simulation_notice_is_dropped_and_its_other_warnings_kept():
    # Prepare
    console = ConsoleFilter()
    notice = logging.LogRecord(
        "flwr", logging.WARNING, "", 0, "DEPRECATED FEATURE: The `run_simulation` function is deprecated", None, None
    )
    other = logging.LogRecord("flwr", logging.WARNING, "", 0, "node 3 did not reply", None, None)

    # Execute
    shown = [console.filter(notice), console.filter(other), ConsoleFilter(verbose=True).filter(notice)]

    # Assert
    assert shown == [False, True, True]
    assert any("run_simulation" in n for n in CONSOLE_NOISE)


def test_the_simulation_launcher_filters_flowers_own_console_handler():
    # Prepare
    from flwr.supercore.logger import console_handler

    from server.simulation import _quiet_flower_console

    notice = logging.LogRecord(
        "flwr", logging.WARNING, "", 0, "DEPRECATED FEATURE: The `run_simulation` function is deprecated", None, None
    )

    # Execute
    added = _quiet_flower_console(verbose=False)
    try:
        passes = console_handler.filter(notice)
    finally:
        console_handler.removeFilter(added)

    # Assert
    assert not passes
    assert console_handler.filter(notice)  # removed again: nothing leaks into other Flower users


def test_sampling_shows_progress_in_samples_and_no_bar_for_a_single_batch(capsys, tiny_model_dir):
    # Prepare
    import torch
    from transformers import AutoModelForCausalLM

    from popri.assets import load_tokenizer
    from popri.generation import sample_completions

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    common = {"samples_per_prompt": 2, "max_new_tokens": 3, "token_budget": 8, "progress": True, "desc": "gen"}

    # Execute
    sample_completions(model, tokenizer, ["a", "b"], batch_size=2, generator=torch.Generator().manual_seed(0), **common)
    single = capsys.readouterr().err
    sample_completions(model, tokenizer, ["a", "b"], batch_size=1, generator=torch.Generator().manual_seed(0), **common)
    several = capsys.readouterr().err

    # Assert
    assert "gen" not in single
    assert "/4 [" in several and "sample/s" in several  # a bar over 2 prompts x 2 samples, counted in samples


class _Scalars:
    def __init__(self) -> None:
        self.rows: list[tuple[str, float, int]] = []
        self.closed = False

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.rows.append((tag, value, step))

    def close(self) -> None:
        self.closed = True


class _Run:
    def __init__(self) -> None:
        self.logged: list[tuple[dict, int]] = []

    def log(self, metrics: dict, step: int) -> None:
        self.logged.append((metrics, step))


RECORD = {
    "round": 3,
    "users_sampled": 9,
    "replies": 2,
    "pairs": 32,
    "privacy/epsilon": 4.2,
    "dpo/loss": 0.61,
    "control": False,
    "seconds": {"generate": 21.0, "dpo": 18.5},
}


def test_trackers_get_the_rounds_jsonl_keys_at_the_round_step_and_no_user_count():
    # Prepare
    scalars, run = _Scalars(), _Run()

    # Execute
    for writer in (scalars, run):
        tracker = MetricsTracker(writer)
        tracker.log(RECORD)
        tracker.close()

    # Assert
    expected = {"replies": 2.0, "pairs": 32.0, "privacy/epsilon": 4.2, "dpo/loss": 0.61}
    expected |= {"seconds/generate": 21.0, "seconds/dpo": 18.5}
    assert {tag: value for tag, value, _ in scalars.rows} == expected
    assert {step for _, _, step in scalars.rows} == {3}
    assert scalars.closed
    assert run.logged == [(expected, 3)]
    assert "users_sampled" not in flat_metrics(RECORD)


def test_make_tracker_refuses_unknown_backends_and_says_what_to_install(tmp_path):
    # Execute / Assert
    assert make_tracker("none", tmp_path) is None
    with pytest.raises(ValueError, match="'tensorboard' or 'wandb'"):
        make_tracker("mlflow", tmp_path)
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"report-to.*needs tensorboard \(pip install"):
            make_tracker("tensorboard", tmp_path)
    else:
        tracker = make_tracker("tensorboard", tmp_path)
        assert tracker is not None
        tracker.log(RECORD)
        tracker.close()
        assert any(Path(tmp_path / "tensorboard").iterdir())


def test_transformers_own_handler_is_replaced_by_the_console_filter_and_the_file(clean_logging, capfd, tmp_path):
    # Prepare
    from transformers.utils import logging as hf_logging

    from popri.logs import route_transformers_logging

    setup_logging()
    route_transformers_logging()
    handler = attach_log_file(tmp_path / "run.log")

    # Execute
    try:
        hf_logging.get_logger("transformers.utils.generic").warning("`past_key_values` are deprecated, use `cache`")
        hf_logging.get_logger("transformers.modeling_utils").warning("some weights were not initialized")
    finally:
        detach_log_file(handler)
        hf_logging.disable_propagation()
        hf_logging.enable_default_handler()

    # Assert
    console, log = capfd.readouterr().err, (tmp_path / "run.log").read_text()
    assert "past_key_values" not in console and "past_key_values" in log
    assert "some weights were not initialized" in console
    assert "[transformers]" not in console


@pytest.mark.slow
def test_popri_run_on_ray_keeps_third_party_noise_off_the_console(tiny_model_dir, user_file, tmp_path):
    # Prepare: the real command, tiny settings, its own process (Ray, Flower and transformers configure logging)
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    sets = {
        "model": tiny_model_dir,
        "rejected-rank": 1,
        "max-new-tokens": 8,
        "initial-set-size": 4,
        "min-text-chars": 5,
        "cache-dir": tmp_path / "cache",
    }
    command = [sys.executable, "-m", "popri.cli", "run", "--output", str(out), "--data", str(user_file)]
    command += ["--rounds", "1", "--prompts", "2", "--samples-per-prompt", "2", "--final-samples", "2"]
    for key, value in sets.items():
        command += ["--set", f"{key}={value}"]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1"}

    # Execute
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1])

    # Assert
    assert done.returncode == 0, done.stderr[-3000:]
    console, log = done.stdout + done.stderr, (out / "run.log").read_text()
    noises = ("DEPRECATED FEATURE", "Tip: In future versions of Ray", "is_gradient_checkpointing", "[transformers]")
    for noise in noises:
        assert noise not in console, noise
    assert "ClientAppActor" not in console  # Ray's actor output is not forwarded
    assert "DEPRECATED FEATURE" in log
    assert "round 1/1" in console and "round 1/1" in log
    assert (out / "report.md").exists()
