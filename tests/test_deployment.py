"""The real deployment path on loopback: ``flower-superlink`` and ``flower-supernode`` processes with TLS from generated
certificates and SuperNode authentication, runs submitted with ``flwr run`` and checked with ``flwr ls``.

One federation (a SuperLink and two registered SuperNodes, each with its own private JSONL file) serves every test of
the module. The runs use the real default generator (SmolLM2) with tiny settings. Every process is started in its own
session and stopped by process id (its whole process tree, process group by process group) in the fixture teardown.

The fast tests at the end cover the helpers of the ``deploy`` package and the hostile-reply bound without any
process. No test bounds an elapsed time: the timings live in ``scripts/measure_deployment.py``, which prints them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

import deploy
from deploy.cli import add_subparser
from popri.privacy import compute_epsilon

FEDERATION = "popri-test"
POLL_INTERVAL = 0.1  # FLWR_SUPEREXEC_TASK_POLL_INTERVAL: start the ServerApp / ClientApp processes sooner
REPLY_TIMEOUT = 30.0  # the round deadline in the node-failure test; a healthy round collects in ~10-15 s here
TINY = {
    "rounds": 2,
    "prompts": 1,  # one preference pair per round: a single DPO step
    "samples-per-prompt": 2,
    "rejected-rank": 1,
    "max-new-tokens": 8,
    "initial-set-size": 4,
    "final-samples": 2,
    "batch-size": 2,
    "num-nodes": 2,
    "min-replies": 1,
    "epsilon": 7.0,
    "delta": 3e-6,
}
# One device = one user: each SuperNode gets its own file, as a phone or a hospital server would.
DEVICE_TEXTS = {
    "node1": ("alice", ["To be or not to be, that is the question.", "The lady doth protest too much, methinks."]),
    "node2": ("bob", ["Now is the winter of our discontent made glorious.", "A horse! my kingdom for a horse!"]),
}


# -- process handling --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants (a SuperExec runs in its own session, so groups alone miss it)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@dataclass
class Service:
    """A Flower process started by the test, in its own session, logging to a file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    members: dict[int, psutil.Process] = field(default_factory=dict)  # every process of the tree seen so far

    def start(self) -> Service:
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def _signal(self, sig: int) -> None:
        """Send ``sig`` to the process groups led by processes of this tree, then to each of them by id.

        Members are remembered as ``psutil.Process`` objects, which notice a reused process id, so a process that
        is gone is never mistaken for someone else's; a SuperExec (own session) is reached through the tree.
        """
        if self.proc is not None:
            self.members.update({p.pid: p for p in _tree(self.proc.pid)})
        live = [p for p in self.members.values() if p.is_running()]
        for proc in live:
            try:
                if os.getpgid(proc.pid) == proc.pid:  # a group leader: its whole group is ours
                    os.killpg(proc.pid, sig)
                proc.send_signal(sig)
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the whole tree (SuperLink + SuperExec + ServerApp, or SuperNode + SuperExec + ClientApp)."""
        assert self.proc is not None
        self._signal(sig)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM (children that watch their parent then exit on their own), then SIGKILL whatever is left."""
        if self.proc is None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
            time.sleep(0.5)
        except subprocess.TimeoutExpired:
            pass
        self._signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def clientapps(self) -> list[psutil.Process]:
        """Live ``flwr-clientapp`` processes under this SuperNode (one per message it is handling)."""
        if self.proc is None:
            return []
        live = []
        for proc in _tree(self.proc.pid)[1:]:
            try:
                if proc.status() != psutil.STATUS_ZOMBIE and "flwr-clientapp" in " ".join(proc.cmdline()):
                    live.append(proc)
            except psutil.NoSuchProcess:
                pass
        return live

    def text(self) -> str:
        return self.log.read_text(errors="replace")


