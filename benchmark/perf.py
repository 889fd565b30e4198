"""Performance harness: ``popri bench perf --output DIR [--quick]`` writes ``DIR/perf.json`` and ``DIR/perf.md``.

Every comparison runs popri and its peer in the same process on the same inputs, interleaved A, B, B, A, ... so that
load from other processes hits both alike; the tables report medians. ``ratio = peer_s / popri_s`` (above 1: popri
is faster).

- ``generation``: popri's sampler (``sample_completions`` on the bf16 merged generation model: one prefill per prompt,
  its KV cache expanded for the J samples) against Hugging Face ``model.generate(num_return_sequences=J,
  do_sample=True)`` in float32, and against llama.cpp (``llama-cpp-python``) on the packaged GGUF when it is
  installed. Same prompts, same number of samples, same new-token limit, same stop rule; tokens/s is also given as a
  fraction of this machine's measured float32 matmul peak (2 x parameters FLOPs per token).
- ``scoring``: popri's vectorised scoring through per-user embedding sums against the reference code's per-user loop
  (``sentence_transformers.util.cos_sim`` per user, sum, centre/scale, clip), 2,000 users; plus the private-embedding
  cache: the first ``cached_user_sums`` embeds, the second only reads the disk.
- ``dpo``: one popri DPO round (``LoraDPO.train_round``) against TRL's ``DPOTrainer`` (its defaults) with the same
  model, LoRA config, pairs, batch and number of steps; plus the step-1 loss of both on a float32 config.
- ``round``: one round of ``PopriRun`` with the real defaults (private users capped, see ``PerfSizes``), its per-stage
  seconds and peak memory; its peer is the same round with the three stages above replaced by their peers' measured
  times (an estimate).
- Communication: bytes per client per round for POPri and for DP-FedAvg of the benchmark's downstream model.
- ``dpo_fp32`` (both sides in float32), ``dpo_loss`` (the step-1 check alone), ``dpo_shared_prompt`` (an ablation: the
  shared-prompt DPO forward, a proposal for ``popri.dpo``) and ``threads`` (1 thread vs all cores on this machine).

``--perf-only NAME ...`` measures some of these and keeps the rest of an existing ``perf.json``, so a busy machine can
run them one at a time; ``--perf-size FIELD=VALUE`` shrinks a measurement; ``--perf-threads N`` fixes torch's threads.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from popri.data import UserData
from popri.generation import SAMPLE_HEADER, clean_completion, iter_chunks, sample_completions, truncate_tokens

logger = logging.getLogger(__name__)

COMPARISONS = (
    "generation",
    "scoring",
    "dpo",
    "dpo_fp32",
    "dpo_loss",
    "dpo_shared_prompt",
    "round",
    "communication",
    "threads",
)
TARGETS = {"generation": 1.5, "scoring": 20.0, "dpo": 4.0}
EMBEDDING_DIM = 384  # all-MiniLM-L6-v2


# -- sizes and assets ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PerfSizes:
    """How big each measurement is. ``full`` is a default round of ``popri run``; ``quick`` is a smoke size."""

    prompts: int = 32  # K of a default round
    samples_per_prompt: int = 4  # J
    max_new_tokens: int = 48
    token_budget: int = 64
    generation_batch: int = 32
    rejected_rank: int = 2
    dpo_batch: int = 4
    dpo_pairs: int = 16  # a default round trains on K=32 pairs; 16 (4 steps) keeps TRL's side short here
    users: int = 2000
    texts_per_user: float = 50.0  # mean; Shakespeare's 200-user sample has ~54
    cache_users: int = 20
    round_max_users: int = 200  # a default run uses all ~1,400 users; 200 keeps the one-off embedding short
    round_initial_set: int = 64
    repeats_generation: int = 2
    repeats_scoring: int = 5
    repeats_dpo: int = 1

    @classmethod
    def quick(cls) -> PerfSizes:
        return cls(
            prompts=4,
            max_new_tokens=16,
            token_budget=24,
            generation_batch=4,
            dpo_pairs=4,
            texts_per_user=20.0,
            cache_users=5,
            round_max_users=10,
            round_initial_set=6,
            repeats_scoring=3,
        )


@dataclass
class PerfAssets:
    """The models under test: a float32 base LM and its tokenizer, the embedder, where they come from."""

    model: Any
    tokenizer: Any
    embedder: Any
    generator_id: str = "smollm2"  # what PopriRun loads: 'smollm2' or a local HF folder
    gguf_path: Path | None = None  # the same weights for llama.cpp, when available
    cache_users: UserData | None = None  # private users for the cache check
    round_data: str = "shakespeare"  # DataConfig.data of the round
    initial_set: list[str] | None = None  # the public initial set the prompts draw from (None: fixed lines)
    description: str = ""


def _sig(seconds: float, digits: int = 6) -> float:
    """Round to significant digits, not decimals: sub-millisecond stages keep their precision (and their ratio)."""
    return float(f"{seconds:.{digits}g}")


def load_default_assets(*, cache_dir: Path | None, cache_users: int, seed: int) -> PerfAssets:
    """SmolLM2-135M-Instruct (float32, best device), all-MiniLM-L6-v2 and Shakespeare users, all packaged."""
    from popri.assets import load_generator, smollm2_gguf_path
    from popri.config import GenerationConfig, RunConfig
    from popri.data import load_user_data
    from popri.embedding import load_embedder
    from popri.generation import make_initial_set

    model, tokenizer = load_generator(cache_dir=cache_dir, dtype=torch.float32)
    users = load_user_data("shakespeare", max_users=cache_users, seed=seed)
    g = GenerationConfig()
    # The initial set a default run uses (same key, so a run's cached set is reused; else made as a run makes it).
    initial_set = make_initial_set(
        copy.deepcopy(model).to(torch.bfloat16),
        tokenizer,
        instruction=g.initial_instruction,
        size=g.initial_set_size,
        max_new_tokens=g.max_new_tokens,
        token_budget=g.token_budget,
        seed=seed,
        cache_dir=cache_dir or RunConfig().resolved_cache_dir(),
        model_id=g.model,
    )
    return PerfAssets(
        model=model,
        tokenizer=tokenizer,
        embedder=load_embedder(),
        gguf_path=smollm2_gguf_path(),
        cache_users=users,
        initial_set=initial_set,
        description="SmolLM2-135M-Instruct (packaged GGUF, dequantized), all-MiniLM-L6-v2, Shakespeare",
    )


# -- measuring -----------------------------------------------------------------------------------------------------


def interleaved(runs: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Wall seconds of each run, ``repeats`` times, in the order A B .. B A .. (ABBA), and each run's last result."""
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    results: dict[str, Any] = {}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            start = time.perf_counter()
            results[name] = runs[name]()
            times[name].append(time.perf_counter() - start)
            logger.info("%s: %.3fs", name, times[name][-1])
    return times, results


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def comparison(
    name: str, popri_times: list[float], peer: str, peer_times: list[float], *, target: float | None, **extra: Any
) -> dict[str, Any]:
    popri_s, peer_s = _median(popri_times), _median(peer_times)
    return {
        "name": name,
        "popri_s": _sig(popri_s),
        "peer": peer,
        "peer_s": _sig(peer_s),
        "ratio": round(peer_s / popri_s, 2) if popri_s > 0 else None,
        "target": target,
        "popri_runs_s": [round(t, 6) for t in popri_times],
        "peer_runs_s": [round(t, 6) for t in peer_times],
        **extra,
    }


