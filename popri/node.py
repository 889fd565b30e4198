"""What one federation node does with its private data: hold its users, score, return the clipped sum.

A device holds one user; a simulated node holds a shard of users and returns the sum of its sampled users' clipped
vectors. Either way each user adds at most 1 (L2) to the global sum, so the sensitivity and the accounting are the
same. Every privacy step a node takes lives here, free of Flower, so that ``client/app.py`` only unpacks messages:

- where its data comes from (:class:`NodeSource`; a node with no explicit source refuses to score) and the
  data-independent tag that lets the server check that sources are disjoint (:func:`source_tag`);
- the device owner's floor (:class:`NodePolicy`), checked against the run's own settings, never the round's message;
- its generators (:func:`node_generators`): OS entropy unless a reproducible noise seed was asked for;
- Poisson sampling of its users with the run's rate, and in secure-aggregation mode the box projection and the noise
  share (:func:`secure_node_vector`);
- the fixed set of error codes a refusal may carry (:class:`NodeErrorCode`): nothing derived from the device
  (paths, library messages, data) ever goes into a reply; details stay in the node's local log.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import hmac
import logging
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from popri.config import ConfigError, RunConfig, delta_warning
from popri.data import DataFormatError, UserData, load_user_data, partition_users, read_user_file, split_users
from popri.embedding import cached_user_sums
from popri.privacy import add_noise_share, compute_epsilon, noise_share_std, poisson_sample
from popri.scoring import clipped_scores_sum

logger = logging.getLogger(__name__)

PRIVACY_MODES = ("central", "secagg")

# Chance that any coordinate of one node's noisy secure-aggregation vector leaves the SecAgg+ range (per round).
SECAGG_RANGE_FAILURE_PROBABILITY = 2.0**-40


# ---------------------------------------------------------------------------------------------------------------------
# Errors: a small fixed set of codes, the only thing a refusal tells the server
# ---------------------------------------------------------------------------------------------------------------------


class NodeErrorCode(enum.IntEnum):
    """The codes of a node's error replies: ``Error(code=int(c), reason=c.reason)``. No free text ever travels."""

    INVALID_REQUEST = 400  # the message or the run's settings cannot be served (wrong shape, rate, range, ...)
    POLICY_REFUSED = 403  # the run is weaker than this node's privacy policy, or asks for a mode it may not use
    INTERNAL_ERROR = 500  # anything unexpected on the node
    DATA_UNAVAILABLE = 503  # no explicit data source, or the node's data cannot be read

    @property
    def reason(self) -> str:
        """The fixed reason string, e.g. ``popri/policy-refused``."""
        return "popri/" + self.name.lower().replace("_", "-")


NODE_ERROR_REASONS: dict[int, str] = {int(c): c.reason for c in NodeErrorCode}
"""Error code -> reason, for the server's log lines."""


