"""A generation peer in its own interpreter: ``PYTHON peer_worker.py BACKEND --model DIR --work DIR --threads N``.

Runs in the peer's own virtual environment (CTranslate2, OpenVINO GenAI and vLLM each pin their own dependencies),
so this file imports only the standard library and, lazily, the backend. It speaks JSON lines on stdin/stdout:
first it writes ``{"ready": true, "version": ..., "load_s": ...}`` once the model is loaded (converted first when the
backend needs its own format, cached under ``--work``); then for every request ``{"prompts": [...],
"samples_per_prompt": J, "max_new_tokens": N, "stop": [...], "seed": S}`` it writes ``{"texts": [...]}``: the J raw
completions of each prompt in prompt order (the parent cleans and truncates them with popri's own rules), or
``{"error": "..."}``. Sampling is popri's: temperature 1, top-p 1, the whole vocabulary, no repetition penalty.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Generate = Callable[[list[str], int, int, list[str], int], list[str]]


def _ctranslate2(model: Path, work: Path, threads: int) -> tuple[str, Generate]:
    """CTranslate2 on the safetensors folder, converted once to float32 (its CPU build has no bf16 compute)."""
    import ctranslate2
    from transformers import AutoTokenizer

    out = work / f"ctranslate2-{ctranslate2.__version__}-float32"
    if not (out / "model.bin").exists():
        ctranslate2.converters.TransformersConverter(str(model)).convert(str(out), quantization="float32", force=True)
    generator = ctranslate2.Generator(str(out), device="cpu", compute_type="float32", intra_threads=threads)
    tok = AutoTokenizer.from_pretrained(str(model))

    def generate(prompts: list[str], j: int, max_new: int, stop: list[str], seed: int) -> list[str]:
        ctranslate2.set_random_seed(seed)
        starts = [tok.convert_ids_to_tokens(tok.encode(p, add_special_tokens=False)) for p in prompts for _ in range(j)]
        pieces: dict[int, list[str]] = {i: [] for i in range(len(starts))}

        def callback(step: Any) -> bool:  # stop a row once it wrote the next header (checked every 8 tokens)
            pieces[step.batch_id].append(step.token)
            return step.step % 8 == 7 and any(s in tok.convert_tokens_to_string(pieces[step.batch_id]) for s in stop)

        results = generator.generate_batch(
            starts,
            max_length=max_new,
            sampling_topk=0,
            sampling_topp=1.0,
            sampling_temperature=1.0,
            include_prompt_in_result=False,
            callback=callback,
        )
        return [tok.decode(r.sequences_ids[0], skip_special_tokens=True) for r in results]

    return ctranslate2.__version__, generate


def _openvino(model: Path, work: Path, threads: int) -> tuple[str, Generate]:
    """OpenVINO GenAI's LLMPipeline on the folder exported once by optimum-intel (float32 weights; the CPU plugin
    picks its inference precision, bf16 on CPUs with AMX or AVX512-BF16)."""
    import openvino_genai

    out = work / f"openvino-{openvino_genai.__version__}-fp32"
    if not (out / "openvino_model.xml").exists():
        cli = Path(sys.executable).with_name("optimum-cli")
        subprocess.run(
            [
                *(str(cli), "export", "openvino", "--model", str(model)),
                *("--task", "text-generation-with-past", "--weight-format", "fp32", str(out)),
            ],
            check=True,
            stdout=sys.stderr,
        )
    pipe = openvino_genai.LLMPipeline(str(out), "CPU", INFERENCE_NUM_THREADS=threads)

    def generate(prompts: list[str], j: int, max_new: int, stop: list[str], seed: int) -> list[str]:
        config = openvino_genai.GenerationConfig()
        config.do_sample = True
        config.temperature = 1.0
        config.top_p = 1.0
        config.top_k = 0
        config.repetition_penalty = 1.0
        config.num_return_sequences = j
        config.max_new_tokens = max_new
        config.stop_strings = set(stop)
        config.include_stop_str_in_output = False
        config.apply_chat_template = False
        config.rng_seed = seed
        texts: list[str] = []
        for prompt in prompts:  # one prompt a call: its J sequences share the prompt's prefill
            texts += list(pipe.generate(prompt, config).texts)
        return texts

    return openvino_genai.__version__, generate


def _vllm(model: Path, work: Path, threads: int) -> tuple[str, Generate]:
    """vLLM's CPU backend on the safetensors folder in bf16 (``n=J`` samples per prompt share the prompt's blocks)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    # vLLM binds its OpenMP threads to explicit CPU ids: the first ``threads`` of them, like the other peers' count.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0" if threads <= 1 else f"0-{threads - 1}")
    import vllm

    llm = vllm.LLM(model=str(model), dtype="bfloat16", max_model_len=1024, seed=0, enforce_eager=True)

    def generate(prompts: list[str], j: int, max_new: int, stop: list[str], seed: int) -> list[str]:
        params = vllm.SamplingParams(n=j, temperature=1.0, top_p=1.0, top_k=0, max_tokens=max_new, stop=stop, seed=seed)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return [c.text for o in outputs for c in o.outputs]

    return vllm.__version__, generate


BACKENDS: dict[str, Callable[[Path, Path, int], tuple[str, Generate]]] = {
    "ctranslate2": _ctranslate2,
    "openvino": _openvino,
    "vllm": _vllm,
}


def _reply(obj: dict[str, Any], out: Any) -> None:
    out.write(json.dumps(obj, ensure_ascii=False) + "\n")
    out.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backend", choices=sorted(BACKENDS))
    parser.add_argument("--model", type=Path, required=True, help="the generator as a safetensors folder")
    parser.add_argument("--work", type=Path, required=True, help="where converted models are cached")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads of the backend")
    args = parser.parse_args(argv)
    # The protocol owns the real stdout; file descriptor 1 becomes stderr, so that whatever a backend or the
    # processes it starts print (vLLM's engine runs in a child process) cannot corrupt the protocol.
    sys.stdout.flush()
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        version, generate = BACKENDS[args.backend](args.model, args.work, args.threads)
    except Exception as err:  # report any load failure through the protocol, then stop
        _reply({"ready": False, "error": f"{type(err).__name__}: {err}"}, protocol)
        return 1
    _reply({"ready": True, "version": version, "load_s": round(time.perf_counter() - start, 3)}, protocol)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            texts = generate(
                list(req["prompts"]),
                int(req["samples_per_prompt"]),
                int(req["max_new_tokens"]),
                list(req.get("stop", [])),
                int(req.get("seed", 0)),
            )
            _reply({"texts": texts}, protocol)
        except Exception as err:  # one bad request must not kill the worker: the parent reads the error
            _reply({"error": f"{type(err).__name__}: {err}"}, protocol)
    return 0


if __name__ == "__main__":
    sys.exit(main())