def matmul_gflops(dtype: torch.dtype = torch.float32, *, n: int = 1024, seconds: float = 0.5) -> float:
    """Best sustained GFLOP/s of an n x n matmul in ``dtype`` over ~``seconds`` (2n^3 FLOPs per product)."""
    device = _device()
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    end = time.perf_counter() + seconds
    while True:
        _sync()
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        _sync()
        best = min(best, (time.perf_counter() - start) / 4)
        if time.perf_counter() > end:
            break
    return 2 * n**3 / best / 1e9


def _device() -> torch.device:
    from popri.assets import best_device

    return best_device()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_mib() -> dict[str, float]:
    """Peak resident memory of this process so far (and peak CUDA memory where CUDA is used), in MiB."""
    out = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def num_parameters(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def _count_tokens(tokenizer: Any, texts: list[str]) -> int:
    return int(sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])) if texts else 0


# -- generation ----------------------------------------------------------------------------------------------------


def hf_generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    samples_per_prompt: int,
    max_new_tokens: int,
    token_budget: int,
    batch_size: int,
    seed: int,
) -> list[str]:
    """The peer: ``model.generate(num_return_sequences=J, do_sample=True)`` with popri's stop rule and clean-up.

    Plain ancestral sampling at temperature 1 (top_k=0, top_p=1), like popri's default. Rows stop at EOS or at the next
    sample header (checked every token; popri checks every 8).
    """
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    raw: list[str] = []
    for chunk in iter_chunks(prompts, batch_size):
        enc = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        enc = {k: v.to(device) for k, v in enc.items()}
        with torch.no_grad():
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                num_return_sequences=samples_per_prompt,
                max_new_tokens=max_new_tokens,
                stop_strings=[SAMPLE_HEADER],
                tokenizer=tokenizer,
                pad_token_id=tokenizer.pad_token_id,
            )
        raw += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return truncate_tokens([clean_completion(t) for t in raw], tokenizer, token_budget)