class Federation:
    """A SuperLink with TLS + node auth and registered SuperNodes on loopback, and the flwr CLI pointed at it.

    The processes are started through ``python -m deploy`` (what ``popri deploy ...`` runs), in the folder
    layout it documents (``certs/``, ``keys/``, ``superlink/``, ``nodes/``, ``app/``).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.certs = deploy.write_certificates(root / "certs")
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.cli_env = deploy.flower_env(root / "cli-home", poll_interval=POLL_INTERVAL)
        self.app = deploy.write_app(root / "app")
        self.services: list[Service] = []
        self.superlink: Service | None = None
        self.nodes: dict[str, Service] = {}
        self.node_ids: dict[str, int] = {}

    def _service(self, name: str, step: list[str]) -> Service:
        """``python -m deploy STEP ... --dir ROOT`` as a service (a restart logs to a new file)."""
        argv = [
            sys.executable,
            "-m",
            "deploy",
            *step,
            "--dir",
            str(self.root),
            "--poll-interval",
            str(POLL_INTERVAL),
        ]
        starts = sum(s.name == name for s in self.services)
        service = Service(name, argv, self.cli_env, self.root / f"{name}-{starts}.log")
        self.services.append(service)
        return service

    def flwr(self, *args: str, timeout: float = 60) -> Any:
        proc = subprocess.run(
            [deploy.executable("flwr"), *args], env=self.cli_env, capture_output=True, text=True, timeout=timeout
        )
        return deploy.parse_json_output(proc.stdout)

    def start_superlink(self) -> Service:
        """Start (or restart) the SuperLink on its database; it also writes the flwr connection for the CLI."""
        step = ["superlink", "--port", str(self.port), "--federation", FEDERATION]
        superlink = self.superlink = self._service("superlink", step).start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return superlink
            assert superlink.proc is not None and superlink.proc.poll() is None, superlink.text()
            time.sleep(0.2)
        raise AssertionError(f"SuperLink not listening after 60 s:\n{superlink.text()}")

    def node_service(self, name: str, *, retry_for: float = 0.0) -> Service:
        """A SuperNode for device ``name``: its own data file and cache, its key ``keys/NAME``."""
        data = self.root / f"{name}.jsonl"
        if not data.exists():
            user, texts = DEVICE_TEXTS.get(name, ("mallory", ["Something is rotten in the state of Denmark."]))
            data.write_text("".join(json.dumps({"user": user, "text": t}) + "\n" for t in texts))
        if not (self.root / "keys" / name).exists():
            deploy.write_node_keys(self.root / "keys", name)
        step = ["supernode", name, "--superlink", self.address, "--data", str(data), "--port", str(_free_port())]
        return self._service(name, [*step, "--retry-for", str(retry_for)])

    def register(self, name: str) -> int:
        deploy.write_node_keys(self.root / "keys", name)
        argv = [sys.executable, "-m", "deploy", "register", name, "--dir", str(self.root)]
        proc = subprocess.run(
            [*argv, "--federation", FEDERATION], env=self.cli_env, capture_output=True, text=True, timeout=60
        )
        found = re.search(rf"{name}: registered as node (\d+)", proc.stdout)
        assert proc.returncode == 0 and found, proc.stdout + proc.stderr
        self.node_ids[name] = int(found.group(1))
        return self.node_ids[name]

    def online(self) -> dict[int, str]:
        """node id -> status, as the SuperLink reports it."""
        out = self.flwr("supernode", "list", FEDERATION, "--format", "json")
        return {int(n["node-id"]): n["status"] for n in out.get("nodes", [])}

    def wait_online(self, names: list[str], timeout: float = 90) -> None:
        wanted = {self.node_ids[n] for n in names}
        deadline = time.monotonic() + timeout
        status: dict[int, str] = {}
        while time.monotonic() < deadline:
            status = self.online()
            if all(status.get(i) == "online" for i in wanted):
                return
            time.sleep(1)
        logs = "\n".join(self.nodes[n].text()[-2000:] for n in names if n in self.nodes)
        raise AssertionError(f"nodes {names} not online after {timeout:.0f}s: {status}\n{logs}")

    def start_node(self, name: str) -> Service:
        """Start (or restart) a registered device; it retries while the SuperLink still holds its crashed self."""
        service = self.node_service(name, retry_for=150).start()
        self.nodes[name] = service
        return service

    def submit(self, output: Path, **overrides: Any) -> int:
        config = {**TINY, "output": str(output), **overrides}
        return deploy.submit_run(self.app, FEDERATION, config, env=self.cli_env, timeout=120)

    def wait(self, run_id: int, timeout: float = 300) -> str:
        return deploy.wait_for_run(FEDERATION, run_id, timeout=timeout, env=self.cli_env, poll=1.0)

    def run_log(self, run_id: int, *, tail: int | None = 6000) -> str:
        """The run's log as ``flwr log --show`` prints it (the ServerApp's popri lines included); the last ``tail``
        characters, or all of it with ``tail=None``."""
        proc = subprocess.run(
            [deploy.executable("flwr"), "log", str(run_id), FEDERATION, "--show"],
            env=self.cli_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        text = proc.stdout + proc.stderr
        return text if tail is None else text[-tail:]

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    fed = Federation(tmp_path_factory.mktemp("federation"))
    try:
        fed.start_superlink()
        for name in ("node1", "node2"):
            fed.register(name)
            fed.start_node(name)
        fed.wait_online(["node1", "node2"])
        yield fed
    finally:
        fed.stop()


def _rounds(output: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output / "rounds.jsonl").read_text().splitlines()]


def _privacy(output: Path) -> dict[str, Any]:
    return json.loads((output / "privacy.json").read_text())


def _wait_for(predicate: Any, timeout: float, what: str, poll: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _rounds_completed(output: Path) -> int:
    try:
        return int(_privacy(output)["rounds_completed"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


# -- the deployment tests ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_unregistered_supernode_is_refused(federation: Federation) -> None:
    # Prepare: a key pair the SuperLink has never seen
    intruder = federation.node_service("intruder")
    before = federation.online()

    # Execute
    intruder.start()
    assert intruder.proc is not None
    try:
        code = intruder.proc.wait(timeout=90)
    finally:
        intruder.stop()

    # Assert: it gave up with Flower's "failed to activate" exit, and the federation did not grow
    assert code != 0
    assert "Failed to activate SuperNode" in intruder.text()
    assert set(federation.online()) == set(before)


@pytest.mark.slow
def test_two_rounds_finish_when_a_node_is_killed_mid_round_and_it_rejoins(federation: Federation) -> None:
    # Prepare
    output = federation.root / "runs" / "node-killed"
    node2_id = federation.node_ids["node2"]
    run_id = federation.submit(output, **{"reply-timeout": REPLY_TIMEOUT, "final-samples": 0})

    # Execute: SIGKILL node2 (SuperNode, SuperExec and the ClientApp scoring round 1, not the one that prepared its
    # embeddings before round 1), then restart it at once
    node2 = federation.nodes["node2"]
    ready = f"node {node2_id} ready"
    _wait_for(lambda: ready in federation.run_log(run_id, tail=None), 300, "node2 to prepare", poll=2.0)
    preparing = {proc.pid for proc in node2.clientapps()}
    _wait_for(lambda: [p for p in node2.clientapps() if p.pid not in preparing], 180, "node2 to start scoring round 1")
    node2.kill(signal.SIGKILL)
    federation.start_node("node2")
    status = federation.wait(run_id)

    # Assert: round 1 closed at its deadline with node1's reply alone (node2's missing reply is counted as rejected)
    assert status == "finished:completed", federation.run_log(run_id)
    first, second = _rounds(output)
    popri_lines = "\n".join(line for line in federation.run_log(run_id, tail=None).splitlines() if " popri." in line)
    assert (first["replies"], first["rejected_replies"]) == (1, 1) and "users_sampled" not in first, popri_lines
    # closed by the deadline, not by an early NODE_UNAVAILABLE: the server says why it gave up on node2 (how long
    # collecting took is printed by scripts/measure_deployment.py --node-failure, never bounded here)
    assert f"rejected reply from node {node2_id}: no reply within {REPLY_TIMEOUT:.0f}s" in popri_lines
    # Round 2 starts while the SuperLink may still hold the dead node2 "online" (up to 60 s after the kill), so node2
    # answers, fails (NODE_UNAVAILABLE / deadline) or is not asked; node1 always answers
    assert second["replies"] >= 1 and "users_sampled" not in second
    # the ledger charged each round once, whatever the number of replies
    privacy = _privacy(output)
    assert privacy["rounds_completed"] == 2
    expected = compute_epsilon(noise_multiplier=privacy["noise_multiplier"], delta=3e-6, sample_rate=1.0, rounds=2)
    assert privacy["epsilon"] == pytest.approx(expected) and privacy["epsilon"] <= 7.0
    # with node authentication the restarted device rejoins with its node id (the next test gets its replies)
    federation.wait_online(["node2"], timeout=120)
    assert f"SuperNode ID: {node2_id}" in federation.nodes["node2"].text()


@pytest.mark.slow
def test_server_killed_mid_run_resumes_with_the_same_ledger(federation: Federation) -> None:
    # Prepare: a run, and the server machine dies (SuperLink, SuperExec, ServerApp: SIGKILL) once round 1 is saved
    output = federation.root / "runs" / "server-killed"
    federation.wait_online(["node1", "node2"])
    crashed_run = federation.submit(output)
    _wait_for(lambda: _rounds_completed(output) >= 1, 240, "round 1's checkpoint")
    assert federation.superlink is not None
    federation.superlink.kill(signal.SIGKILL)
    after_crash = _privacy(output)
    round_one = _rounds(output)

    # Execute: restart the SuperLink on its database and resume through Flower at once (the nodes reconnect by
    # themselves, with their node ids, while the ServerApp loads; it waits for num-nodes before round 2)
    federation.start_superlink()
    resumed_run = federation.submit(output, resume=True)
    status = federation.wait(resumed_run)

    # Assert
    assert status == "finished:completed", federation.run_log(resumed_run)
    assert after_crash["rounds_completed"] == 1
    privacy = _privacy(output)
    assert privacy["rounds_completed"] == 2  # continued from 1, never recounted
    expected = compute_epsilon(noise_multiplier=privacy["noise_multiplier"], delta=3e-6, sample_rate=1.0, rounds=2)
    assert privacy["epsilon"] == pytest.approx(expected) and privacy["epsilon"] <= 7.0
    assert privacy["noise_multiplier"] == after_crash["noise_multiplier"]
    rounds = _rounds(output)
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0] == round_one[0]  # the saved round is kept as it was
    assert rounds[1]["replies"] == 2  # both devices, node2 too if the previous test restarted it
    assert (output / "synthetic.jsonl").exists()
    assert resumed_run != crashed_run


@pytest.mark.slow
def test_secure_aggregation_round_on_real_supernodes(federation: Federation) -> None:
    # Prepare: both devices online; the round needs both of their noise shares
    output = federation.root / "runs" / "secagg"
    federation.wait_online(["node1", "node2"], timeout=120)

    # Execute
    run_id = federation.submit(output, rounds=1, **{"privacy-mode": "secagg", "min-replies": 2, "final-samples": 0})
    status = federation.wait(run_id)

    # Assert: one SecAgg+ round over both devices, charged once; the server never learned a user count
    assert status == "finished:completed", federation.run_log(run_id)
    (record,) = _rounds(output)
    assert record["replies"] == 2 and "users_sampled" not in record and record["pairs"] == TINY["prompts"]
    privacy = _privacy(output)
    assert privacy["privacy_mode"] == "secagg" and privacy["rounds_completed"] == 1
    assert "Secure aggregation completed" in federation.run_log(run_id)


# -- fast tests: the helpers, and a hostile node against the aggregate -------------------------------------------


def test_certificates_cover_loopback_and_the_given_hosts(tmp_path: Path) -> None:
    # Execute
    certs = deploy.write_certificates(tmp_path / "certs", ["10.0.0.7", "link.example.org"])

    # Assert
    sans = deploy.certificate_sans(certs.server_cert)
    assert {"DNS:localhost", "IP:127.0.0.1", "IP:::1", "IP:10.0.0.7", "DNS:link.example.org"} <= set(sans)
    assert certs.ca_key.stat().st_mode & 0o777 == 0o600
    assert certs.server_key.stat().st_mode & 0o777 == 0o600
    with pytest.raises(deploy.DeployError, match="already holds"):
        deploy.write_certificates(tmp_path / "certs")


def test_certificate_chain_verifies_with_the_ca(tmp_path: Path) -> None:
    # Prepare
    from cryptography import x509

    certs = deploy.write_certificates(tmp_path / "certs")
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())

    # Execute / Assert: the server certificate is signed by the CA (raises otherwise)
    server.verify_directly_issued_by(ca)


def test_bind_all_address_is_refused_as_a_certificate_name() -> None:
    with pytest.raises(deploy.DeployError, match="only what the SuperLink binds to"):
        deploy.san_entries(["0.0.0.0"])


def test_node_keys_are_openssh_ecdsa_p384(tmp_path: Path) -> None:
    # Prepare
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    # Execute
    private, public = deploy.write_node_keys(tmp_path, "node1")

    # Assert: what flower-supernode and `flwr supernode register` load
    key = load_ssh_private_key(private.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert load_ssh_public_key(public.read_bytes()).public_numbers() == key.public_key().public_numbers()
    assert private.stat().st_mode & 0o777 == 0o600
    with pytest.raises(deploy.DeployError, match="exists"):
        deploy.write_node_keys(tmp_path, "node1")


def test_supernode_command_points_at_the_devices_own_data(tmp_path: Path) -> None:
    # Execute
    argv = deploy.supernode_command(
        superlink="10.0.0.7:8000",
        root_certificates=tmp_path / "ca.crt",
        private_key=tmp_path / "node1",
        data_path=tmp_path / "my data.jsonl",
        cache_dir=tmp_path / "cache",
        port=9100,
    )

    # Assert
    node_config = argv[argv.index("--node-config") + 1]
    assert node_config == f"data-path='{tmp_path / 'my data.jsonl'}' cache-dir='{tmp_path / 'cache'}'"
    assert argv[argv.index("--superlink") + 1] == "10.0.0.7:8000"
    assert "--insecure" not in argv


def test_superlink_command_has_tls_auth_database_and_no_runtime_installs(tmp_path: Path) -> None:
    # Execute
    argv = deploy.superlink_command(deploy.Certificates(tmp_path), tmp_path / "state.db", host="0.0.0.0", port=9000)

    # Assert
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--database"):
        assert flag in argv
    assert {"--enable-supernode-auth", "--disable-runtime-dependency-installation"} <= set(argv)
    assert argv[argv.index("--host") + 1] == "0.0.0.0" and argv[argv.index("--port") + 1] == "9000"


def test_app_declares_every_config_key_so_flwr_run_can_override_it(tmp_path: Path) -> None:
    # Prepare
    import tomllib

    from popri.config import known_keys

    # Execute
    app = deploy.write_app(tmp_path / "app", {"rounds": 3, "output": "/abs/out"})

    # Assert
    project = tomllib.loads((app / "pyproject.toml").read_text())
    config = project["tool"]["flwr"]["app"]["config"]
    assert set(known_keys()) | {"resume", "progress"} == set(config)
    assert config["rounds"] == 3 and config["output"] == "/abs/out" and config["resume"] is False
    components = project["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "server.app:app", "clientapp": "client.app:app"}
    assert (app / "server" / "app.py").exists() and (app / "client" / "app.py").exists()
    assert not list(app.rglob("*.jsonl"))
    size = sum(p.stat().st_size for p in app.rglob("*") if p.is_file())
    assert size < 10 * 2**20  # Flower's FAB limit


def test_app_refuses_an_unknown_or_invalid_key(tmp_path: Path) -> None:
    from popri.config import ConfigError

    with pytest.raises(ConfigError, match="unknown config key 'round'"):
        deploy.write_app(tmp_path / "app", {"round": 3})
    with pytest.raises(ConfigError, match="rounds"):
        deploy.write_app(tmp_path / "app", {"rounds": 0})


def test_federation_entry_is_added_then_replaced_keeping_the_others(tmp_path: Path) -> None:
    # Prepare
    import tomllib

    home = tmp_path / "flwr-home"

    # Execute
    deploy.write_federation(home, "prod", "10.0.0.7:8000", tmp_path / "ca.crt")
    deploy.write_federation(home, "other", "10.0.0.8:8000", tmp_path / "ca.crt")
    deploy.write_federation(home, "prod", "10.0.0.9:8000", tmp_path / "ca2.crt")

    # Assert
    config = tomllib.loads((home / "config.toml").read_text())["superlink"]
    assert config["default"] == "local" and config["local"] == {"address": ":local:"}
    assert config["prod"] == {"address": "10.0.0.9:8000", "root-certificates": str(tmp_path / "ca2.crt")}
    assert config["other"]["address"] == "10.0.0.8:8000"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, "true"), (3, "3"), (0.5, "0.5"), ("/a b/c", "'/a b/c'"), ("it's", '"it\'s"'), (None, "''")],
)
def test_override_values_use_flowers_toml_syntax(value: Any, expected: str) -> None:
    assert deploy.toml_value(value) == expected


def test_flwr_json_output_is_found_among_log_lines() -> None:
    text = 'Loading project configuration...\n{\n  "success": true,\n  "run-id": "42"\n}\n'
    assert deploy.parse_json_output(text) == {"success": True, "run-id": "42"}


def test_deploy_commands_have_help_and_print_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: the parser `popri` builds (popri.cli registers deploy.cli.add_subparser the same way)
    parser = argparse.ArgumentParser(prog="popri")
    add_subparser(parser.add_subparsers(dest="command", required=True))

    # Execute / Assert: every step has --help; --print shows the command instead of running it
    for step in ("certs", "keys", "federation", "superlink", "register", "supernode", "app", "run"):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(["deploy", step, "--help"])
        assert exc.value.code == 0
    args = parser.parse_args(["deploy", "supernode", "node1", "--dir", str(tmp_path), "--data", "/d.jsonl", "--print"])
    assert args.func(args) == 0
    line = capsys.readouterr().out
    assert "flower-supernode" in line and "--auth-supernode-private-key" in line and "FLWR_HOME=" in line


def test_supervise_restarts_a_refused_supernode_until_it_is_let_in(tmp_path: Path) -> None:
    # Prepare: a stand-in for flower-supernode that fails (as on "Failed to activate") twice, then succeeds
    counter = tmp_path / "starts"
    script = (
        "import pathlib, sys; p = pathlib.Path(sys.argv[1]); n = int(p.read_text() or 0) + 1 if p.exists() else 1; "
        "p.write_text(str(n)); sys.exit(0 if n >= 3 else 1)"
    )

    # Execute
    code = deploy.supervise([sys.executable, "-c", script, str(counter)], dict(os.environ), retry_for=30, backoff=0.05)

    # Assert
    assert code == 0 and counter.read_text() == "3"


class _FakeClock:
    """A clock that only moves when ``sleep`` is called: the supervisor's restarts can be counted exactly."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _count_starts_script(counter: Path, exit_code: int) -> list[str]:
    """A stand-in for flower-supernode that counts its starts in ``counter`` and exits with ``exit_code``."""
    script = (
        "import pathlib, sys; p = pathlib.Path(sys.argv[1]); "
        "p.write_text(str(int(p.read_text()) + 1 if p.exists() else 1)); sys.exit(int(sys.argv[2]))"
    )
    return [sys.executable, "-c", script, str(counter), str(exit_code)]


