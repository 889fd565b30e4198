"""LargeFedBench configuration: one frozen dataclass per concern, validated when built, plus the three presets.

Errors name the key the way the command line spells it (``--dpfedavg-rounds`` is ``dpfedavg.rounds``), so a typo or a
bad value is found before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from popri.config import ConfigError, coerce_value, default_cache_dir, split_assignment

METHODS: tuple[str, ...] = ("eps0", "epsinf", "oracle", "dpfedavg", "pe", "popri")
PRIVATE_METHODS: tuple[str, ...] = ("dpfedavg", "pe", "popri")
NAMED_DATASETS: tuple[str, ...] = ("shakespeare", "congress", "biorxiv", "pubmed")
PRESETS: tuple[str, ...] = ("quick", "default", "paper")
DOWNSTREAM_KINDS: tuple[str, ...] = ("gpt2", "pretrained-lora")
# popri run keys the benchmark sets itself from its shared settings (so every method sees the same data and budget);
# each maps to the benchmark key that sets it.
POPRI_MANAGED_KEYS: dict[str, str] = {
    "data": "dataset / data.*",
    "max-users": "data.max-users",
    "validation-fraction": "data.validation-fraction",
    "min-text-chars": "data.min-text-chars",
    "token-budget": "data.token-budget",
    "model": "corpus.generator",
    "max-new-tokens": "corpus.max-new-tokens",
    "initial-set-size": "corpus.initial-set-size",
    "initial-instruction": "corpus.instruction",
    "generation-batch-size": "corpus.generation-batch-size",
    "temperature": "corpus.temperature",
    "top-p": "corpus.top-p",
    "final-samples": "corpus.samples",
    "final-samples-per-prompt": "corpus.samples-per-prompt",
    "epsilon": "--epsilons",
    "delta": "delta",
    "accountant": "accountant",
    "seed": "seed / --seeds",
    "noise-seed": "noise-seed",
    "output": "--output",
    "cache-dir": "cache-dir",
}


class BenchConfigError(ValueError):
    """An invalid benchmark setting; the message names the key and what would fix it."""


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise BenchConfigError(f"invalid benchmark key '{key}': {why}")


@dataclass(frozen=True)
class DataSpec:
    """Which private data set, and how it is cut into private train / validation / test.

    Test and validation hold out whole *users* (see :mod:`benchmark.datasets` for why), and every text that also
    occurs in an earlier split is dropped from the later one, so no text is shared between splits.
    """

    dataset: str = field(
        default="shakespeare",
        metadata={"help": "'shakespeare' (offline), 'congress', 'biorxiv', 'pubmed', or a user JSONL/JSON/parquet"},
    )
    data_file: str = field(
        default="",
        metadata={"help": "local raw file (or folder) for congress/biorxiv/pubmed; without it they come from the hub"},
    )
    max_users: int = field(default=0, metadata={"help": "keep a seeded random subset of this many users (0 = all)"})
    min_text_chars: int = field(default=20, metadata={"help": "shorter texts are dropped"})
    token_budget: int = field(default=64, metadata={"help": "every text is truncated to this many tokens"})
    validation_fraction: float = field(default=0.1, metadata={"help": "fraction of users held out for validation"})
    test_fraction: float = field(default=0.1, metadata={"help": "fraction of users held out for test"})
    max_validation_texts: int = field(default=500, metadata={"help": "seeded cap on validation texts (0 = all)"})
    max_test_texts: int = field(default=2000, metadata={"help": "seeded cap on test texts (0 = all)"})

    def __post_init__(self) -> None:
        _check(bool(self.dataset), "data.dataset", f"give one of {', '.join(NAMED_DATASETS)} or a file path")
        _check(self.max_users >= 0, "data.max-users", f"must be >= 0, got {self.max_users}")
        _check(self.min_text_chars >= 1, "data.min-text-chars", f"must be >= 1, got {self.min_text_chars}")
        _check(self.token_budget >= 1, "data.token-budget", f"must be >= 1, got {self.token_budget}")
        _check(0 < self.validation_fraction < 1, "data.validation-fraction", "must be in (0, 1)")
        _check(0 < self.test_fraction < 1, "data.test-fraction", "must be in (0, 1)")
        _check(
            self.validation_fraction + self.test_fraction < 1,
            "data.test-fraction",
            f"validation + test fractions must leave users for training, got {self.validation_fraction} + "
            f"{self.test_fraction}",
        )
        _check(self.max_validation_texts >= 0, "data.max-validation-texts", "must be >= 0")
        _check(self.max_test_texts >= 0, "data.max-test-texts", "must be >= 0")


@dataclass(frozen=True)
class DownstreamConfig:
    """The downstream LM every method trains, and the one training recipe they all share.

    ``kind``: ``gpt2`` builds a small GPT-2 from scratch (``n-embd``, ``n-layer``, ``n-head``); ``pretrained-lora``
    fine-tunes a LoRA adapter (``lora-r``, ``lora-alpha``; ``dropout`` is the adapter's dropout) on the public
    pretrained generator's weights (SmolLM2-135M by default, offline), as the paper fine-tunes a pretrained small LM.
    """

    kind: str = field(
        default="gpt2", metadata={"help": "'gpt2' (from scratch) or 'pretrained-lora' (public LM + LoRA)"}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (kind pretrained-lora)"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (kind pretrained-lora)"})
    n_embd: int = field(default=64, metadata={"help": "hidden size (the tied token embedding dominates the size)"})
    n_layer: int = field(default=2, metadata={"help": "transformer blocks"})
    n_head: int = field(default=2, metadata={"help": "attention heads"})
    dropout: float = field(default=0.1, metadata={"help": "dropout in attention, residual and embedding"})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate (constant, as in the paper)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    batch_size: int = field(default=32, metadata={"help": "texts per optimizer step"})
    pretrain_epochs: int = field(default=10, metadata={"help": "max epochs of the public base model"})
    epochs: int = field(default=6, metadata={"help": "max epochs when a method trains the base model further"})
    max_steps: int = field(default=800, metadata={"help": "cap on optimizer steps per training (0 = no cap)"})
    eval_every: int = field(default=25, metadata={"help": "validate every this many steps (and at the end)"})
    eval_batch_size: int = field(default=64, metadata={"help": "texts per evaluation batch"})

    def __post_init__(self) -> None:
        _check(
            self.kind in DOWNSTREAM_KINDS,
            "downstream.kind",
            f"use one of {', '.join(DOWNSTREAM_KINDS)}, got {self.kind!r}",
        )
        _check(self.lora_r >= 1, "downstream.lora-r", f"must be >= 1, got {self.lora_r}")
        _check(self.lora_alpha >= 1, "downstream.lora-alpha", f"must be >= 1, got {self.lora_alpha}")
        for key in ("n_embd", "n_layer", "n_head", "batch_size", "pretrain_epochs", "epochs", "eval_every"):
            _check(getattr(self, key) >= 1, f"downstream.{key.replace('_', '-')}", "must be >= 1")
        _check(self.n_embd % self.n_head == 0, "downstream.n-head", f"must divide n-embd ({self.n_embd})")
        _check(0 <= self.dropout < 1, "downstream.dropout", f"must be in [0, 1), got {self.dropout}")
        _check(self.learning_rate > 0, "downstream.learning-rate", f"must be > 0, got {self.learning_rate}")
        _check(self.weight_decay >= 0, "downstream.weight-decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.max_steps >= 0, "downstream.max-steps", f"must be >= 0, got {self.max_steps}")
        _check(self.eval_batch_size >= 1, "downstream.eval-batch-size", "must be >= 1")


@dataclass(frozen=True)
class CorpusConfig:
    """The generator side shared by eps0, PE and POPri: same model, prompts, sampling and corpus size."""

    generator: str = field(default="smollm2", metadata={"help": "'smollm2' (packaged) or a local HF model folder"})
    samples: int = field(
        default=500, metadata={"help": "size of the corpora the methods train on (eps0's public one, PE's, POPri's)"}
    )
    public_samples: int = field(
        default=500, metadata={"help": "untuned-generator samples the public base model is trained on first"}
    )
    max_new_tokens: int = field(default=48, metadata={"help": "new tokens per generated sample"})
    temperature: float = field(
        default=1.0, metadata={"help": "sampling temperature of every corpus and of POPri's rounds (one knob for all)"}
    )
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass, shared the same way"})
    samples_per_prompt: int = field(
        default=1,
        metadata={
            "help": "completions per prompt in every corpus the downstream trains on (public, eps0's, PE's, "
            "POPri's final); > 1 prefills each prompt once for all of them"
        },
    )
    initial_set_size: int = field(default=64, metadata={"help": "public seed samples the prompts draw from"})
    generation_batch_size: int = field(default=32, metadata={"help": "prompts decoded together"})
    instruction: str = field(
        default="", metadata={"help": "public instruction for the initial set ('' = the data set's default)"}
    )

    def __post_init__(self) -> None:
        _check(bool(self.generator), "corpus.generator", "give 'smollm2' or a model folder")
        _check(self.samples >= 3, "corpus.samples", f"must be >= 3, got {self.samples}")
        _check(self.public_samples >= 1, "corpus.public-samples", f"must be >= 1, got {self.public_samples}")
        _check(self.max_new_tokens >= 1, "corpus.max-new-tokens", f"must be >= 1, got {self.max_new_tokens}")
        _check(
            math.isfinite(self.temperature) and self.temperature > 0,
            "corpus.temperature",
            f"must be finite and > 0, got {self.temperature}",
        )
        _check(0 < self.top_p <= 1, "corpus.top-p", f"must be in (0, 1], got {self.top_p}")
        _check(
            self.samples_per_prompt >= 1, "corpus.samples-per-prompt", f"must be >= 1, got {self.samples_per_prompt}"
        )
        _check(self.initial_set_size >= 3, "corpus.initial-set-size", "prompts draw 3 samples; must be >= 3")
        _check(self.generation_batch_size >= 1, "corpus.generation-batch-size", "must be >= 1")


@dataclass(frozen=True)
class DPFedAvgConfig:
    """DP-FedAvg with user-level DP (McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially Private Recurrent
    Language Models", ICLR): Poisson-sampled users, per-user clipped updates, Gaussian noise on their sum, fixed
    denominator ``q·N``."""

    rounds: int = field(default=6, metadata={"help": "T, federated rounds (each one is a private release)"})
    sample_rate: float = field(default=0.1, metadata={"help": "q, Poisson sampling rate of users per round"})
    clip_norm: float = field(default=0.5, metadata={"help": "C, L2 bound on one user's model update"})
    local_steps: int = field(default=2, metadata={"help": "local SGD steps per sampled user"})
    local_batch_size: int = field(default=16, metadata={"help": "texts per local step"})
    local_learning_rate: float = field(default=0.5, metadata={"help": "local SGD learning rate"})
    server_learning_rate: float = field(default=1.0, metadata={"help": "server step on the noisy mean update"})
    num_nodes: int = field(default=4, metadata={"help": "Flower nodes; each holds a round-robin group of users"})

    def __post_init__(self) -> None:
        _check(self.rounds >= 1, "dpfedavg.rounds", f"must be >= 1, got {self.rounds}")
        _check(0 < self.sample_rate <= 1, "dpfedavg.sample-rate", f"must be in (0, 1], got {self.sample_rate}")
        _check(self.clip_norm > 0, "dpfedavg.clip-norm", f"must be > 0, got {self.clip_norm}")
        _check(self.local_steps >= 1, "dpfedavg.local-steps", f"must be >= 1, got {self.local_steps}")
        _check(self.local_batch_size >= 1, "dpfedavg.local-batch-size", "must be >= 1")
        _check(self.local_learning_rate > 0, "dpfedavg.local-learning-rate", "must be > 0")
        _check(self.server_learning_rate > 0, "dpfedavg.server-learning-rate", "must be > 0")
        _check(self.num_nodes >= 1, "dpfedavg.num-nodes", f"must be >= 1, got {self.num_nodes}")


@dataclass(frozen=True)
class PEConfig:
    """Private Evolution (Lin et al. 2024; Xie et al. 2024, Aug-PE; Hou et al. 2024, PrE-Text) with user-level votes."""

    rounds: int = field(default=3, metadata={"help": "T, PE iterations (each one is a private release)"})
    population: int = field(default=64, metadata={"help": "synthetic samples voted on per iteration"})
    keep: int = field(default=16, metadata={"help": "top-voted samples kept as in-context examples for variations"})

    def __post_init__(self) -> None:
        _check(self.rounds >= 1, "pe.rounds", f"must be >= 1, got {self.rounds}")
        _check(self.population >= 3, "pe.population", f"must be >= 3, got {self.population}")
        _check(3 <= self.keep <= self.population, "pe.keep", f"must be in [3, population], got {self.keep}")


@dataclass(frozen=True)
class PopriMethodConfig:
    """The POPri run: popri's own run schema (``popri.config``), not a copy of it.

    ``settings`` holds any popri run key (``popri.config.known_keys()``) as (kebab-key, value) pairs, set on the
    command line as ``--set popri.<key>=VALUE`` and validated through ``popri.config.config_from_flat`` (so errors
    name the key). The keys the benchmark shares across methods (data, generator, sampling lengths, initial set,
    corpus size, ε, δ, accountant, seed: :data:`POPRI_MANAGED_KEYS`) are set by the benchmark and refused here.
    Everything not set takes popri's own default.
    """

    backend: str = field(
        default="inprocess",
        metadata={"help": "'inprocess' (popri's ServerApp/ClientApp over an in-process grid) or 'simulation' (Ray)"},
    )
    settings: tuple[tuple[str, Any], ...] = field(
        default=(), metadata={"help": "popri run keys as (kebab-key, value) pairs, e.g. (('rounds', 6),)"}
    )

    def __post_init__(self) -> None:
        _check(
            self.backend in ("inprocess", "simulation"),
            "popri.backend",
            f"use 'inprocess' or 'simulation', got {self.backend!r}",
        )
        from popri.config import known_keys

        keys = [k for k, _ in self.settings]
        _check(len(set(keys)) == len(keys), "popri", f"a key is set twice: {keys}")
        known = set(known_keys())
        for key in keys:
            _check(key in known, f"popri.{key}", f"not a popri run key; known keys: {', '.join(known_keys())}")
            _check(
                key not in POPRI_MANAGED_KEYS,
                f"popri.{key}",
                f"the benchmark sets it for every method; use '{POPRI_MANAGED_KEYS.get(key)}' instead",
            )
        self.run_config()  # values and combinations checked now, before any model is loaded

    def run_config(self, shared: dict[str, Any] | None = None) -> Any:
        """popri's ``RunConfig`` from ``settings`` on top of ``shared`` (the benchmark's keys), popri defaults else."""
        from popri.config import ConfigError, config_from_flat

        try:
            return config_from_flat({**(shared or {}), **dict(self.settings)})
        except (ConfigError, ValueError) as err:
            text = str(err).replace("config key '", "config key 'popri.")
            raise BenchConfigError(f"invalid benchmark key (POPri run schema): {text}") from None

    @property
    def rounds(self) -> int:
        return int(self.run_config().rounds)

    @property
    def prompts(self) -> int:
        return int(self.run_config().generation.prompts)

    @property
    def samples_per_prompt(self) -> int:
        return int(self.run_config().generation.samples_per_prompt)

    @property
    def num_nodes(self) -> int:
        return int(self.run_config().num_nodes)


@dataclass(frozen=True)
class BenchConfig:
    """A whole benchmark: data, downstream recipe, the methods and privacy budgets, and where results go."""

    preset: str = "default"
    datasets: tuple[DataSpec, ...] = (DataSpec(),)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    dpfedavg: DPFedAvgConfig = field(default_factory=DPFedAvgConfig)
    pe: PEConfig = field(default_factory=PEConfig)
    popri: PopriMethodConfig = field(default_factory=PopriMethodConfig)
    methods: tuple[str, ...] = METHODS
    epsilons: tuple[float, ...] = (1.0, 7.0)
    delta: float = 3e-6
    accountant: str = "rdp"
    seed: int = 0
    seeds: int = 3
    bootstrap_resamples: int = 2000
    # True: a hyperparameter search. Checkpoints are chosen on one half of the validation users and rows are scored
    # on the other half; the test split is never encoded, embedded or scored (benchmark.datasets.tuning_splits).
    tune: bool = False
    noise_seed: int | None = None
    output: str = "runs/bench"
    cache_dir: str = ""
    progress: bool = True
    resume: bool = False

    def __post_init__(self) -> None:
        _check(self.preset in PRESETS, "preset", f"use one of {', '.join(PRESETS)}, got {self.preset!r}")
        _check(len(self.datasets) >= 1, "dataset", "select at least one data set")
        names = [d.dataset for d in self.datasets]
        _check(len(set(names)) == len(names), "dataset", f"a data set is listed twice: {names}")
        _check(len(self.methods) >= 1, "methods", "select at least one method")
        unknown = [m for m in self.methods if m not in METHODS]
        _check(not unknown, "methods", f"unknown method {unknown[:1]}; use {', '.join(METHODS)}")
        _check(len(set(self.methods)) == len(self.methods), "methods", "a method is listed twice")
        _check(len(self.epsilons) >= 1 or not set(self.methods) & set(PRIVATE_METHODS), "epsilons", "give at least one")
        for eps in self.epsilons:
            _check(math.isfinite(eps) and eps > 0, "epsilons", f"each must be finite and > 0, got {eps}")
        _check(self.seeds >= 1, "seeds", f"must be >= 1, got {self.seeds}")
        _check(self.bootstrap_resamples >= 100, "bootstrap-resamples", "must be >= 100")
        _check(0 < self.delta < 1, "delta", f"must be in (0, 1), got {self.delta}")
        _check(self.accountant in ("rdp", "prv"), "accountant", f"use 'rdp' or 'prv', got {self.accountant!r}")
        _check(bool(self.output), "output", "give an output folder")

    @property
    def output_dir(self) -> Path:
        return Path(self.output)

    def resolved_cache_dir(self) -> Path:
        return default_cache_dir(self.cache_dir)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (saved in results.json so a table can be traced to its settings)."""
        out = dataclasses.asdict(self)
        out["datasets"] = [dataclasses.asdict(d) for d in self.datasets]
        out["methods"] = list(self.methods)
        out["epsilons"] = list(self.epsilons)
        out["popri"] = {"backend": self.popri.backend, "settings": dict(self.popri.settings)}
        return out

    def seed_values(self) -> list[int]:
        """The seeds of the replicates: ``seed, seed + 1, ...`` (``seeds`` of them), shared by every method (paired)."""
        return [self.seed + i for i in range(self.seeds)]


def preset_config(name: str, **overrides: Any) -> BenchConfig:
    """The named preset, with top-level fields replaced by ``overrides``.

    - ``quick``: every method at toy size on 60 Shakespeare users, two ε; minutes on 2 CPU cores (CI).
    - ``default``: the full comparison on Shakespeare (all ~1,350 users), aimed at <= 90 minutes on 2 cores.
    - ``paper``: the paper's sizes (K=1800, J=10, T=20, 64 tokens, a large final corpus); needs a GPU.
    """
    _check(name in PRESETS, "preset", f"use one of {', '.join(PRESETS)}, got {name!r}")
    if name == "quick":
        base = BenchConfig(
            preset="quick",
            datasets=(
                DataSpec(
                    max_users=60,
                    validation_fraction=0.15,
                    test_fraction=0.15,
                    max_validation_texts=60,
                    max_test_texts=200,
                ),
            ),
            # validation dominates training at this size (49k-token output layer): few, small validations
            downstream=DownstreamConfig(
                n_embd=32,
                n_layer=1,
                n_head=2,
                learning_rate=3e-3,
                batch_size=16,
                pretrain_epochs=8,
                epochs=4,
                max_steps=40,
                eval_every=10,
            ),
            corpus=CorpusConfig(
                samples=16, public_samples=16, max_new_tokens=20, initial_set_size=8, generation_batch_size=16
            ),
            dpfedavg=DPFedAvgConfig(rounds=2, sample_rate=0.5, local_steps=1, num_nodes=2),
            pe=PEConfig(rounds=1, population=8, keep=4),
            popri=PopriMethodConfig(
                settings=(("rounds", 1), ("prompts", 4), ("samples-per-prompt", 3), ("rejected-rank", 1)),
            ),
            seeds=2,
        )
    elif name == "default":
        base = BenchConfig(preset="default")
    else:
        base = BenchConfig(
            preset="paper",
            datasets=(DataSpec(max_validation_texts=5000, max_test_texts=0),),
            downstream=DownstreamConfig(
                n_embd=256, n_layer=4, n_head=4, pretrain_epochs=20, epochs=20, max_steps=0, eval_every=500
            ),
            corpus=CorpusConfig(
                samples=100_000,
                public_samples=100_000,
                max_new_tokens=85,
                initial_set_size=1000,
                generation_batch_size=128,
            ),
            dpfedavg=DPFedAvgConfig(rounds=100, sample_rate=0.1, num_nodes=16),
            pe=PEConfig(rounds=20, population=18_000, keep=1800),
            popri=PopriMethodConfig(
                settings=(
                    ("rounds", 20),
                    ("prompts", 1800),
                    ("samples-per-prompt", 10),
                    ("rejected-rank", 4),
                    ("num-nodes", 16),
                ),
            ),
        )
    return dataclasses.replace(base, **overrides) if overrides else base


_SECTIONS = ("downstream", "corpus", "dpfedavg", "pe", "popri", "data")


def _coerce(key: str, raw: str, part: Any, attr: str) -> Any:
    """``raw`` converted to the type the dataclass ``part`` declares for ``attr``, by popri's one value parser (the same
    rules as ``popri run``: no bool for a number, no NaN or inf, ``none`` for an optional); errors name the key."""
    type_name = {f.name: f.type for f in dataclasses.fields(part)}[attr]
    try:
        return coerce_value(key, raw, str(type_name))
    except ConfigError as err:
        raise BenchConfigError(str(err).replace("invalid config key", "invalid benchmark key")) from None


def parse_assignments(items: list[str]) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` as an ordered dict of raw strings (a later assignment of the same key wins), split by
    popri's one parser of assignments; each value is typed later by the field it sets."""
    out: dict[str, str] = {}
    for item in items:
        try:
            key, raw = split_assignment(item)
        except ConfigError as err:
            raise BenchConfigError(f"invalid benchmark key '{item}': {err}") from None
        out[key] = raw
    return out


def _with_popri_key(config: BenchConfig, key: str, raw: str) -> BenchConfig:
    """``popri.<key>=raw``: ``backend`` is the benchmark's; any other key is a popri run key (validated by popri)."""
    if key.replace("-", "_") == "backend":
        return dataclasses.replace(config, popri=dataclasses.replace(config.popri, backend=raw))
    run_key = key.replace("_", "-")
    settings = (*((k, v) for k, v in config.popri.settings if k != run_key), (run_key, raw))
    return dataclasses.replace(config, popri=dataclasses.replace(config.popri, settings=settings))


def apply_overrides(config: BenchConfig, assignments: list[str]) -> BenchConfig:
    """``section.key=value`` assignments (kebab or snake case), e.g. ``dpfedavg.rounds=10``, ``data.max-users=200``.

    ``data.*`` applies to every selected data set; ``popri.*`` takes any popri run key (``popri.beta=0.1``) and
    ``popri.backend``; top-level keys (``delta=1e-5``, ``seeds=5``) have no section.
    """
    for key, raw in parse_assignments(assignments).items():
        section, dot, name = key.rpartition(".")
        attr = name.replace("-", "_")
        if dot and section not in _SECTIONS:
            raise BenchConfigError(f"invalid benchmark key '{key}': sections are {', '.join(_SECTIONS)}")
        if section == "data":
            if attr not in {f.name for f in dataclasses.fields(DataSpec)}:
                raise BenchConfigError(f"invalid benchmark key '{key}': unknown field")
            specs = tuple(dataclasses.replace(d, **{attr: _coerce(key, raw, d, attr)}) for d in config.datasets)
            config = dataclasses.replace(config, datasets=specs)
        elif section == "popri":
            config = _with_popri_key(config, name, raw)
        elif section:
            part = getattr(config, section)
            if attr not in {f.name for f in dataclasses.fields(part)}:
                raise BenchConfigError(f"invalid benchmark key '{key}': unknown field")
            new = dataclasses.replace(part, **{attr: _coerce(key, raw, part, attr)})
            config = dataclasses.replace(config, **{section: new})
        else:
            simple = {
                "delta",
                "accountant",
                "seed",
                "seeds",
                "bootstrap_resamples",
                "noise_seed",
                "tune",
                "output",
                "cache_dir",
            }
            if attr not in simple:
                raise BenchConfigError(f"invalid benchmark key '{key}': top-level keys are {', '.join(sorted(simple))}")
            config = dataclasses.replace(config, **{attr: _coerce(key, raw, config, attr)})
    return config