def llama_cpp_status() -> str | None:
    """None when ``llama_cpp`` imports, else why it is not measured."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as err:
        return f"llama-cpp-python is not installed ({err})"
    return None


def make_llama_cpp_sampler(gguf: Path, *, threads: int, n_ctx: int) -> Callable[..., list[str]]:
    """A llama.cpp sampler on the packaged GGUF (Q4_1 weights, llama.cpp's own kernels)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_batch=512, seed=0, verbose=False)

    def generate(
        prompts: list[str], *, samples_per_prompt: int, max_new_tokens: int, token_budget: int, tokenizer: Any
    ) -> list[str]:
        raw = []
        for prompt in prompts:
            for _ in range(samples_per_prompt):  # the common prompt prefix stays in llama.cpp's KV cache
                out = llm.create_completion(
                    prompt,
                    max_tokens=max_new_tokens,
                    temperature=1.0,
                    top_p=1.0,
                    top_k=0,
                    min_p=0.0,
                    typical_p=1.0,
                    repeat_penalty=1.0,
                    stop=[SAMPLE_HEADER],
                )
                raw.append(out["choices"][0]["text"])
        return truncate_tokens([clean_completion(t) for t in raw], tokenizer, token_budget)

    return generate


def popri_sampler(model: Any, tokenizer: Any, dtype: torch.dtype) -> Any:
    """What a round samples with: ``LoraDPO.generation_model(dtype)`` (adapter merged, cast) on a copy of the base."""
    from popri.config import TrainConfig
    from popri.dpo import LoraDPO

    dpo = LoraDPO(copy.deepcopy(model), tokenizer, config=TrainConfig())
    sampler = dpo.generation_model(dtype)
    del dpo
    return sampler


def bench_generation(
    assets: PerfAssets, sizes: PerfSizes, prompts: list[str], *, seed: int, peak_gflops: dict[str, float]
) -> tuple[list[dict[str, Any]], list[str]]:
    """popri (bf16 merged model) vs HF generate (fp32) and llama.cpp if installed; rows and popri's samples."""
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
    llama_why = llama_cpp_status()
    if llama_why is None and assets.gguf_path is None:
        llama_why = "no GGUF file of these weights (tiny test model)"
    if llama_why is None and _device().type == "cuda":
        llama_why = "CUDA run: llama.cpp was built for the CPU here"
    if llama_why is None:
        assert assets.gguf_path is not None
        llama = make_llama_cpp_sampler(assets.gguf_path, threads=torch.get_num_threads(), n_ctx=1024)
        runs["llama.cpp"] = lambda: llama(prompts, tokenizer=tok, **k)
    # Warm-up (one-time allocations, lazy init) outside the timed runs.
    for warm in (
        lambda: sample_completions(
            sampler,
            tok,
            prompts[:1],
            samples_per_prompt=2,
            max_new_tokens=2,
            token_budget=4,
            generator=torch.Generator().manual_seed(0),
        ),
        lambda: hf_generate(
            assets.model,
            tok,
            prompts[:1],
            samples_per_prompt=2,
            max_new_tokens=2,
            token_budget=4,
            batch_size=1,
            seed=0,
        ),
    ):
        warm()
    times, results = interleaved(runs, sizes.repeats_generation)
    peak_gflops = {k: max(v, matmul_gflops(getattr(torch, k))) for k, v in peak_gflops.items()}  # best of before/after
    params = num_parameters(assets.model)
    n_samples = len(prompts) * sizes.samples_per_prompt

    def throughput(name: str) -> dict[str, Any]:
        tokens = _count_tokens(tok, results[name])
        tps = tokens / _median(times[name])
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
    if "llama.cpp" in times:
        rows.append(
            comparison(
                "generation_llama_cpp",
                times["popri"],
                "llama.cpp (llama-cpp-python) on the packaged Q4_1 GGUF, one sequence at a time, prefix KV reuse",
                times["llama.cpp"],
                target=TARGETS["generation"],
                **common,
                peer_detail={"dtype": "Q4_1 weights", **throughput("llama.cpp")},
            )
        )
    else:
        rows.append({"name": "generation_llama_cpp", "measured": False, "why": llama_why})
    return rows, results["popri"]


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


def reference_loop_scores(sample_embeddings: torch.Tensor, per_user: list[torch.Tensor]) -> np.ndarray:
    """The reference code's scoring (``neural_scores_for_policy``): per user, cos_sim, sum, z-score, clip to norm 1."""
    from sentence_transformers import util

    total = np.zeros(sample_embeddings.shape[0], dtype=np.float64)
    for private in per_user:
        s = util.cos_sim(sample_embeddings, private).sum(dim=1).numpy().astype(np.float64)
        std = s.std()
        if std == 0:
            continue
        z = (s - s.mean()) / std
        norm = np.linalg.norm(z)
        total += z / norm if norm > 1 else z
    return total


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


def bench_embedding_cache(assets: PerfAssets) -> dict[str, Any]:
    """The first ``cached_user_sums`` embeds the private texts; the second (a later round) only reads the cache."""
    from popri.embedding import cached_user_sums

    users = assets.cache_users
    if users is None:
        return {"measured": False, "why": "no private users given"}
    with tempfile.TemporaryDirectory(prefix="popri-perf-cache-") as tmp:
        times = []
        for _ in range(2):
            start = time.perf_counter()
            sums = cached_user_sums(assets.embedder, users, cache_dir=Path(tmp))
            times.append(time.perf_counter() - start)
    return {
        "users": users.num_users,
        "private_texts": len(users.texts),
        "first_call_s": round(times[0], 4),
        "second_call_s": round(times[1], 4),
        "embedded_per_s": round(len(users.texts) / times[0], 1),
        "sums_shape": list(sums.shape),
    }


# -- DPO -----------------------------------------------------------------------------------------------------------


def _randomize_lora(model: Any, *, seed: int, scale: float = 0.02) -> None:
    """Nonzero LoRA B matrices, so the step-1 loss is not trivially ln 2."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_((torch.randn(param.shape, generator=gen) * scale).to(param.device, param.dtype))


def _lora_config() -> Any:
    """The same LoRA as :class:`popri.dpo.LoraDPO` builds from the default TrainConfig."""
    from peft import LoraConfig

    from popri.config import TrainConfig

    c = TrainConfig()
    return LoraConfig(
        r=c.lora_r,
        lora_alpha=c.lora_alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def _trl_args(output_dir: str, *, batch: int, steps: int | None, fp32: bool) -> Any:
    """TRL's DPOConfig: its defaults (bf16=True, gradient checkpointing) unless ``fp32`` (the loss check)."""
    from trl import DPOConfig

    from popri.config import TrainConfig

    c = TrainConfig()
    extra: dict[str, Any] = {"bf16": False, "gradient_checkpointing": False} if fp32 else {}
    return DPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=batch,
        learning_rate=c.learning_rate,
        beta=c.beta,
        num_train_epochs=1,
        max_steps=steps if steps is not None else -1,
        logging_steps=1,
        use_cpu=_device().type != "cuda",
        report_to="none",
        save_strategy="no",
        lr_scheduler_type="constant",
        max_length=None,
        seed=0,
        disable_tqdm=True,
        **extra,
    )


