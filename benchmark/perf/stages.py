"""The benchmarked stages: generation, scoring, the private-embedding cache, DPO, the shared-prompt ablation,
threads, one whole round and its communication. Each returns a row (or a record) for perf.json.

- ``generation``: popri's sampler (``sample_completions`` on the bf16 merged generation model: one prefill per prompt,
  its KV cache expanded for the J samples) against Hugging Face ``model.generate(num_return_sequences=J,
  do_sample=True)`` in float32, llama.cpp on the packaged GGUF, and CTranslate2, OpenVINO GenAI and vLLM CPU in
  their own interpreters, each when available (else a row saying why). Same prompts, samples, new-token limit and
  stop rule; tokens/s is also given as a fraction of this machine's measured matmul peak (2 x parameters FLOPs per
  token).
- ``scoring``: popri's vectorised scoring through per-user embedding sums against the reference code's per-user loop;
  plus the private-embedding cache: the first ``cached_user_sums`` embeds, the second only reads the disk.
- ``dpo``: one popri DPO round (``LoraDPO.train_round``) against TRL's ``DPOTrainer`` with the same model, LoRA,
  pairs, batch and steps; plus the step-1 loss of both on a float32 config.
- ``round``: one round of ``PopriRun`` at the default settings, its per-stage seconds and peak memory.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark.perf.inputs import EMBEDDING_DIM, PerfAssets, PerfSizes, popri_sampler
from benchmark.perf.peers import (
    WORKER_PEERS,
    PeerFailure,
    PeerStatus,
    WorkerPeer,
    hf_generate,
    llama_cpp_status,
    make_llama_cpp_sampler,
    popri_lora_config,
    reference_loop_scores,
    trl_args,
    trl_trainer,
    worker_peer_status,
)
from benchmark.perf.timing import (
    comparison,
    count_tokens,
    device,
    interleaved,
    matmul_gflops,
    median,
    not_measured,
    num_parameters,
    peak_memory_mib,
    sig,
    sync,
)
from popri.generation import sample_completions

logger = logging.getLogger(__name__)

TARGETS = {"generation": 1.5, "scoring": 20.0, "dpo": 4.0}


# -- generation ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationPeers:
    """Which optional generation peers to try: the interpreter of each worker peer (None: this one)."""

    pythons: dict[str, str | None] = field(default_factory=dict)
    work_dir: Path | None = None  # where worker peers cache their converted models (default: a temporary folder)


def _llama_status(assets: PerfAssets) -> PeerStatus:
    status = llama_cpp_status()
    if status.available and assets.gguf_path is None:
        return PeerStatus("llama.cpp", False, version=status.version, why="no GGUF file of these weights (tiny model)")
    if status.available and device().type == "cuda":
        return PeerStatus("llama.cpp", False, version=status.version, why="CUDA run: llama.cpp was built for the CPU")
    return status


def _model_dir(assets: PerfAssets) -> Path | None:
    """The weights as a safetensors folder, for peers that convert them (the local folder a tiny model loads from)."""
    if assets.model_dir is not None:
        return assets.model_dir
    local = Path(assets.generator_id)
    return local if (local / "config.json").exists() else None


def _start_worker_peers(
    assets: PerfAssets, peers: GenerationPeers, workdir: Path
) -> tuple[dict[str, WorkerPeer], dict[str, PeerStatus]]:
    """Every worker peer that is installed and loads; the status of each (loaded or why not)."""
    started: dict[str, WorkerPeer] = {}
    statuses: dict[str, PeerStatus] = {}
    model_dir = _model_dir(assets)
    for name in WORKER_PEERS:
        status = worker_peer_status(name, peers.pythons.get(name))
        if status.available and device().type == "cuda":
            status = PeerStatus(name, False, version=status.version, why="CUDA run: the worker peers run on the CPU")
        if status.available and model_dir is None:
            status = PeerStatus(name, False, version=status.version, why="no safetensors folder of these weights")
        if status.available:
            assert status.python is not None and model_dir is not None
            try:
                started[name] = WorkerPeer(
                    name,
                    python=status.python,
                    model_dir=model_dir,
                    work_dir=peers.work_dir or workdir / "peers",
                    threads=torch.get_num_threads(),
                )
            except (OSError, RuntimeError) as err:
                status = PeerStatus(name, False, version=status.version, why=str(err), python=status.python)
        statuses[name] = status
    return started, statuses


def bench_generation(
    assets: PerfAssets,
    sizes: PerfSizes,
    prompts: list[str],
    *,
    seed: int,
    peak_gflops: dict[str, float],
    peers: GenerationPeers | None = None,
    workdir: Path | None = None,
) -> tuple[list[dict[str, Any]], list[str], dict[str, PeerStatus]]:
    """popri (bf16 merged model) vs HF generate (fp32) and every optional peer that is available.

    Returns the rows (one per peer; a peer that is not available is a row saying why), popri's samples and each
    optional peer's status.
    """
    peers = peers or GenerationPeers()
    tok = assets.tokenizer
    k = dict(
        samples_per_prompt=sizes.samples_per_prompt,
        max_new_tokens=sizes.max_new_tokens,
        token_budget=sizes.token_budget,
    )
    sampler = popri_sampler(assets.model, tok, torch.bfloat16)

    def run_popri() -> list[str]:
        return sample_completions(
            sampler, tok, prompts, batch_size=sizes.generation_batch, generator=torch.Generator().manual_seed(seed), **k
        )

    def run_hf() -> list[str]:
        return hf_generate(assets.model, tok, prompts, batch_size=sizes.generation_batch, seed=seed, **k)

    runs: dict[str, Callable[[], list[str]]] = {"popri": run_popri, "hf": run_hf}
    statuses = {"llama.cpp": _llama_status(assets)}
    if statuses["llama.cpp"].available:
        assert assets.gguf_path is not None
        llama = make_llama_cpp_sampler(assets.gguf_path, threads=torch.get_num_threads(), n_ctx=1024)
        runs["llama.cpp"] = lambda: llama(prompts, tokenizer=tok, **k)
    with tempfile.TemporaryDirectory(prefix="popri-perf-peers-") as tmp:
        workers, worker_statuses = _start_worker_peers(assets, peers, Path(workdir or tmp))
        statuses.update(worker_statuses)
        try:
            for name, worker in workers.items():
                runs[name] = lambda w=worker: w.generate(prompts, tokenizer=tok, seed=seed, **k)
            # Warm-up (one-time allocations, lazy init) outside the timed runs.
            warm = dict(samples_per_prompt=2, max_new_tokens=2, token_budget=4)
            sample_completions(sampler, tok, prompts[:1], generator=torch.Generator().manual_seed(0), **warm)
            hf_generate(assets.model, tok, prompts[:1], batch_size=1, seed=0, **warm)
            for worker in workers.values():
                worker.generate(prompts[:1], tokenizer=tok, seed=0, **warm)
            while True:
                try:
                    times, results = interleaved(runs, sizes.repeats_generation)
                    break
                except PeerFailure as err:  # one engine's bug must not cost the others' measurements
                    logger.warning("%s; measuring the others without it", err)
                    runs.pop(err.name)
                    workers.pop(err.name).close()
                    old_status = statuses[err.name]
                    statuses[err.name] = PeerStatus(
                        err.name, False, version=old_status.version, why=str(err), python=old_status.python
                    )
        finally:
            for worker in workers.values():
                worker.close()
    peak_gflops = {k: max(v, matmul_gflops(getattr(torch, k))) for k, v in peak_gflops.items()}  # best of before/after
    params = num_parameters(assets.model)
    n_samples = len(prompts) * sizes.samples_per_prompt

    def throughput(name: str) -> dict[str, Any]:
        tokens = count_tokens(tok, results[name])
        tps = tokens / median(times[name])
        return {
            "tokens": tokens,
            "tokens_per_sample": round(tokens / n_samples, 1),
            "tokens_per_s": round(tps, 1),
            "fraction_of_fp32_peak": round(tps * 2 * params / (peak_gflops["float32"] * 1e9), 4),
            "fraction_of_bf16_peak": round(tps * 2 * params / (peak_gflops["bfloat16"] * 1e9), 4),
        }

    common = {
        "samples": n_samples,
        "prompts": len(prompts),
        "prompt_tokens_mean": round(
            float(np.mean([len(i) for i in tok(prompts, add_special_tokens=False)["input_ids"]])), 1
        ),
        "samples_per_prompt": sizes.samples_per_prompt,
        "max_new_tokens": sizes.max_new_tokens,
        "parameters": params,
        "peak_gflops": {k: round(v, 1) for k, v in peak_gflops.items()},
        "popri_detail": {"dtype": "bfloat16 (merged adapter)", **throughput("popri")},
    }
    rows = [
        comparison(
            "generation",
            times["popri"],
            "HF transformers model.generate(num_return_sequences=J, do_sample=True), float32",
            times["hf"],
            target=TARGETS["generation"],
            **common,
            peer_detail={"dtype": "float32", **throughput("hf")},
        )
    ]
    described = {
        "llama.cpp": (
            "llama.cpp (llama-cpp-python) on the packaged Q4_1 GGUF, one sequence at a time, prefix KV reuse",
            "Q4_1 weights",
        ),
        **{name: (spec.what, spec.dtype) for name, spec in WORKER_PEERS.items()},
    }
    for name, (what, dtype) in described.items():
        row_name = "generation_" + name.replace(".", "_")
        status = statuses[name]
        if name not in times:
            rows.append(not_measured(row_name, str(status.why), peer=name))
            continue
        version = workers[name].version if name in workers else status.version
        rows.append(
            comparison(
                row_name,
                times["popri"],
                f"{what} ({name} {version})",
                times[name],
                target=TARGETS["generation"],
                **common,
                peer_detail={"dtype": dtype, "version": version, **throughput(name)},
                **({"peer_load_s": workers[name].load_s} if name in workers else {}),
            )
        )
    return rows, results["popri"], statuses


# -- scoring -------------------------------------------------------------------------------------------------------


def synthetic_private_embeddings(
    *, users: int, texts_per_user: float, samples: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit-norm random private embeddings (geometric counts per user, mean ``texts_per_user``), owners, samples."""
    rng = np.random.default_rng(seed)
    counts = rng.geometric(1.0 / texts_per_user, size=users)
    private = rng.standard_normal((int(counts.sum()), EMBEDDING_DIM)).astype(np.float32)
    private /= np.linalg.norm(private, axis=1, keepdims=True)
    owner = np.repeat(np.arange(users), counts)
    sample_emb = rng.standard_normal((samples, EMBEDDING_DIM)).astype(np.float32)
    sample_emb /= np.linalg.norm(sample_emb, axis=1, keepdims=True)
    return private, owner, sample_emb


