"""Measure a real loopback deployment against the simulation: seconds per round and bytes per node per round.

    .venv/bin/python scripts/measure_deployment.py [--rounds 3] [--prompts 2] [--samples-per-prompt 2]

It builds a federation with ``popri deploy`` (TLS, SuperNode auth, two devices with one user each), puts a
byte-counting TCP relay between node1 and the SuperLink (the TLS stream passes through untouched), and runs POPri
twice (1 round, then ``--rounds`` rounds): the difference divided by the extra rounds is the marginal traffic of one
round for one node, polling included. Then it runs ``popri run`` (Flower's simulation engine) with the same settings
and prints a markdown table of both. Every process it starts is stopped by process group at the end.
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

from popri import deploy

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


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
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
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for member in [m for m in members.values() if m.is_running()]:
            try:
                if os.getpgid(member.pid) == member.pid:
                    os.killpg(member.pid, sig)
                member.send_signal(sig)
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
        time.sleep(3)


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
    py = [sys.executable, "-m", "popri.deploy"]
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
            procs.append(
                start(
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
            )
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
