"""Real deployment helpers: certificates, SuperNode keys, and the Flower command lines that run a federation.

``popri deploy ...`` takes a user from nothing to a running federation of real devices::

    popri deploy certs --host 192.168.1.10           # CA + server certificate (SAN: localhost, 127.0.0.1, the host)
    popri deploy keys node1 node2                    # one EC key pair per SuperNode (device)
    popri deploy superlink --host 0.0.0.0            # TLS + SuperNode auth + database, no runtime installs
    popri deploy register node1 node2                # register the SuperNodes' public keys with the SuperLink
    popri deploy supernode node1 --superlink 192.168.1.10:8000 --data /abs/private.jsonl   # on each device
    popri deploy run --set rounds=6                  # submit the run, wait for it, exit 1 if it failed

Everything lives under one folder (``--dir``, default ``./popri-deploy``)::

    certs/ca.crt ca.key server.pem server.key    the CA key stays with the operator; devices need ca.crt only
    keys/<node> <node>.pub                        a device needs its own private key only
    superlink/state.db flwr-home/                 SuperLink state (runs, registered nodes), installed apps
    nodes/<node>/flwr-home/ cache/                a SuperNode's installed apps and private-embedding cache
    app/                                          the Flower app that ``run`` submits (all popri config keys)

This module never imports Flower: it writes files (with ``cryptography``, a Flower dependency) and builds and runs the
``flower-superlink``, ``flower-supernode`` and ``flwr`` command lines. Every command accepts ``--print`` to show the
command (with its environment) instead of running it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import ipaddress
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from popri.config import ConfigError, RunConfig, config_from_flat, config_to_flat, known_keys

logger = logging.getLogger(__name__)

DEFAULT_DIR = "popri-deploy"
DEFAULT_FEDERATION = "popri"
DEFAULT_SUPERLINK_PORT = 8000  # Flower 1.42: one HTTPS port serves the Fleet, Control and Runtime APIs
DEFAULT_SUPERNODE_PORT = 9094  # a SuperNode's local Runtime API (one per SuperNode on a host)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
APP_PACKAGES = ("popri", "server", "client")  # what the ServerApp and ClientApp import
RUN_CONTROL_KEYS = {"resume": False, "progress": False}  # read by server.app.run_options, not popri.config
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    # Every host is pre-installed: never let the SuperLink `uv sync` the app's dependencies from PyPI at run time.
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
FINISHED = "finished"


class DeployError(RuntimeError):
    """A deployment step that cannot go on; the message says what to do."""


# -- environment and executables --------------------------------------------------------------------------------


def flower_env(
    flwr_home: Path | None = None, *, base: Mapping[str, str] | None = None, poll_interval: float | None = None
) -> dict[str, str]:
    """The environment for a Flower process: ``base`` (default ``os.environ``) + :data:`FLOWER_ENV` + FLWR_HOME.

    ``poll_interval`` sets ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (seconds, Flower's default 1.0): a SuperExec that
    polls faster starts the ServerApp / ClientApp sooner. This environment's ``bin`` folder goes first on PATH,
    because the SuperLink and SuperNode start ``flower-superexec`` (and it ``flwr-serverapp`` / ``flwr-clientapp``)
    by name: without it a non-activated virtual environment fails with "No such file: 'flower-superexec'".
    """
    env = dict(os.environ if base is None else base)
    env.update(FLOWER_ENV)
    bin_dir = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if bin_dir not in path.split(os.pathsep):
        env["PATH"] = bin_dir + (os.pathsep + path if path else "")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(Path(flwr_home).absolute())
    if poll_interval is not None:
        env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = f"{poll_interval:g}"
    return env


def executable(name: str) -> str:
    """A console script of this environment (next to the running Python), else the one on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"'{name}' not found: install flwr==1.42.0 in this environment (pip install -e .)")
    return found


def _quote(arg: str) -> str:
    """Shell quoting that stays readable for ``key='value'`` arguments (double quotes when that is safe)."""
    quoted = shlex.quote(arg)
    if quoted != arg and "'" in arg and not any(c in arg for c in '"$`\\!'):
        return f'"{arg}"'
    return quoted


