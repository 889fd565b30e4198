"""Measure a real loopback deployment against the simulation: seconds per round and bytes per node per round.

    .venv/bin/python -m scripts.measure_deployment [--rounds 3] [--prompts 2] [--samples-per-prompt 2] [--node-failure]

(from the checkout's root, so that ``python -m deploy`` finds the checkout's ``deploy`` package).

It builds a federation with ``popri deploy`` (TLS, SuperNode auth, two devices with one user each), puts a
byte-counting TCP relay between node1 and the SuperLink (the TLS stream passes through untouched), and runs POPri
twice (1 round, then ``--rounds`` rounds): the difference divided by the extra rounds is the marginal traffic of one
round for one node, polling included. Then it runs ``popri run`` (Flower's simulation engine) with the same settings
and prints both as JSON (also written to ``measurements.json``). Every process it starts is stopped by process group
at the end.

``--node-failure`` adds the fault that ``tests/test_deployment.py`` checks by behaviour only: a 1-round run whose
node2 is SIGKILLed while its ClientApp scores; it prints how long collecting took against ``--reply-timeout`` (the
round should close at its deadline with node1's reply alone). Timings are printed here, never asserted in a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import deploy

FEDERATION = "measure"
USERS = {
    "node1": ("alice", ["To be or not to be, that is the question.", "The lady doth protest too much, methinks."]),
    "node2": ("bob", ["Now is the winter of our discontent made glorious.", "A horse! my kingdom for a horse!"]),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class CountingRelay:
    """A loopback TCP relay that counts the bytes in each direction (the TLS bytes on the wire)."""

    def __init__(self, target_port: int) -> None:
        self.target_port, self.port = target_port, free_port()
        self.up = self.down = 0  # node -> SuperLink, SuperLink -> node
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self.loop.run_forever()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upward: bool) -> None:
        try:
            while data := await reader.read(65536):
                if upward:
                    self.up += len(data)
                else:
                    self.down += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer, True), self._pipe(up_reader, writer, False))

    def total(self) -> tuple[int, int]:
        return self.up, self.down


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as fh:
        return subprocess.Popen(argv, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def stop_all(
    procs: list[subprocess.Popen[bytes]], signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGKILL)
) -> None:
    """SIGTERM, then SIGKILL, the process trees we started: each group led by one of our processes, then each
    process by id (``psutil`` objects notice a reused id, so nobody else's process is touched)."""
    import psutil

    members: dict[int, psutil.Process] = {}
    for proc in procs:
        try:
            root = psutil.Process(proc.pid)
            members.update({p.pid: p for p in [root, *root.children(recursive=True)]})
        except psutil.NoSuchProcess:
            pass
    for sig in signals:
        for member in [m for m in members.values() if m.is_running()]:
            try:
                if os.getpgid(member.pid) == member.pid:
                    os.killpg(member.pid, sig)
                member.send_signal(sig)
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
        time.sleep(3)


def clientapps(proc: subprocess.Popen[bytes]) -> list[Any]:
    """Live ``flwr-clientapp`` processes under a SuperNode we started (one per message it is handling)."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    live = []
    for child in children:
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "flwr-clientapp" in " ".join(child.cmdline()):
                live.append(child)
        except psutil.NoSuchProcess:
            pass
    return live


def measure_node_failure(
    app: Path,
    root: Path,
    settings: dict[str, Any],
    node: subprocess.Popen[bytes],
    procs: list[subprocess.Popen[bytes]],
    *,
    reply_timeout: float,
    env: dict[str, str],
) -> dict[str, Any]:
    """A 1-round run whose ``node`` is SIGKILLed (its whole tree) while it scores: how long the round collected."""
    out = root / "node-failure"
    config = {**settings, "rounds": 1, "reply-timeout": reply_timeout, "output": str(out)}
    run_id = deploy.submit_run(app, FEDERATION, config, env=env)
    deadline = time.monotonic() + 1800
    while not clientapps(node) and time.monotonic() < deadline:
        time.sleep(0.1)
    killed_at_s = time.monotonic()
    stop_all([node], signals=(signal.SIGKILL,))
    procs.remove(node)
    status = deploy.wait_for_run(FEDERATION, run_id, timeout=1800, env=env)
    (record,) = rounds_of(out)
    return {
        "status": status,
        "reply_timeout_s": reply_timeout,
        "collect_s": record["seconds"]["collect"],
        "run_end_after_kill_s": time.monotonic() - killed_at_s,
        "replies": record["replies"],
        "rejected_replies": record["rejected_replies"],
    }


def rounds_of(output: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output / "rounds.jsonl").read_text().splitlines()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--samples-per-prompt", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--out", help="work folder (default: a new temporary folder)")
    parser.add_argument("--skip-simulation", action="store_true")
    parser.add_argument(
        "--node-failure", action="store_true", help="also time a round whose node2 is SIGKILLed while it scores"
    )
    parser.add_argument("--reply-timeout", type=float, default=30.0, help="the round deadline of --node-failure (s)")
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="popri-measure-")).absolute()
    root.mkdir(parents=True, exist_ok=True)
    settings = {
        "prompts": args.prompts,
        "samples-per-prompt": args.samples_per_prompt,
        "rejected-rank": 1,
        "max-new-tokens": args.max_new_tokens,
        "initial-set-size": 4,
        "final-samples": 0,
        "batch-size": 4,
        "num-nodes": 2,
        "min-replies": 1,
        "epsilon": 7.0,
    }
    cli_env = deploy.flower_env(root / "cli-home")
    py = [sys.executable, "-m", "deploy"]
    procs: list[subprocess.Popen[bytes]] = []
    result: dict[str, Any] = {"settings": settings}
    try:
        deploy.write_certificates(root / "certs")
        app = deploy.write_app(root / "app")
        port = free_port()
        procs.append(
            start(
                [
                    *py,
                    "superlink",
                    "--dir",
                    str(root),
                    "--port",
                    str(port),
                    "--federation",
                    FEDERATION,
                    "--poll-interval",
                    "0.1",
                ],
                cli_env,
                root / "superlink.log",
            )
        )
        time.sleep(5)
        relay = CountingRelay(port)
        nodes: dict[str, subprocess.Popen[bytes]] = {}
        for name, (user, texts) in USERS.items():
            deploy.write_node_keys(root / "keys", name, overwrite=True)
            subprocess.run(
                [*py, "register", name, "--dir", str(root), "--federation", FEDERATION],
                env=cli_env,
                check=True,
                capture_output=True,
            )
            data = root / f"{name}.jsonl"
            data.write_text("".join(json.dumps({"user": user, "text": t}) + "\n" for t in texts))
            link = relay.port if name == "node1" else port  # node1's traffic goes through the counting relay
            nodes[name] = start(
                [
                    *py,
                    "supernode",
                    name,
                    "--dir",
                    str(root),
                    "--superlink",
                    f"127.0.0.1:{link}",
                    "--data",
                    str(data),
                    "--port",
                    str(free_port()),
                    "--poll-interval",
                    "0.1",
                ],
                cli_env,
                root / f"{name}.log",
            )
            procs.append(nodes[name])
        time.sleep(10)
        before, t0 = relay.total(), time.monotonic()
        time.sleep(30)
        after = relay.total()
        idle = [(a - b) / (time.monotonic() - t0) for a, b in zip(after, before, strict=True)]
        result["idle_bytes_per_s"] = {"up": idle[0], "down": idle[1]}
        for rounds in (1, args.rounds):
            out = root / f"deploy-{rounds}"
            start_bytes, t0 = relay.total(), time.monotonic()
            run_id = deploy.submit_run(app, FEDERATION, {**settings, "rounds": rounds, "output": str(out)}, env=cli_env)
            status = deploy.wait_for_run(FEDERATION, run_id, timeout=1800, env=cli_env)
            end_bytes = relay.total()
            result[f"deploy_{rounds}"] = {
                "status": status,
                "wall_s": time.monotonic() - t0,
                "bytes_up": end_bytes[0] - start_bytes[0],
                "bytes_down": end_bytes[1] - start_bytes[1],
                "rounds": [r["seconds"] for r in rounds_of(out)],
            }
        extra = args.rounds - 1
        if extra > 0:
            one, many = result["deploy_1"], result[f"deploy_{args.rounds}"]
            result["bytes_per_round_node1"] = {
                "up": (many["bytes_up"] - one["bytes_up"]) / extra,
                "down": (many["bytes_down"] - one["bytes_down"]) / extra,
            }
        if args.node_failure:  # last: node2 stays dead
            result["node_failure"] = measure_node_failure(
                app, root, settings, nodes["node2"], procs, reply_timeout=args.reply_timeout, env=cli_env
            )
            failure = result["node_failure"]
            sys.stdout.write(
                f"node failure: collect {failure['collect_s']:.1f} s with reply-timeout {args.reply_timeout:.0f} s "
                f"({failure['replies']} reply, {failure['rejected_replies']} rejected, {failure['status']})\n"
            )
    finally:
        stop_all(procs)
    if not args.skip_simulation:
        sim_data = root / "all-users.jsonl"
        sim_data.write_text("".join((root / f"{n}.jsonl").read_text() for n in USERS))
        out = root / "simulation"
        sets = [f"--set={k}={v}" for k, v in {**settings, "validation-fraction": 0.0, "min-text-chars": 20}.items()]
        t0 = time.monotonic()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "popri.cli",
                "run",
                "--rounds",
                str(args.rounds),
                "--data",
                str(sim_data),
                "--output",
                str(out),
                "--no-progress",
                *sets,
            ],
            check=True,
            env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
        )
        result["simulation"] = {"wall_s": time.monotonic() - t0, "rounds": [r["seconds"] for r in rounds_of(out)]}
    (root / "measurements.json").write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(json.dumps(result, indent=2) + f"\nwritten to {root / 'measurements.json'}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
