"""LargeFedBench driver: every selected method at every ε on every selected data set and seed, one table at the end.

Per data set (the splits are drawn once, from ``seed``), and per replicate seed s (``seeds`` of them, shared by
every method: a paired design):

1. load, truncate and split by users (:mod:`benchmark.datasets`);
2. the untuned generator writes a public corpus from the public initial set (seed s); a fresh downstream model
   (initialised from s) trains on its first part: the *public base model*, the starting point of every method (the
   paper's C4-pretrained DistilGPT2 plays this role);
3. every method of :data:`benchmark.methods.REGISTRY` returns a corpus (the driver trains a copy of the base model on
   it with the same recipe, :func:`benchmark.downstream.train`) or a trained model (DP-FedAvg);
4. each model is scored once on test, at the checkpoint its validation accuracy selected, with per-test-user counts
   (for the paired bootstrap of :mod:`benchmark.stats`), and every generated corpus gets its distribution metrics
   against the test users' texts (:mod:`benchmark.distribution`; non-private diagnostics).

Rows are written to ``results.json``/``results.md``/``privacy_utility.png`` as they finish; with ``resume`` a row
already in ``results.json`` (same data set, method, ε and seed) is not run again.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmark import report
from benchmark.config import BenchConfig, DataSpec
from benchmark.corpus import Generator, generate_corpus_resumable, initial_set, read_corpus, read_seconds
from benchmark.datasets import Splits, default_instruction, load_splits, tuning_splits
from benchmark.downstream import (
    SpecialIds,
    build_downstream,
    encode_texts,
    evaluate,
    num_parameters,
    train,
    trainable_parameters,
)
from benchmark.methods import REGISTRY, MethodOutput
from popri.checkpoint import atomic_open

logger = logging.getLogger(__name__)


@dataclass
class Assets:
    """Models shared by all methods, loaded once and only when a method needs them."""

    config: BenchConfig
    _tokenizer: Any = None
    _generator: Any = None
    _embedder: Any = None

    @property
    def tokenizer(self) -> Any:
        """The downstream tokenizer: the generator's (SmolLM2 by default), so token budgets agree everywhere."""
        if self._tokenizer is None:
            from popri.assets import load_tokenizer

            self._tokenizer = load_tokenizer(self.config.corpus.generator, cache_dir=self.config.resolved_cache_dir())
        return self._tokenizer

    @property
    def generator(self) -> tuple[Any, Any]:
        """The sampler of every corpus: bf16 weights, as popri's own rounds and final corpus sample (its default
        precision), so every method's texts come from the same numerics; measured 2-3x faster than float32."""
        if self._generator is None:
            from popri.assets import load_generator

            self._generator = load_generator(
                self.config.corpus.generator, cache_dir=self.config.resolved_cache_dir(), dtype=torch.bfloat16
            )
        return self._generator

    @property
    def pretrained(self) -> Any:
        """A float32 copy of the public generator, the base of the ``pretrained-lora`` downstream (loaded per use:
        each method trains its own adapter on a fresh copy)."""
        from popri.assets import load_generator

        return load_generator(self.config.corpus.generator, cache_dir=self.config.resolved_cache_dir())[0]

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            from popri.embedding import load_embedder

            self._embedder = load_embedder()
        return self._embedder