def shell_line(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """``argv`` as one copy-pasteable shell line, prefixed by the variables that differ from ``os.environ``."""
    prefix = []
    path = os.environ.get("PATH", "")
    for key, value in sorted((env or {}).items()):
        if os.environ.get(key) == value:
            continue
        if key == "PATH" and path and value.endswith(os.pathsep + path) and '"' not in value:
            prefix.append(f'PATH="{value[: -len(path)]}$PATH"')  # flower_env put the venv's bin first
        else:
            prefix.append(f"{key}={_quote(value)}")
    return " ".join([*prefix, *(_quote(str(a)) for a in argv)])


# -- certificates and keys ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    """The TLS files of a deployment (``certs/`` under the deployment folder)."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    def exist(self) -> bool:
        return all(p.exists() for p in (self.ca_cert, self.server_cert, self.server_key))


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret file readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def san_entries(hosts: Sequence[str] = ()) -> list[str]:
    """Subject alternative names: the loopback names plus each host (IP addresses as IP, others as DNS names).

    ``0.0.0.0`` and ``::`` are bind addresses, not addresses a SuperNode dials, so they are refused.
    """
    names: list[str] = []
    for host in (*LOOPBACK_NAMES, *hosts):
        host = host.strip().strip("[]")
        if not host:
            continue
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?", host):
                raise DeployError(f"--host {host!r} is neither an IP address nor a DNS name") from None
            entry = f"DNS:{host.lower()}"
        else:
            if ip.is_unspecified:
                raise DeployError(
                    f"--host {host}: give the address the SuperNodes dial (e.g. the machine's LAN IP or DNS name); "
                    f"{host} is only what the SuperLink binds to"
                )
            entry = f"IP:{ip}"
        if entry not in names:
            names.append(entry)
    return names


def write_certificates(
    directory: Path, hosts: Sequence[str] = (), *, days: int = 365, overwrite: bool = False
) -> Certificates:
    """A self-signed CA and a server certificate it signs, valid for the loopback names and ``hosts``.

    RSA-2048 keys, SHA-256 signatures; the private keys are written with mode 0600. Existing files are kept unless
    ``overwrite`` (a new CA would invalidate the ``ca.crt`` already copied to the devices).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    certs = Certificates(Path(directory))
    if certs.exist() and not overwrite:
        raise DeployError(f"{certs.directory} already holds certificates; pass --overwrite to replace them")
    sans = san_entries(hosts)
    alt_names: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address(v[3:])) if v.startswith("IP:") else x509.DNSName(v[4:]) for v in sans
    ]
    now = dt.datetime.now(dt.UTC)
    valid_from, valid_to = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "popri deployment CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_to)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (list(hosts) or ["localhost"])[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_to)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=True,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    pem_key = {
        "encoding": serialization.Encoding.PEM,
        "format": serialization.PrivateFormat.TraditionalOpenSSL,
        "encryption_algorithm": serialization.NoEncryption(),
    }
    certs.directory.mkdir(parents=True, exist_ok=True)
    _write_private(certs.ca_key, ca_key.private_bytes(**pem_key))
    _write_private(certs.server_key, server_key.private_bytes(**pem_key))
    certs.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    certs.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    logger.info("wrote %s (SAN %s)", certs.directory, ", ".join(sans))
    return certs


def certificate_sans(cert_path: Path) -> list[str]:
    """The subject alternative names of a PEM certificate, as ``DNS:name`` / ``IP:addr``."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [f"DNS:{n}" for n in ext.get_values_for_type(x509.DNSName)] + [
        f"IP:{ip}" for ip in ext.get_values_for_type(x509.IPAddress)
    ]


def write_node_keys(directory: Path, name: str, *, overwrite: bool = False) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format (what ``ssh-keygen -t ecdsa -b 384`` writes), for SuperNode auth.

    Returns ``(private, public)``: ``directory/name`` (mode 0600, stays on the device) and ``directory/name.pub``
    (given to ``flwr supernode register``).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise DeployError(f"node name {name!r}: use letters, digits, '.', '_' or '-'")
    private, public = Path(directory) / name, Path(directory) / f"{name}.pub"
    if private.exists() and not overwrite:
        raise DeployError(f"{private} exists; a registered key must not be replaced silently (pass --overwrite)")
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        + f" popri-{name}\n".encode()
    )
    return private, public


# -- command lines -----------------------------------------------------------------------------------------------


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


