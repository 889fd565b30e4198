"""A finished tiny POPri run (the real ServerApp and ClientApp through the in-process grid) for artifact tests."""

from __future__ import annotations

import json
from pathlib import Path

from client.app import make_client_app
from tests.helpers import ROLES, InProcessGrid, run_server, tiny_run_config

NODES = {101: {"partition-id": 0, "num-partitions": 2}, 102: {"partition-id": 1, "num-partitions": 2}}


def write_users(path: Path) -> Path:
    """12 users (3 per role) in popri's JSONL format."""
    with path.open("w") as fh:
        for role, texts in ROLES.items():
            for k in range(3):
                for text in texts:
                    fh.write(json.dumps({"user": f"{role}-{k}", "text": f"{text} ({k})"}) + "\n")
    return path


def finished_run(root: Path, model_dir: Path, **overrides: object) -> Path:
    """Run 2 tiny rounds + the final corpus into ``root/run``; returns the run folder."""
    root.mkdir(parents=True, exist_ok=True)
    users = write_users(root / "users.jsonl")
    out = root / "run"
    cfg = tiny_run_config(model_dir, users, out, **{"learning-rate": 0.05, **overrides})
    run_server(InProcessGrid(make_client_app(), NODES, cfg), cfg)
    return out