@dataclass
class Prepared:
    """One data set, encoded for the downstream model (shared by every seed)."""

    spec: DataSpec
    splits: Splits
    special: SpecialIds
    user_sequences: list[list[list[int]]]
    validation: list[list[int]]
    test: list[list[int]]
    test_groups: list[int]  # the test user of every test sequence (0..users-1), for per-user counts
    folder: Path
    instruction: str
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class Replicate:
    """One seed of one data set: the public base model and eps0's public corpus drawn with that seed."""

    bench: Benchmark
    prepared: Prepared
    seed: int
    folder: Path
    base_model: Any = None
    public_finetune: list[str] = field(default_factory=list)
    base_seconds: float = 0.0


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class Benchmark:
    """Runs a :class:`BenchConfig`; ``assets`` can be injected (tests build tiny ones)."""

    def __init__(self, config: BenchConfig, *, assets: Assets | None = None) -> None:
        self.config = config
        self.assets = assets or Assets(config)
        self.out = config.output_dir
        self.out.mkdir(parents=True, exist_ok=True)
        results_path = self.out / "results.json"
        if config.resume and results_path.exists():
            self.results = report.read_results_json(results_path)
        else:
            self.results = {"benchmark": "LargeFedBench", "datasets": {}}
        self.results.update(
            {
                "preset": config.preset,
                "delta": config.delta,
                "accountant": config.accountant,
                "seeds": config.seed_values(),
                "config": config.to_dict(),
                "environment": report.environment(),
            }
        )

    # -- randomness ------------------------------------------------------------------------------------------------

    def noise_seed_for(self, method: str, epsilon: float, seed: int) -> int | None:
        """The reproducible noise seed of one row, or None (then noise comes from a CSPRNG). Derived per (method, ε,
        seed), so a row's noise does not depend on which other rows ran before it."""
        if self.config.noise_seed is None:
            return None
        eps = -1 if math.isinf(epsilon) else round(epsilon * 1000)
        return _derived_seed(self.config.noise_seed, seed, list(REGISTRY).index(method), eps)

    def rngs(self, method: str, epsilon: float, seed: int) -> tuple[np.random.Generator, np.random.Generator, bool]:
        """(noise rng, user-sampling rng, seeded?) of one row. User sampling must be as unpredictable as the noise
        (amplification by sampling needs a secret sample), or as reproducible, when asked for."""
        from popri.privacy import make_noise_rng

        noise_seed = self.noise_seed_for(method, epsilon, seed)
        noise_rng, seeded = make_noise_rng(noise_seed)
        sampling_rng, _ = make_noise_rng(None if noise_seed is None else _derived_seed(noise_seed, 7919))
        return noise_rng, sampling_rng, seeded

    # -- helpers -------------------------------------------------------------------------------------------------

    def generator_for(self, prep: Prepared) -> Generator:
        model, tokenizer = self.assets.generator
        return Generator(
            model=model,
            tokenizer=tokenizer,
            config=self.config.corpus,
            token_budget=prep.spec.token_budget,
            instruction=prep.instruction,
            cache_dir=self.config.resolved_cache_dir(),
        )

    def initial(self, rep: Replicate) -> list[str]:
        """The public initial set of this seed (POPri's run with the same seed derives the same one)."""
        return initial_set(self.generator_for(rep.prepared), seed=rep.seed, progress=self.config.progress)

    def embedding_dim(self) -> int:
        return embedding_dimension(self.assets.embedder)

    def _rows(self, name: str) -> list[dict[str, Any]]:
        return self.results["datasets"].setdefault(name, {}).setdefault("results", [])

    def _done(self, name: str, method: str, epsilon: float, seed: int) -> dict[str, Any] | None:
        for row in self._rows(name):
            same = row["method"] == method and report.as_float(row["epsilon"]) == epsilon
            if same and int(row.get("seed", self.config.seed)) == seed:
                return row
        return None

    def _record(self, name: str, row: dict[str, Any]) -> None:
        rows = self._rows(name)
        key = (row["method"], row["epsilon"], row["seed"])
        rows[:] = [r for r in rows if (r["method"], r["epsilon"], r.get("seed", self.config.seed)) != key]
        rows.append(row)
        report.write_all(self.out, self.results)
        logger.info(
            "%s %s eps=%s seed=%d: test accuracy %.4f, cross-entropy %.4f (%.0fs)",
            name,
            row["method"],
            row["epsilon"],
            row["seed"],
            row["accuracy"],
            row["cross_entropy"],
            row["wall_seconds"],
        )

    def _model_factory(self, prep: Prepared, seed: int) -> Any:
        """A fresh downstream model of ``downstream.kind``, initialised from ``seed``."""
        from popri.assets import best_device

        model = build_downstream(
            self.config.downstream,
            prep.special,
            max_positions=prep.spec.token_budget + 2,
            seed=seed,
            pretrained=lambda: self.assets.pretrained,
        )
        return model.to(best_device())

    def _encode(self, prep: Prepared, texts: list[str]) -> list[list[int]]:
        return encode_texts(texts, self.assets.tokenizer, token_budget=prep.spec.token_budget, special=prep.special)

    def _finetune(self, rep: Replicate, texts: list[str], desc: str) -> tuple[Any, Any]:
        """A copy of the seed's public base model trained on ``texts`` with the shared recipe: (model, result)."""
        model = copy.deepcopy(rep.base_model)
        result = train(
            model,
            self._encode(rep.prepared, texts),
            rep.prepared.validation,
            config=self.config.downstream,
            epochs=self.config.downstream.epochs,
            pad=rep.prepared.special.pad,
            generator=torch.Generator().manual_seed(rep.seed),
            progress=self.config.progress,
            desc=desc,
        )
        return model, result

    def _test(self, prep: Prepared, model: Any) -> Any:
        return evaluate(
            model,
            prep.test,
            pad=prep.special.pad,
            batch_size=self.config.downstream.eval_batch_size,
            groups=prep.test_groups,
        )

    # -- data ----------------------------------------------------------------------------------------------------

    def prepare(self, spec: DataSpec) -> Prepared:
        tok = self.assets.tokenizer
        splits = load_splits(spec, tok, seed=self.config.seed)
        if self.config.tune:
            splits = tuning_splits(splits, seed=self.config.seed)
        special = SpecialIds.from_tokenizer(tok)
        enc = {"token_budget": spec.token_budget, "special": special}
        user_sequences = [encode_texts(splits.train.texts_of(u), tok, **enc) for u in range(splits.train.num_users)]
        prep = Prepared(
            spec=spec,
            splits=splits,
            special=special,
            user_sequences=user_sequences,
            validation=encode_texts(splits.validation.texts, tok, **enc),
            test=encode_texts(splits.test.texts, tok, **enc),
            test_groups=[int(u) for u in splits.test.owner],
            folder=self.out / splits.name,
            instruction=self.config.corpus.instruction or default_instruction(spec.dataset),
        )
        ds = self.results["datasets"].setdefault(splits.name, {})
        ds["splits"] = splits.summary()
        ds["scored_on"] = "validation, second half (tuning; test unread)" if self.config.tune else "test"
        return prep

    def private_embeddings(self, prep: Prepared) -> np.ndarray:
        return self.split_embeddings(prep, "train")

    def split_embeddings(self, prep: Prepared, split: str) -> np.ndarray:
        """Embeddings of the ``train``, ``validation`` or ``test`` users' texts (cached per split content)."""
        from benchmark.pe import cached_text_embeddings

        key = f"{split}_embeddings"
        if key not in prep.extras:
            data = getattr(prep.splits, split)
            cache = prep.folder / "private" / f"{split}-embeddings-{data.fingerprint()}.npy"
            prep.extras[key] = cached_text_embeddings(
                self.assets.embedder, data.texts, cache=cache, progress=self.config.progress
            )
        return np.asarray(prep.extras[key])

    def _distribution(self, prep: Prepared, texts: list[str], seed: int, *, against: str = "test") -> dict[str, Any]:
        """FID and k-NN precision/recall of ``texts`` against the ``against`` users' texts, and both sides' mean length
        in words (non-private diagnostics)."""
        from benchmark.distribution import distribution_metrics, mean_words
        from popri.embedding import embed_texts

        texts = [t for t in texts if t.strip()]
        lengths = {
            "mean_words": mean_words(texts),
            "reference_mean_words": mean_words(getattr(prep.splits, against).texts),
        }
        if len(texts) < 2:
            return {"fid": None, "knn_precision": None, "knn_recall": None, "metric_samples": len(texts), **lengths}
        return {
            **distribution_metrics(
                np.asarray(embed_texts(self.assets.embedder, texts)),
                self.split_embeddings(prep, against),
                rng=np.random.default_rng([seed, 53]),
            ),
            **lengths,
        }

    # -- the public base model, per seed ---------------------------------------------------------------------------

    def _public_corpus(self, rep: Replicate) -> tuple[list[str], list[str], float]:
        """Samples of the untuned generator from the public initial set: (pretraining part, eps0 fine-tuning part,
        seconds it took to write them, also when a resumed run reuses them)."""
        path = rep.folder / "public.jsonl"
        n_base, n_ft = self.config.corpus.public_samples, self.config.corpus.samples
        corpus = read_corpus(path) if self.config.resume and path.exists() else []
        if len(corpus) == n_base + n_ft:
            return corpus[:n_base], corpus[n_base:], read_seconds(path)
        if not self.config.resume:  # a fresh run never continues an earlier partial corpus
            for stale in (path.with_name(path.name + ".partial"), path.with_name(path.name + ".partial.seconds.json")):
                stale.unlink(missing_ok=True)
        before = read_seconds(path.with_name(path.name + ".partial"))
        corpus = generate_corpus_resumable(
            self.generator_for(rep.prepared),
            self.initial(rep),
            count=n_base + n_ft,
            seed=rep.seed + 10,
            path=path,
            progress=self.config.progress,
            desc="public corpus",
        )
        return corpus[:n_base], corpus[n_base:], before  # earlier invocations' share; this one is on the clock

    def replicate(self, prep: Prepared, seed: int) -> Replicate:
        """The public base model of ``seed`` (built, or loaded when resuming) and eps0's public corpus.

        base = a fresh model (initialised from ``seed``) trained on ``public_samples`` samples of the untuned generator
        (the role of the paper's C4-pretrained DistilGPT2); only what trains is saved (all of GPT-2, LoRA's adapter).
        """
        start = time.time()
        rep = Replicate(bench=self, prepared=prep, seed=seed, folder=prep.folder / f"seed{seed}")
        base = self._model_factory(prep, seed)
        ds = self.results["datasets"][prep.splits.name]
        ds["downstream_parameters"] = num_parameters(base)
        ds["downstream_trainable_parameters"] = sum(p.numel() for _, p in trainable_parameters(base))
        ds["downstream_kind"] = self.config.downstream.kind
        pretrain, rep.public_finetune, reused_seconds = self._public_corpus(rep)
        base_path = rep.folder / "base_model.pt"
        if self.config.resume and base_path.exists():
            _load_trainable(base, torch.load(base_path, weights_only=True, map_location="cpu"))
            rep.base_model = base
            return rep
        start -= reused_seconds  # wall time counts the corpus even when a resumed run reuses it
        result = train(
            base,
            self._encode(prep, pretrain),
            prep.validation,
            config=self.config.downstream,
            epochs=self.config.downstream.pretrain_epochs,
            pad=prep.special.pad,
            generator=torch.Generator().manual_seed(seed),
            progress=self.config.progress,
            desc=f"public base (seed {seed})",
        )
        with atomic_open(base_path) as fh:
            torch.save({n: p.detach().cpu() for n, p in trainable_parameters(base)}, fh)
        rep.base_model = base
        base_test = evaluate(base, prep.test, pad=prep.special.pad, batch_size=self.config.downstream.eval_batch_size)
        info = {
            "note": "public-only starting point of every method (not a table row: eps0 is the ε=0 reference)",
            "seed": seed,
            "corpus_size": len(pretrain),
            "selected": f"step {result.selected_step}/{result.steps}",
            "validation_accuracy": result.selected_validation.accuracy,
            "accuracy": base_test.accuracy,
            "cross_entropy": base_test.cross_entropy,
            "wall_seconds": time.time() - start,
        }
        models = [m for m in ds.get("base_models", []) if m.get("seed") != seed] + [info]
        ds["base_models"] = sorted(models, key=lambda m: m["seed"])
        ds["base_model"] = ds["base_models"][0]
        rep.base_seconds = time.time() - start
        return rep

    # -- one row ---------------------------------------------------------------------------------------------------

    def run_method(self, rep: Replicate, method: str, epsilon: float) -> dict[str, Any]:
        """Run one registered method at ``epsilon`` for the replicate's seed, score it and record its row."""
        prep = rep.prepared
        start = time.time() - (rep.base_seconds if method == "eps0" else 0.0)  # eps0 carries the base's cost
        out: MethodOutput = REGISTRY[method].run(rep, epsilon=epsilon)
        start -= float(out.row.pop("reused_seconds", 0.0))
        label = f"{method} eps={epsilon:g} seed={rep.seed}"
        if out.corpus is not None:
            model, trained = self._finetune(rep, out.corpus, label)
            validation, selected = trained.selected_validation, f"step {trained.selected_step}/{trained.steps}"
            corpus_size: int | None = len(out.corpus)
        else:
            model, validation, selected, corpus_size = out.model, out.validation, out.selected, None
        test = self._test(prep, model)
        row: dict[str, Any] = {
            "method": method,
            "epsilon": epsilon,
            "seed": rep.seed,
            "accuracy": test.accuracy,
            "cross_entropy": test.cross_entropy,
            "test_tokens": test.tokens,
            "test_user_correct": list(test.group_correct or ()),
            "test_user_tokens": list(test.group_tokens or ()),
            "validation_accuracy": validation.accuracy,
            "validation_cross_entropy": validation.cross_entropy,
            "selected": selected,
            "epsilon_spent": out.epsilon_spent,
            "delta": self.config.delta if REGISTRY[method].private else None,
            "non_private": not REGISTRY[method].private and method != "eps0",
            "corpus_size": corpus_size,
            "bytes_down_per_client_round": None,
            "bytes_up_per_client_round": None,
            **out.row,
        }
        if out.synthetic or method == "oracle":
            row.update(self._distribution(prep, out.corpus or [], rep.seed))
            row["distribution_note"] = "vs the test users' texts: a benchmark diagnostic, non-private"
        if out.round_samples:
            rounds = sorted(out.round_samples.items())
            row["round_metrics"] = [
                {"round": r, **self._distribution(prep, texts, rep.seed, against="validation")} for r, texts in rounds
            ]
            row["round_metrics_note"] = "each round's K·J samples vs the validation users: benchmark-only, non-private"
        row["wall_seconds"] = time.time() - start
        self._record(prep.splits.name, row)
        return row

    # -- all -----------------------------------------------------------------------------------------------------

    def jobs(self) -> list[tuple[str, float]]:
        """(method, ε) pairs: eps0 first (every other method starts from the same base model), non-private methods
        at their own ε, private ones at every ε."""
        methods = ["eps0", *[m for m in self.config.methods if m != "eps0"]]
        out: list[tuple[str, float]] = []
        for name in methods:
            method = REGISTRY[name]
            if method.private:
                out += [(name, float(e)) for e in self.config.epsilons]
            else:
                out.append((name, float(method.fixed_epsilon or 0.0)))
        return out

    def run(self) -> dict[str, Any]:
        for spec in self.config.datasets:
            prep = self.prepare(spec)
            jobs = self.jobs()
            seeds = self.config.seed_values()
            bar = tqdm(total=len(jobs) * len(seeds), desc=prep.splits.name, disable=not self.config.progress)
            for seed in seeds:
                done = {(m, e) for m, e in jobs if self.config.resume and self._done(prep.splits.name, m, e, seed)}
                todo = [job for job in jobs if job not in done]
                if not todo:
                    bar.update(len(jobs))
                    continue
                rep = self.replicate(prep, seed)
                for method, epsilon in jobs:
                    bar.set_postfix_str(f"seed {seed} {method} eps={epsilon:g}")
                    if (method, epsilon) in todo:
                        self.run_method(rep, method, epsilon)
                    else:
                        logger.info("resume: %s eps=%g seed=%d already in results.json", method, epsilon, seed)
                    bar.update(1)
                rep.base_model = None  # free the seed's models before the next one
            bar.close()
        report.write_all(self.out, self.results)
        return self.results

    def reuse_popri(self, output: Path) -> Any:
        return _reuse_popri(output, self.config, self.assets)


