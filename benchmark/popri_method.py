"""The POPri method: a real popri run (its own ServerApp and ClientApp) on exactly the private train split.

The benchmark writes the private train users to a user JSONL file and hands popri a config built from the shared
settings (generator, sampling lengths, initial set, token budget, corpus size, δ, accountant, seed), so POPri, PE and
eps0 differ only in how they use private data. popri's ``synthetic.jsonl`` is the corpus the downstream model trains
on; ``privacy.json`` gives the ε its ledger spent.

Backends: ``simulation`` runs popri's own Flower simulation entry point (Ray, virtual SuperNodes); ``inprocess``
runs the same ServerApp and ClientApp over :class:`server.grid.InProcessGrid` (no Ray: for tests and small
machines).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmark.config import BenchConfig, DataSpec
from benchmark.corpus import read_corpus
from server.grid import run_in_process, simulated_node_configs
from server.messages import query_bytes, score_reply_bytes

logger = logging.getLogger(__name__)

BACKENDS = ("inprocess", "simulation")


def popri_flat_config(
    bench: BenchConfig,
    spec: DataSpec,
    *,
    epsilon: float,
    seed: int,
    noise_seed: int | None,
    train_file: Path,
    output: Path,
    instruction: str,
) -> dict[str, Any]:
    """popri's flat (kebab-case) config for one ε and one seed: the benchmark's shared keys
    (:data:`benchmark.config.POPRI_MANAGED_KEYS`) and then the method's own ``bench.popri.settings``."""
    flat: dict[str, Any] = {
        "data": str(train_file),
        "validation-fraction": 0.0,  # the file is the private train split: every user in it takes part
        "min-text-chars": 1,  # already filtered and truncated by the benchmark
        "max-users": 0,
        "model": bench.corpus.generator,
        "max-new-tokens": bench.corpus.max_new_tokens,
        "temperature": bench.corpus.temperature,
        "top-p": bench.corpus.top_p,
        "token-budget": spec.token_budget,
        "initial-set-size": bench.corpus.initial_set_size,
        "initial-instruction": instruction,
        "generation-batch-size": bench.corpus.generation_batch_size,
        "final-samples": bench.corpus.samples,
        "final-samples-per-prompt": bench.corpus.samples_per_prompt,
        "epsilon": epsilon,
        "delta": bench.delta,
        "sample-rate": 1.0,
        "accountant": bench.accountant,
        "seed": seed,
        "output": str(output),
        # PE's votes and every metric embed in fp32; POPri's scores too, unless popri.embedding-precision says else
        "embedding-precision": "fp32",
    }
    if bench.cache_dir:
        flat["cache-dir"] = bench.cache_dir
    if noise_seed is not None:
        flat["noise-seed"] = noise_seed
    flat.update(dict(bench.popri.settings))
    bench.popri.run_config(flat)  # validated against popri's schema (errors name the key)
    return flat


def _run_inprocess(flat: dict[str, Any], *, num_nodes: int, progress: bool, resume: bool) -> None:
    from client.app import make_client_app

    run_config = {**flat, "progress": progress, "resume": resume}
    run_in_process(make_client_app(), simulated_node_configs(num_nodes), run_config)


def _run_simulation(flat: dict[str, Any], *, progress: bool, resume: bool) -> None:
    from popri.config import config_from_flat

    config = config_from_flat(flat)
    try:
        from popri.runner import run_simulation  # type: ignore[import-not-found]
    except ImportError:
        from server.simulation import run_simulation
    run_simulation(config, resume=resume, progress=progress)


@dataclass
class PopriResult:
    corpus: list[str]
    epsilon: float
    noise_multiplier: float | None
    rounds: int
    bytes_down_per_client_round: int
    bytes_up_per_client_round: int
    seconds: float
    output: Path
    sample_rate: float = 1.0


def client_bytes_per_round(*, prompts: int, samples_per_prompt: int, embedding_dim: int) -> tuple[int, int]:
    """(down, up) bytes for one client per round: :func:`server.messages.query_bytes` and
    :func:`server.messages.score_reply_bytes`, counted on the very records the apps send.

    Down: the ``query.score`` message (K·J × d float32 sample embeddings and its round config). Up: its reply (the
    K·J float64 clipped score sum, the user count and the source tag). Transport framing is not counted, for any
    method.
    """
    n = prompts * samples_per_prompt
    return query_bytes(num_samples=n, dim=embedding_dim), score_reply_bytes(num_samples=n)


def run_popri_method(
    bench: BenchConfig,
    spec: DataSpec,
    *,
    epsilon: float,
    seed: int,
    noise_seed: int | None,
    train_file: Path,
    output: Path,
    instruction: str,
    embedding_dim: int,
    resume: bool = False,
) -> PopriResult:
    """One popri run at ``epsilon``; returns its final corpus and its ledger's ε.

    ``resume`` continues an interrupted run in ``output`` from its last checkpoint (popri's own resume: the privacy
    ledger continues, it never recounts).
    """
    backend = bench.popri.backend
    if backend not in BACKENDS:
        raise ValueError(f"unknown popri backend {backend!r}; use {', '.join(BACKENDS)}")
    start = time.time()
    flat = popri_flat_config(
        bench,
        spec,
        epsilon=epsilon,
        seed=seed,
        noise_seed=noise_seed,
        train_file=train_file,
        output=output,
        instruction=instruction,
    )
    logger.info("POPri run at epsilon=%g -> %s (%s)", epsilon, output, backend)
    if backend == "inprocess":
        _run_inprocess(flat, num_nodes=bench.popri.num_nodes, progress=bench.progress, resume=resume)
    else:
        _run_simulation(flat, progress=bench.progress, resume=resume)
    privacy = json.loads((output / "privacy.json").read_text())
    corpus = read_corpus(output / "synthetic.jsonl")
    down, up = client_bytes_per_round(
        prompts=bench.popri.prompts, samples_per_prompt=bench.popri.samples_per_prompt, embedding_dim=embedding_dim
    )
    return PopriResult(
        corpus=corpus,
        epsilon=float(privacy["epsilon"]),
        noise_multiplier=privacy.get("noise_multiplier"),
        rounds=int(privacy.get("rounds_completed", bench.popri.rounds)),
        sample_rate=float(flat["sample-rate"]),
        bytes_down_per_client_round=down,
        bytes_up_per_client_round=up,
        seconds=time.time() - start,
        output=output,
    )


def round_samples(output: Path) -> dict[int, list[str]]:
    """The samples of every POPri round (popri keeps each round's in ``output/samples/``, beyond checkpoint pruning):
    round number (1-based) -> texts. For benchmark diagnostics only (their metrics read private held-out text)."""
    from popri.report import SAMPLES_DIR

    out: dict[int, list[str]] = {}
    folder = output / SAMPLES_DIR
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("round-*.jsonl")):
        out[int(path.stem[len("round-") :]) + 1] = read_corpus(path)  # files count rounds from 0
    return out
