"""Real deployment helpers: certificates, SuperNode keys, and the Flower command lines that run a federation.

``popri deploy ...`` (or ``python -m deploy ...``) takes a user from nothing to a running federation of real
devices::

    popri deploy certs --host 192.168.1.10           # CA + server certificate (SAN: localhost, 127.0.0.1, the host)
    popri deploy keys node1 node2                    # one EC key pair per SuperNode (device)
    popri deploy superlink --host 0.0.0.0            # TLS + SuperNode auth + database, no runtime installs
    popri deploy register node1 node2                # register the SuperNodes' public keys with the SuperLink
    popri deploy supernode node1 --superlink 192.168.1.10:8000 --data /abs/private.jsonl   # on each device
    popri deploy run --set rounds=6                  # submit the run, wait for it, exit 1 if it failed

This module only parses the command line and calls the helpers of the other ``deploy`` modules; every step accepts
``--print`` to show the command (with its environment) instead of running it where it starts a process.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deploy.app import write_app
from deploy.certs import Certificates, certificate_sans, write_certificates, write_node_keys
from deploy.commands import (
    DEFAULT_FEDERATION,
    DEFAULT_SUPERLINK_PORT,
    DEFAULT_SUPERNODE_PORT,
    parse_json_output,
    register_command,
    run_command,
    superlink_command,
    supernode_command,
)
from deploy.environment import flower_env, shell_line
from deploy.errors import DeployError
from deploy.flower_config import flwr_home, write_federation
from deploy.runs import FINISHED, submit_run, wait_for_run
from deploy.supervise import supervise
from popri.config import ConfigError, parse_assignments

DEFAULT_DIR = "popri-deploy"


def _out(text: str) -> None:
    """CLI output (the handlers talk to the user; the helpers in the other modules only log)."""
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
    """``KEY=VALUE`` strings -> typed values, through the schema's one parser (run-control keys allowed)."""
    return parse_assignments(items or [], run_control=True)


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
    """``python -m deploy STEP ...`` (or ``python -m deploy.cli``): the same as ``popri deploy STEP ...``."""
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
