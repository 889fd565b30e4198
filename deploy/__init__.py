"""Deployment tooling: from nothing to a running Flower federation of real devices (``popri deploy ...``).

It is not part of the core library: it writes files and builds and runs Flower's command lines
(``flower-superlink``, ``flower-supernode``, ``flwr``) and never imports Flower itself. One module per job:

    errors         DeployError
    environment    the environment of a Flower process, its console scripts, copy-pasteable shell lines
    certs          the CA and server certificate (TLS), the SuperNode key pairs (node authentication)
    flower_config  ``key=value`` overrides, a device's ``--node-config``, the flwr CLI's ``config.toml``
    app            the Flower app folder that ``flwr run`` submits
    commands       the command lines of the SuperLink, a SuperNode, ``flwr supernode register / run / ls``
    supervise      restarting a SuperNode the SuperLink refuses for a while after a crash
    runs           submitting a run and polling it until it is finished
    cli            ``add_subparser`` (registered by ``popri.cli``) and ``main`` (``python -m deploy``)

Everything lives under one folder (``--dir``, default ``./popri-deploy``)::

    certs/ca.crt ca.key server.pem server.key    the CA key stays with the operator; devices need ca.crt only
    keys/<node> <node>.pub                        a device needs its own private key only
    superlink/state.db flwr-home/                 SuperLink state (runs, registered nodes), installed apps
    nodes/<node>/flwr-home/ cache/                a SuperNode's installed apps and private-embedding cache
    app/                                          the Flower app that ``run`` submits (all popri config keys)

The names below are the public helpers, importable from the package (``deploy.write_certificates``); the CLI is
left out so that ``python -m deploy.cli`` does not import itself twice.
"""

from __future__ import annotations

from deploy.app import APP_PACKAGES, RUN_CONTROL_KEYS, app_config, write_app
from deploy.certs import (
    LOOPBACK_NAMES,
    Certificates,
    certificate_sans,
    san_entries,
    write_certificates,
    write_node_keys,
)
from deploy.commands import (
    DEFAULT_FEDERATION,
    DEFAULT_SUPERLINK_PORT,
    DEFAULT_SUPERNODE_PORT,
    list_runs_command,
    parse_json_output,
    register_command,
    run_command,
    superlink_command,
    supernode_command,
)
from deploy.environment import FLOWER_ENV, executable, flower_env, shell_line
from deploy.errors import DeployError
from deploy.flower_config import flwr_home, key_values, node_config, toml_value, write_federation
from deploy.runs import FINISHED, run_status, submit_run, wait_for_run
from deploy.supervise import supervise

__all__ = [
    "APP_PACKAGES",
    "DEFAULT_FEDERATION",
    "DEFAULT_SUPERLINK_PORT",
    "DEFAULT_SUPERNODE_PORT",
    "FINISHED",
    "FLOWER_ENV",
    "LOOPBACK_NAMES",
    "RUN_CONTROL_KEYS",
    "Certificates",
    "DeployError",
    "app_config",
    "certificate_sans",
    "executable",
    "flower_env",
    "flwr_home",
    "key_values",
    "list_runs_command",
    "node_config",
    "parse_json_output",
    "register_command",
    "run_command",
    "run_status",
    "san_entries",
    "shell_line",
    "submit_run",
    "superlink_command",
    "supernode_command",
    "supervise",
    "toml_value",
    "wait_for_run",
    "write_app",
    "write_certificates",
    "write_federation",
    "write_node_keys",
]
