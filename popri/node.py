"""What one federation node does with its private data: hold its users, score, return the clipped sum.

A device holds one user; a simulated node holds a shard of users and returns the sum of its sampled users' clipped
vectors. Either way each user adds at most 1 (L2) to the global sum, so the sensitivity and the accounting are the
same. Users are Poisson-sampled here, on the node, with the rate the server announces and the accountant uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from popri.config import RunConfig
from popri.data import UserData, load_user_data, partition_users, read_user_file, split_users
from popri.embedding import cached_user_sums
from popri.privacy import poisson_sample
from popri.scoring import clipped_scores_sum


def load_node_users(
    config: RunConfig, *, partition_id: int, num_partitions: int, data_path: str | None = None
) -> UserData:
    """The private users of one node.

    With ``data_path`` (deployment: the device's own file) all its users are private training users. Otherwise
    (simulation) the node takes its round-robin shard of the configured data set's training users; the validation
    users are held out on the server side for diagnostics only.
    """
    if data_path:
        return read_user_file(data_path, min_text_chars=config.data.min_text_chars)
    data = load_user_data(
        config.data.data, min_text_chars=config.data.min_text_chars, max_users=config.data.max_users, seed=config.seed
    )
    train, _ = split_users(data, validation_fraction=config.data.validation_fraction, seed=config.seed)
    return train.subset(partition_users(train.num_users, num_partitions, partition_id))


@dataclass
class NodeScorer:
    """A node's users, reduced to their private embedding sums (computed once, cached on the node's disk)."""

    user_sums: np.ndarray  # (users, d), private

    @classmethod
    def from_users(cls, embedder: Any | None, users: UserData, *, cache_dir: Path) -> NodeScorer:
        """``embedder=None``: load the default embedder only if the cache misses."""
        return cls(cached_user_sums(embedder, users, cache_dir=cache_dir))

    @property
    def num_users(self) -> int:
        return int(self.user_sums.shape[0])

    def score(
        self, sample_embeddings: np.ndarray, *, sample_rate: float, rng: np.random.Generator
    ) -> tuple[np.ndarray, int]:
        """(Σ over Poisson-sampled users of clipped score vectors, number sampled). Sensitivity 1 per user."""
        if sample_embeddings.ndim != 2 or sample_embeddings.shape[1] != self.user_sums.shape[1]:
            raise ValueError(
                f"sample embeddings of shape {sample_embeddings.shape} do not match this node's embedder "
                f"(dimension {self.user_sums.shape[1]})"
            )
        users = poisson_sample(num_users=self.num_users, sample_rate=sample_rate, rng=rng)
        return clipped_scores_sum(sample_embeddings, self.user_sums[users]), int(users.size)
