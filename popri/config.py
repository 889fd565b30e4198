"""Run configuration: one frozen dataclass per concern, validated when built; the one schema of popri's settings.

Every field maps to one flat kebab-case key (``samples_per_prompt`` <-> ``samples-per-prompt``). The field metadata
(``help``, and ``resume_locked`` for the keys a resumed run must keep) generates the ``popri run`` flags, ``popri
config``, :func:`resume_locked_keys` and the ``[tool.flwr.app.config]`` table in pyproject.toml (a test checks that
table against :func:`config_to_app_config`). The same keys drive ``popri run``, ``flwr run .`` and the benchmark,
through :func:`config_from_flat`; ``KEY=VALUE`` strings go through :func:`parse_assignments`.

None in TOML: TOML has no null, so an unset optional key (``noise-multiplier``, ``noise-seed``, ``epsilon`` when a
fixed σ is given) is written as the empty string ``""``; :func:`config_from_flat` reads ``""``, ``"none"`` and None
as None for optional keys.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# What ends a completion in DPO (see TrainConfig.completion_end).
COMPLETION_ENDS: tuple[str, ...] = ("eos", "header")
# Precision of the sentence embedder (see RunConfig.embedding_precision).
EMBEDDING_PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp32")


def default_cache_dir(configured: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder for models, initial sets and embeddings: the one default every part of popri uses.

    ``configured`` (a ``cache-dir`` key or ``--cache-dir`` flag) when non-empty, else ``$POPRI_CACHE``, else
    ``~/.cache/popri``; ``~`` is expanded in each.
    """
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("POPRI_CACHE") or Path.home() / ".cache" / "popri").expanduser()


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key and the fix."""


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"invalid config key '{key}': {why}")


def _key(name: str) -> str:
    return name.replace("_", "-")


def _base_type(type_name: str) -> tuple[str, bool]:
    """``"int | None"`` -> ``("int", True)``: the field's scalar type and whether None is allowed."""
    parts = [p.strip() for p in str(type_name).split("|")]
    optional = "None" in parts
    rest = [p for p in parts if p != "None"]
    return (rest[0] if rest else "str"), optional