def bench_scoring(sizes: PerfSizes, *, seed: int) -> dict[str, Any]:
    """popri's vectorised scoring vs the reference per-user loop on the same embeddings; both from cached embeddings."""
    from popri.scoring import clipped_scores_sum, user_embedding_sums

    n_samples = sizes.prompts * sizes.samples_per_prompt
    private, owner, samples = synthetic_private_embeddings(
        users=sizes.users, texts_per_user=sizes.texts_per_user, samples=n_samples, seed=seed
    )
    start = time.perf_counter()
    sums = user_embedding_sums(private, owner, sizes.users)
    sums_s = time.perf_counter() - start
    bounds = np.searchsorted(owner, np.arange(sizes.users + 1))
    per_user = [torch.from_numpy(private[bounds[u] : bounds[u + 1]]) for u in range(sizes.users)]
    samples_t = torch.from_numpy(samples)
    times, results = interleaved(
        {
            "popri": lambda: clipped_scores_sum(samples, sums),
            "loop": lambda: reference_loop_scores(samples_t, per_user),
        },
        sizes.repeats_scoring,
    )
    diff = float(np.max(np.abs(results["popri"] - results["loop"])))
    return comparison(
        "scoring",
        times["popri"],
        "reference per-user loop: sentence_transformers.util.cos_sim per user, sum, z-score, clip",
        times["loop"],
        target=TARGETS["scoring"],
        users=sizes.users,
        private_texts=int(private.shape[0]),
        samples=n_samples,
        user_sums_once_s=round(sums_s, 4),
        max_abs_difference=diff,
        note="both start from private embeddings already computed; popri's per-user sums are its on-disk cache "
        "(user_sums_once_s is their one-off cost)",
    )


