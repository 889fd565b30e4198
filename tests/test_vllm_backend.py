"""The optional vLLM generation backend, against a fake ``vllm`` module (vLLM itself needs CUDA; not run here).

What is checked is popri's side of the contract: what it asks vLLM for (J samples per prompt, stop strings, seeds
from the run's generator, the current adapter under a fresh id) and what it makes of the answer.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from popri.config import ConfigError, TrainConfig, config_from_flat
from popri.dpo import LoraDPO
from popri.generation import SAMPLE_HEADER
from popri.rounds import NodeReply, PopriRun
from popri.vllm_backend import VllmSampler, vllm_unavailable_reason
from tests.helpers import tiny_run_config
from tests.tiny_models import byte_tokenizer, randomize_lora, tiny_causal_lm


class FakeLLM:
    """Records what popri asks for; answers prompt k's sample j with 'line k.j' plus text past the next header."""

    instances: ClassVar[list[FakeLLM]] = []

    def __init__(self, **kwargs: Any) -> None:
        self.init = kwargs
        self.calls: list[dict[str, Any]] = []
        FakeLLM.instances.append(self)

    def generate(self, prompts: list[str], params: list[Any], *, lora_request: Any, use_tqdm: bool) -> list[Any]:
        self.calls.append({"prompts": prompts, "params": params, "lora": lora_request})
        return [
            types.SimpleNamespace(
                outputs=[
                    types.SimpleNamespace(text=f" line {k}.{j}\n{SAMPLE_HEADER} 5: leaked")
                    for j in range(p.kwargs["n"])
                ]
            )
            for k, p in enumerate(params)
        ]


class FakeSamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


class FakeLoRARequest:
    def __init__(self, name: str, int_id: int, path: str) -> None:
        self.name, self.int_id, self.path = name, int_id, path


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> type[FakeLLM]:
    vllm = types.ModuleType("vllm")
    vllm.LLM = FakeLLM  # type: ignore[attr-defined]
    vllm.SamplingParams = FakeSamplingParams  # type: ignore[attr-defined]
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = FakeLoRARequest  # type: ignore[attr-defined]
    for name, module in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, module)
    FakeLLM.instances = []
    return FakeLLM


def _sample(sampler: VllmSampler, adapter: Path | None, seed: int) -> list[str]:
    return sampler.sample(
        ["prompt a", "prompt b"],
        byte_tokenizer(),
        adapter_dir=adapter,
        samples_per_prompt=3,
        max_new_tokens=12,
        token_budget=64,
        temperature=0.9,
        top_p=0.95,
        generator=torch.Generator().manual_seed(seed),
    )


def test_vllm_sampler_asks_for_j_samples_per_prompt_with_the_current_adapter(fake_vllm: type[FakeLLM], tmp_path: Path):
    # Prepare: a trained-looking adapter saved as the round would save it
    tok = byte_tokenizer()
    dpo = LoraDPO(tiny_causal_lm(tok), tok, config=TrainConfig())
    randomize_lora(dpo.policy, seed=1)
    adapter = dpo.save_adapter(tmp_path / "adapter")
    sampler = VllmSampler(tmp_path / "model", lora_rank=16, gpu_memory=0.3, seed=0)

    # Execute: two rounds' worth of calls, the first twice from the same seed
    first = _sample(sampler, adapter, seed=7)
    again = _sample(sampler, adapter, seed=7)
    llm = fake_vllm.instances[0]

    # Assert: K·J cleaned samples in k·J + j order, what was asked for, the adapter on disk is the policy's
    assert first == [f"line {k}.{j}" for k in range(2) for j in range(3)] == again
    assert llm.init["enable_lora"] and llm.init["max_lora_rank"] == 16 and llm.init["gpu_memory_utilization"] == 0.3
    params = llm.calls[0]["params"]
    assert [p.kwargs["n"] for p in params] == [3, 3]
    assert {p.kwargs["max_tokens"] for p in params} == {12}
    assert SAMPLE_HEADER in params[0].kwargs["stop"]
    assert [p.kwargs["seed"] for p in params] == [p.kwargs["seed"] for p in llm.calls[1]["params"]]
    assert params[0].kwargs["seed"] != params[1].kwargs["seed"]
    assert [c["lora"].int_id for c in llm.calls] == [1, 2]  # a new id each time: vLLM caches adapters by id
    saved = load_file(str(Path(llm.calls[0]["lora"].path) / "adapter_model.safetensors"))
    lora = {n: p for n, p in dpo.policy.named_parameters() if p.requires_grad}
    assert len(saved) == len(lora) > 0
    assert all(any(torch.equal(v, p.detach()) for p in lora.values()) for v in saved.values())


def test_a_round_with_the_vllm_backend_trains_on_vllm_samples(
    fake_vllm: type[FakeLLM], monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, user_file: Path, tmp_path: Path
):
    # Prepare: a tiny run configured for vLLM (availability forced: this machine has no GPU)
    monkeypatch.setattr("popri.loop.vllm_unavailable_reason", lambda: None)
    flat = tiny_run_config(tiny_model_dir, user_file, tmp_path / "run", rounds=1, **{"final-samples": 0})
    run = PopriRun(config_from_flat({**flat, "generation-backend": "vllm"}), progress=False)
    k, j = run.config.generation.prompts, run.config.generation.samples_per_prompt

    def collect(embeddings: np.ndarray, t: int, q: float) -> list[NodeReply]:
        return [NodeReply(node_id=1, node_sum=np.zeros(len(embeddings)), num_users=3)]

    # Execute
    run.run(collect)
    llm = fake_vllm.instances[0]

    # Assert: vLLM served the round (K prompts, J samples each, the policy's adapter) and DPO trained on it
    assert len(llm.calls) == 1 and len(llm.calls[0]["prompts"]) == k
    assert all(p.kwargs["n"] == j for p in llm.calls[0]["params"])
    assert (Path(llm.calls[0]["lora"].path) / "adapter_config.json").exists()
    assert run.dpo.steps_done > 0


def test_vllm_backend_is_refused_by_key_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, user_file: Path, tmp_path: Path
):
    # Prepare: no vllm installed
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    flat = tiny_run_config(tiny_model_dir, user_file, tmp_path / "run", **{"generation-backend": "vllm"})

    # Execute / Assert: an unknown backend and an unavailable one both name the key
    with pytest.raises(ConfigError, match="generation-backend"):
        config_from_flat({**flat, "generation-backend": "tgi"})
    assert "not installed" in (vllm_unavailable_reason() or "")
    with pytest.raises(ConfigError, match=r"generation-backend.*not installed"):
        PopriRun(config_from_flat(flat), progress=False)