def _check_types(obj: Any) -> None:
    """Refuse a field value of the wrong type: a bool where a number is expected, a NaN or infinite float, ...

    ``bool`` is a subclass of ``int`` in Python, so ``rounds=True`` would otherwise pass as 1.
    """
    for f in dataclasses.fields(obj):
        base, optional = _base_type(str(f.type))
        if base not in ("bool", "int", "float", "str"):
            continue  # a section
        value, key = getattr(obj, f.name), _key(f.name)
        if value is None:
            _check(optional, key, f"must be a {base}, got None")
            continue
        if base == "bool":
            _check(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        elif base == "int":
            _check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an int, got {value!r}")
        elif base == "float":
            _check(
                isinstance(value, int | float) and not isinstance(value, bool), key, f"expected a float, got {value!r}"
            )
            _check(math.isfinite(value), key, f"must be a finite number, got {value!r}")
        else:
            _check(isinstance(value, str), key, f"expected a string, got {value!r}")


@functools.lru_cache(maxsize=64)
def _rdp_epsilon_floor(delta: float) -> float:
    from popri.rdp import epsilon_floor  # numpy/scipy only; loaded when a config with a target epsilon is built

    return epsilon_floor(delta=delta)


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
        _check_types(self)
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

    epsilon: float | None = field(
        default=7.0,
        metadata={
            "help": "target epsilon after all rounds; with a noise-multiplier, a cap the run never passes",
            "resume_locked": True,
        },
    )
    noise_multiplier: float | None = field(
        default=None,
        metadata={
            "help": "sigma, fixed instead of calibrated to epsilon (popri run --noise-multiplier also unsets epsilon)",
            "resume_locked": True,
        },
    )
    delta: float = field(default=3e-6, metadata={"help": "target delta", "resume_locked": True})
    sample_rate: float = field(
        default=1.0, metadata={"help": "q, Poisson sampling rate of users per round", "resume_locked": True}
    )
    accountant: str = field(
        default="rdp", metadata={"help": "'rdp' or 'prv' (Opacus accountants)", "resume_locked": True}
    )
    noise_seed: int | None = field(default=None, metadata={"help": "reproducible noise (NOT for real privacy)"})
    privacy_mode: str = field(
        default="central",
        metadata={
            "help": "'central' (the server adds the noise) or 'secagg' (each node adds a noise share; the server "
            "sees only the SecAgg+ sum)",
            "resume_locked": True,
        },
    )
    min_replies: int = field(
        default=1,
        metadata={
            "help": "a round with fewer valid node replies is discarded (secagg: the noise shares are sized for it)",
            "resume_locked": True,
        },
    )
    secagg_clipping_range: float = field(
        default=1024.0,
        metadata={"help": "secagg: the bound SecAgg+ quantises each entry of a node's noisy sum within (±range)"},
    )

    def __post_init__(self) -> None:
        _check_types(self)
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
        if self.epsilon is not None and self.accountant == "rdp":
            # As sigma grows, the RDP -> (epsilon, delta) conversion tends to a floor > 0: no noise reaches below it.
            floor = _rdp_epsilon_floor(self.delta)
            _check(
                self.epsilon > floor,
                "epsilon",
                f"{self.epsilon:g} is at or below {floor:.4f}, the smallest epsilon the rdp accountant certifies at "
                f"delta={self.delta:g} with any noise; raise epsilon or delta",
            )
        if self.noise_seed is not None:
            _check(self.noise_seed >= 0, "noise-seed", f"must be >= 0 (or none), got {self.noise_seed}")
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
    length_penalty: float = field(
        default=0.0,
        metadata={"help": "R-DPO alpha: the margin gains alpha per token the chosen sample is longer (0 = plain DPO)"},
    )
    learning_rate: float = field(default=5e-4, metadata={"help": "AdamW learning rate for the LoRA weights"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    batch_size: int = field(default=4, metadata={"help": "pairs per DPO step"})
    epochs: int = field(default=1, metadata={"help": "DPO epochs over each round's pairs"})
    precision: str = field(
        default="bf16", metadata={"help": "frozen base weights in 'bf16' (about 2x faster) or 'fp32'; LoRA stays fp32"}
    )
    completion_end: str = field(
        default="eos",
        metadata={
            "help": "what ends each completion in DPO: 'eos' (TRL's tokenisation, the paper's) or 'header' (the next "
            "sample's header, where the sampler actually stops)"
        },
    )

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self.rejected_rank >= 1, "rejected-rank", f"must be >= 1 (0 is the chosen), got {self.rejected_rank}")
        _check(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        _check(self.length_penalty >= 0, "length-penalty", f"must be >= 0, got {self.length_penalty}")
        _check(self.learning_rate > 0, "learning-rate", f"must be > 0, got {self.learning_rate}")
        _check(self.lora_r >= 1, "lora-r", f"must be >= 1, got {self.lora_r}")
        _check(self.lora_alpha >= 1, "lora-alpha", f"must be >= 1, got {self.lora_alpha}")
        _check(self.batch_size >= 1, "batch-size", f"must be >= 1, got {self.batch_size}")
        _check(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        _check(self.precision in ("bf16", "fp32"), "precision", f"use 'bf16' or 'fp32', got {self.precision!r}")
        _check(
            self.completion_end in COMPLETION_ENDS,
            "completion-end",
            f"use {' or '.join(map(repr, COMPLETION_ENDS))}, got {self.completion_end!r}",
        )


@dataclass(frozen=True)
class DataConfig:
    """Where the private data comes from and how users are split."""

    data: str = field(
        default="shakespeare",
        metadata={"help": "'shakespeare' or a user JSONL/JSON/parquet file", "resume_locked": True},
    )
    max_users: int = field(
        default=0, metadata={"help": "keep at most this many users (0 = all)", "resume_locked": True}
    )
    validation_fraction: float = field(
        default=0.1, metadata={"help": "users held out for diagnostics", "resume_locked": True}
    )
    min_text_chars: int = field(default=20, metadata={"help": "shorter texts are dropped", "resume_locked": True})

    def __post_init__(self) -> None:
        _check_types(self)
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
    final_samples_per_prompt: int = field(
        default=1,
        metadata={
            "help": "completions per prompt in the final corpus (> 1 prefills each prompt once for all of them: "
            "faster, fewer distinct prompts)"
        },
    )
    embedding_precision: str = field(
        default="auto",
        metadata={
            "help": "sentence embedder weights on the server and the nodes: 'bf16', 'fp32', or 'auto' (bf16 where "
            "the device computes it natively, else fp32)"
        },
    )
    seed: int = field(
        default=0, metadata={"help": "seed for prompts, sampling and user sampling", "resume_locked": True}
    )
    num_nodes: int = field(default=2, metadata={"help": "Flower nodes in simulation"})
    diagnostics: bool = field(default=False, metadata={"help": "NON-PRIVATE similarity to held-out private text"})
    control: bool = field(default=False, metadata={"help": "random preference pairs (no private signal)"})
    output: str = field(default="runs/default", metadata={"help": "artifact directory"})
    cache_dir: str = field(
        default="", metadata={"help": "model and embedding cache (default $POPRI_CACHE or ~/.cache/popri)"}
    )
    reply_timeout: float = field(
        default=600.0, metadata={"help": "seconds the server waits for nodes to connect and for their replies"}
    )
    prepare_timeout: float = field(
        default=3600.0,
        metadata={
            "help": "seconds the server waits for nodes to prepare their private embeddings before the first round "
            "(no privacy cost)"
        },
    )
    max_discarded_rounds: int = field(
        default=3,
        metadata={
            "help": "a round discarded for too few valid replies is redone; the run stops after this many discards "
            "in a row"
        },
    )
    report_to: str = field(
        default="none",
        metadata={
            "help": "experiment tracker for the per-round metrics (rounds.jsonl keys): 'none', 'tensorboard' "
            "(pip install tensorboard; DIR/tensorboard) or 'wandb' (if installed)"
        },
    )

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")
        _check(self.final_samples >= 0, "final-samples", f"must be >= 0, got {self.final_samples}")
        _check(
            self.final_samples_per_prompt >= 1,
            "final-samples-per-prompt",
            f"must be >= 1, got {self.final_samples_per_prompt}",
        )
        _check(
            self.embedding_precision in EMBEDDING_PRECISIONS,
            "embedding-precision",
            f"use {', '.join(map(repr, EMBEDDING_PRECISIONS))}, got {self.embedding_precision!r}",
        )
        _check(self.num_nodes >= 1, "num-nodes", f"must be >= 1, got {self.num_nodes}")
        _check(self.reply_timeout > 0, "reply-timeout", "must be > 0")
        _check(self.prepare_timeout > 0, "prepare-timeout", f"must be > 0, got {self.prepare_timeout}")
        _check(self.max_discarded_rounds >= 0, "max-discarded-rounds", f"must be >= 0, got {self.max_discarded_rounds}")
        _check(
            self.report_to in ("none", "tensorboard", "wandb"),
            "report-to",
            f"use 'none', 'tensorboard' or 'wandb', got {self.report_to!r}",
        )
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
        return default_cache_dir(self.cache_dir)

    def resolved_noise_multiplier(self) -> float:
        """σ of this run, the same on the server and on every node (:func:`popri.privacy.resolve_noise_multiplier`).

        A target that the accountant cannot reach (Opacus: "privacy budget too low") is a :class:`ConfigError`.
        """
        from popri.privacy import resolve_noise_multiplier  # opacus loads only when a run needs σ

        p = self.privacy
        try:
            return resolve_noise_multiplier(
                epsilon=p.epsilon,
                noise_multiplier=p.noise_multiplier,
                delta=p.delta,
                sample_rate=p.sample_rate,
                rounds=self.rounds,
                accountant=p.accountant,
            )
        except (ValueError, RuntimeError) as err:
            raise ConfigError(
                f"invalid config key 'epsilon': no noise multiplier reaches epsilon={p.epsilon} at delta={p.delta}, "
                f"q={p.sample_rate}, T={self.rounds} with the {p.accountant} accountant ({err}); raise epsilon or delta"
            ) from None


_SECTIONS = {"generation": GenerationConfig, "privacy": PrivacyConfig, "train": TrainConfig, "data": DataConfig}

# Not RunConfig keys: the ServerApp's run control, carried in Flower's run config beside them.
RUN_CONTROL_KEYS: dict[str, bool] = {"resume": False, "progress": False}


@dataclass(frozen=True)
class KeySpec:
    """One flat key of the schema, read from the dataclass fields."""

    key: str
    section: str | None  # None: a top-level RunConfig field
    name: str
    type_name: str  # "int", "float", "str" or "bool"
    optional: bool  # None allowed ("" or "none" in TOML and on the command line)
    default: Any
    help: str
    resume_locked: bool

    @property
    def type_label(self) -> str:
        return f"{self.type_name} | None" if self.optional else self.type_name


@functools.lru_cache(maxsize=1)
def key_specs() -> tuple[KeySpec, ...]:
    """Every flat key with its type, default, help and resume lock, in a stable order (top level, then sections)."""

    def spec(f: dataclasses.Field[Any], section: str | None, defaults: Any) -> KeySpec:
        base, optional = _base_type(str(f.type))
        return KeySpec(
            key=_key(f.name),
            section=section,
            name=f.name,
            type_name=base,
            optional=optional,
            default=getattr(defaults, f.name),
            help=str(f.metadata.get("help", "")),
            resume_locked=bool(f.metadata.get("resume_locked", False)),
        )

    base = RunConfig()
    specs = [spec(f, None, base) for f in dataclasses.fields(RunConfig) if f.name not in _SECTIONS]
    for name, cls in _SECTIONS.items():
        specs += [spec(f, name, getattr(base, name)) for f in dataclasses.fields(cls)]
    return tuple(specs)


def _spec_by_key() -> dict[str, KeySpec]:
    return {s.key: s for s in key_specs()}


def known_keys() -> list[str]:
    """All flat keys, in a stable order."""
    return [s.key for s in key_specs()]


def resume_locked_keys() -> tuple[str, ...]:
    """Keys a resumed run must keep unchanged: changing them would break the privacy ledger or the user set."""
    return tuple(s.key for s in key_specs() if s.resume_locked)


def coerce_value(key: str, value: Any, type_name: str) -> Any:
    """Convert a TOML/CLI/JSON value to a field's type (``type_name`` as the dataclass declares it, e.g.
    ``"int | None"``), with an error that names the key.

    Strings are parsed (``"8"`` -> 8, ``"true"`` -> True); for an optional field, None, ``""`` and ``"none"`` are
    None. Refused: a bool where a number or string is expected, a float with a fraction for an int, NaN and inf.
    """
    base, optional = _base_type(type_name)
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in ("", "none"))):
        return None
    expected = f"expected {base}{' or none' if optional else ''}, got {value!r}"
    if base == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
            return value.strip().lower() in ("true", "1")
        raise ConfigError(f"invalid config key '{key}': {expected}")
    if isinstance(value, bool):
        raise ConfigError(f"invalid config key '{key}': {expected} (a bool)")
    if base == "int":
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"invalid config key '{key}': {expected}")
    if base == "float":
        try:
            number = float(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            raise ConfigError(f"invalid config key '{key}': {expected}") from None
        if not math.isfinite(number):
            raise ConfigError(f"invalid config key '{key}': must be a finite number, got {value!r}")
        return number
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    raise ConfigError(f"invalid config key '{key}': {expected}")


def _coerce(key: str, value: Any, type_name: str) -> Any:
    return coerce_value(key, value, type_name)


def split_assignment(item: str) -> tuple[str, str]:
    """``"KEY=VALUE"`` -> ``(KEY, VALUE)``, both stripped; the error names the item."""
    key, sep, raw = str(item).partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"expected KEY=VALUE, got {item!r} (e.g. beta=0.05)")
    return key.strip(), raw.strip()


def parse_assignments(items: Iterable[str], *, run_control: bool = False) -> dict[str, Any]:
    """``["prompts=8", "epsilon=none", ...]`` -> ``{"prompts": 8, "epsilon": None, ...}``, typed by the schema.

    The one parser of ``KEY=VALUE`` strings for popri keys (``popri run --set``, the benchmark's ``popri.KEY=VALUE``,
    the perf harness, ``popri deploy run --set``). ``run_control=True`` also accepts the run-control keys of
    Flower's run config (``resume``, ``progress``, as bools). Unknown keys and bad values raise :class:`ConfigError`
    naming the key and the item; a later item for the same key wins. Values are typed only: cross-field checks
    happen in :func:`config_from_flat`.
    """
    types = {key: spec.type_label for key, spec in _spec_by_key().items()}
    if run_control:
        types.update({key: "bool" for key in RUN_CONTROL_KEYS})
    out: dict[str, Any] = {}
    for item in items:
        key, raw = split_assignment(item)
        if key not in types:
            raise ConfigError(f"unknown config key '{key}' (in {item!r}); known keys: {', '.join(types)}")
        try:
            out[key] = coerce_value(key, raw, types[key])
        except ConfigError as err:
            raise ConfigError(f"{err} (in {item!r})") from None
    return out


def config_from_flat(flat: dict[str, Any]) -> RunConfig:
    """Build a :class:`RunConfig` from flat kebab-case keys; unknown keys are an error (typos must not pass)."""
    specs = _spec_by_key()
    unknown = sorted(set(flat) - set(specs))
    if unknown:
        raise ConfigError(f"unknown config key '{unknown[0]}'; known keys: {', '.join(specs)}")
    values = {key: coerce_value(key, value, specs[key].type_label) for key, value in flat.items()}
    sections = {
        name: cls(**{s.name: values[s.key] for s in specs.values() if s.section == name and s.key in values})
        for name, cls in _SECTIONS.items()
    }
    top = {s.name: values[s.key] for s in specs.values() if s.section is None and s.key in values}
    return RunConfig(**sections, **top)


def split_run_options(run_config: dict[str, Any]) -> tuple[dict[str, Any], bool, bool]:
    """Split a Flower run config into popri's config keys and the run-control flags (resume, progress)."""
    flat = dict(run_config)
    resume = str(flat.pop("resume", False)).lower() in ("true", "1")
    progress = str(flat.pop("progress", False)).lower() in ("true", "1")
    return flat, resume, progress


def config_to_flat(config: RunConfig) -> dict[str, Any]:
    """The inverse of :func:`config_from_flat` (None values are kept as None; JSON writes them as null)."""
    flat: dict[str, Any] = {}
    for f in dataclasses.fields(RunConfig):
        value = getattr(config, f.name)
        if f.name in _SECTIONS:
            flat.update({_key(k): v for k, v in dataclasses.asdict(value).items()})
        else:
            flat[_key(f.name)] = value
    return flat


def config_to_app_config(config: RunConfig) -> dict[str, bool | int | float | str]:
    """Every key as Flower's run config carries it (TOML values: None becomes ``""``); :func:`config_from_flat`
    reads it back to the same config. ``[tool.flwr.app.config]`` declares ``config_to_app_config(RunConfig())``.

    Use this, not :func:`config_to_flat`, for anything that passes through Flower: a dropped None key would fall
    back to its default there (epsilon=7 for a fixed-σ run).
    """
    return {k: ("" if v is None else v) for k, v in config_to_flat(config).items()}


def describe_keys() -> list[dict[str, Any]]:
    """``[{"key", "type", "default", "help"}, ...]`` for every key (``popri config --json``)."""
    return [{"key": s.key, "type": s.type_label, "default": s.default, "help": s.help} for s in key_specs()]


def delta_warning(delta: float, num_users: int) -> str | None:
    """A warning when δ >= 1/(number of users), else None.

    An (ε, δ) guarantee with δ >= 1/n allows a mechanism that publishes one user's data in the clear with
    probability δ (Dwork & Roth 2014, Sec. 2.3): δ should be well below 1/n. The message states no count (counts
    are private too); the caller decides where to log it.
    """
    if num_users >= 1 and delta * num_users >= 1:
        return (
            f"delta={delta:g} is not below 1/(number of users): the guarantee would allow releasing some user's data "
            "in the clear; choose a delta well below 1/(number of users)"
        )
    return None


def save_config(config: RunConfig, path: Path) -> None:
    """Write the flat config atomically (the project's one writer; imported here so this module stays torch-free)."""
    from popri.checkpoint import atomic_write_json

    atomic_write_json(path, config_to_flat(config))


def load_config(path: Path) -> RunConfig:
    try:
        flat = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON (line {err.lineno}): {err.msg}") from None
    if not isinstance(flat, dict):
        raise ConfigError(f"{path}: expected a JSON object of config keys, got {type(flat).__name__}")
    return config_from_flat(flat)
