"""Optional vLLM generation backend for CUDA servers (``pip install -e ".[gpu]"``, ``--set generation-backend=vllm``).

It draws the same samples as :func:`popri.generation.sample_completions`: the same prompts, J completions each in
order k·J .. k·J+J−1, the same stop rule, clean-up and token budget. The policy's current LoRA adapter is saved each
round and served through vLLM's LoRA support, so the weights vLLM holds never need reloading. vLLM shares the GPU
with DPO training in the same process, so it claims only ``vllm_gpu_memory`` of it.

Seeds: one per prompt, drawn from the run's sampling generator, so a run (and a resumed run) asks vLLM for the same
samples; vLLM's kernels are not bitwise deterministic across GPUs, so a resumed run matches in distribution only.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from popri.generation import SAMPLE_HEADER, clean_completion, truncate_tokens

# Cut generation where clean_completion would cut it anyway: the next sample header or a chat-turn marker.
STOP_STRINGS = [SAMPLE_HEADER, "<|im_start|>", "<|im_end|>"]


def vllm_unavailable_reason() -> str | None:
    """Why the vLLM backend cannot run here, or None when it can."""
    if importlib.util.find_spec("vllm") is None:
        return 'vllm is not installed (pip install -e ".[gpu]" on a CUDA machine)'
    if not torch.cuda.is_available():
        return "vllm needs a CUDA GPU and torch sees none"
    return None


class VllmSampler:
    """A vLLM engine on the generator's weights, sampling with a LoRA adapter saved by :class:`popri.dpo.LoraDPO`."""

    def __init__(self, model_dir: Path, *, lora_rank: int, gpu_memory: float, seed: int) -> None:
        from vllm import LLM

        self.llm = LLM(
            model=str(model_dir),
            dtype="bfloat16",
            enable_lora=True,
            max_lora_rank=_supported_rank(lora_rank),
            max_loras=1,
            gpu_memory_utilization=gpu_memory,
            seed=seed,
        )
        self._adapters_served = 0

    def sample(
        self,
        prompts: list[str],
        tokenizer: Any,
        *,
        adapter_dir: Path | None,
        samples_per_prompt: int,
        max_new_tokens: int,
        token_budget: int,
        temperature: float,
        top_p: float,
        generator: torch.Generator,
        progress: bool = False,
    ) -> list[str]:
        """K·J cleaned completions, the J samples of prompt k at positions k·J .. k·J+J−1."""
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator).tolist()
        params = [
            SamplingParams(
                n=samples_per_prompt,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_new_tokens,
                stop=STOP_STRINGS,
                seed=int(seed),
            )
            for seed in seeds
        ]
        lora = None
        if adapter_dir is not None:
            # A new id per adapter version: vLLM caches adapters by id, and this one changed since the last round.
            self._adapters_served += 1
            lora = LoRARequest(f"popri-{self._adapters_served}", self._adapters_served, str(adapter_dir))
        outputs = self.llm.generate(prompts, params, lora_request=lora, use_tqdm=progress)
        if len(outputs) != len(prompts) or any(len(o.outputs) != samples_per_prompt for o in outputs):
            raise RuntimeError(f"vLLM returned {len(outputs)} results for {len(prompts)} prompts, or too few samples")
        raw = [completion.text for output in outputs for completion in output.outputs]
        return truncate_tokens([clean_completion(t) for t in raw], tokenizer, token_budget)


def _supported_rank(rank: int) -> int:
    """The smallest LoRA rank vLLM accepts as ``max_lora_rank`` that holds ``rank`` (it takes a fixed set)."""
    for supported in (8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= supported:
            return supported
    raise ValueError(f"vLLM serves LoRA ranks up to 512, got {rank}")