class NodeRefusal(ValueError):
    """A node declines a message. ``code`` goes to the server; ``detail`` only to the node's local log."""

    def __init__(self, code: NodeErrorCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class NodeConfigError(ValueError):
    """An invalid ``--node-config`` value; the message names the key and the fix.

    ``code``: what the reply says. An unreadable policy key fails closed (``popri/policy-refused``); an unreadable
    data-source key means the node has no usable data (``popri/data-unavailable``).
    """

    def __init__(self, message: str, *, code: NodeErrorCode = NodeErrorCode.POLICY_REFUSED) -> None:
        super().__init__(message)
        self.code = code


def error_code_for(err: BaseException) -> NodeErrorCode:
    """The code a reply carries for ``err``; the exception's text itself never leaves the node."""
    if isinstance(err, NodeRefusal):
        return err.code
    if isinstance(err, NodeConfigError):
        return err.code
    if isinstance(err, ConfigError):
        return NodeErrorCode.INVALID_REQUEST
    if isinstance(err, (DataFormatError, OSError, UnicodeError)):
        return NodeErrorCode.DATA_UNAVAILABLE
    return NodeErrorCode.INTERNAL_ERROR


# ---------------------------------------------------------------------------------------------------------------------
# The node's data source and its tag
# ---------------------------------------------------------------------------------------------------------------------


def _source_error(message: str) -> NodeConfigError:
    return NodeConfigError(message, code=NodeErrorCode.DATA_UNAVAILABLE)


def _node_int(node_config: Mapping[str, Any], key: str) -> int:
    value = node_config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _source_error(f"invalid node-config key '{key}': expected an integer, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise _source_error(f"invalid node-config key '{key}': expected an integer, got {value!r}") from None
    if not number.is_integer():
        raise _source_error(f"invalid node-config key '{key}': expected an integer, got {value!r}")
    return int(number)


@dataclass(frozen=True)
class NodeSource:
    """Where a node's private users come from, as its operator configured it (``--node-config``).

    ``data_path``: the device's own user file (deployment). ``partition``: ``(partition-id, num-partitions)``, the
    node's round-robin shard of the run's data set (Flower's simulation sets both keys), or of ``data_path`` when
    both are given. At least one must be set: a node is never silently given the whole data set.
    """

    data_path: str | None = None
    partition: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.data_path is None and self.partition is None:
            raise NodeRefusal(
                NodeErrorCode.DATA_UNAVAILABLE,
                "this node has no data source: give --node-config \"data-path='<users.jsonl>'\" (or both "
                "'partition-id' and 'num-partitions' in a simulation)",
            )
        if self.data_path is not None and not Path(self.data_path).is_absolute():
            raise _source_error(f"invalid node-config key 'data-path': give an absolute path, got {self.data_path}")
        if self.partition is not None:
            pid, parts = self.partition
            if parts < 1 or not 0 <= pid < parts:
                raise _source_error(
                    f"invalid node-config key 'partition-id': {pid} is outside [0, num-partitions={parts})"
                )

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeSource:
        """Read ``data-path`` and ``partition-id``/``num-partitions``; a lone partition key is an error."""
        raw_path = str(node_config.get("data-path", "") or "")
        has = [k in node_config for k in ("partition-id", "num-partitions")]
        if any(has) and not all(has):
            missing = "num-partitions" if has[0] else "partition-id"
            raise _source_error(f"invalid node-config key '{missing}': give both partition-id and num-partitions")
        partition = (
            (_node_int(node_config, "partition-id"), _node_int(node_config, "num-partitions")) if all(has) else None
        )
        data_path = str(Path(raw_path).expanduser().resolve()) if raw_path else None
        return cls(data_path=data_path, partition=partition)

    def descriptor(self, *, data_setting: str) -> str:
        """The operator-chosen, data-independent name of this source (see :func:`source_descriptor`)."""
        part = None if self.partition is None else f"{self.partition[0]}/{self.partition[1]}"
        if self.data_path is not None:
            return "file:" + self.data_path + ("" if part is None else "#" + part)
        return "partition:" + data_setting + ":" + str(part)


def source_descriptor(*, node_config: Mapping[str, Any], data_setting: str) -> str:
    """``"file:" + absolute data-path [+ "#pid/n"]`` (symlinks resolved) for a node with its own file, else
    ``"partition:" + data_setting + ":pid/n"`` (simulation). Built from configuration only, never from the data."""
    return NodeSource.from_node_config(node_config).descriptor(data_setting=data_setting)


def source_tag(*, salt: str, descriptor: str) -> str:
    """``HMAC-SHA256(key=salt, msg=descriptor)`` as hex: lets the server see that two nodes name the same source.

    The descriptor is operator-chosen and data-independent; a hash of the data's content would be a release outside
    the DP mechanism. The per-run salt keeps tags of different runs unlinkable.
    """
    if not isinstance(salt, str) or not salt:
        raise NodeRefusal(NodeErrorCode.INVALID_REQUEST, "the message carries no 'source-salt' (a non-empty string)")
    return hmac.new(salt.encode(), descriptor.encode(), hashlib.sha256).hexdigest()


def load_node_users(
    config: RunConfig,
    *,
    partition_id: int | None = None,
    num_partitions: int | None = None,
    data_path: str | None = None,
) -> UserData:
    """The private users of one node; with neither a ``data_path`` nor a partition, the node refuses.

    With ``data_path`` (deployment: the device's own file) all its users are private training users, or its shard of
    them when a partition is given too (several nodes sharing one file). Otherwise (simulation) the node takes its
    round-robin shard of the configured data set's training users; the validation users are held out on the server
    side for diagnostics only.
    """
    partition = None if partition_id is None or num_partitions is None else (partition_id, num_partitions)
    source = NodeSource(
        data_path=str(Path(data_path).expanduser().resolve()) if data_path else None, partition=partition
    )
    return _load_source_users(config, source)


def _load_source_users(config: RunConfig, source: NodeSource) -> UserData:
    if source.data_path is not None:
        users = read_user_file(source.data_path, min_text_chars=config.data.min_text_chars)
        if source.partition is None:
            return users
        return users.subset(partition_users(users.num_users, source.partition[1], source.partition[0]))
    assert source.partition is not None  # NodeSource guarantees one of the two
    data = load_user_data(
        config.data.data, min_text_chars=config.data.min_text_chars, max_users=config.data.max_users, seed=config.seed
    )
    train, _ = split_users(data, validation_fraction=config.data.validation_fraction, seed=config.seed)
    return train.subset(partition_users(train.num_users, source.partition[1], source.partition[0]))


# ---------------------------------------------------------------------------------------------------------------------
# The device owner's privacy policy
# ---------------------------------------------------------------------------------------------------------------------


def _node_float(node_config: Mapping[str, Any], key: str) -> float | None:
    value = node_config.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise NodeConfigError(f"invalid node-config key '{key}': expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise NodeConfigError(f"invalid node-config key '{key}': expected a number, got {value!r}") from None


@functools.lru_cache(maxsize=32)
def planned_epsilon(
    *, noise_multiplier: float, delta: float, sample_rate: float, rounds: int, accountant: str
) -> float:
    """ε after all ``rounds`` of the run (:func:`popri.privacy.compute_epsilon`), cached: nodes ask every round."""
    return compute_epsilon(
        noise_multiplier=noise_multiplier, delta=delta, sample_rate=sample_rate, rounds=rounds, accountant=accountant
    )


@dataclass(frozen=True)
class NodePolicy:
    """The floor a device owner sets in ``--node-config``; a run weaker than it is refused, whatever the server says.

    ``min-noise-multiplier``: σ of the run (on the sensitivity-1 sum) must be at least this. ``max-epsilon``: the run's
    planned ε over all its rounds, at the run's δ, must be at most this. ``max-delta``: the run's δ must be at most
    this (set it with ``max-epsilon``: a large δ makes any ε small). ``privacy-modes``: comma list of the modes this
    node takes part in (default ``central,secagg``).
    """

    min_noise_multiplier: float = 0.0
    max_epsilon: float | None = None
    max_delta: float | None = None
    privacy_modes: tuple[str, ...] = PRIVACY_MODES

    def __post_init__(self) -> None:
        if not (math.isfinite(self.min_noise_multiplier) and self.min_noise_multiplier >= 0):
            raise NodeConfigError(
                f"invalid node-config key 'min-noise-multiplier': must be a finite number >= 0, "
                f"got {self.min_noise_multiplier}"
            )
        if self.max_epsilon is not None and not (math.isfinite(self.max_epsilon) and self.max_epsilon > 0):
            raise NodeConfigError(f"invalid node-config key 'max-epsilon': must be > 0, got {self.max_epsilon}")
        if self.max_delta is not None and not 0 < self.max_delta < 1:
            raise NodeConfigError(f"invalid node-config key 'max-delta': must be in (0, 1), got {self.max_delta}")
        unknown = [m for m in self.privacy_modes if m not in PRIVACY_MODES]
        if unknown or not self.privacy_modes:
            raise NodeConfigError(
                f"invalid node-config key 'privacy-modes': use a comma list of {', '.join(PRIVACY_MODES)}, "
                f"got {','.join(self.privacy_modes)!r}"
            )

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodePolicy:
        """Read the policy keys; absent keys keep the defaults (no floor beyond the run's own budget)."""
        modes_raw = node_config.get("privacy-modes", ",".join(PRIVACY_MODES))
        if not isinstance(modes_raw, str):
            raise NodeConfigError(f"invalid node-config key 'privacy-modes': expected a comma list, got {modes_raw!r}")
        modes = tuple(m.strip() for m in modes_raw.split(",") if m.strip())
        min_sigma = _node_float(node_config, "min-noise-multiplier")
        return cls(
            min_noise_multiplier=0.0 if min_sigma is None else min_sigma,
            max_epsilon=_node_float(node_config, "max-epsilon"),
            max_delta=_node_float(node_config, "max-delta"),
            privacy_modes=modes,
        )

    def check(self, config: RunConfig) -> None:
        """Refuse (:class:`NodeRefusal`, ``popri/policy-refused``) a run weaker than this policy.

        Everything is judged from the run's settings: σ from ``config.resolved_noise_multiplier()``, ε planned over
        all ``config.rounds`` with the run's rate, δ and accountant.
        """
        p = config.privacy
        if p.privacy_mode not in self.privacy_modes:
            raise NodeRefusal(
                NodeErrorCode.POLICY_REFUSED,
                f"the run is in privacy-mode {p.privacy_mode!r}; this node's privacy-modes are "
                f"{','.join(self.privacy_modes)}",
            )
        if self.max_delta is not None and p.delta > self.max_delta:
            raise NodeRefusal(
                NodeErrorCode.POLICY_REFUSED, f"the run's delta {p.delta} > this node's max-delta {self.max_delta}"
            )
        sigma = config.resolved_noise_multiplier()
        if sigma < self.min_noise_multiplier:
            raise NodeRefusal(
                NodeErrorCode.POLICY_REFUSED,
                f"the run's noise multiplier {sigma:.4g} is below this node's min-noise-multiplier "
                f"{self.min_noise_multiplier}",
            )
        if self.max_epsilon is not None:
            epsilon = planned_epsilon(
                noise_multiplier=sigma,
                delta=p.delta,
                sample_rate=p.sample_rate,
                rounds=config.rounds,
                accountant=p.accountant,
            )
            if epsilon > self.max_epsilon:
                raise NodeRefusal(
                    NodeErrorCode.POLICY_REFUSED,
                    f"the run plans epsilon {epsilon:.4g} over {config.rounds} rounds; this node's max-epsilon is "
                    f"{self.max_epsilon}",
                )


def check_run_settings(config: RunConfig) -> None:
    """Run settings no node takes part in: secure aggregation with a ``noise-seed`` (the server would know every
    noise share, so the sum it unmasks would carry no noise it cannot subtract)."""
    if config.privacy.privacy_mode == "secagg" and config.privacy.noise_seed is not None:
        raise NodeRefusal(
            NodeErrorCode.POLICY_REFUSED,
            "secure aggregation with a noise-seed: the server would know every noise share; remove noise-seed",
        )


def check_round_request(config: RunConfig, *, mode: str, sample_rate: float) -> None:
    """What every scoring message must satisfy before the node touches its data.

    ``mode`` is the kind of message (``central`` for ``query.score``, ``secagg`` for the SecAgg+ ``train``): it must
    be the run's mode, or a server could ask a secure-aggregation run for the plain sum. The announced sample rate
    must be the run's (the accountant uses the run's). In secure aggregation the noise must not come from a seed the
    server knows: a run with ``noise-seed`` is refused.
    """
    p = config.privacy
    if mode != p.privacy_mode:
        raise NodeRefusal(
            NodeErrorCode.POLICY_REFUSED, f"a {mode} round in a run whose privacy-mode is {p.privacy_mode!r}"
        )
    check_run_settings(config)
    if not (isinstance(sample_rate, (int, float)) and float(sample_rate) == p.sample_rate):
        raise NodeRefusal(
            NodeErrorCode.INVALID_REQUEST, f"the round's sample rate {sample_rate!r} is not the run's ({p.sample_rate})"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------------------------------------


def node_generators(
    *, noise_seed: int | None, node_id: int, round_index: int
) -> tuple[np.random.Generator, np.random.Generator]:
    """(user-sampling generator, noise generator) for one node and round.

    Both must be unpredictable to everyone else: seeded from the OS CSPRNG (``secrets``, 128 bits) unless the run asked
    for a reproducible ``noise_seed`` (experiments only). A seeded run derives independent streams from the entropy
    tuple ``(noise_seed, node_id, round_index)`` with ``np.random.SeedSequence.spawn``.
    """
    if noise_seed is None:
        root = np.random.SeedSequence(secrets.randbits(128))
    else:
        root = np.random.SeedSequence((int(noise_seed), int(node_id), int(round_index)))
    sampling, noise = root.spawn(2)
    return np.random.Generator(np.random.PCG64(sampling)), np.random.Generator(np.random.PCG64(noise))


# ---------------------------------------------------------------------------------------------------------------------
# Secure-aggregation vector
# ---------------------------------------------------------------------------------------------------------------------


def secagg_box_bound(
    *,
    clipping_range: float,
    noise_std: float,
    dimension: int,
    failure_probability: float = SECAGG_RANGE_FAILURE_PROBABILITY,
) -> float:
    """B = R − z·s with z = √(2 ln(d / p)): the box the clipped node sum is projected onto before its noise share.

    With every coordinate of the projected sum in [−B, B], an entry of the noisy vector leaves SecAgg+'s range
    [−R, R] only if its noise N(0, s²) exceeds z·s. Per coordinate P(|g| > z·s) = 2Φ(−z) <= exp(−z²/2) (Chernoff),
    so by the union bound over the d coordinates P(any) <= d·exp(−z²/2) = p (2⁻⁴⁰ by default). Only on that event
    would SecAgg+ clip an entry and the release differ from the Gaussian mechanism: the round's δ grows by at most
    (1 + e^ε)·p, negligible next to any δ a run uses. Raises ``popri/invalid-request`` when R is too small for the
    noise (B <= 0): a property of the run's settings, never of the data.
    """
    if dimension < 1:
        raise NodeRefusal(NodeErrorCode.INVALID_REQUEST, f"a secure vector needs >= 1 coordinate, got {dimension}")
    z = math.sqrt(2.0 * math.log(dimension / failure_probability))
    bound = clipping_range - z * noise_std
    if not bound > 0:
        raise NodeRefusal(
            NodeErrorCode.INVALID_REQUEST,
            f"secagg-clipping-range {clipping_range} leaves no room for the noise share (std {noise_std:.4g}, "
            f"z {z:.2f}): raise it above {z * noise_std:.4g}",
        )
    return bound


def check_secagg_setup(config: RunConfig, *, clipping_range: float, threshold: int, max_weight: float) -> None:
    """The SecAgg+ parameters the server set up this round must be the ones the run's privacy rests on.

    ``threshold``: unmasking needs this many live nodes, so any sum the server sees covers at least that many noise
    shares: it must be >= max(2, min-replies). ``clipping_range``: SecAgg+ clips each entry to it; below the run's
    ``secagg-clipping-range`` the box of :func:`secagg_box_bound` would no longer fit. ``max_weight``: each node
    sends weight 1 and SecAgg+ scales its vector by 1/max_weight; below 1 that would push entries past the range.
    """
    p = config.privacy
    needed = max(2, p.min_replies)
    if threshold < needed:
        raise NodeRefusal(
            NodeErrorCode.POLICY_REFUSED, f"SecAgg+ reconstruction threshold {threshold} < min-replies {needed}"
        )
    if not clipping_range >= p.secagg_clipping_range:
        raise NodeRefusal(
            NodeErrorCode.INVALID_REQUEST,
            f"SecAgg+ clipping range {clipping_range} < the run's secagg-clipping-range {p.secagg_clipping_range}",
        )
    if not max_weight >= 1.0:
        raise NodeRefusal(NodeErrorCode.INVALID_REQUEST, f"SecAgg+ max weight {max_weight} < 1")


def project_to_box(vector: np.ndarray, *, bound: float) -> np.ndarray:
    """Euclidean projection onto the box [−B, B]^d (coordinate-wise clamping).

    Projection onto a convex set is 1-Lipschitz in L2: ||P(a) − P(b)|| <= ||a − b||. Neighbouring node sums differ by
    at most 1 (one user's clipped vector), so their projections do too: the sensitivity stays 1 per user. Source:
    non-expansiveness of convex projections (Bauschke & Combettes 2017, Prop. 4.16).
    """
    return np.clip(vector.astype(np.float64), -bound, bound)


def secure_node_vector(
    *,
    node_sum: np.ndarray,
    noise_multiplier: float,
    min_replies: int,
    clipping_range: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """What a node puts into the secure sum: ``project_to_box(node_sum, B) + N(0, σ²/n_min · I)``.

    The noise share s = σ·Δ/√n_min (Δ = 1; :func:`popri.privacy.noise_share_std`): any sum over >= n_min nodes carries
    at least the N(0, σ²) the accountant assumes. B from :func:`secagg_box_bound` keeps every entry inside SecAgg+'s
    range except with probability 2⁻⁴⁰, so the node never has to drop out because of its own (data-dependent) values.
    Non-finite values are refused before SecAgg+ quantises them.
    """
    if not np.all(np.isfinite(node_sum)):
        raise NodeRefusal(NodeErrorCode.INTERNAL_ERROR, "the node's clipped sum is not finite")
    std = noise_share_std(noise_multiplier=noise_multiplier, min_replies=min_replies)
    bound = secagg_box_bound(clipping_range=clipping_range, noise_std=std, dimension=int(node_sum.size))
    noisy = add_noise_share(
        node_sum=project_to_box(node_sum, bound=bound),
        noise_multiplier=noise_multiplier,
        min_replies=min_replies,
        rng=rng,
    )
    if not np.all(np.isfinite(noisy)):
        raise NodeRefusal(NodeErrorCode.INTERNAL_ERROR, "the node's noisy vector is not finite")
    return noisy


# ---------------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------------


def check_sample_embeddings(embeddings: np.ndarray) -> np.ndarray:
    """The server's sample embeddings as float64 (K·J, d); a wrong shape or a non-finite entry is refused."""
    arr = np.asarray(embeddings)
    if arr.ndim != 2 or arr.shape[0] < 1 or not np.issubdtype(arr.dtype, np.floating):
        raise NodeRefusal(NodeErrorCode.INVALID_REQUEST, f"sample embeddings of shape {arr.shape}, dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise NodeRefusal(NodeErrorCode.INVALID_REQUEST, "the sample embeddings contain NaN or inf")
    return arr.astype(np.float64)


@dataclass
class NodeScorer:
    """A node's users, reduced to their private embedding sums (computed once, cached on the node's disk)."""

    user_sums: np.ndarray  # (users, d), private

    @classmethod
    def from_users(
        cls,
        embedder: Any | None,
        users: UserData,
        *,
        cache_dir: Path,
        precision: str = "fp32",
        progress: bool = False,
    ) -> NodeScorer:
        """``embedder=None``: load the default embedder in ``precision`` only if the cache misses."""
        return cls(cached_user_sums(embedder, users, cache_dir=cache_dir, precision=precision, progress=progress))

    @property
    def num_users(self) -> int:
        return int(self.user_sums.shape[0])

    def score(
        self, sample_embeddings: np.ndarray, *, sample_rate: float, rng: np.random.Generator
    ) -> tuple[np.ndarray, int]:
        """(Σ over Poisson-sampled users of clipped score vectors, number sampled). Sensitivity 1 per user."""
        if sample_embeddings.ndim != 2 or sample_embeddings.shape[1] != self.user_sums.shape[1]:
            raise NodeRefusal(
                NodeErrorCode.INVALID_REQUEST,
                f"sample embeddings of shape {sample_embeddings.shape} do not match this node's embedder "
                f"(dimension {self.user_sums.shape[1]})",
            )
        users = poisson_sample(num_users=self.num_users, sample_rate=sample_rate, rng=rng)
        return clipped_scores_sum(sample_embeddings, self.user_sums, users=users), int(users.size)


# In simulation one process serves several virtual nodes: prepared scorers are keyed by everything that selects the
# node's users, never shared blindly. In deployment each message is a fresh process and the disk cache serves.
_PREPARED: dict[tuple[Any, ...], NodeScorer] = {}


def _file_version(path: str) -> tuple[int, int] | None:
    """(mtime, size) of a data file, so that an edited file is read again by a long-lived process."""
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def prepare_node(config: RunConfig, source: NodeSource, *, cache_dir: Path, progress: bool = True) -> NodeScorer:
    """Load the node's private users and their embedding sums (disk-cached, then kept in this process).

    Called on ``query.prepare`` so the slow first embedding never runs under a round's reply deadline; a scoring
    message on an unprepared node calls it too. Unreadable data is refused with ``popri/data-unavailable``.
    """
    key = (
        source,
        config.data,
        config.seed,
        config.embedding_precision,
        str(cache_dir),
        _file_version(source.data_path or config.data.data),
    )
    if key not in _PREPARED:
        try:
            users = _load_source_users(config, source)
        except (DataFormatError, OSError, UnicodeError) as err:
            raise NodeRefusal(NodeErrorCode.DATA_UNAVAILABLE, f"cannot read this node's data: {err}") from err
        _PREPARED[key] = NodeScorer.from_users(
            None, users, cache_dir=cache_dir, precision=config.embedding_precision, progress=progress
        )
        logger.info("node prepared: private embedding sums ready")
        # The federation has at least this node's users, so δ >= 1/(node's users) means δ >= 1/(everyone): warn
        # here, in the node's own log (the server never learns the count).
        if warning := delta_warning(config.privacy.delta, _PREPARED[key].num_users):
            logger.warning("%s", warning)
    return _PREPARED[key]
