"""The benchmark's methods behind one :class:`Method` protocol, registered explicitly in :data:`REGISTRY`.

As Private Evolution's DPSDA makes its parts swappable, a method here is a small object with a ``name``, whether it is
``private`` (then it runs at every ε of the benchmark) and ``run(replicate, epsilon=...)``, which returns either a
corpus (the driver trains the public base model on it with the shared recipe) or a trained model (DP-FedAvg), plus the
accounting fields of its row. The driver (:mod:`benchmark.run`) scores every output the same way.

Methods:

- ``eps0``: the untuned generator's public samples (no private data; ε = 0);
- ``epsinf``: all private train texts (non-private; ε = ∞);
- ``oracle``: N real private train texts, N = the synthetic corpus size (non-private; a ceiling for any N-text
  corpus under this recipe);
- ``dpfedavg``, ``pe``, ``popri``: the private methods, at every ε.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from benchmark.config import METHODS
from popri.card import PrivacyCard, write_card

# What released private data in the benchmark's PE (benchmark/pe.py), for the corpus's privacy card.
PE_MECHANISM = (
    "Gaussian mechanism on the sum of per-user nearest-neighbour vote vectors, each normalised to L2 norm 1 "
    "(sensitivity 1), once per iteration"
)

if TYPE_CHECKING:
    from benchmark.downstream import EvalResult
    from benchmark.run import Replicate


@dataclass
class MethodOutput:
    """What a method hands back: a ``corpus`` to train on, or a trained ``model`` with the validation result and
    checkpoint choice that selected it; plus its row's accounting fields (``row``)."""

    epsilon_spent: float
    corpus: list[str] | None = None
    model: Any = None
    validation: EvalResult | None = None
    selected: str = ""
    synthetic: bool = False  # a generated corpus: distribution metrics are computed for it
    round_samples: dict[int, list[str]] = field(default_factory=dict)  # per-round samples, when the method has them
    row: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.corpus is None) == (self.model is None):
            raise ValueError("a method returns either a corpus or a trained model, not both or neither")
        if self.model is not None and self.validation is None:
            raise ValueError("a trained model comes with the validation result that selected it")


class Method(Protocol):
    """A benchmark method. ``private`` methods run at every ε; the others at their own ``fixed_epsilon``."""

    name: str
    private: bool
    fixed_epsilon: float | None

    def run(self, replicate: Replicate, *, epsilon: float) -> MethodOutput:
        """One row's work at ``epsilon`` for ``replicate.seed`` (its DP noise, sampling, generation and init)."""
        ...


class Eps0:
    """The ε = 0 reference: the base model trained further on ``corpus.samples`` more public samples of the untuned
    generator (POPri or PE with no private feedback), so the methods are credited only for what private data adds."""

    name: str = "eps0"
    private: bool = False
    fixed_epsilon: float | None = 0.0

    def run(self, replicate: Replicate, *, epsilon: float) -> MethodOutput:
        return MethodOutput(epsilon_spent=0.0, corpus=list(replicate.public_finetune), synthetic=True)


class EpsInf:
    """The ε = ∞ reference: the base model trained on every private train text (non-private)."""

    name: str = "epsinf"
    private: bool = False
    fixed_epsilon: float | None = math.inf

    def run(self, replicate: Replicate, *, epsilon: float) -> MethodOutput:
        return MethodOutput(epsilon_spent=math.inf, corpus=list(replicate.prepared.splits.train.texts))


class Oracle:
    """Non-private ceiling for an N-text corpus: N real private train texts (N = ``corpus.samples``), a seeded draw
    without replacement per seed, trained with the same recipe. What a perfect generator of N texts could reach."""

    name: str = "oracle"
    private: bool = False
    fixed_epsilon: float | None = math.inf

    def run(self, replicate: Replicate, *, epsilon: float) -> MethodOutput:
        texts = replicate.prepared.splits.train.texts
        n = min(replicate.bench.config.corpus.samples, len(texts))
        pick = np.random.default_rng([replicate.seed, 31]).choice(len(texts), size=n, replace=False)
        return MethodOutput(
            epsilon_spent=math.inf, corpus=[texts[int(i)] for i in np.sort(pick)], row={"non_private": True}
        )


class DPFedAvgMethod:
    """DP-FedAvg with user-level DP on Flower (:mod:`benchmark.dpfedavg`), from the base model, same downstream."""

    name: str = "dpfedavg"
    private: bool = True
    fixed_epsilon: float | None = None

    def run(self, replicate: Replicate, *, epsilon: float) -> MethodOutput:
        import copy

        from benchmark.downstream import evaluate
        from benchmark.dpfedavg import run_dpfedavg

        bench, prep = replicate.bench, replicate.prepared
        cfg = bench.config
        noise_rng, sampling_rng, seeded = bench.rngs(self.name, epsilon, replicate.seed)
        result = run_dpfedavg(
            initial_model=replicate.base_model,
            model_factory=lambda: copy.deepcopy(replicate.base_model),
            user_sequences=prep.user_sequences,
            evaluate_validation=lambda m: evaluate(
                m, prep.validation, pad=prep.special.pad, batch_size=cfg.downstream.eval_batch_size
            ),
            config=cfg.dpfedavg,
            epsilon=epsilon,
            delta=cfg.delta,
            accountant=cfg.accountant,
            pad=prep.special.pad,
            seed=replicate.seed,
            noise_rng=noise_rng,
            sampling_rng=sampling_rng,
            progress=cfg.progress,
        )
        return MethodOutput(
            epsilon_spent=result.epsilon,
            model=result.model,
            validation=result.selected_validation,
            selected=f"round {result.selected_round}/{cfg.dpfedavg.rounds}",
            row={
                "noise_multiplier": result.noise_multiplier,
                "rounds": cfg.dpfedavg.rounds,
                "sample_rate": cfg.dpfedavg.sample_rate,
                "bytes_down_per_client_round": result.bytes_down_per_client_round,
                "bytes_up_per_client_round": result.bytes_up_per_client_round,
                "noise_seeded": seeded,
            },
        )


