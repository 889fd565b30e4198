"""Which nodes may take part: each proves its data source with a salted tag, and two nodes with one source count once.

One user is one unit of privacy: the same users' data on two nodes (or one node scoring another's partition) would
enter the sum twice and double the sensitivity the accountant assumes. Before the first round each node sends a tag
derived from its data source and the run's salt; a node whose tag another node already proved is excluded (the first
one is kept), and every later reply must carry the tag its node proved.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

_TAG = re.compile(r"[0-9a-f]{8,128}")


def is_valid_tag(tag: object) -> bool:
    """A source tag is a lower-case hex string of 8 to 128 characters."""
    return isinstance(tag, str) and _TAG.fullmatch(tag) is not None


@dataclass
class SourceRegistry:
    """The nodes that proved a distinct data source (``tags``), and why the others take no part (``excluded``)."""

    tags: dict[int, str] = field(default_factory=dict)
    excluded: dict[int, str] = field(default_factory=dict)

    def register(self, node_id: int, tag: object) -> bool:
        """Record ``node_id``'s prepared tag; False (and logged) when it is malformed or duplicates another's."""
        if node_id in self.tags or node_id in self.excluded:
            return node_id in self.tags
        if not is_valid_tag(tag):
            return self.exclude(node_id, "its source tag is not a hex string")
        first = next((other for other, known in self.tags.items() if known == tag), None)
        if first is not None:
            return self.exclude(node_id, f"it has the same data source as node {first} (counted once)")
        self.tags[node_id] = str(tag)
        return True

    def exclude(self, node_id: int, reason: str) -> bool:
        """Keep ``node_id`` out of every round; ``reason`` is the server's own text. Always False."""
        self.excluded[node_id] = reason
        logger.warning("node %d excluded: %s", node_id, reason)
        return False

    @property
    def ready(self) -> list[int]:
        return sorted(self.tags)

    def check_reply(self, node_id: int, tag: object) -> str | None:
        """None when ``tag`` is the one ``node_id`` proved at prepare time, else why the reply is rejected."""
        if node_id not in self.tags:
            return "the node proved no data source before the run"
        if tag != self.tags[node_id]:
            return "its source tag differs from the one it proved before the run"
        return None
