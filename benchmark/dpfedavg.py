"""DP-FedAvg with user-level DP, on Flower's Message API, accounted with Opacus like POPri.

Mechanism (McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially Private Recurrent Language Models", ICLR,
Alg. 1 with the fixed-denominator estimator), one round:

1. The server Poisson-samples users with rate q (``popri.privacy.poisson_sample``; the sampling the accountant
   analyses; drawn from a CSPRNG-seeded generator, since amplification by sampling needs the sample to be secret)
   and sends the global model θ and the sampled ids to every node.
2. A node holds a round-robin group of users (``popri.data.partition_users``). For each sampled user u it owns it
   runs ``local-steps`` SGD steps from θ on u's texts, takes ``Δ_u = θ_u − θ`` over all parameters, clips it,
   ``Δ̄_u = Δ_u · min(1, C / ||Δ_u||_2)``, and replies with ``S_k = Σ_{u ∈ node k} Δ̄_u`` and the ids it trained.
3. The server checks every reply (shapes, finiteness, claimed ids ⊆ sampled ids, each id claimed once), re-clips it to
   ``|claimed_k| · C``, sums, and adds Gaussian noise: ``S̃ = Σ_k S_k + N(0, σ²C² I)``.
4. ``θ ← θ + η_s · S̃ / (q·N)`` with N the number of users: the denominator is fixed, so it reveals nothing about
   who took part and the sensitivity of the mean is C/(qN).

**Sensitivity with grouped nodes.** Adding or removing one user changes exactly one term Δ̄_u of ``Σ_k S_k`` and
nothing else (the denominator is fixed), so the L2 sensitivity of the sum is C however users are grouped into nodes.
A node that sums g users' clipped updates is therefore *not* a DP unit with bound C: its reply may have norm up to
g·C, and it must not be clipped to C (that would change the mechanism's output, not its privacy) nor counted as one
contribution. Flower's own ``DifferentialPrivacy{Client,Server}SideFixedClipping`` wrappers assume one DP unit per
node (noise ``z·C/num_sampled_clients`` on the mean of node replies, node-level clipping) and draw noise from numpy's
global generator; with one user per node and q = 1 they are the same mechanism as this one (the tests check the
noise scale against ``flwr.supercore.differential_privacy.compute_stdv``). This strategy is their user-level
equivalent: it subclasses Flower's Message-API ``FedAvg`` and keeps its round loop (``Strategy.start``), and
replaces the aggregation.

Privacy: T rounds of the sampled Gaussian mechanism with multiplier σ and rate q, add/remove-one-user adjacency;
σ is calibrated with Opacus (``popri.privacy.calibrate_noise``) and every round is charged to a
``popri.privacy.PrivacyLedger`` before its noisy result is used. Choosing the round on validation data is, as for
every method here, benchmark model selection outside the accounting.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from tqdm.auto import tqdm

from benchmark.config import DPFedAvgConfig
from benchmark.downstream import seeded_torch, sequence_loss, trainable_parameters
from popri.data import partition_users
from popri.privacy import PrivacyLedger, calibrate_noise, gaussian_mechanism, poisson_sample
from server.grid import InProcessGrid, simulated_node_configs

logger = logging.getLogger(__name__)

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"


# --------------------------------------------------------------------------------------------------------------------
# model <-> arrays


def model_arrays(model: torch.nn.Module) -> ArrayRecord:
    """The trainable parameters as an ArrayRecord (tied weights appear once, under their first name). For a LoRA
    downstream these are the adapter's only: the frozen pretrained weights are public and never sent."""
    return ArrayRecord({name: Array(p.detach().cpu().numpy().copy()) for name, p in trainable_parameters(model)})


def load_arrays(model: torch.nn.Module, arrays: ArrayRecord) -> None:
    params = dict(trainable_parameters(model))
    if set(arrays.keys()) != set(params):
        raise ValueError(f"arrays hold {sorted(arrays.keys())[:3]}..., the model expects {sorted(params)[:3]}...")
    with torch.no_grad():
        for name, array in arrays.items():
            params[name].copy_(torch.from_numpy(array.numpy()))


def l2_norm(arrays: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays)))


def clip_update(update: list[np.ndarray], *, clip_norm: float) -> list[np.ndarray]:
    """``Δ · min(1, C / ||Δ||_2)`` with the norm taken over all parameters together (flat clipping)."""
    norm = l2_norm(update)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return [u * scale for u in update]


# --------------------------------------------------------------------------------------------------------------------
# client side