def supervise(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    retry_for: float,
    backoff: float = 3.0,
    healthy_after: float = 60.0,
) -> int:
    """Run ``argv`` and restart it after a failure, until it has failed for ``retry_for`` seconds in a row.

    Why a SuperNode needs this: after a crash (power loss, ``kill -9``) the SuperLink keeps the node "online" until
    two heartbeats are missed (up to 60 s) and refuses to activate the same node id again before that; Flower's
    SuperNode then exits (code 305, "Failed to activate SuperNode") instead of retrying. A child that ran for
    ``healthy_after`` seconds resets the clock. SIGINT / SIGTERM are passed on to the child and end the loop.
    Returns the child's last exit code.
    """
    import signal

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
            started = time.monotonic()
            child.append(subprocess.Popen(list(argv), env=dict(env)))
            code = child[-1].wait()
            child.pop(0)
            now = time.monotonic()
            if stopping or code == 0:
                return code
            if failing_since is None or now - started >= healthy_after:
                failing_since = now  # a first failure, or one after a healthy run: the clock starts now
            if now - failing_since >= retry_for:
                logger.error("%s kept failing for %.0fs (exit %d); giving up", Path(argv[0]).name, retry_for, code)
                return code
            logger.warning("%s exited with %d; restarting in %.0fs", Path(argv[0]).name, code, backoff)
            time.sleep(backoff)
            if stopping:
                return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- the Flower configuration (connections used by the flwr CLI) -------------------------------------------------


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
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# -- the Flower app that is submitted ----------------------------------------------------------------------------