class PrivateEvolution:
    """Private Evolution with user-level DP votes (:mod:`benchmark.pe`), same generator and prompts as POPri."""

    name: str = "pe"
    private: bool = True
    fixed_epsilon: float | None = None

    def run(self, replicate: Replicate, *, epsilon: float) -> MethodOutput:
        from benchmark.corpus import write_corpus
        from benchmark.pe import run_pe

        bench = replicate.bench
        cfg = bench.config
        gen = bench.generator_for(replicate.prepared)
        noise_rng, _, seeded = bench.rngs(self.name, epsilon, replicate.seed)
        result = run_pe(
            gen,
            bench.assets.embedder,
            initial=bench.initial(replicate),
            private_embeddings=bench.private_embeddings(replicate.prepared),
            owner=replicate.prepared.splits.train.owner,
            config=cfg.pe,
            corpus_size=cfg.corpus.samples,
            epsilon=epsilon,
            delta=cfg.delta,
            accountant=cfg.accountant,
            seed=replicate.seed,
            noise_rng=noise_rng,
            progress=cfg.progress,
        )
        corpus_file = write_corpus(result.corpus, replicate.folder / f"pe-eps{epsilon:g}.jsonl")
        card = PrivacyCard(
            epsilon=result.epsilon,
            delta=cfg.delta,
            accountant=cfg.accountant,
            noise_multiplier=result.noise_multiplier,
            rounds=result.rounds,
            rounds_planned=result.rounds,
            sample_rate=1.0,
            privacy_mode="central",
            generator=cfg.corpus.generator,
            noise_seeded=seeded,
            target_epsilon=epsilon,
            mechanism=PE_MECHANISM,
        )
        write_card(corpus_file.with_suffix(".card.md"), card, title=f"Private Evolution corpus, ε={epsilon:g}")
        return MethodOutput(
            epsilon_spent=result.epsilon,
            corpus=result.corpus,
            synthetic=True,
            row={
                "noise_multiplier": result.noise_multiplier,
                "rounds": result.rounds,
                "sample_rate": 1.0,
                "bytes_down_per_client_round": result.bytes_down_per_client_round,
                "bytes_up_per_client_round": result.bytes_up_per_client_round,
                "noise_seeded": seeded,
            },
        )


class Popri:
    """A real popri run (its ServerApp and ClientApp) on the private train split (:mod:`benchmark.popri_method`)."""

    name: str = "popri"
    private: bool = True
    fixed_epsilon: float | None = None

    def run(self, replicate: Replicate, *, epsilon: float) -> MethodOutput:
        import shutil

        from benchmark.corpus import read_seconds, write_seconds
        from benchmark.datasets import write_user_jsonl
        from benchmark.popri_method import round_samples, run_popri_method

        bench, prep = replicate.bench, replicate.prepared
        cfg = bench.config
        train_file = write_user_jsonl(prep.splits.train, prep.folder / "private" / "train-users.jsonl")
        output = replicate.folder / f"popri-eps{epsilon:g}"
        reused_seconds = 0.0
        if cfg.resume and (output / "synthetic.jsonl").exists() and (output / "privacy.json").exists():
            result = bench.reuse_popri(output)
            reused_seconds = read_seconds(output / "synthetic.jsonl")  # the run happened in an earlier invocation
        else:
            interrupted = cfg.resume and (output / "config.json").exists()
            if output.exists() and not interrupted:
                shutil.rmtree(output)  # a run of an earlier invocation (popri refuses to overwrite a run)
            result = run_popri_method(
                cfg,
                prep.spec,
                epsilon=epsilon,
                seed=replicate.seed,
                noise_seed=bench.noise_seed_for(self.name, epsilon, replicate.seed),
                train_file=train_file,
                output=output,
                instruction=prep.instruction,
                embedding_dim=bench.embedding_dim(),
                resume=interrupted,
            )
            write_seconds(output / "synthetic.jsonl", result.seconds)
        return MethodOutput(
            epsilon_spent=result.epsilon,
            corpus=result.corpus,
            synthetic=True,
            round_samples=round_samples(output),
            row={
                "noise_multiplier": result.noise_multiplier,
                "rounds": result.rounds,
                "sample_rate": result.sample_rate,
                "bytes_down_per_client_round": result.bytes_down_per_client_round,
                "bytes_up_per_client_round": result.bytes_up_per_client_round,
                "run_folder": str(output),
                "reused_seconds": reused_seconds,
            },
        )


def _register(*methods: Method) -> dict[str, Method]:
    registry = {m.name: m for m in methods}
    if tuple(registry) != METHODS:
        raise RuntimeError(f"registered methods {tuple(registry)} differ from benchmark.config.METHODS {METHODS}")
    return registry


REGISTRY: dict[str, Method] = _register(Eps0(), EpsInf(), Oracle(), DPFedAvgMethod(), PrivateEvolution(), Popri())
