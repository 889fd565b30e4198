"""What a harness run is asked for: which comparisons, which peers, and how big (from the run schema's defaults).

Light on purpose (no torch): ``popri --help`` builds the ``perf`` parser from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from popri.config import ConfigError, GenerationConfig, TrainConfig, coerce_value, split_assignment

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
    "growth",
    "corpus",
)
# Run only when named (``--only growth``, ``--only corpus``): at default sizes they measure for minutes (growth: tens).
OPT_IN_COMPARISONS = ("growth", "corpus")
DEFAULT_COMPARISONS = tuple(c for c in COMPARISONS if c not in OPT_IN_COMPARISONS)
# Generation peers that run in their own interpreter (benchmark/perf/peer_worker.py), by --peer-python NAME.
WORKER_PEER_NAMES = ("ctranslate2", "openvino", "vllm")

# A default run's settings: the harness measures what `popri run` does unless told otherwise.
_GENERATION = GenerationConfig()
_TRAIN = TrainConfig()


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"invalid perf size '{key}': {why}")


def size_list(key: str, text: str) -> tuple[int, ...]:
    """``"128,256,512"`` -> ``(128, 256, 512)``: sorted, duplicates dropped, each >= 1, at least two distinct sizes
    (a slope needs two points). ``key`` is the kebab-case size name the error names.
    """
    try:
        values = sorted({int(part) for part in str(text).replace(" ", "").split(",") if part})
    except ValueError:
        raise ConfigError(f"invalid perf size '{key}': expected comma-separated integers, got {text!r}") from None
    _check(len(values) >= 2, key, f"give at least two distinct sizes (a slope needs two points), got {text!r}")
    _check(values[0] >= 1, key, f"every size must be >= 1, got {text!r}")
    return tuple(values)


@dataclass(frozen=True)
class PerfSizes:
    """How big each measurement is. The generation and DPO sizes default to a default round of ``popri run``
    (:class:`popri.config.GenerationConfig`, :class:`popri.config.TrainConfig`); the rest are the harness's own.
    ``quick`` is a smoke size. Validated when built: the run-schema sizes through the run schema itself.
    """

    prompts: int = _GENERATION.prompts  # K
    samples_per_prompt: int = _GENERATION.samples_per_prompt  # J
    max_new_tokens: int = _GENERATION.max_new_tokens
    token_budget: int = _GENERATION.token_budget
    generation_batch: int = _GENERATION.generation_batch_size
    rejected_rank: int = _TRAIN.rejected_rank
    dpo_batch: int = _TRAIN.batch_size
    dpo_pairs: int = 16  # a default round trains on K pairs; 16 (4 steps) keeps TRL's side short (0 = all K)
    users: int = 2000
    texts_per_user: float = 50.0  # mean; Shakespeare's 200-user sample has ~54
    cache_users: int = 100  # ~2,400 texts: the fp32 and bf16 first calls of the private embedding
    round_max_users: int = 200  # a default run uses all ~1,400 users; 200 keeps the one-off embedding short
    round_initial_set: int = _GENERATION.initial_set_size
    repeats_generation: int = 2
    repeats_scoring: int = 5
    repeats_dpo: int = 1
    # "How cost grows" (benchmark/perf/growth.py, --only growth): comma-separated size lists.
    growth_users: str = "1000,10000,100000,1000000"  # users per node of the scoring sweep (U)
    growth_users_samples: int = 128  # K·J of the users sweep
    growth_scoring_samples: str = "128,256,512,1024,2048"  # K·J of the scoring sweep at fixed U
    growth_scoring_users: int = 10000  # U of that sweep
    growth_texts_per_user: float = 10.0  # mean private texts summed into each synthetic user
    growth_kj: str = "128,256,512,1024,2048"  # K·J of the round sweep (J = samples-per-prompt, K = K·J / J)
    growth_round_users: int = 1400  # users of the round's one node (a default run's Shakespeare has ~1,400)
    repeats_growth_scoring: int = 3
    repeats_growth_round: int = 1
    # "Corpus sampling" (benchmark/perf/corpus.py, --only corpus): N samples per variant, J samples per prompt.
    corpus_samples: int = 64
    corpus_per_prompt: str = "1,2,4,8"  # comma-separated; must hold 1 (the bf16 baseline)
    repeats_corpus: int = 2

    def __post_init__(self) -> None:
        # The sizes a run also has are checked by the run's own dataclasses (their errors name the run key).
        GenerationConfig(
            prompts=self.prompts,
            samples_per_prompt=self.samples_per_prompt,
            max_new_tokens=self.max_new_tokens,
            token_budget=self.token_budget,
            generation_batch_size=self.generation_batch,
            initial_set_size=self.round_initial_set,
        )
        TrainConfig(rejected_rank=self.rejected_rank, batch_size=self.dpo_batch)
        _check(self.dpo_pairs >= 0, "dpo-pairs", f"must be >= 0 (0 = all), got {self.dpo_pairs}")
        _check(self.users >= 1, "users", f"must be >= 1, got {self.users}")
        _check(self.texts_per_user >= 1, "texts-per-user", f"a mean of >= 1 text, got {self.texts_per_user}")
        _check(self.cache_users >= 1, "cache-users", f"must be >= 1, got {self.cache_users}")
        _check(self.round_max_users >= 0, "round-max-users", f"must be >= 0 (0 = all), got {self.round_max_users}")
        for key in (
            "repeats_generation",
            "repeats_scoring",
            "repeats_dpo",
            "repeats_growth_scoring",
            "repeats_growth_round",
            "growth_users_samples",
            "growth_scoring_users",
            "growth_round_users",
            "corpus_samples",
            "repeats_corpus",
        ):
            _check(getattr(self, key) >= 1, key.replace("_", "-"), f"must be >= 1, got {getattr(self, key)}")
        _check(self.growth_texts_per_user >= 1, "growth-texts-per-user", "a mean of >= 1 text")
        size_list("growth-users", self.growth_users)
        size_list("growth-scoring-samples", self.growth_scoring_samples)
        j = self.samples_per_prompt
        bad = [kj for kj in size_list("growth-kj", self.growth_kj) if kj % j]
        _check(not bad, "growth-kj", f"each K·J must be a multiple of samples-per-prompt J={j}, got {bad}")
        per_prompt = size_list("corpus-per-prompt", self.corpus_per_prompt)
        _check(1 in per_prompt, "corpus-per-prompt", f"must hold 1 (the J=1 baseline), got {self.corpus_per_prompt!r}")

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
            growth_users="200,1000",
            growth_users_samples=16,
            growth_scoring_samples="16,64",
            growth_scoring_users=500,
            growth_kj="8,16",
            growth_round_users=50,
            repeats_growth_scoring=2,
            corpus_samples=8,
            corpus_per_prompt="1,4",
        )


def sizes_with_overrides(sizes: PerfSizes, overrides: list[str], *, flag: str = "--perf-size") -> PerfSizes:
    """``KEY=VALUE`` strings (kebab- or snake-case field names) applied to ``sizes``, each parsed as its field's type.

    Raises :class:`popri.config.ConfigError` (a ``ValueError``) naming the flag, the key and the known fields.
    """
    types = {f.name.replace("_", "-"): str(f.type) for f in dataclasses.fields(sizes)}
    changes: dict[str, Any] = {}
    for item in overrides:
        try:
            key, value = split_assignment(item)
        except ConfigError as err:
            raise ConfigError(f"invalid {flag} {item!r}: {err}") from None
        key = key.replace("_", "-")
        if key not in types:
            raise ConfigError(f"invalid {flag} {item}: unknown size; known: {', '.join(types)}")
        try:
            changes[key.replace("-", "_")] = coerce_value(key, value, types[key])
        except ConfigError as err:
            raise ConfigError(f"invalid {flag} {item}: {err}") from None
    return dataclasses.replace(sizes, **changes)
