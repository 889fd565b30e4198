"""Flower's configuration syntax: ``key=value`` overrides (TOML scalars), a device's ``--node-config``, and the
``[superlink.NAME]`` connections in the ``flwr`` CLI's ``config.toml``."""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deploy.errors import DeployError


def toml_value(value: Any) -> str:
    """One value in the ``key=value`` syntax of ``flwr run -c`` and ``--node-config`` (TOML scalars)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if value is None:
        return "''"
    text = str(value)
    if "'" not in text and "\n" not in text:
        return f"'{text}'"
    if '"' not in text and "\\" not in text and "\n" not in text:
        return f'"{text}"'
    raise DeployError(f"value {text!r} cannot be passed on Flower's command line (it has both quote kinds)")


def key_values(mapping: Mapping[str, Any]) -> str:
    """``{"rounds": 2, "data-path": "/x"}`` -> ``rounds=2 data-path='/x'`` (Flower's override syntax)."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in mapping.items())


def node_config(data_path: Path, cache_dir: Path, extra: Mapping[str, Any] | None = None) -> str:
    """The ``--node-config`` of a device: its own private data file and the folder that caches its embeddings.

    Both are absolute, because the ClientApp runs with the SuperNode's working directory.
    """
    data_path, cache_dir = Path(data_path).absolute(), Path(cache_dir).absolute()
    return key_values({"data-path": str(data_path), "cache-dir": str(cache_dir), **(extra or {})})


def flwr_home(env: Mapping[str, str] | None = None) -> Path:
    """The ``flwr`` CLI's folder: ``$FLWR_HOME`` or ``~/.flwr``."""
    env = os.environ if env is None else env
    return Path(env.get("FLWR_HOME") or Path.home() / ".flwr")


_FLWR_CONFIG_HEADER = (
    '[superlink]\ndefault = "local"\n\n[superlink.supergrid]\naddress = "api.flower.ai"\n\n'
    '[superlink.local]\naddress = ":local:"\n'
)


def write_federation(home: Path, name: str, address: str, root_certificates: Path) -> Path:
    """Add or replace ``[superlink.NAME]`` (address + CA certificate) in ``HOME/config.toml``; other entries stay."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise DeployError(f"federation name {name!r}: use letters, digits, '_' or '-'")
    path = Path(home) / "config.toml"
    text = path.read_text() if path.exists() else _FLWR_CONFIG_HEADER
    block = (
        f"[superlink.{name}]\naddress = {json.dumps(address)}\n"
        f"root-certificates = {json.dumps(str(Path(root_certificates).absolute()))}\n"
    )
    header = re.compile(rf"^\[superlink\.{re.escape(name)}\]\s*$", re.M)
    found = header.search(text)
    if found:
        nxt = re.compile(r"^\[", re.M).search(text, found.end())
        end = nxt.start() if nxt else len(text)
        text = text[: found.start()] + block + ("\n" if nxt else "") + text[end:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    tomllib.loads(text)  # never leave a broken file behind
    from popri.checkpoint import atomic_write_text  # inside: popri.checkpoint loads torch, deploy stays light

    atomic_write_text(path, text)
    return path