def _load_trainable(model: Any, state: dict[str, torch.Tensor]) -> None:
    """Load saved trainable parameters (or, for a file of an earlier version, a whole state dict)."""
    params = dict(trainable_parameters(model))
    if set(state) == set(params):
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)
    else:
        model.load_state_dict(state)


def embedding_dimension(embedder: Any) -> int:
    """The embedder's output size (sentence-transformers renamed the method in 6.x)."""
    getter = getattr(embedder, "get_embedding_dimension", None) or embedder.get_sentence_embedding_dimension
    return int(getter())


def _reuse_popri(output: Path, config: BenchConfig, assets: Assets) -> Any:
    """A finished popri run found by ``resume``: its corpus and ledger, without running it again."""
    import json

    from benchmark.popri_method import PopriResult, client_bytes_per_round

    privacy = json.loads((output / "privacy.json").read_text())
    down, up = client_bytes_per_round(
        prompts=config.popri.prompts,
        samples_per_prompt=config.popri.samples_per_prompt,
        embedding_dim=embedding_dimension(assets.embedder),
    )
    return PopriResult(
        corpus=read_corpus(output / "synthetic.jsonl"),
        epsilon=float(privacy["epsilon"]),
        noise_multiplier=privacy.get("noise_multiplier"),
        rounds=int(privacy.get("rounds_completed", config.popri.rounds)),
        bytes_down_per_client_round=down,
        bytes_up_per_client_round=up,
        seconds=0.0,  # the caller adds the time recorded when the run was made
        output=output,
    )


def run_benchmark(config: BenchConfig, *, assets: Assets | None = None) -> dict[str, Any]:
    """Run the benchmark and write results.json, results.md and privacy_utility.png into ``config.output``."""
    return Benchmark(config, assets=assets).run()