class CountingEmbedder:
    """The embedder with a count of the texts it was asked to encode: tells a cache hit (0) from a miss."""

    def __init__(self, embedder: Any) -> None:
        self.embedder = embedder
        self.texts_encoded = 0

    def encode(self, texts: list[str], *args: Any, **kwargs: Any) -> Any:
        self.texts_encoded += len(texts)
        return self.embedder.encode(texts, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # everything else is the embedder's own
        return getattr(self.embedder, name)


def _first_and_second_call(embedder: Any, users: Any) -> tuple[list[float], list[int], np.ndarray]:
    """Two ``cached_user_sums`` calls on a fresh cache: (seconds, texts embedded, the sums) of each."""
    from popri.embedding import cached_user_sums

    counting = CountingEmbedder(embedder)
    times, embedded = [], []
    with tempfile.TemporaryDirectory(prefix="popri-perf-cache-") as tmp:
        for _ in range(2):
            before = counting.texts_encoded
            start = time.perf_counter()
            sums = cached_user_sums(counting, users, cache_dir=Path(tmp))
            times.append(time.perf_counter() - start)
            embedded.append(counting.texts_encoded - before)
    return times, embedded, sums


def precision_agreement(
    sums: dict[str, np.ndarray], samples: dict[str, np.ndarray], *, samples_per_prompt: int, rejected_rank: int
) -> dict[str, Any]:
    """How much bf16 embeddings move a node's clipped score sum, against the DP noise of a default run.

    ``sums``/``samples``: per precision, the users' embedding sums and the sample embeddings. Returns the standard
    deviation of (bf16 sum − fp32 sum) over the samples, the noise std σ·Δ of the default run (Δ = 1 per user, σ of
    ``RunConfig()``), their ratio, and the share of J-groups whose chosen and rejected samples stay the same.
    """
    from popri.config import RunConfig
    from popri.preferences import rank_within_prompts
    from popri.scoring import clipped_scores_sum

    score = {p: clipped_scores_sum(samples[p].astype(np.float64), sums[p]) for p in ("fp32", "bf16")}
    shift_sd = float(np.std(score["bf16"] - score["fp32"]))
    sigma = float(RunConfig().resolved_noise_multiplier())
    groups = len(score["fp32"]) // samples_per_prompt
    ranks = {p: rank_within_prompts(v[: groups * samples_per_prompt], samples_per_prompt) for p, v in score.items()}
    same = (ranks["fp32"][:, 0] == ranks["bf16"][:, 0]) & (
        ranks["fp32"][:, rejected_rank] == ranks["bf16"][:, rejected_rank]
    )
    return {
        "score_shift_sd": sig(shift_sd, 3),
        "default_noise_sd": sig(sigma, 4),
        "shift_over_noise": sig(shift_sd / sigma, 3),
        "same_pairs": f"{int(same.sum())}/{groups}",
    }


def bench_embedding_cache(assets: PerfAssets, sizes: PerfSizes) -> dict[str, Any]:
    """The private embedding, once per run: the first ``cached_user_sums`` embeds the private texts, the second (a
    later round) only reads the cache; in fp32 and in bf16 weights, the same texts, one after the other.

    Records the seconds and how many texts each call embedded (the second: 0 when the cache is hit), and how far
    bf16 moves the node's clipped score sum against the DP noise (:func:`precision_agreement`; the samples are the
    first K·J private texts, embedded in each precision as the server would).
    """
    from popri.embedding import embed_texts

    users = assets.cache_users
    if users is None:
        return {"measured": False, "why": "no private users given"}
    embedders = {"fp32": assets.embedder, "bf16": copy.deepcopy(assets.embedder).to(torch.bfloat16)}
    out: dict[str, Any] = {"users": users.num_users, "private_texts": len(users.texts), "precisions": {}}
    sums, samples = {}, {}
    n_samples = sizes.prompts * sizes.samples_per_prompt
    for name, embedder in embedders.items():
        embed_texts(embedder, users.texts[:8])  # lazy init outside the timing
        times, embedded, sums[name] = _first_and_second_call(embedder, users)
        samples[name] = embed_texts(embedder, users.texts[:n_samples])
        out["precisions"][name] = {
            "first_call_s": round(times[0], 4),
            "second_call_s": round(times[1], 4),
            "first_call_embedded_texts": embedded[0],
            "second_call_embedded_texts": embedded[1],
            "embedded_per_s": round(len(users.texts) / times[0], 1),
        }
    fp32, bf16 = out["precisions"]["fp32"], out["precisions"]["bf16"]
    out["bf16_speedup"] = sig(fp32["first_call_s"] / bf16["first_call_s"], 3)
    out["agreement"] = precision_agreement(
        sums, samples, samples_per_prompt=sizes.samples_per_prompt, rejected_rank=sizes.rejected_rank
    )
    out["sums_shape"] = list(sums["fp32"].shape)
    return out


# -- DPO -----------------------------------------------------------------------------------------------------------


def _randomize_lora(model: Any, *, seed: int, scale: float = 0.02) -> None:
    """Nonzero LoRA B matrices, so the step-1 loss is not trivially ln 2."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_((torch.randn(param.shape, generator=gen) * scale).to(param.device, param.dtype))


def dpo_first_step_losses(base: Any, tokenizer: Any, pairs: list[Any], *, workdir: Path) -> dict[str, Any]:
    """Step-1 DPO loss of popri and of TRL's DPOTrainer on one batch, both float32, the same nonzero adapter."""
    from peft import set_peft_model_state_dict

    from popri.config import TrainConfig
    from popri.dpo import LoraDPO, tokenize_pair

    batch = pairs[:4]
    fp32_base = copy.deepcopy(base).float()
    ours = LoraDPO(copy.deepcopy(fp32_base), tokenizer, config=TrainConfig(batch_size=len(batch), precision="fp32"))
    _randomize_lora(ours.policy, seed=1)
    adapter = {k: v.clone() for k, v in ours.state_dict()["adapter"].items()}
    trainer = trl_trainer(
        fp32_base,
        tokenizer,
        batch,
        trl_args(str(workdir / "trl-loss"), batch=len(batch), steps=1, fp32=True),
        lora=popri_lora_config(ours),
    )
    set_peft_model_state_dict(trainer.model, adapter)
    popri_loss = ours.step([tokenize_pair(tokenizer, p) for p in batch])["loss"]
    trainer.train()
    trl_loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    return {
        "pairs": len(batch),
        "popri_loss": popri_loss,
        "trl_loss": trl_loss,
        "abs_difference": abs(popri_loss - trl_loss),
        "match_1e-5": abs(popri_loss - trl_loss) <= 1e-5,
    }


def bench_dpo(
    assets: PerfAssets, pairs: list[Any], sizes: PerfSizes, *, seed: int, workdir: Path, fp32: bool = False
) -> dict[str, Any]:
    """One popri DPO round (reference log-probs precomputed) vs TRL's DPOTrainer, same pairs, batch and steps.

    Default: popri as a run uses it (bf16 frozen base, fp32 LoRA) against TRL's defaults (bf16=True, gradient
    checkpointing). ``fp32``: both in float32, TRL without gradient checkpointing (the like-for-like precision row).
    """
    from popri.config import TrainConfig
    from popri.dpo import LoraDPO, lora_config

    config = TrainConfig(batch_size=sizes.dpo_batch, precision="fp32" if fp32 else "bf16")
    base = copy.deepcopy(assets.model).to(torch.float32 if fp32 else torch.bfloat16)
    steps = (len(pairs) + sizes.dpo_batch - 1) // sizes.dpo_batch
    trl_setup: list[float] = []
    trl_losses: list[float] = []
    trainers: list[Any] = []
    lora = lora_config(r=config.lora_r, alpha=config.lora_alpha)  # the policy's own LoRA (popri.dpo.lora_config)

    def run_popri() -> dict[str, float]:
        dpo = LoraDPO(copy.deepcopy(base), assets.tokenizer, config=config)
        return dpo.train_round(pairs, rng=np.random.default_rng(seed))

    def run_trl() -> None:
        trainer = trainers.pop()
        trainer.train()
        trl_losses.extend(h["loss"] for h in trainer.state.log_history if "loss" in h)

    def round_args() -> Any:
        return trl_args(str(workdir / "trl-round"), batch=sizes.dpo_batch, steps=steps, fp32=fp32)

    times: dict[str, list[float]] = {"popri": [], "trl": []}
    results: dict[str, Any] = {}
    for r in range(sizes.repeats_dpo):
        start = time.perf_counter()  # TRL's dataset preparation happens here, outside its timed train()
        trainers.append(trl_trainer(assets.model, assets.tokenizer, pairs, round_args(), lora=lora))
        trl_setup.append(time.perf_counter() - start)
        order = {"popri": run_popri, "trl": run_trl} if r % 2 == 0 else {"trl": run_trl, "popri": run_popri}
        t, res = interleaved(order, 1)
        for name in times:
            times[name] += t[name]
        results.update(res)
    args = round_args()
    peer = (
        "TRL DPOTrainer, float32, no gradient checkpointing"
        if fp32
        else "TRL DPOTrainer with its defaults (bf16=True, gradient checkpointing)"
    )
    return comparison(
        "dpo_fp32" if fp32 else "dpo",
        times["popri"],
        peer + " + peft_config; same LoRA, pairs, batch and steps; timed train() only",
        times["trl"],
        target=TARGETS["dpo"],
        pairs=len(pairs),
        batch=sizes.dpo_batch,
        steps=steps,
        popri_precision=config.precision,
        popri_loss=round(float(results["popri"].get("loss", float("nan"))), 6),
        trl_mean_loss=round(float(np.mean(trl_losses)), 6) if trl_losses else None,
        trl_setup_s=round(median(trl_setup), 3),
        trl_bf16=bool(args.bf16),
        trl_gradient_checkpointing=bool(args.gradient_checkpointing),
    )


# -- an ablation: popri's shared-prompt DPO forward against TRL's full rows -------------------------------------------


def bench_shared_prompt(assets: PerfAssets, pairs: list[Any], sizes: PerfSizes, *, repeats: int = 2) -> dict[str, Any]:
    """Policy forward + backward of one DPO batch (bf16 base): full prompt + completion rows (TRL's layout, popri
    before the shared prompt) vs :func:`popri.dpo.shared_prompt_logps` vs ``LoraDPO._logps`` (the shared prompt under
    LoraDPO's autocast and attention choices). Also checks, on a float32 copy, that rows and shared prompt give the
    same log-probs.
    """
    from popri.config import TrainConfig
    from popri.dpo import LoraDPO, collate, full_row_logps, shared_prompt_logps, tokenize_pair

    tok = assets.tokenizer
    batch = [tokenize_pair(tok, p) for p in pairs[: sizes.dpo_batch]]
    fp32 = LoraDPO(copy.deepcopy(assets.model).float(), tok, config=TrainConfig(precision="fp32"))
    _randomize_lora(fp32.policy, seed=2)
    full_batch = {k: v.to(fp32.device) for k, v in collate(batch, tok.pad_token_id).items()}
    with torch.no_grad():
        diff = float((full_row_logps(fp32.policy, full_batch) - fp32._logps(batch)).abs().max())
    del fp32
    dpo = LoraDPO(copy.deepcopy(assets.model).to(torch.bfloat16), tok, config=TrainConfig())
    full_batch = {k: v.to(dpo.device) for k, v in collate(batch, tok.pad_token_id).items()}

    def full() -> None:
        full_row_logps(dpo.policy, full_batch).sum().backward()
        dpo.optimizer.zero_grad(set_to_none=True)

    def shared() -> None:
        shared_prompt_logps(dpo.policy, batch, tok.pad_token_id).sum().backward()
        dpo.optimizer.zero_grad(set_to_none=True)

    def kernels() -> None:  # what LoraDPO runs: the shared prompt under its autocast / attention choices
        dpo._logps(batch).sum().backward()
        dpo.optimizer.zero_grad(set_to_none=True)

    shared()  # warm-up
    kernels()
    times, _ = interleaved({"full": full, "shared": shared, "kernels": kernels}, repeats)
    prompt_tokens = sum(len(p.prompt_ids) for p in batch)
    completion_tokens = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in batch)
    return {
        "what": (
            "policy forward + backward of one DPO batch, bf16 base and fp32 LoRA: full rows with the output layer at "
            "every position (TRL's layout) vs popri.dpo.shared_prompt_logps (each prompt once, output layer only at "
            "scored positions) vs LoraDPO's pass (the same, plus bf16 autocast for the LoRA branch and eager "
            "attention for the CPU backward)"
        ),
        "pairs": len(batch),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "row_tokens_full": 2 * prompt_tokens + completion_tokens,
        "row_tokens_shared": prompt_tokens + completion_tokens,
        "full_s": round(median(times["full"]), 3),
        "shared_s": round(median(times["shared"]), 3),
        "speedup": round(median(times["full"]) / median(times["shared"]), 2),
        "kernels_s": round(median(times["kernels"]), 3),
        "speedup_with_kernels": round(median(times["full"]) / median(times["kernels"]), 2),
        "runs_s": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "max_abs_logp_difference_fp32": diff,
    }


