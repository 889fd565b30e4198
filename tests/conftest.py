"""Shared fixtures: tiny models saved as local HF folders, tiny private data, and an in-process Flower grid."""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import byte_tokenizer, tiny_causal_lm

ROLES = {
    "sailor": ["the sea is wide and the wind is cold tonight", "hoist the sails before the storm", "we sail at dawn"],
    "baker": ["the bread rises in the warm oven", "flour and butter and a pinch of salt", "fresh loaves at dawn"],
    "king": ["my crown weighs heavy on my head", "bring me the traitor in chains", "the realm must hold"],
    "poet": ["the moon is a silver coin in the sky", "my verses fade like morning dew", "love is a red rose"],
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama and a byte tokenizer, saved like any local HF model folder."""
    path = tmp_path_factory.mktemp("tiny-lm")
    tokenizer = byte_tokenizer()
    tiny_causal_lm(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    """12 users (3 per role) in popri's JSONL format."""
    path = tmp_path / "users.jsonl"
    with path.open("w") as fh:
        for role, texts in ROLES.items():
            for k in range(3):
                for text in texts:
                    fh.write(json.dumps({"user": f"{role}-{k}", "text": f"{text} ({k})"}) + "\n")
    return path


def tiny_run_config(model_dir: Path, data: Path, output: Path, **overrides: Any) -> dict[str, Any]:
    flat = {
        "model": str(model_dir),
        "data": str(data),
        "output": str(output),
        "cache-dir": str(output.parent / "cache"),
        "rounds": 2,
        "prompts": 3,
        "samples-per-prompt": 3,
        "rejected-rank": 2,
        "max-new-tokens": 12,
        "token-budget": 16,
        "initial-set-size": 6,
        "final-samples": 4,
        "batch-size": 2,
        "epsilon": 7.0,
        "num-nodes": 2,
        "validation-fraction": 0.25,
        "min-text-chars": 5,
        "noise-seed": 123,
    }
    flat.update(overrides)
    return flat


class InProcessGrid:
    """A Flower Grid that calls a ClientApp in this process (no Ray, no SuperLink). Test-only.

    ``dead`` nodes never answer; ``tamper`` may rewrite a node's reply (a broken or hostile node) or drop it (None).
    """

    def __init__(
        self,
        client_app: Any,
        node_configs: dict[int, dict[str, Any]],
        run_config: dict[str, Any],
        tamper: Callable[[int, Any], Any] | None = None,
    ) -> None:
        from flwr.app import Context, RecordDict
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # needed to build Messages
        self.client_app, self.tamper, self.dead = client_app, tamper, set()
        self.contexts = {
            nid: Context(run_id=1, node_id=nid, node_config=cfg, state=RecordDict(), run_config=dict(run_config))
            for nid, cfg in node_configs.items()
        }
        self.outbox: dict[str, Any] = {}
        self.sent = 0

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.dead]

    def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
        from flwr.app import Error, Message

        ids = []
        for message in messages:
            self.sent += 1
            mid = f"m{self.sent}"
            message.metadata._message_id = mid  # the real SuperLink assigns ids; so do we
            ids.append(mid)
            nid = message.metadata.dst_node_id
            if nid in self.dead:
                continue
            try:
                # A real transport serialises: each node gets its own copy (SecAgg+'s mod edits what it receives).
                reply = self.client_app(copy.deepcopy(message), self.contexts[nid])
            except Exception as err:  # a ClientApp exception becomes an error reply, as in Flower
                reply = Message(Error(code=2, reason=f"{type(err).__name__}: {err}"), reply_to=message)
            reply = self.tamper(nid, reply) if self.tamper else reply
            if reply is not None:  # a tamper that returns None loses the reply: the node died mid-protocol
                self.outbox[mid] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:
        return [self.outbox.pop(m) for m in list(message_ids) if m in self.outbox]

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> Iterable[Any]:
        return self.pull_messages(self.push_messages(messages))

    def create_message(self, content: Any, message_type: str, dst_node_id: int, group_id: str, ttl: Any = None) -> Any:
        from flwr.app import Message

        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def set_run(self, run_id: int) -> None:
        pass

    @property
    def run(self) -> Any:
        return None


def run_server(grid: InProcessGrid, run_config: dict[str, Any]) -> None:
    """The real ServerApp main, in this process, against ``grid``."""
    from flwr.app import Context, RecordDict

    from server.app import make_server_app

    errors: list[BaseException] = []
    app = make_server_app(errors=errors)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
    app(grid, context)
    if errors:
        raise errors[0]