def app_config(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every popri config key with its default (None as ''), the run-control keys, then ``overrides`` (validated).

    With all keys declared in ``[tool.flwr.app.config]``, ``flwr run -c "key=value"`` can set any of them (Flower
    refuses an override of an undeclared key).
    """
    flat: dict[str, Any] = {k: ("" if v is None else v) for k, v in config_to_flat(RunConfig()).items()}
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
    (directory / "pyproject.toml").write_text("\n".join(lines) + "\n")
    tomllib.loads((directory / "pyproject.toml").read_text())
    return directory


# -- submitting and watching runs --------------------------------------------------------------------------------


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


# -- the `popri deploy` command ----------------------------------------------------------------------------------


def _out(text: str) -> None:
    """CLI output (the handlers talk to the user; the library functions above only log)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except the empty ones (None / False) that the help text already explains."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS) or action.default == []:
            return action.help
        return super()._get_help_string(action)


def _parse_sets(items: Sequence[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> a dict with TOML-typed values (``rounds=2`` is an int, ``data=x.jsonl`` a str)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        out[key.strip()] = value
    return out


def _exec_or_print(argv: list[str], env: dict[str, str], args: argparse.Namespace) -> int:
    """Print the command (``--print``) or replace this process with it, so signals go straight to Flower."""
    _out(shell_line(argv, env))
    if args.print_only:
        return 0
    os.execvpe(argv[0], argv, env)  # does not return


def _dir(args: argparse.Namespace) -> Path:
    return Path(args.dir).absolute()


def _cmd_certs(args: argparse.Namespace) -> int:
    certs = write_certificates(_dir(args) / "certs", args.host, days=args.days, overwrite=args.overwrite)
    _out(f"wrote {certs.directory}/: ca.crt ca.key server.pem server.key")
    _out(f"server certificate valid for: {', '.join(certificate_sans(certs.server_cert))}")
    _out(f"copy {certs.ca_cert} (never ca.key) to every device")
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    for name in args.names:
        private, public = write_node_keys(_dir(args) / "keys", name, overwrite=args.overwrite)
        _out(f"{name}: private key {private} (copy to that device only), public key {public}")
    _out(f"next: popri deploy register {' '.join(args.names)}   (once the SuperLink runs)")
    return 0


def _superlink_address(host: str, port: int) -> str:
    """The address the local flwr CLI dials for a SuperLink bound to ``host``."""
    dial = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"[{dial}]:{port}" if ":" in dial else f"{dial}:{port}"


def _cmd_federation(args: argparse.Namespace) -> int:
    ca = Path(args.ca or _dir(args) / "certs" / "ca.crt")
    path = write_federation(flwr_home(), args.federation, args.address, ca)
    _out(f"{path}: [superlink.{args.federation}] address={args.address} root-certificates={ca.absolute()}")
    return 0


def _cmd_superlink(args: argparse.Namespace) -> int:
    root = _dir(args)
    certs = Certificates(root / "certs")
    if not certs.exist():
        raise DeployError(f"no certificates in {certs.directory}: run `popri deploy certs --dir {root}` first")
    state = root / "superlink"
    state.mkdir(parents=True, exist_ok=True)
    if not args.print_only and not args.no_federation:
        address = _superlink_address(args.host, args.port)
        path = write_federation(flwr_home(), args.federation, address, certs.ca_cert)
        _out(f"# flwr connection '{args.federation}' -> {address} written to {path}")
    env = flower_env(state / "flwr-home", poll_interval=args.poll_interval)
    argv = superlink_command(certs, state / "state.db", host=args.host, port=args.port)
    return _exec_or_print(argv, env, args)


def _cmd_register(args: argparse.Namespace) -> int:
    env = flower_env()
    for name in args.names:
        public = _dir(args) / "keys" / f"{name}.pub"
        argv = register_command(public, args.federation)
        _out(shell_line(argv))
        if args.print_only:
            continue
        if not public.exists():
            raise DeployError(f"{public} does not exist: run `popri deploy keys {name}` first")
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        try:
            out = parse_json_output(proc.stdout)
        except DeployError:
            out = {"success": False, "error": (proc.stdout + proc.stderr).strip()[-1000:]}
        if not out.get("success", False):
            _err(f"{name}: registration failed: {out}")
            return 1
        _out(f"{name}: registered as node {out.get('node-id')}")
    return 0


def _cmd_supernode(args: argparse.Namespace) -> int:
    root = _dir(args)
    node_dir = root / "nodes" / args.name
    data = Path(args.data).absolute()
    if not args.print_only and not data.is_file():
        raise DeployError(f'--data {data}: no such file (one JSON object per line: {{"user": ..., "text": ...}})')
    argv = supernode_command(
        superlink=args.superlink,
        root_certificates=Path(args.ca or root / "certs" / "ca.crt"),
        private_key=Path(args.key or root / "keys" / args.name),
        data_path=data,
        cache_dir=Path(args.cache_dir or node_dir / "cache"),
        port=args.port,
    )
    env = flower_env(node_dir / "flwr-home", poll_interval=args.poll_interval)
    if args.retry_for <= 0 or args.print_only:
        return _exec_or_print(argv, env, args)
    _out(shell_line(argv, env))
    return supervise(argv, env, retry_for=args.retry_for)


def _cmd_app(args: argparse.Namespace) -> int:
    out = write_app(Path(args.out or _dir(args) / "app"), _parse_sets(args.set))
    _out(f'wrote the Flower app to {out}: flwr run {out} <federation> -c "key=value ..." sets any popri key')
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    overrides = _parse_sets(args.set)
    if args.app:
        app = Path(args.app)
    else:
        app = write_app(_dir(args) / "app")
    if args.resume:
        overrides["resume"] = True
    argv = run_command(app, args.federation, overrides)
    _out(shell_line(argv))
    if args.print_only:
        return 0
    env = flower_env()
    run_id = submit_run(app, args.federation, overrides, env=env)
    _out(f"run {run_id} submitted; follow it with: flwr log {run_id} {args.federation} --stream")
    if args.no_wait:
        return 0
    status = wait_for_run(args.federation, run_id, timeout=args.timeout, env=env)
    _out(f"run {run_id}: {status}")
    return 0 if status == f"{FINISHED}:completed" else 1


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``deploy`` and its sub-commands on an argparse subparsers object; handlers are ``args.func(args)``."""
    parser = subparsers.add_parser(
        "deploy",
        help="real deployment: certificates, keys, SuperLink, SuperNodes, runs (Flower, TLS + node auth)",
        description=__doc__.split("\n\n")[0] + " See docs/deployment.md.",
    )
    sub = parser.add_subparsers(dest="deploy_command", required=True, metavar="STEP")
    fmt = _HelpFormatter

    def step(name: str, help_text: str, func: Any, *, runs: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=fmt)
        p.add_argument("--dir", default=DEFAULT_DIR, help="deployment folder (certs/, keys/, superlink/, nodes/, app/)")
        if runs:
            p.add_argument(
                "--print",
                dest="print_only",
                action="store_true",
                help="print the command (with its environment) instead of running it",
            )
        p.set_defaults(func=_guarded(func))
        return p

    p = step("certs", "write a CA and a TLS server certificate for the SuperLink", _cmd_certs, runs=False)
    p.add_argument(
        "--host",
        action="append",
        default=[],
        help="an IP address or DNS name the SuperNodes dial (repeatable; localhost/127.0.0.1 always)",
    )
    p.add_argument("--days", type=int, default=365, help="validity in days")
    p.add_argument("--overwrite", action="store_true", help="replace existing certificates")

    p = step("keys", "write an EC key pair per SuperNode (for node authentication)", _cmd_keys, runs=False)
    p.add_argument("names", nargs="+", metavar="NODE", help="node names, e.g. node1 node2")
    p.add_argument("--overwrite", action="store_true", help="replace existing keys")

    p = step("federation", "add the SuperLink connection to the flwr CLI's config.toml", _cmd_federation, runs=False)
    p.add_argument("--address", required=True, help="HOST:PORT of the SuperLink, as this machine reaches it")
    p.add_argument("--ca", help="CA certificate (default DIR/certs/ca.crt)")
    p.add_argument("--federation", default=DEFAULT_FEDERATION, help="connection name used by flwr")

    p = step("superlink", "start the SuperLink: TLS, SuperNode auth, database, no runtime installs", _cmd_superlink)
    p.add_argument("--host", default="127.0.0.1", help="bind address; 0.0.0.0 for real devices on the network")
    p.add_argument(
        "--port", type=int, default=DEFAULT_SUPERLINK_PORT, help="the one HTTPS port (Fleet, Control and Runtime APIs)"
    )
    p.add_argument("--federation", default=DEFAULT_FEDERATION, help="flwr connection name written to config.toml")
    p.add_argument("--no-federation", action="store_true", help="do not touch the flwr CLI's config.toml")
    p.add_argument("--poll-interval", type=float, default=0.5, help="SuperExec task poll interval (s)")

    p = step("register", "register SuperNode public keys with the running SuperLink", _cmd_register)
    p.add_argument("names", nargs="+", metavar="NODE", help="node names (DIR/keys/NODE.pub)")
    p.add_argument("--federation", default=DEFAULT_FEDERATION, help="flwr connection name")

    p = step("supernode", "start a SuperNode on a device, with its own private data file", _cmd_supernode)
    p.add_argument("name", metavar="NODE", help="node name (its key is DIR/keys/NODE unless --key)")
    p.add_argument("--superlink", default=f"127.0.0.1:{DEFAULT_SUPERLINK_PORT}", help="SuperLink HOST:PORT")
    p.add_argument("--data", required=True, help='private data: JSONL, one {"user": ..., "text": ...} per line')
    p.add_argument("--cache-dir", help="private embedding cache on this device (default DIR/nodes/NODE/cache)")
    p.add_argument("--ca", help="CA certificate (default DIR/certs/ca.crt)")
    p.add_argument("--key", help="this node's private key (default DIR/keys/NODE)")
    p.add_argument(
        "--port",
        type=int,
        default=DEFAULT_SUPERNODE_PORT,
        help="local Runtime API port (unique per SuperNode on one machine)",
    )
    p.add_argument("--poll-interval", type=float, default=0.5, help="SuperExec task poll interval (s)")
    p.add_argument(
        "--retry-for",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="restart the SuperNode after a failure for up to this long (after a crash the SuperLink "
        "refuses the node for up to 60 s; 120 rides that out); 0 runs it once",
    )

    p = step("app", "write the Flower app folder that declares every popri config key", _cmd_app, runs=False)
    p.add_argument("--out", help="app folder (default DIR/app)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="change a default (repeatable)")

    p = step("run", "submit a POPri run, wait for it and report its status (exit 1 unless completed)", _cmd_run)
    p.add_argument("--federation", default=DEFAULT_FEDERATION, help="flwr connection name")
    p.add_argument("--app", help="a Flower app folder (default: write DIR/app with every popri config key)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="run config, e.g. --set rounds=6 --set output=/abs/runs/x (repeatable)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in 'output' from its last checkpoint")
    p.add_argument("--no-wait", action="store_true", help="return once the run is submitted")
    p.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds to wait for the run")
    return parser


def _guarded(func: Any) -> Any:
    """Turn a :class:`DeployError` into a message and exit code 1 (the CLI shows no traceback for user errors)."""

    def handler(args: argparse.Namespace) -> int:
        try:
            return int(func(args) or 0)
        except DeployError as err:
            _err(f"popri deploy: {err}")
            return 1

    return handler


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m popri.deploy STEP ...``: the same as ``popri deploy STEP ...``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="popri")
    sub = parser.add_subparsers(dest="command", required=True)
    add_subparser(sub)
    args = parser.parse_args(["deploy", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args))
    except ConfigError as err:
        _err(f"popri: {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
