"""An in-process Flower ``Grid``: the ServerApp's messages are delivered to a ClientApp in the same process.

Same Message API, same ClientApp routing and mods, same strategies as a Flower simulation, without Ray or a
SuperLink (which cost ~1.3 GB of RAM and seconds per round on a 2-core machine). Messages are delivered one node
after another, which is what a 2-core machine would do anyway. Built after the recipe in the project's Flower notes
(section 10); it relies on ``flwr.supercore.task_identity`` (internal API, flwr pinned to 1.42.0).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

logger = logging.getLogger(__name__)

ERROR_CLIENT_EXCEPTION = 2  # the code a real SuperNode uses for a ClientApp exception


def set_task_identity(*, run_id: int = 1, node_id: int = 1, task_id: int = 1) -> None:
    """Messages can only be built inside a Flower task process; this makes the current process one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, task_id


class InProcessGrid(Grid):
    """Delivers each message to ``client_app(message, context_of_its_node)`` and returns the replies.

    ``node_configs`` maps node id -> node config (``{"partition-id": i, "num-partitions": n}`` as in a simulation).
    A ClientApp exception becomes an error reply, as a SuperNode would send. ``context.state`` persists per node.
    Each node gets its own copy of a message, as after a real transport (SecAgg+'s mod edits what it receives).
    Nodes in ``dead`` never answer; ``tamper(node_id, reply)`` may rewrite a reply (a broken or hostile node) or
    lose it (return None), for tests of the server's defences.
    """

    def __init__(
        self,
        client_app: Any,
        node_configs: Mapping[int, dict[str, Any]],
        run_config: dict[str, Any] | None = None,
        *,
        run_id: int = 1,
        tamper: Callable[[int, Message], Message | None] | None = None,
    ) -> None:
        set_task_identity(run_id=run_id)
        self.client_app = client_app
        self.tamper = tamper
        self.dead: set[int] = set()
        self._run: Any = None
        self.sent = 0  # messages delivered so far
        self._mailbox: dict[str, Message] = {}
        self.contexts = {
            nid: Context(
                run_id=run_id, node_id=nid, node_config=dict(cfg), state=RecordDict(), run_config=dict(run_config or {})
            )
            for nid, cfg in node_configs.items()
        }

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return [nid for nid in self.contexts if nid not in self.dead]

    def _deliver(self, message: Message) -> Message | None:
        """The node's reply (an error reply if its ClientApp raised), or None if the node is down."""
        self.sent += 1
        message.metadata.__dict__["_message_id"] = f"inprocess-{self.sent}"  # as Flower's InMemoryGrid does
        nid = message.metadata.dst_node_id
        if nid in self.dead:
            return None  # a dropped node never answers
        try:
            reply = self.client_app(copy.deepcopy(message), self.contexts[nid])
        except Exception as err:  # a ClientApp crash must look like a node's error reply, not stop the server
            logger.warning("node %d failed: %s: %s", nid, type(err).__name__, err)
            reply = Message(Error(code=ERROR_CLIENT_EXCEPTION, reason=f"{type(err).__name__}: {err}"), reply_to=message)
        return self.tamper(nid, reply) if self.tamper is not None else reply

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Delivers at once; the replies wait in a mailbox until pulled."""
        ids = []
        for message in messages:
            reply = self._deliver(message)
            ids.append(message.metadata.message_id)
            if reply is not None:
                self._mailbox[message.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._mailbox.pop(mid) for mid in list(message_ids) if mid in self._mailbox]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return [reply for reply in map(self._deliver, messages) if reply is not None]


def simulated_node_configs(num_nodes: int, *, first_node_id: int = 100) -> dict[int, dict[str, Any]]:
    """Node id -> node config of ``num_nodes`` simulated nodes, as ``flwr run`` gives them (partition i of n)."""
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
    return {first_node_id + pid: {"partition-id": pid, "num-partitions": num_nodes} for pid in range(num_nodes)}


def run_server_app(grid: InProcessGrid, run_config: Mapping[str, Any]) -> None:
    """The real ServerApp (:func:`server.app.make_server_app`) run in this process against ``grid``.

    ``run_config`` is Flower's run config of the ServerApp (popri's flat keys plus ``resume`` / ``progress``). The
    ServerApp's error is raised here (Flower itself would only log it).
    """
    from flwr.app import Context, RecordDict

    from server.app import make_server_app

    errors: list[BaseException] = []
    app = make_server_app(errors=errors)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
    app(grid, context)
    if errors:
        raise errors[0]


def run_in_process(
    client_app: Any,
    node_configs: Mapping[int, dict[str, Any]],
    run_config: Mapping[str, Any],
    *,
    tamper: Callable[[int, Message], Message | None] | None = None,
) -> InProcessGrid:
    """One whole popri run in this process: ``client_app`` on every node of ``node_configs``, the ServerApp over them.

    Every node and the server see the same ``run_config``. Returns the grid (its node contexts, the messages sent);
    raises the ServerApp's error. ``client_app`` is the caller's (``client.app.make_client_app()``): the server
    package never imports the client's.
    """
    grid = InProcessGrid(client_app, node_configs, dict(run_config), tamper=tamper)
    run_server_app(grid, run_config)
    return grid
