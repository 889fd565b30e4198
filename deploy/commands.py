"""The command lines of a federation: ``flower-superlink``, ``flower-supernode``, ``flwr supernode register``,
``flwr run`` and ``flwr ls``, and the JSON that the ``flwr`` CLI prints."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from deploy.certs import Certificates
from deploy.environment import executable
from deploy.errors import DeployError
from deploy.flower_config import key_values, node_config

DEFAULT_FEDERATION = "popri"
DEFAULT_SUPERLINK_PORT = 8000  # Flower 1.42: one HTTPS port serves the Fleet, Control and Runtime APIs
DEFAULT_SUPERNODE_PORT = 9094  # a SuperNode's local Runtime API (one per SuperNode on a host)


def superlink_command(
    certs: Certificates,
    database: Path,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_SUPERLINK_PORT,
    extra: Sequence[str] = (),
) -> list[str]:
    """``flower-superlink`` with TLS, SuperNode authentication, a database and no runtime dependency installation."""
    return [
        executable("flower-superlink"),
        "--ssl-ca-certfile",
        str(certs.ca_cert.absolute()),
        "--ssl-certfile",
        str(certs.server_cert.absolute()),
        "--ssl-keyfile",
        str(certs.server_key.absolute()),
        "--enable-supernode-auth",
        "--database",
        str(Path(database).absolute()),
        "--disable-runtime-dependency-installation",
        "--host",
        host,
        "--port",
        str(port),
        *extra,
    ]


def supernode_command(
    *,
    superlink: str,
    root_certificates: Path,
    private_key: Path,
    data_path: Path,
    cache_dir: Path,
    port: int = DEFAULT_SUPERNODE_PORT,
    extra_node_config: Mapping[str, Any] | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """``flower-supernode`` for one device: TLS to the SuperLink, its registered key, its own data file."""
    return [
        executable("flower-supernode"),
        "--superlink",
        superlink,
        "--root-certificates",
        str(Path(root_certificates).absolute()),
        "--auth-supernode-private-key",
        str(Path(private_key).absolute()),
        "--port",
        str(port),
        "--node-config",
        node_config(data_path, cache_dir, extra_node_config),
        *extra,
    ]


def register_command(public_key: Path, federation: str = DEFAULT_FEDERATION) -> list[str]:
    """``flwr supernode register``: allow a SuperNode's public key on the SuperLink (prints its node id)."""
    return [
        executable("flwr"),
        "supernode",
        "register",
        str(Path(public_key).absolute()),
        federation,
        "--format",
        "json",
    ]


def run_command(
    app: Path, federation: str = DEFAULT_FEDERATION, overrides: Mapping[str, Any] | None = None, *, stream: bool = False
) -> list[str]:
    """``flwr run APP FEDERATION -c "k=v ..." --format json`` (``--stream`` follows the logs instead)."""
    argv = [executable("flwr"), "run", str(app), federation]
    if overrides:
        argv += ["-c", key_values(overrides)]
    return argv + (["--stream"] if stream else ["--format", "json"])


def list_runs_command(federation: str = DEFAULT_FEDERATION, run_id: int | None = None) -> list[str]:
    """``flwr ls`` as JSON (the only reliable run status: ``flwr run`` exits 0 even when the run fails)."""
    argv = [executable("flwr"), "ls", federation, "--format", "json"]
    return argv + (["--run-id", str(run_id)] if run_id is not None else [])


def parse_json_output(text: str) -> Any:
    """The JSON object a ``flwr ... --format json`` command printed (ignoring any log lines around it)."""
    start = text.find("{")
    if start < 0:
        raise DeployError(f"no JSON in flwr output: {text.strip()[:500]!r}")
    obj, _ = json.JSONDecoder().raw_decode(text[start:])
    return obj
