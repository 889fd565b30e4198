"""The Flower app folder that ``flwr run`` submits: popri's ServerApp and ClientApp sources and a ``pyproject.toml``
that declares every popri config key."""

from __future__ import annotations

import importlib.util
import shutil
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deploy.errors import DeployError
from deploy.flower_config import toml_value
from popri.config import RUN_CONTROL_KEYS, ConfigError, RunConfig, config_from_flat, config_to_app_config, known_keys

APP_PACKAGES = ("popri", "server", "client")  # what the ServerApp and ClientApp import


def app_config(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every popri config key with its default (None as ''), the run-control keys, then ``overrides`` (validated).

    With all keys declared in ``[tool.flwr.app.config]``, ``flwr run -c "key=value"`` can set any of them (Flower
    refuses an override of an undeclared key).
    """
    flat: dict[str, Any] = dict(config_to_app_config(RunConfig()))
    flat.update(RUN_CONTROL_KEYS)
    for key, value in (overrides or {}).items():
        if key not in flat:
            known = ", ".join([*known_keys(), *RUN_CONTROL_KEYS])
            raise ConfigError(f"unknown config key '{key}'; known keys: {known}")
        flat[key] = "" if value is None else value
    config_from_flat({k: v for k, v in flat.items() if k not in RUN_CONTROL_KEYS})  # fail here, not on the server
    return flat


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DeployError(f"package '{name}' is not importable: pip install -e . in this environment")
    return Path(next(iter(spec.submodule_search_locations)))


def write_app(directory: Path, overrides: Mapping[str, Any] | None = None, *, version: str = "0.1.0") -> Path:
    """A Flower app folder for ``flwr run``: the installed ``popri``, ``server`` and ``client`` sources and a
    ``pyproject.toml`` that declares every config key (defaults from :class:`popri.config.RunConfig`).

    Only ``*.py`` files are copied: no data, no caches, no tests, so the bundle stays far below Flower's 10 MB cap.
    The folder is rewritten on each call.
    """
    directory = Path(directory)
    config = app_config(overrides)
    for package in APP_PACKAGES:
        source, target = _package_dir(package), directory / package
        if target.exists():
            shutil.rmtree(target)
        for path in sorted(source.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            dest = target / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
    lines = [
        "# Written by `popri deploy app`: the popri Flower app with every config key declared.",
        "[build-system]",
        'requires = ["setuptools>=68"]',
        'build-backend = "setuptools.build_meta"',
        "",
        "[project]",
        'name = "popri"',
        f'version = "{version}"',
        'requires-python = ">=3.11"',
        "# Pre-installed on every host (runtime dependency installation is off).",
        'dependencies = ["flwr==1.42.0"]',
        "",
        "[tool.flwr.app]",
        'publisher = "popri"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "server.app:app"',
        'clientapp = "client.app:app"',
        "",
        "[tool.flwr.app.config]",
        *(f"{k} = {toml_value(v)}" for k, v in config.items()),
    ]
    text = "\n".join(lines) + "\n"
    tomllib.loads(text)  # never leave a broken file behind
    from popri.checkpoint import atomic_write_text  # inside: popri.checkpoint loads torch, deploy stays light

    atomic_write_text(directory / "pyproject.toml", text)
    return directory