# -- threads -------------------------------------------------------------------------------------------------------


def bench_threads(assets: PerfAssets, *, repeats: int = 3) -> dict[str, Any]:
    """One bf16 forward of the generator (8 x 128 tokens) at 1 thread and at every core, interleaved.

    On a CPU that other busy processes share, torch's threads wait for each other at every parallel region, so more
    threads can be much slower; on an idle machine all cores win. This tells which case the measurements ran in.
    """
    model = copy.deepcopy(assets.model).to(torch.bfloat16)
    ids = torch.randint(0, int(model.config.vocab_size), (8, 128), generator=torch.Generator().manual_seed(0))
    ids = ids.to(next(model.parameters()).device)
    before = torch.get_num_threads()
    counts = sorted({1, os.cpu_count() or 1})

    def forward(n: int) -> Callable[[], None]:
        def run() -> None:
            torch.set_num_threads(n)
            with torch.no_grad():
                model(input_ids=ids)
            sync()

        return run

    try:
        forward(counts[-1])()  # warm-up
        times, _ = interleaved({f"{n}": forward(n) for n in counts}, repeats)
    finally:
        torch.set_num_threads(before)
    return {
        "what": "bf16 forward of the generator, 8 x 128 tokens",
        "median_s_by_threads": {n: round(median(t), 3) for n, t in times.items()},
        "runs_s_by_threads": {n: [round(x, 3) for x in t] for n, t in times.items()},
    }