def _trl_trainer(base: Any, tokenizer: Any, pairs: list[Any], args: Any) -> Any:
    from datasets import Dataset
    from trl import DPOTrainer

    return DPOTrainer(
        model=copy.deepcopy(base),
        args=args,
        train_dataset=Dataset.from_list([p.to_dict() for p in pairs]),
        processing_class=tokenizer,
        peft_config=_lora_config(),
    )


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
    trainer = _trl_trainer(
        fp32_base, tokenizer, batch, _trl_args(str(workdir / "trl-loss"), batch=len(batch), steps=1, fp32=True)
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
    from popri.dpo import LoraDPO

    config = TrainConfig(batch_size=sizes.dpo_batch, precision="fp32" if fp32 else "bf16")
    base = copy.deepcopy(assets.model).to(torch.float32 if fp32 else torch.bfloat16)
    steps = (len(pairs) + sizes.dpo_batch - 1) // sizes.dpo_batch
    trl_setup: list[float] = []
    trl_losses: list[float] = []
    trainers: list[Any] = []

    def run_popri() -> dict[str, float]:
        dpo = LoraDPO(copy.deepcopy(base), assets.tokenizer, config=config)
        return dpo.train_round(pairs, rng=np.random.default_rng(seed))

    def run_trl() -> None:
        trainer = trainers.pop()
        trainer.train()
        trl_losses.extend(h["loss"] for h in trainer.state.log_history if "loss" in h)

    def trl_args() -> Any:
        return _trl_args(str(workdir / "trl-round"), batch=sizes.dpo_batch, steps=steps, fp32=fp32)

    times: dict[str, list[float]] = {"popri": [], "trl": []}
    results: dict[str, Any] = {}
    for r in range(sizes.repeats_dpo):
        start = time.perf_counter()  # TRL's dataset preparation happens here, outside its timed train()
        trainers.append(_trl_trainer(assets.model, assets.tokenizer, pairs, trl_args()))
        trl_setup.append(time.perf_counter() - start)
        order = {"popri": run_popri, "trl": run_trl} if r % 2 == 0 else {"trl": run_trl, "popri": run_popri}
        t, res = interleaved(order, 1)
        for name in times:
            times[name] += t[name]
        results.update(res)
    args = trl_args()
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
        trl_setup_s=round(_median(trl_setup), 3),
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
        "full_s": round(_median(times["full"]), 3),
        "shared_s": round(_median(times["shared"]), 3),
        "speedup": round(_median(times["full"]) / _median(times["shared"]), 2),
        "kernels_s": round(_median(times["kernels"]), 3),
        "speedup_with_kernels": round(_median(times["full"]) / _median(times["kernels"]), 2),
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
            _sync()

        return run

    try:
        forward(counts[-1])()  # warm-up
        times, _ = interleaved({f"{n}": forward(n) for n in counts}, repeats)
    finally:
        torch.set_num_threads(before)
    return {
        "what": "bf16 forward of the generator, 8 x 128 tokens",
        "median_s_by_threads": {n: round(_median(t), 3) for n, t in times.items()},
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
        "users": int(record.get("users_sampled", 0)),
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
    """Bytes per client per round, counted on the Flower records the apps send (payload only, no framing)."""
    from flwr.app import Array, ArrayRecord

    from benchmark.config import DownstreamConfig
    from benchmark.downstream import SpecialIds, build_model
    from benchmark.dpfedavg import model_arrays

    def popri_bytes(k: int, j: int) -> tuple[int, int]:
        n = k * j
        down = ArrayRecord({"embeddings": Array(np.zeros((n, EMBEDDING_DIM), dtype=np.float32))}).count_bytes()
        up = ArrayRecord({"scores": Array(np.zeros(n, dtype=np.float64))}).count_bytes()
        return int(down), int(up)

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
            "down": f"{prompts * samples_per_prompt} x {EMBEDDING_DIM} float32 sample embeddings",
            "up": f"{prompts * samples_per_prompt} float64 clipped score sum",
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


# -- the run -------------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(_device()),
    }
    with contextlib.suppress(OSError):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _prompts(assets: PerfAssets, sizes: PerfSizes, *, seed: int) -> list[str]:
    """K prompts of the paper's template filled from the run's initial set, or from fixed lines (tiny models)."""
    from popri.generation import build_prompts

    lines = assets.initial_set or [
        "Good morrow to you, friend; what news from the town?",
        "I will not stay the night, for the roads are long and cold.",
        "Speak softly, the king is sleeping in the next room.",
        "What light is this that breaks upon the garden wall?",
        "Bring me my cloak and sword, and saddle the grey horse.",
        "Thou art a fool to trust a merchant with a smiling face.",
        "The harvest failed and the people cry for bread.",
        "Let us be merry while the candles burn.",
    ]
    prompts = build_prompts(lines, num_prompts=sizes.prompts, rng=np.random.default_rng([seed, 11]))
    lengths = [len(ids) for ids in assets.tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    logger.info("%d prompts of %.0f tokens on average", len(prompts), float(np.mean(lengths)))
    return prompts


@contextlib.contextmanager
def _timed(stages: dict[str, Any], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    stages[name] = round(time.perf_counter() - start, 3)


def run_perf(
    output: Path,
    *,
    quick: bool = False,
    only: tuple[str, ...] = COMPARISONS,
    assets: PerfAssets | None = None,
    sizes: PerfSizes | None = None,
    cache_dir: str = "",
    seed: int = 0,
    threads: int | None = None,
) -> dict[str, Any]:
    """Measure, then write ``output/perf.json`` and ``output/perf.md``; returns perf.json's content.

    Comparisons not in ``only`` keep the values of an existing ``perf.json`` in ``output`` (each row carries the
    time it was measured), so the harness can be run one comparison at a time on a busy machine. ``threads`` sets
    torch's intra-op threads for popri and its peers alike (on a CPU shared with other busy processes, 1 thread can
    be several times faster than 2: the threads wait for each other at every parallel region).
    """
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_perf(output, quick=quick, only=only, assets=assets, sizes=sizes, cache_dir=cache_dir, seed=seed)
    finally:
        torch.set_num_threads(before)


def _run_perf(
    output: Path,
    *,
    quick: bool,
    only: tuple[str, ...],
    assets: PerfAssets | None,
    sizes: PerfSizes | None,
    cache_dir: str,
    seed: int,
) -> dict[str, Any]:
    output.mkdir(parents=True, exist_ok=True)
    sizes = sizes or (PerfSizes.quick() if quick else PerfSizes())
    harness: dict[str, Any] = {}
    with _timed(harness, "load_assets_s"):
        assets = assets or load_default_assets(
            cache_dir=Path(cache_dir) if cache_dir else None, cache_users=sizes.cache_users, seed=seed
        )
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    previous = _load_previous(output / "perf.json")
    peak = {"float32": matmul_gflops(torch.float32), "bfloat16": matmul_gflops(torch.bfloat16)}
    result: dict[str, Any] = {
        "date": now,
        "quick": quick,
        "machine": machine_info(),
        "models": assets.description or "tiny models built in code",
        "sizes": dataclasses.asdict(sizes),
        "matmul_peak_gflops": {k: round(v, 1) for k, v in peak.items()},
        "stages": previous.get("stages", {}),
        "comparisons": [],
        "embedding_cache": previous.get("embedding_cache"),
        "dpo_first_step_fp32": previous.get("dpo_first_step_fp32"),
        "threads_check": previous.get("threads_check"),
        "ablations": previous.get("ablations") or {},
        "communication": previous.get("communication"),
    }
    rows: dict[str, dict[str, Any]] = {r["name"]: r for r in previous.get("comparisons", [])}
    prompts = _prompts(assets, sizes, seed=seed)
    samples: list[str] | None = None
    with tempfile.TemporaryDirectory(prefix="popri-perf-") as tmp, _blas_threads(torch.get_num_threads()):
        workdir = Path(tmp)
        if "round" in only:  # first, so that the peak memory is the round's (plus the harness's own fp32 model)
            round_result = bench_round(assets, sizes, seed=seed, cache_dir=cache_dir, workdir=workdir)
            result["stages"] = {**round_result, **_when(now)}
        if "generation" in only:
            gen_rows, samples = bench_generation(assets, sizes, prompts, seed=seed, peak_gflops=peak)
            rows.update({row["name"]: {**row, **_when(now)} for row in gen_rows})
            _save_samples(output, prompts, samples, sizes, seed=seed)
        if "scoring" in only:
            rows["scoring"] = {**bench_scoring(sizes, seed=seed), **_when(now)}
            result["embedding_cache"] = {**bench_embedding_cache(assets), **_when(now)}
        if {"dpo", "dpo_fp32", "dpo_loss", "dpo_shared_prompt"} & set(only):
            if samples is None:
                samples = _saved_samples(output, prompts, sizes, seed=seed)
                if samples is None:
                    samples = _sample(assets, prompts, sizes, seed=seed)
                    _save_samples(output, prompts, samples, sizes, seed=seed)
            pairs = _pairs(prompts, samples, sizes, seed=seed)[: sizes.dpo_pairs or None]
            for name in ("dpo", "dpo_fp32"):
                if name in only:
                    row = bench_dpo(assets, pairs, sizes, seed=seed, workdir=workdir, fp32=name == "dpo_fp32")
                    rows[name] = {**row, **_when(now)}
            if "dpo_shared_prompt" in only:
                result["ablations"]["shared_prompt_dpo"] = {**bench_shared_prompt(assets, pairs, sizes), **_when(now)}
            if "dpo_loss" in only:
                check = dpo_first_step_losses(assets.model, assets.tokenizer, pairs, workdir=workdir)
                result["dpo_first_step_fp32"] = {**check, **_when(now)}
        if "threads" in only:
            result["threads_check"] = {**bench_threads(assets), **_when(now)}
        if "communication" in only:
            comm = communication(
                assets.tokenizer,
                prompts=sizes.prompts,
                samples_per_prompt=sizes.samples_per_prompt,
                token_budget=sizes.token_budget,
            )
            result["communication"] = {**comm, **_when(now)}
    result["matmul_peak_gflops"]["float32_after"] = round(matmul_gflops(torch.float32), 1)
    if result["stages"]:
        rows["round"] = _round_row(result["stages"], rows)
    result["comparisons"] = [rows[n] for n in _row_order(rows)]
    result["harness"] = harness
    (output / "perf.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (output / "perf.md").write_text(render_markdown(result), encoding="utf-8")
    return result


def _samples_key(prompts: list[str], sizes: PerfSizes, seed: int) -> list[Any]:
    return [prompts, sizes.samples_per_prompt, sizes.max_new_tokens, sizes.token_budget, seed]


def _save_samples(output: Path, prompts: list[str], samples: list[str], sizes: PerfSizes, *, seed: int) -> None:
    """popri's samples of the generation run, reused as DPO pairs by a later ``--perf-only dpo`` run."""
    data = {"key": _samples_key(prompts, sizes, seed), "samples": samples}
    (output / "samples.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _saved_samples(output: Path, prompts: list[str], sizes: PerfSizes, *, seed: int) -> list[str] | None:
    saved = _load_previous(output / "samples.json")
    return list(saved["samples"]) if saved.get("key") == _samples_key(prompts, sizes, seed) else None


def _sample(assets: PerfAssets, prompts: list[str], sizes: PerfSizes, *, seed: int) -> list[str]:
    """popri's samples for the DPO pairs, when no generation run left them."""
    return sample_completions(
        popri_sampler(assets.model, assets.tokenizer, torch.bfloat16),
        assets.tokenizer,
        prompts,
        samples_per_prompt=sizes.samples_per_prompt,
        max_new_tokens=sizes.max_new_tokens,
        token_budget=sizes.token_budget,
        batch_size=sizes.generation_batch,
        generator=torch.Generator().manual_seed(seed),
    )


def _when(now: str) -> dict[str, Any]:
    """When and under which conditions a row was measured."""
    out: dict[str, Any] = {"measured_at": now, "torch_threads": torch.get_num_threads()}
    with contextlib.suppress(OSError):
        out["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return out


@contextlib.contextmanager
def _blas_threads(n: int) -> Iterator[None]:
    """numpy's BLAS at ``n`` threads too (threadpoolctl when available), so popri's numpy scoring runs like torch."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=n, user_api="blas"):
        yield


def _load_previous(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        logger.warning("ignoring unreadable %s", path)
        return {}


def _row_order(rows: dict[str, Any]) -> list[str]:
    first = ["generation", "generation_llama_cpp", "scoring", "dpo", "dpo_fp32", "round"]
    return [n for n in first if n in rows] + sorted(n for n in rows if n not in first)


def _pairs(prompts: list[str], samples: list[str], sizes: PerfSizes, *, seed: int) -> list[Any]:
    """One preference pair per prompt from popri's own samples, ranked by random scores (as noisy scores would)."""
    from popri.preferences import build_pairs

    scores = np.random.default_rng([seed, 5]).standard_normal(len(samples))
    return build_pairs(
        prompts=prompts,
        samples=samples,
        dp_scores=scores,
        samples_per_prompt=sizes.samples_per_prompt,
        rejected_rank=min(sizes.rejected_rank, sizes.samples_per_prompt - 1),
    )


def _round_row(stages: dict[str, Any], rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
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
        "popri_s": _sig(popri_s),
        "peer": "estimate: the same round with " + (", ".join(substituted) or "nothing") + " (peer/popri ratios "
        "measured above applied to popri's stage times)",
        "peer_s": _sig(peer_s),
        "ratio": round(peer_s / popri_s, 2) if popri_s > 0 else None,
        "target": None,
        "measured_at": stages.get("measured_at"),
    }


# -- report --------------------------------------------------------------------------------------------------------


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def render_markdown(result: dict[str, Any]) -> str:
    """perf.md: the comparisons, the round's stages, the cache check, communication and the machine."""
    m = result["machine"]
    lines = [
        "# popri performance" + (" (--quick)" if result["quick"] else ""),
        "",
        f"Measured {result['date']} on {m['processor']} ({m['cpu_count']} CPUs, torch threads {m['torch_threads']}, "
        f"device {m['device']}; load average at start {m.get('load_average_at_start', '?')}). "
        f"Models: {result['models']}.",
        "Each comparison runs popri and its peer in this one process, interleaved (A B B A ...); times are medians.",
        "ratio = peer_s / popri_s (above 1: popri faster).",
        "",
        "| comparison | popri s | peer | peer s | ratio | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    notes: list[str] = []
    for row in result["comparisons"]:
        if row.get("measured") is False:
            lines.append(f"| {row['name']} | - | not measured: {row['why']} | - | - | - | - |")
            continue
        target = row.get("target")
        met = "-" if target is None or row.get("ratio") is None else ("yes" if row["ratio"] >= target else "NO")
        lines.append(
            f"| {row['name']} | {_fmt(row['popri_s'])} | {row['peer']} | {_fmt(row['peer_s'])} | "
            f"{_fmt(row['ratio'])} | {_fmt(target)} | {met} |"
        )
        if row["name"].startswith("generation") and "popri_detail" in row:
            p, q = row["popri_detail"], row["peer_detail"]
            notes.append(
                f"- {row['name']}: {row['samples']} samples ({row['prompts']} prompts of "
                f"{row.get('prompt_tokens_mean', '?')} tokens x {row['samples_per_prompt']}), "
                f"<= {row['max_new_tokens']} new tokens. popri {p['tokens_per_s']} tokens/s "
                f"({p['tokens_per_sample']} tokens/sample kept; {100 * p['fraction_of_fp32_peak']:.1f} % of the fp32 "
                f"matmul peak, {100 * p.get('fraction_of_bf16_peak', 0):.1f} % of the bf16 one); peer "
                f"{q['tokens_per_s']} tokens/s ({q['tokens_per_sample']} tokens/sample, "
                f"{100 * q['fraction_of_fp32_peak']:.1f} % of peak). {row['parameters']:,} parameters."
            )
        if row["name"] == "scoring" and "users" in row:
            notes.append(
                f"- scoring: {row['users']} users, {row['private_texts']:,} private embeddings, {row['samples']} "
                f"samples; largest difference between the two score sums {row['max_abs_difference']:.2e}; "
                f"popri's one-off per-user sums {row['user_sums_once_s']} s."
            )
        if row["name"].startswith("dpo") and "steps" in row:
            notes.append(
                f"- {row['name']}: {row['pairs']} pairs, batch {row['batch']}, {row['steps']} steps; popri base in "
                f"{row['popri_precision']}; TRL bf16={row['trl_bf16']}, gradient checkpointing="
                f"{row['trl_gradient_checkpointing']}, TRL setup outside the timing {row['trl_setup_s']} s."
            )
    fs = result.get("dpo_first_step_fp32")
    if fs:
        notes.append(
            f"- Step-1 DPO loss on a float32 config ({fs['pairs']} pairs, the same nonzero adapter): popri "
            f"{fs['popri_loss']:.7f}, TRL {fs['trl_loss']:.7f}, |diff| {fs['abs_difference']:.1e} "
            f"({'within' if fs['match_1e-5'] else 'NOT within'} 1e-5)."
        )
    lines += ["", *notes]
    peak = result["matmul_peak_gflops"]
    lines += [
        "",
        f"Matmul peak measured in this run (1024 x 1024, best of ~0.5 s): float32 {peak['float32']} GFLOP/s "
        f"(again at the end: {peak.get('float32_after', '-')}), bfloat16 {peak['bfloat16']} GFLOP/s.",
    ]
    ab = (result.get("ablations") or {}).get("shared_prompt_dpo")
    if ab:
        lines += [
            "",
            f"Ablation, shared-prompt DPO forward ({ab['what']}; {ab['pairs']} pairs, {ab['row_tokens_full']} -> "
            f"{ab['row_tokens_shared']} tokens): {ab['full_s']} s -> {ab['shared_s']} s, x{ab['speedup']}"
            + (
                f"; with LoraDPO's kernels {ab['kernels_s']} s, x{ab['speedup_with_kernels']}; "
                if "kernels_s" in ab
                else "; "
            )
            + f"largest log-prob difference in float32 {ab['max_abs_logp_difference_fp32']:.1e}.",
        ]
    tc = result.get("threads_check")
    if tc:
        by = ", ".join(f"{n} thread(s) {t} s" for n, t in tc["median_s_by_threads"].items())
        lines += ["", f"Threads check ({tc['what']}, medians, load average {tc.get('load_average', '?')}): {by}."]
    stages = result.get("stages") or {}
    if stages:
        lines += [
            "",
            f"## One round (K={stages['prompts']}, J={stages['samples_per_prompt']}, "
            f"{stages['max_new_tokens']} new tokens, {stages['users']} users, {stages['pairs']} pairs, "
            f"DPO base in {stages['precision']})",
            "",
            "| stage | seconds |",
            "|---|---|",
            f"| setup (load models, initial set) | {stages['setup_s']} |",
            f"| node setup (private embedding sums, cached on disk) | {stages['node_setup_s']} |",
            *[f"| {k} | {v} |" for k, v in stages["seconds"].items()],
            f"| round total | {stages['round_s']} |",
            "",
            f"Peak resident memory {stages['peak_rss_mib']} MiB"
            + (f", peak CUDA memory {stages['peak_cuda_mib']} MiB" if "peak_cuda_mib" in stages else "")
            + " (the whole harness process up to the end of the round).",
        ]
    cache = result.get("embedding_cache") or {}
    if cache.get("first_call_s") is not None:
        lines += [
            "",
            "## Private-embedding cache",
            "",
            f"First `cached_user_sums` ({cache['users']} users, {cache['private_texts']} texts): "
            f"{cache['first_call_s']} s; the second call, as in every later round: {cache['second_call_s']} s "
            "(disk read, no embedding).",
        ]
    comm = result.get("communication")
    if comm:
        p, pp, f = comm["popri"], comm["popri_paper_size"], comm["dpfedavg"]
        lines += [
            "",
            "## Communication per client per round",
            "",
            "| method | down | up |",
            "|---|---|---|",
            f"| POPri K={p['prompts']}, J={p['samples_per_prompt']} | {_mib(p['down_bytes'])} ({p['down']}) | "
            f"{_mib(p['up_bytes'])} ({p['up']}) |",
            f"| POPri paper size K=1800, J=10 | {_mib(pp['down_bytes'])} | {_mib(pp['up_bytes'])} |",
            f"| DP-FedAvg, {f['model']}, {f['parameters']:,} parameters | {_mib(f['down_bytes'])} | "
            f"{_mib(f['up_bytes'])} |",
            "",
            f"DP-FedAvg / POPri: down x{comm['ratio_down_dpfedavg_over_popri']}, "
            f"up x{comm['ratio_up_dpfedavg_over_popri']}, total x{comm['ratio_total_dpfedavg_over_popri']}.",
        ]
    return "\n".join(lines) + "\n"


# -- CLI -----------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags ``popri bench perf`` adds to ``popri bench`` (it also uses --output, --seed, --cache-dir)."""
    group = parser.add_argument_group("perf mode")
    group.add_argument("--quick", action="store_true", help="perf: small sizes (a smoke test, ~3 min on 2 busy cores)")
    group.add_argument(
        "--perf-only",
        nargs="+",
        choices=COMPARISONS,
        default=None,
        help="perf: measure only these (the others keep their values from an existing OUTPUT/perf.json)",
    )
    group.add_argument(
        "--perf-size",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="perf: override one PerfSizes field, e.g. repeats_generation=1 or dpo_pairs=32",
    )
    group.add_argument(
        "--perf-threads",
        type=int,
        default=None,
        help="perf: torch intra-op threads for popri and the peers alike (default: torch's choice)",
    )


def sizes_with_overrides(sizes: PerfSizes, overrides: list[str]) -> PerfSizes:
    """``FIELD=VALUE`` strings applied to ``sizes`` (values parsed as the field's type)."""
    types = {f.name: type(getattr(sizes, f.name)) for f in dataclasses.fields(sizes)}
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in types:
            raise ValueError(f"invalid --perf-size {item!r}; fields: {', '.join(types)}")
        changes[key] = types[key](value)
    return dataclasses.replace(sizes, **changes)


def main(args: argparse.Namespace) -> int:
    """``popri bench perf``: measure, write OUTPUT/perf.json and perf.md, print the table."""
    output = Path(args.output or "runs/perf")
    quick = bool(getattr(args, "quick", False))
    try:
        sizes = sizes_with_overrides(PerfSizes.quick() if quick else PerfSizes(), getattr(args, "perf_size", []))
    except ValueError as err:
        print(f"popri bench perf: {err}", file=sys.stderr)
        return 2
    result = run_perf(
        output,
        quick=quick,
        sizes=sizes,
        only=tuple(getattr(args, "perf_only", None) or COMPARISONS),
        cache_dir=getattr(args, "cache_dir", None) or "",
        seed=int(getattr(args, "seed", None) or 0),
        threads=getattr(args, "perf_threads", None),
    )
    print(render_markdown(result))
    print(f"wrote {output / 'perf.json'} and {output / 'perf.md'}")
    return 0