@dataclass
class NodeData:
    """What one node holds: its users' global ids and their encoded texts (private; never sent)."""

    user_ids: np.ndarray
    sequences: dict[int, list[list[int]]]  # global user id -> encoded texts


def local_update(
    model: torch.nn.Module,
    global_arrays: ArrayRecord,
    sequences: list[list[int]],
    *,
    local_steps: int,
    batch_size: int,
    learning_rate: float,
    pad: int,
    generator: torch.Generator,
) -> list[np.ndarray]:
    """``θ_u − θ``: ``local_steps`` SGD steps from θ on one user's texts (batches cycle through a seeded shuffle)."""
    load_arrays(model, global_arrays)
    trainable = trainable_parameters(model)
    names = [n for n, _ in trainable]
    start = [global_arrays[n].numpy() for n in names]
    optimizer = torch.optim.SGD([p for _, p in trainable], lr=learning_rate)
    model.train()
    order: list[int] = []
    with seeded_torch(generator):  # dropout draws only from ``generator``
        for _ in range(local_steps):
            if len(order) < min(batch_size, len(sequences)):
                order += torch.randperm(len(sequences), generator=generator).tolist()
            batch, order = order[:batch_size], order[batch_size:]
            loss = sequence_loss(model, [sequences[i] for i in batch], pad=pad)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    params = dict(trainable)
    return [params[n].detach().cpu().numpy() - s for n, s in zip(names, start, strict=True)]


def make_client_app(
    node_data: Callable[[Context], NodeData],
    model_factory: Callable[[], torch.nn.Module],
    *,
    pad: int,
    seed: int,
) -> ClientApp:
    """The ClientApp: trains each sampled user it owns, clips each user's update, replies with their sum."""
    app = ClientApp()
    models: dict[int, torch.nn.Module] = {}  # one working copy per node, reused across rounds

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        data = node_data(context)
        config = msg.content[CONFIG]
        arrays = msg.content[ARRAYS]
        sampled = {int(u) for u in config["sampled-users"]}  # type: ignore[union-attr]
        mine = [int(u) for u in data.user_ids if int(u) in sampled]
        clip_norm = float(config["clip-norm"])  # type: ignore[arg-type]
        rnd = int(config["server-round"])  # type: ignore[arg-type]
        if context.node_id not in models:
            models[context.node_id] = model_factory()
        model = models[context.node_id]
        total = [np.zeros_like(a.numpy()) for a in arrays.values()]
        for user in mine:
            generator = torch.Generator().manual_seed(
                int(np.random.SeedSequence([seed, rnd, user]).generate_state(1)[0])
            )
            update = local_update(
                model,
                arrays,
                data.sequences[user],
                local_steps=int(config["local-steps"]),  # type: ignore[arg-type]
                batch_size=int(config["local-batch-size"]),  # type: ignore[arg-type]
                learning_rate=float(config["local-learning-rate"]),  # type: ignore[arg-type]
                pad=pad,
                generator=generator,
            )
            total = [t + c for t, c in zip(total, clip_update(update, clip_norm=clip_norm), strict=True)]
        reply = RecordDict(
            {
                ARRAYS: ArrayRecord(
                    {k: Array(t.astype(np.float32)) for k, t in zip(arrays.keys(), total, strict=True)}
                ),
                METRICS: MetricRecord({"num-examples": max(len(mine), 1), "users": mine, "num-users": len(mine)}),
            }
        )
        return Message(reply, reply_to=msg)

    return app


# --------------------------------------------------------------------------------------------------------------------
# server side


class InvalidUpdateError(ValueError):
    """A node reply the server must not use."""


