"""Run configuration: one frozen dataclass per concern, validated when built.

Every field maps to one flat kebab-case key (``samples_per_prompt`` <-> ``samples-per-prompt``). The same keys drive
``popri run``, ``flwr run .`` (``[tool.flwr.app.config]`` in pyproject.toml) and the benchmark, through
:func:`config_from_flat`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key and the fix."""


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"invalid config key '{key}': {why}")


@dataclass(frozen=True)
class GenerationConfig:
    """How the server LLM writes candidate samples each round (step 1 of the algorithm)."""

    model: str = field(default="smollm2", metadata={"help": "'smollm2' (packaged) or a local HF model folder"})
    prompts: int = field(default=32, metadata={"help": "K, prompts per round (= preference pairs per round)"})
    samples_per_prompt: int = field(default=4, metadata={"help": "J, completions sampled per prompt"})
    max_new_tokens: int = field(default=48, metadata={"help": "new tokens sampled per completion"})
    token_budget: int = field(default=64, metadata={"help": "samples are truncated to this many tokens"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    initial_set_size: int = field(default=64, metadata={"help": "public seed samples the prompts draw from"})
    initial_instruction: str = field(
        default="Write one short line of dialogue that a character in a play might speak.",
        metadata={"help": "public instruction that makes the initial set (never private data)"},
    )
    generation_batch_size: int = field(default=32, metadata={"help": "prompts decoded together"})
    generation_backend: str = field(
        default="torch",
        metadata={"help": "'torch' (popri's sampler, CPU or GPU) or 'vllm' (CUDA only; pip install -e '.[gpu]')"},
    )
    vllm_gpu_memory: float = field(
        default=0.3, metadata={"help": "share of GPU memory vLLM may claim (DPO trains on the same GPU)"}
    )

    def __post_init__(self) -> None:
        _check(self.prompts >= 1, "prompts", f"must be >= 1, got {self.prompts}")
        _check(self.samples_per_prompt >= 2, "samples-per-prompt", f"needs >= 2 to rank, got {self.samples_per_prompt}")
        _check(self.max_new_tokens >= 1, "max-new-tokens", f"must be >= 1, got {self.max_new_tokens}")
        _check(self.token_budget >= 1, "token-budget", f"must be >= 1, got {self.token_budget}")
        _check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, "top-p", f"must be in (0, 1], got {self.top_p}")
        _check(self.initial_set_size >= 3, "initial-set-size", f"prompts draw 3 samples; got {self.initial_set_size}")
        _check(self.generation_batch_size >= 1, "generation-batch-size", "must be >= 1")
        _check(
            self.generation_backend in ("torch", "vllm"),
            "generation-backend",
            f"use 'torch' or 'vllm', got {self.generation_backend!r}",
        )
        _check(0 < self.vllm_gpu_memory < 1, "vllm-gpu-memory", f"must be in (0, 1), got {self.vllm_gpu_memory}")


@dataclass(frozen=True)
class PrivacyConfig:
    """The DP mechanism and its budget (step 4). Give ``epsilon`` or ``noise_multiplier``; the other is derived."""

    epsilon: float | None = field(default=7.0, metadata={"help": "target epsilon after all rounds"})
    noise_multiplier: float | None = field(default=None, metadata={"help": "sigma; overrides epsilon if given"})
    delta: float = field(default=3e-6, metadata={"help": "target delta"})
    sample_rate: float = field(default=1.0, metadata={"help": "q, Poisson sampling rate of users per round"})
    accountant: str = field(default="rdp", metadata={"help": "'rdp' or 'prv' (Opacus accountants)"})
    noise_seed: int | None = field(default=None, metadata={"help": "reproducible noise (NOT for real privacy)"})
    privacy_mode: str = field(
        default="central",
        metadata={
            "help": "'central' (the server adds the noise) or 'secagg' (each node adds a noise share; the server "
            "sees only the SecAgg+ sum)"
        },
    )
    min_replies: int = field(default=1, metadata={"help": "a round with fewer valid node replies is discarded"})
    secagg_clipping_range: float = field(
        default=1024.0,
        metadata={"help": "secagg: the bound SecAgg+ quantises each entry of a node's noisy sum within (±range)"},
    )

    def __post_init__(self) -> None:
        _check(
            self.epsilon is not None or self.noise_multiplier is not None,
            "epsilon",
            "give a target epsilon or a noise-multiplier",
        )
        if self.epsilon is not None:
            _check(self.epsilon > 0, "epsilon", f"must be > 0, got {self.epsilon}")
        if self.noise_multiplier is not None:
            _check(self.noise_multiplier > 0, "noise-multiplier", f"must be > 0, got {self.noise_multiplier}")
        _check(0 < self.delta < 1, "delta", f"must be in (0, 1), got {self.delta}")
        _check(0 < self.sample_rate <= 1, "sample-rate", f"must be in (0, 1], got {self.sample_rate}")
        _check(self.accountant in ("rdp", "prv"), "accountant", f"use 'rdp' or 'prv', got {self.accountant!r}")
        _check(
            self.privacy_mode in ("central", "secagg"),
            "privacy-mode",
            f"use 'central' or 'secagg', got {self.privacy_mode!r}",
        )
        _check(self.min_replies >= 1, "min-replies", f"must be >= 1, got {self.min_replies}")
        # A secure sum of one reply is that reply, and each share carries only σ²/min-replies of the noise.
        _check(
            self.privacy_mode != "secagg" or self.min_replies >= 2,
            "min-replies",
            f"secagg needs >= 2 replies per round (SecAgg+ hides nothing in a sum of one), got {self.min_replies}",
        )
        _check(self.secagg_clipping_range > 0, "secagg-clipping-range", "must be > 0")


@dataclass(frozen=True)
class TrainConfig:
    """Preference pairs and LoRA DPO on the server (steps 5 and 6)."""

    rejected_rank: int = field(default=2, metadata={"help": "rank (0 = best) of the rejected sample"})
    beta: float = field(default=0.1, metadata={"help": "DPO beta"})
    learning_rate: float = field(default=5e-4, metadata={"help": "AdamW learning rate for the LoRA weights"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    batch_size: int = field(default=4, metadata={"help": "pairs per DPO step"})
    epochs: int = field(default=1, metadata={"help": "DPO epochs over each round's pairs"})
    precision: str = field(
        default="bf16", metadata={"help": "frozen base weights in 'bf16' (about 2x faster) or 'fp32'; LoRA stays fp32"}
    )

    def __post_init__(self) -> None:
        _check(self.rejected_rank >= 1, "rejected-rank", f"must be >= 1 (0 is the chosen), got {self.rejected_rank}")
        _check(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        _check(self.learning_rate > 0, "learning-rate", f"must be > 0, got {self.learning_rate}")
        _check(self.lora_r >= 1, "lora-r", f"must be >= 1, got {self.lora_r}")
        _check(self.lora_alpha >= 1, "lora-alpha", f"must be >= 1, got {self.lora_alpha}")
        _check(self.batch_size >= 1, "batch-size", f"must be >= 1, got {self.batch_size}")
        _check(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        _check(self.precision in ("bf16", "fp32"), "precision", f"use 'bf16' or 'fp32', got {self.precision!r}")


@dataclass(frozen=True)
class DataConfig:
    """Where the private data comes from and how users are split."""

    data: str = field(default="shakespeare", metadata={"help": "'shakespeare' or a user JSONL/JSON/parquet file"})
    max_users: int = field(default=0, metadata={"help": "keep at most this many users (0 = all)"})
    validation_fraction: float = field(default=0.1, metadata={"help": "users held out for diagnostics"})
    min_text_chars: int = field(default=20, metadata={"help": "shorter texts are dropped"})

    def __post_init__(self) -> None:
        _check(bool(self.data), "data", "give 'shakespeare' or a file path")
        _check(self.max_users >= 0, "max-users", f"must be >= 0, got {self.max_users}")
        _check(0 <= self.validation_fraction < 1, "validation-fraction", "must be in [0, 1)")
        _check(self.min_text_chars >= 0, "min-text-chars", "must be >= 0")


@dataclass(frozen=True)
class RunConfig:
    """A whole POPri run."""

    generation: GenerationConfig = field(default_factory=GenerationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rounds: int = field(default=6, metadata={"help": "T, private rounds"})
    final_samples: int = field(default=256, metadata={"help": "size of the final synthetic corpus"})
    seed: int = field(default=0, metadata={"help": "seed for prompts, sampling and user sampling"})
    num_nodes: int = field(default=2, metadata={"help": "Flower nodes in simulation"})
    diagnostics: bool = field(default=False, metadata={"help": "NON-PRIVATE similarity to held-out private text"})
    control: bool = field(default=False, metadata={"help": "random preference pairs (no private signal)"})
    output: str = field(default="runs/default", metadata={"help": "artifact directory"})
    cache_dir: str = field(default="", metadata={"help": "cache for models and embeddings (default ~/.cache/popri)"})
    reply_timeout: float = field(
        default=600.0, metadata={"help": "seconds the server waits for nodes to connect and for their replies"}
    )
    prepare_timeout: float = field(
        default=3600.0, metadata={"help": "seconds the server waits for nodes to prove their data source"}
    )
    max_discarded_rounds: int = field(
        default=3, metadata={"help": "a discarded round is redone at most this many times in a row"}
    )

    def __post_init__(self) -> None:
        _check(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")
        _check(self.final_samples >= 0, "final-samples", f"must be >= 0, got {self.final_samples}")
        _check(self.num_nodes >= 1, "num-nodes", f"must be >= 1, got {self.num_nodes}")
        _check(self.reply_timeout > 0, "reply-timeout", "must be > 0")
        _check(
            self.train.rejected_rank < self.generation.samples_per_prompt,
            "rejected-rank",
            f"must be < samples-per-prompt ({self.generation.samples_per_prompt}), got {self.train.rejected_rank}",
        )
        _check(
            self.privacy.min_replies <= self.num_nodes,
            "min-replies",
            f"cannot exceed num-nodes ({self.num_nodes}), got {self.privacy.min_replies}",
        )

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else Path.home() / ".cache" / "popri"

    def resolved_noise_multiplier(self) -> float:
        """σ of this run, the same on the server and on every node (:func:`popri.privacy.resolve_noise_multiplier`)."""
        from popri.privacy import resolve_noise_multiplier  # opacus loads only when a run needs σ

        p = self.privacy
        return resolve_noise_multiplier(
            epsilon=p.epsilon,
            noise_multiplier=p.noise_multiplier,
            delta=p.delta,
            sample_rate=p.sample_rate,
            rounds=self.rounds,
            accountant=p.accountant,
        )


_SECTIONS = {"generation": GenerationConfig, "privacy": PrivacyConfig, "train": TrainConfig, "data": DataConfig}


def _key(name: str) -> str:
    return name.replace("_", "-")


def _coerce(key: str, value: Any, type_name: str) -> Any:
    """Convert a TOML/CLI value to the field's type, with an error that names the key."""
    optional = "None" in type_name
    if optional and (value is None or value == "" or value == "none"):
        return None
    try:
        if type_name.startswith("bool"):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                return value.lower() in ("true", "1")
            return bool(value)
        if type_name.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if type_name.startswith("float"):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"invalid config key '{key}': expected {type_name}, got {value!r}") from None


def known_keys() -> list[str]:
    """All flat keys, in a stable order."""
    keys = [_key(f.name) for f in dataclasses.fields(RunConfig) if f.name not in _SECTIONS]
    for cls in _SECTIONS.values():
        keys += [_key(f.name) for f in dataclasses.fields(cls)]
    return keys


def config_from_flat(flat: dict[str, Any]) -> RunConfig:
    """Build a :class:`RunConfig` from flat kebab-case keys; unknown keys are an error (typos must not pass)."""
    unknown = sorted(set(flat) - set(known_keys()))
    if unknown:
        raise ConfigError(f"unknown config key '{unknown[0]}'; known keys: {', '.join(known_keys())}")
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        kwargs = {
            f.name: _coerce(_key(f.name), flat[_key(f.name)], str(f.type))
            for f in dataclasses.fields(cls)
            if _key(f.name) in flat
        }
        sections[name] = cls(**kwargs)
    top = {
        f.name: _coerce(_key(f.name), flat[_key(f.name)], str(f.type))
        for f in dataclasses.fields(RunConfig)
        if f.name not in _SECTIONS and _key(f.name) in flat
    }
    return RunConfig(**sections, **top)


def split_run_options(run_config: dict[str, Any]) -> tuple[dict[str, Any], bool, bool]:
    """Split a Flower run config into popri's config keys and the run-control flags (resume, progress)."""
    flat = dict(run_config)
    resume = str(flat.pop("resume", False)).lower() in ("true", "1")
    progress = str(flat.pop("progress", False)).lower() in ("true", "1")
    return flat, resume, progress


def config_to_flat(config: RunConfig) -> dict[str, Any]:
    """The inverse of :func:`config_from_flat` (None values are kept as None)."""
    flat: dict[str, Any] = {}
    for f in dataclasses.fields(RunConfig):
        value = getattr(config, f.name)
        if f.name in _SECTIONS:
            flat.update({_key(k): v for k, v in dataclasses.asdict(value).items()})
        else:
            flat[_key(f.name)] = value
    return flat


def save_config(config: RunConfig, path: Path) -> None:
    path.write_text(json.dumps(config_to_flat(config), indent=2) + "\n")


def load_config(path: Path) -> RunConfig:
    try:
        flat = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON (line {err.lineno}): {err.msg}") from None
    return config_from_flat(flat)