# -- a whole round -------------------------------------------------------------------------------------------------


def bench_round(assets: PerfAssets, sizes: PerfSizes, *, seed: int, cache_dir: str, workdir: Path) -> dict[str, Any]:
    """One ``PopriRun.run_round`` at the default settings; collect = the ClientApp's NodeScorer, in process."""
    from popri.config import DataConfig, GenerationConfig, RunConfig
    from popri.node import NodeScorer, load_node_users
    from popri.rounds import NodeReply, PopriRun

    generation = GenerationConfig(  # PerfSizes() holds the defaults; --quick or --perf-size make them smaller
        model=assets.generator_id,
        initial_set_size=sizes.round_initial_set,
        prompts=sizes.prompts,
        samples_per_prompt=sizes.samples_per_prompt,
        max_new_tokens=sizes.max_new_tokens,
        token_budget=sizes.token_budget,
        generation_batch_size=sizes.generation_batch,
    )
    config = RunConfig(
        generation=generation,
        data=DataConfig(data=assets.round_data, max_users=sizes.round_max_users),
        rounds=1,
        final_samples=0,
        seed=seed,
        output=str(workdir / "round-run"),
        cache_dir=cache_dir,
    )
    start = time.perf_counter()
    run = PopriRun(config, progress=False)
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    users = load_node_users(config, partition_id=0, num_partitions=1)
    scorer = NodeScorer.from_users(run.embedder, users, cache_dir=config.resolved_cache_dir())
    node_s = time.perf_counter() - start
    rng = np.random.default_rng(seed)

    def collect(embeddings: np.ndarray, round_index: int, sample_rate: float) -> list[NodeReply]:
        node_sum, n = scorer.score(embeddings.astype(np.float32).astype(np.float64), sample_rate=sample_rate, rng=rng)
        return [NodeReply(node_id=1, node_sum=node_sum, num_users=n)]

    start = time.perf_counter()
    record = run.run_round(0, collect)
    total_s = time.perf_counter() - start
    return {
        "setup_s": round(setup_s, 3),
        "node_setup_s": round(node_s, 3),
        "round_s": round(total_s, 3),
        "seconds": record["seconds"],
        "users": scorer.num_users,  # the harness's own node (q = 1): not a run's release
        "pairs": int(record.get("pairs", 0)),
        "prompts": config.generation.prompts,
        "samples_per_prompt": config.generation.samples_per_prompt,
        "max_new_tokens": config.generation.max_new_tokens,
        "precision": config.train.precision,
        "dpo_loss": record.get("dpo/loss"),
        **peak_memory_mib(),
    }