class UserLevelDPFedAvg(FedAvg):
    """Flower ``FedAvg`` with user-level DP aggregation (module docstring: sampling, clipping, noise, denominator)."""

    def __init__(
        self,
        *,
        num_users: int,
        noise_multiplier: float,
        clip_norm: float,
        sample_rate: float,
        server_learning_rate: float,
        ledger: PrivacyLedger,
        user_rng: np.random.Generator,
        noise_rng: np.random.Generator,
        min_nodes: int = 1,
    ) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=min_nodes,
            min_available_nodes=min_nodes,
        )
        if noise_multiplier < 0 or clip_norm <= 0 or not 0 < sample_rate <= 1 or num_users < 1:
            raise ValueError("need noise_multiplier >= 0, clip_norm > 0, 0 < sample_rate <= 1 and num_users >= 1")
        self.num_users = num_users
        self.noise_multiplier = noise_multiplier
        self.clip_norm = clip_norm
        self.sample_rate = sample_rate
        self.server_learning_rate = server_learning_rate
        self.ledger = ledger
        self.user_rng = user_rng
        self.noise_rng = noise_rng
        self.current: ArrayRecord = ArrayRecord()
        self.sampled: set[int] = set()
        self.bytes_down = 0
        self.bytes_up = 0
        self.last_round_users = 0  # in memory only: a count of users is private under user-level DP

    @property
    def noise_std_on_mean(self) -> float:
        """σ·C/(qN): the standard deviation of the noise on the mean update, per coordinate."""
        return self.noise_multiplier * self.clip_norm / (self.sample_rate * self.num_users)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = arrays
        self.sampled = {
            int(u) for u in poisson_sample(num_users=self.num_users, sample_rate=self.sample_rate, rng=self.user_rng)
        }
        config["sampled-users"] = sorted(self.sampled)
        config["clip-norm"] = self.clip_norm
        self.bytes_down = int(arrays.count_bytes())
        return super().configure_train(server_round, arrays, config, grid)

    def _checked(self, reply: Message, claimed_so_far: set[int]) -> tuple[list[np.ndarray], list[int]]:
        """A reply's update sum, re-clipped to ``|claimed| · C``, and the users it claims; raises if unusable."""
        content = reply.content
        if ARRAYS not in content.array_records or METRICS not in content.metric_records:
            raise InvalidUpdateError("reply lacks its arrays or metrics")
        arrays = content[ARRAYS]
        if list(arrays.keys()) != list(self.current.keys()):
            raise InvalidUpdateError("reply arrays do not match the model's parameters")
        update = arrays.to_numpy_ndarrays()
        for got, want in zip(update, self.current.to_numpy_ndarrays(), strict=True):
            if got.shape != want.shape or not np.issubdtype(got.dtype, np.floating):
                raise InvalidUpdateError(f"reply array of shape {got.shape} / {got.dtype}, expected {want.shape}")
            if not np.all(np.isfinite(got)):
                raise InvalidUpdateError("reply contains NaN or inf")
        users = [int(u) for u in content[METRICS].get("users", [])]  # type: ignore[union-attr]
        if len(set(users)) != len(users) or not set(users) <= self.sampled or set(users) & claimed_so_far:
            raise InvalidUpdateError("reply claims users that were not sampled, or claims a user twice")
        if not users:
            return [np.zeros_like(u, dtype=np.float64) for u in update], []
        return clip_update([u.astype(np.float64) for u in update], clip_norm=len(users) * self.clip_norm), users

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        current = self.current.to_numpy_ndarrays()
        total = [np.zeros_like(c, dtype=np.float64) for c in current]
        claimed: set[int] = set()
        rejected = 0
        for reply in replies:
            if reply.has_error():
                rejected += 1
                logger.warning("round %d: node error reply: %s", server_round, reply.error.reason)
                continue
            try:
                update, users = self._checked(reply, claimed)
            except InvalidUpdateError as err:
                rejected += 1
                logger.warning("round %d: rejected a node reply: %s", server_round, err)
                continue
            self.bytes_up = max(self.bytes_up, int(reply.content[ARRAYS].count_bytes()))
            claimed |= set(users)
            total = [t + u for t, u in zip(total, update, strict=True)]
        epsilon = self.ledger.charge(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        scale = self.server_learning_rate / (self.sample_rate * self.num_users)
        new = []
        for c, t in zip(current, total, strict=True):  # one Gaussian per array = one on the concatenated update
            noisy = gaussian_mechanism(
                summed_scores=t, noise_multiplier=self.noise_multiplier, sensitivity=self.clip_norm, rng=self.noise_rng
            )
            new.append((c.astype(np.float64) + scale * noisy).astype(c.dtype))
        arrays = ArrayRecord({k: Array(a) for k, a in zip(self.current.keys(), new, strict=True)})
        # The number of users is private under user-level DP: it stays in memory (the duplicate check), never logged.
        self.last_round_users = len(claimed)
        metrics = MetricRecord({"rejected-replies": rejected, "epsilon": epsilon})
        logger.info("round %d: epsilon spent %.4f", server_round, epsilon)
        return arrays, metrics


# --------------------------------------------------------------------------------------------------------------------
# driver


@dataclass
class DPFedAvgResult:
    model: torch.nn.Module
    epsilon: float
    noise_multiplier: float
    selected_round: int
    selected_validation: Any
    bytes_down_per_client_round: int
    bytes_up_per_client_round: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


def run_dpfedavg(
    *,
    initial_model: torch.nn.Module,
    model_factory: Callable[[], torch.nn.Module],
    user_sequences: list[list[list[int]]],
    evaluate_validation: Callable[[torch.nn.Module], Any],
    config: DPFedAvgConfig,
    epsilon: float,
    delta: float,
    accountant: str,
    pad: int,
    seed: int,
    noise_rng: np.random.Generator,
    sampling_rng: np.random.Generator,
    progress: bool = False,
) -> DPFedAvgResult:
    """Run DP-FedAvg at (ε, δ) from ``initial_model`` on Flower (in-process grid), keep the best validation round.

    ``user_sequences[u]`` holds user u's encoded private texts. ``sampling_rng`` draws the Poisson sample of users:
    like the noise it must be unpredictable (CSPRNG-seeded) for the sampling amplification to hold, unless the user
    asked for reproducible runs. ``evaluate_validation(model)`` returns an object with
    ``accuracy`` and ``cross_entropy`` (a :class:`benchmark.downstream.EvalResult`).
    """
    start = time.time()
    num_users = len(user_sequences)
    sigma = calibrate_noise(
        epsilon=epsilon, delta=delta, sample_rate=config.sample_rate, rounds=config.rounds, accountant=accountant
    )
    logger.info(
        "DP-FedAvg: epsilon=%g delta=%g sigma=%.4f q=%g rounds=%d users=%d C=%g",
        epsilon,
        delta,
        sigma,
        config.sample_rate,
        config.rounds,
        num_users,
        config.clip_norm,
    )
    nodes = {}
    for pid in range(config.num_nodes):
        ids = partition_users(num_users, config.num_nodes, pid)
        nodes[pid] = NodeData(user_ids=ids, sequences={int(u): user_sequences[int(u)] for u in ids})
    client_app = make_client_app(
        lambda ctx: nodes[int(ctx.node_config["partition-id"])], model_factory, pad=pad, seed=seed
    )
    grid = InProcessGrid(client_app, simulated_node_configs(config.num_nodes))
    with _quiet_flower():
        strategy = UserLevelDPFedAvg(
            num_users=num_users,
            noise_multiplier=sigma,
            clip_norm=config.clip_norm,
            sample_rate=config.sample_rate,
            server_learning_rate=config.server_learning_rate,
            ledger=PrivacyLedger(delta=delta, accountant=accountant, target_epsilon=epsilon),
            user_rng=sampling_rng,
            noise_rng=noise_rng,
            min_nodes=config.num_nodes,
        )
    evaluator = model_factory()
    best: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    bar = tqdm(total=config.rounds, desc=f"DP-FedAvg eps={epsilon:g}", disable=not progress, leave=False)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None  # the starting point is not a candidate (as in downstream.train)
        load_arrays(evaluator, arrays)
        result = evaluate_validation(evaluator)
        history.append({"round": server_round, "accuracy": result.accuracy, "cross_entropy": result.cross_entropy})
        if not best or (result.accuracy, -result.cross_entropy) > (
            best["result"].accuracy,
            -best["result"].cross_entropy,
        ):
            best.update(round=server_round, result=result, arrays=arrays)
        bar.update(1)
        bar.set_postfix(val_acc=f"{result.accuracy:.4f}")
        return MetricRecord({"val-accuracy": result.accuracy, "val-cross-entropy": result.cross_entropy})

    try:
        with _quiet_flower():  # Flower logs every round at INFO; our own logger reports the rounds
            strategy.start(
                grid=grid,
                initial_arrays=model_arrays(initial_model),
                num_rounds=config.rounds,
                train_config=ConfigRecord(
                    {
                        "local-steps": config.local_steps,
                        "local-batch-size": config.local_batch_size,
                        "local-learning-rate": config.local_learning_rate,
                    }
                ),
                evaluate_fn=evaluate_fn,
            )
    finally:
        bar.close()
    model = model_factory()
    load_arrays(model, best["arrays"])
    return DPFedAvgResult(
        model=model,
        epsilon=strategy.ledger.epsilon(),
        noise_multiplier=sigma,
        selected_round=int(best["round"]),
        selected_validation=best["result"],
        bytes_down_per_client_round=strategy.bytes_down,
        bytes_up_per_client_round=_one_user_upload(strategy),
        seconds=time.time() - start,
        history=history,
    )


@contextlib.contextmanager
def _quiet_flower() -> Iterator[None]:
    """Flower warns at INFO/WARNING about settings this strategy uses on purpose (no federated evaluation)."""
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        flwr_logger.setLevel(level)


def _one_user_upload(strategy: UserLevelDPFedAvg) -> int:
    """A user's device uploads one clipped update: the same arrays as the model, so the same size as the download."""
    return strategy.bytes_up or strategy.bytes_down