def test_supervise_gives_up_after_failing_for_retry_for_seconds(tmp_path: Path) -> None:
    # Prepare: a child that always fails; restarts 0.25 s apart on a clock that moves only while the supervisor waits
    counter, clock = tmp_path / "starts", _FakeClock()

    # Execute
    code = deploy.supervise(
        _count_starts_script(counter, 3), dict(os.environ), retry_for=1.0, backoff=0.25, clock=clock, sleep=clock.sleep
    )

    # Assert: it kept restarting until the failures had lasted retry_for (starts at 0, .25, .5, .75 and 1.0), then
    # gave up with the child's exit code, neither earlier nor later
    assert code == 3
    assert counter.read_text() == "5"
    assert clock.sleeps == [0.25] * 4


def test_supervise_stops_restarting_once_the_child_succeeds(tmp_path: Path) -> None:
    # Prepare
    counter, clock = tmp_path / "starts", _FakeClock()

    # Execute
    code = deploy.supervise(
        _count_starts_script(counter, 0), dict(os.environ), retry_for=10.0, backoff=0.25, clock=clock, sleep=clock.sleep
    )

    # Assert: a clean exit ends the loop at once
    assert code == 0 and counter.read_text() == "1" and clock.sleeps == []


def test_hostile_node_moves_the_aggregate_by_at_most_its_claimed_users() -> None:
    """Central mode: whatever one node sends, the accepted sum moves by at most (its claimed users) x sensitivity 1.

    A node that claims more users than it has is only bounded by its claim; one device holds one user, so an
    operator who knows the devices can check the claim (see docs/deployment.md).
    """
    # Prepare: three honest single-user nodes and one hostile node sending a huge vector
    from popri.rounds import NodeReply, aggregate_replies

    rng = np.random.Generator(np.random.PCG64(11))
    honest = []
    for node in range(3):
        vec = rng.standard_normal(12)
        honest.append(NodeReply(node, vec / np.linalg.norm(vec), 1))
    honest_sum, _, _ = aggregate_replies(honest, expected_len=12)
    assert honest_sum is not None

    for claimed in (0, 1, 5):
        hostile = NodeReply(99, 1e9 * rng.standard_normal(12), claimed)

        # Execute
        total, users, rejected = aggregate_replies([*honest, hostile], expected_len=12)

        # Assert
        assert total is not None and not rejected and users == 3 + claimed
        assert np.linalg.norm(total - honest_sum) <= claimed + 1e-9

    for garbage in (np.full(12, np.nan), np.zeros(11), np.full(12, np.inf)):
        total, users, rejected = aggregate_replies([*honest, NodeReply(99, garbage, 1)], expected_len=12)
        assert total is not None and len(rejected) == 1 and users == 3
        np.testing.assert_array_equal(total, honest_sum)