# -- communication -------------------------------------------------------------------------------------------------


def communication(tokenizer: Any, *, prompts: int, samples_per_prompt: int, token_budget: int) -> dict[str, Any]:
    """Bytes per client per round, counted on the Flower records the apps send (payload only, no framing).

    POPri's come from :func:`benchmark.popri_method.client_bytes_per_round` (the one count the benchmark reports too).
    """
    from benchmark.config import DownstreamConfig
    from benchmark.downstream import SpecialIds, build_model
    from benchmark.dpfedavg import model_arrays
    from benchmark.popri_method import client_bytes_per_round

    def popri_bytes(k: int, j: int) -> tuple[int, int]:
        return client_bytes_per_round(prompts=k, samples_per_prompt=j, embedding_dim=EMBEDDING_DIM)

    special = SpecialIds.from_tokenizer(tokenizer)
    model = build_model(DownstreamConfig(), special, max_positions=token_budget + 2, seed=0)
    fedavg = int(model_arrays(model).count_bytes())
    down, up = popri_bytes(prompts, samples_per_prompt)
    paper_down, paper_up = popri_bytes(1800, 10)
    return {
        "popri": {
            "prompts": prompts,
            "samples_per_prompt": samples_per_prompt,
            "down_bytes": down,
            "up_bytes": up,
            "down": f"{prompts * samples_per_prompt} x {EMBEDDING_DIM} float32 sample embeddings + round config",
            "up": f"{prompts * samples_per_prompt} float64 clipped score sum + user count + source tag",
        },
        "popri_paper_size": {"prompts": 1800, "samples_per_prompt": 10, "down_bytes": paper_down, "up_bytes": paper_up},
        "dpfedavg": {
            "model": "benchmark downstream GPT-2 (DownstreamConfig defaults, tied embeddings)",
            "parameters": num_parameters(model),
            "down_bytes": fedavg,
            "up_bytes": fedavg,
            "dtype": "float32 both ways",
        },
        "ratio_down_dpfedavg_over_popri": round(fedavg / down, 2),
        "ratio_up_dpfedavg_over_popri": round(fedavg / up, 1),
        "ratio_total_dpfedavg_over_popri": round(2 * fedavg / (down + up), 2),
    }


def round_row(stages: dict[str, Any], rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The round, popri vs an estimate of the same round with each stage's peer time substituted (where measured)."""
    seconds = stages["seconds"]
    popri_s = float(sum(seconds.values()))
    peer_s = popri_s
    substituted = []
    for stage, name in (("generate", "generation"), ("collect", "scoring"), ("dpo", "dpo")):
        row = rows.get(name)
        if row and row.get("ratio") and stage in seconds:
            peer_s += seconds[stage] * (float(row["ratio"]) - 1.0)
            substituted.append(f"{stage} x{row['ratio']}")
    return {
        "name": "round",
        "popri_s": sig(popri_s),
        "peer": "estimate: the same round with " + (", ".join(substituted) or "nothing") + " (peer/popri ratios "
        "measured above applied to popri's stage times)",
        "peer_s": sig(peer_s),
        "ratio": round(peer_s / popri_s, 2) if popri_s > 0 else None,
        "target": None,
        "measured_at": stages.get("measured_at"),
    }
