"""LargeFedBench driver: every selected method at every ε on every selected data set, one table at the end.

Per data set:

1. load, truncate and split by users (:mod:`benchmark.datasets`);
2. the untuned generator writes a public corpus from the public initial set; a fresh downstream model trains on its
   first part: the *public base model*, the starting point of every method (the paper's C4-pretrained DistilGPT2
   plays this role);
3. every method trains a copy of the base model with the same recipe (:func:`benchmark.downstream.train`):
   ``eps0`` on the rest of the public corpus (as many samples as PE's and POPri's corpora: the ε = 0 reference, i.e.
   the same pipeline with no private feedback), ``epsinf`` on the private train texts themselves, ``pe`` and
   ``popri`` on their synthetic corpora, ``dpfedavg`` federated on Flower;
4. each model is scored once on test, at the checkpoint its validation accuracy selected.

Rows are written to ``results.json``/``results.md``/``privacy_utility.png`` as they finish; with ``resume`` a row
already in ``results.json`` (same data set, method and ε) is not run again.
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
from benchmark.corpus import (
    Generator,
    generate_corpus_resumable,
    initial_set,
    read_corpus,
    read_seconds,
    write_corpus,
    write_seconds,
)
from benchmark.datasets import Splits, default_instruction, load_splits, write_user_jsonl
from benchmark.downstream import (
    EvalResult,
    SpecialIds,
    build_model,
    encode_texts,
    evaluate,
    num_parameters,
    train,
)

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
        if self._generator is None:
            from popri.assets import load_generator

            self._generator = load_generator(self.config.corpus.generator, cache_dir=self.config.resolved_cache_dir())
        return self._generator

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            from popri.embedding import load_embedder

            self._embedder = load_embedder()
        return self._embedder


@dataclass
class Prepared:
    """One data set, encoded for the downstream model, and the eps0 model every method starts from."""

    spec: DataSpec
    splits: Splits
    special: SpecialIds
    user_sequences: list[list[list[int]]]
    validation: list[list[int]]
    test: list[list[int]]
    folder: Path
    instruction: str
    base_model: Any = None  # the public-only starting point of every method
    extras: dict[str, Any] = field(default_factory=dict)


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
                "config": config.to_dict(),
                "environment": report.environment(),
            }
        )
        from popri.privacy import make_noise_rng

        self.noise_rng, self.noise_seeded = make_noise_rng(config.noise_seed)
        # DP-FedAvg's user sampling must be as unpredictable as the noise (or as reproducible, when asked for).
        self.sampling_rng, _ = make_noise_rng(None if config.noise_seed is None else config.noise_seed + 7919)

    # -- helpers -------------------------------------------------------------------------------------------------

    def _gen(self, prep: Prepared) -> Generator:
        model, tokenizer = self.assets.generator
        return Generator(
            model=model,
            tokenizer=tokenizer,
            config=self.config.corpus,
            token_budget=prep.spec.token_budget,
            instruction=prep.instruction,
            cache_dir=self.config.resolved_cache_dir(),
        )

    def _rows(self, name: str) -> list[dict[str, Any]]:
        return self.results["datasets"].setdefault(name, {}).setdefault("results", [])

    def _done(self, name: str, method: str, epsilon: float) -> dict[str, Any] | None:
        for row in self._rows(name):
            if row["method"] == method and report.as_float(row["epsilon"]) == epsilon:
                return row
        return None

    def _record(self, name: str, row: dict[str, Any]) -> None:
        rows = self._rows(name)
        rows[:] = [r for r in rows if not (r["method"] == row["method"] and r["epsilon"] == row["epsilon"])]
        rows.append(row)
        report.write_all(self.out, self.results)
        logger.info(
            "%s %s eps=%s: test accuracy %.4f, cross-entropy %.4f (%.0fs)",
            name,
            row["method"],
            row["epsilon"],
            row["accuracy"],
            row["cross_entropy"],
            row["wall_seconds"],
        )

    def _model_factory(self, prep: Prepared) -> Any:
        from popri.assets import best_device

        d = self.config.downstream
        model = build_model(d, prep.special, max_positions=prep.spec.token_budget + 2, seed=self.config.seed)
        return model.to(best_device())

    def _finetune(self, prep: Prepared, texts: list[str], desc: str) -> tuple[Any, Any]:
        """A copy of the public base model trained on ``texts`` with the shared recipe; returns (model, result)."""
        model = copy.deepcopy(prep.base_model)
        sequences = encode_texts(
            texts, self.assets.tokenizer, token_budget=prep.spec.token_budget, special=prep.special
        )
        result = train(
            model,
            sequences,
            prep.validation,
            config=self.config.downstream,
            epochs=self.config.downstream.epochs,
            pad=prep.special.pad,
            generator=torch.Generator().manual_seed(self.config.seed),
            progress=self.config.progress,
            desc=desc,
        )
        return model, result

    def _row(
        self,
        prep: Prepared,
        *,
        method: str,
        epsilon: float,
        model: Any,
        validation: EvalResult,
        selected: str,
        start: float,
        **extra: Any,
    ) -> dict[str, Any]:
        test = evaluate(model, prep.test, pad=prep.special.pad, batch_size=self.config.downstream.eval_batch_size)
        return {
            "method": method,
            "epsilon": epsilon,
            "accuracy": test.accuracy,
            "cross_entropy": test.cross_entropy,
            "test_tokens": test.tokens,
            "validation_accuracy": validation.accuracy,
            "validation_cross_entropy": validation.cross_entropy,
            "selected": selected,
            "delta": None if method in ("eps0", "epsinf") else self.config.delta,
            "wall_seconds": time.time() - start,
            **extra,
        }

    # -- data ----------------------------------------------------------------------------------------------------

    def prepare(self, spec: DataSpec) -> Prepared:
        tok = self.assets.tokenizer
        splits = load_splits(spec, tok, seed=self.config.seed)
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
            folder=self.out / splits.name,
            instruction=self.config.corpus.instruction or default_instruction(spec.dataset),
        )
        ds = self.results["datasets"].setdefault(splits.name, {})
        ds["splits"] = splits.summary()
        return prep

    # -- methods -------------------------------------------------------------------------------------------------

    def _public_corpus(self, prep: Prepared) -> tuple[list[str], list[str], float]:
        """Samples of the untuned generator from the public initial set: (pretraining part, eps0 fine-tuning part,
        seconds it took to write them, also when a resumed run reuses them)."""
        path = prep.folder / "public.jsonl"
        n_base, n_ft = self.config.corpus.public_samples, self.config.corpus.samples
        corpus = read_corpus(path) if self.config.resume and path.exists() else []
        if len(corpus) == n_base + n_ft:
            return corpus[:n_base], corpus[n_base:], read_seconds(path)
        if not self.config.resume:  # a fresh run never continues an earlier partial corpus
            for stale in (path.with_name(path.name + ".partial"), path.with_name(path.name + ".partial.seconds.json")):
                stale.unlink(missing_ok=True)
        gen = self._gen(prep)
        before = read_seconds(path.with_name(path.name + ".partial"))
        corpus = generate_corpus_resumable(
            gen,
            initial_set(gen, seed=self.config.seed, progress=self.config.progress),
            count=n_base + n_ft,
            seed=self.config.seed + 10,
            path=path,
            progress=self.config.progress,
            desc="public corpus",
        )
        return corpus[:n_base], corpus[n_base:], before  # earlier invocations' share; this one is on the clock

    def run_eps0(self, prep: Prepared) -> None:
        """The public base model (everyone's starting point) and the ε=0 reference.

        base = a fresh model trained on ``public_samples`` samples of the untuned generator (the role of the paper's
        C4-pretrained DistilGPT2). eps0 = the base trained further, with the same recipe as PE and POPri, on another
        ``samples`` samples of the untuned generator: POPri or PE with no private feedback. Comparing the methods
        with this control credits them only for what the private data adds, not for seeing more generator text.
        """
        name, start = prep.splits.name, time.time()
        base_path = prep.folder / "base_model.pt"
        base = self._model_factory(prep)
        ds = self.results["datasets"][name]
        ds["downstream_parameters"] = num_parameters(base)
        if self.config.resume and self._done(name, "eps0", 0.0) is not None and base_path.exists():
            base.load_state_dict(torch.load(base_path, weights_only=True, map_location="cpu"))
            prep.base_model = base
            return
        pretrain, finetune, reused_seconds = self._public_corpus(prep)
        start -= reused_seconds  # wall time counts the corpus even when a resumed run reuses it
        sequences = encode_texts(
            pretrain, self.assets.tokenizer, token_budget=prep.spec.token_budget, special=prep.special
        )
        result = train(
            base,
            sequences,
            prep.validation,
            config=self.config.downstream,
            epochs=self.config.downstream.pretrain_epochs,
            pad=prep.special.pad,
            generator=torch.Generator().manual_seed(self.config.seed),
            progress=self.config.progress,
            desc="public base",
        )
        torch.save(base.state_dict(), base_path)
        prep.base_model = base
        base_test = evaluate(base, prep.test, pad=prep.special.pad, batch_size=self.config.downstream.eval_batch_size)
        ds["base_model"] = {
            "note": "public-only starting point of every method (not a table row: eps0 is the ε=0 reference)",
            "corpus_size": len(pretrain),
            "selected": f"step {result.selected_step}/{result.steps}",
            "validation_accuracy": result.selected_validation.accuracy,
            "accuracy": base_test.accuracy,
            "cross_entropy": base_test.cross_entropy,
            "wall_seconds": time.time() - start,
        }
        model, trained = self._finetune(prep, finetune, "eps0")
        self._record(
            name,
            self._row(
                prep,
                method="eps0",
                epsilon=0.0,
                model=model,
                validation=trained.selected_validation,
                selected=f"step {trained.selected_step}/{trained.steps}",
                start=start,
                epsilon_spent=0.0,
                corpus_size=len(finetune),
                bytes_down_per_client_round=None,
                bytes_up_per_client_round=None,
            ),
        )

    def run_epsinf(self, prep: Prepared) -> None:
        start = time.time()
        model, result = self._finetune(prep, prep.splits.train.texts, "epsinf")
        self._record(
            prep.splits.name,
            self._row(
                prep,
                method="epsinf",
                epsilon=math.inf,
                model=model,
                validation=result.selected_validation,
                selected=f"step {result.selected_step}/{result.steps}",
                start=start,
                epsilon_spent=math.inf,
                corpus_size=len(prep.splits.train.texts),
                bytes_down_per_client_round=None,
                bytes_up_per_client_round=None,
            ),
        )

    def run_dpfedavg(self, prep: Prepared, epsilon: float) -> None:
        from benchmark.dpfedavg import run_dpfedavg

        start = time.time()
        result = run_dpfedavg(
            initial_model=prep.base_model,
            model_factory=lambda: self._model_factory(prep),
            user_sequences=prep.user_sequences,
            evaluate_validation=lambda m: evaluate(
                m, prep.validation, pad=prep.special.pad, batch_size=self.config.downstream.eval_batch_size
            ),
            config=self.config.dpfedavg,
            epsilon=epsilon,
            delta=self.config.delta,
            accountant=self.config.accountant,
            pad=prep.special.pad,
            seed=self.config.seed,
            noise_rng=self.noise_rng,
            sampling_rng=self.sampling_rng,
            progress=self.config.progress,
        )
        self._record(
            prep.splits.name,
            self._row(
                prep,
                method="dpfedavg",
                epsilon=epsilon,
                model=result.model,
                validation=result.selected_validation,
                selected=f"round {result.selected_round}/{self.config.dpfedavg.rounds}",
                start=start,
                epsilon_spent=result.epsilon,
                noise_multiplier=result.noise_multiplier,
                rounds=self.config.dpfedavg.rounds,
                sample_rate=self.config.dpfedavg.sample_rate,
                bytes_down_per_client_round=result.bytes_down_per_client_round,
                bytes_up_per_client_round=result.bytes_up_per_client_round,
                noise_seeded=self.noise_seeded,
            ),
        )

    def _private_embeddings(self, prep: Prepared) -> np.ndarray:
        from benchmark.pe import cached_text_embeddings

        if "private_embeddings" not in prep.extras:
            cache = prep.folder / "private" / f"train-embeddings-{prep.splits.train.fingerprint()}.npy"
            prep.extras["private_embeddings"] = cached_text_embeddings(
                self.assets.embedder, prep.splits.train.texts, cache=cache, progress=self.config.progress
            )
        return np.asarray(prep.extras["private_embeddings"])

    def run_pe(self, prep: Prepared, epsilon: float) -> None:
        from benchmark.pe import run_pe

        start = time.time()
        gen = self._gen(prep)
        result = run_pe(
            gen,
            self.assets.embedder,
            initial=initial_set(gen, seed=self.config.seed, progress=self.config.progress),
            private_embeddings=self._private_embeddings(prep),
            owner=prep.splits.train.owner,
            config=self.config.pe,
            corpus_size=self.config.corpus.samples,
            epsilon=epsilon,
            delta=self.config.delta,
            accountant=self.config.accountant,
            seed=self.config.seed,
            noise_rng=self.noise_rng,
            progress=self.config.progress,
        )
        write_corpus(result.corpus, prep.folder / f"pe-eps{epsilon:g}.jsonl")
        self._score_corpus(
            prep, method="pe", epsilon=epsilon, result=result, start=start, noise_seeded=self.noise_seeded
        )

    def run_popri(self, prep: Prepared, epsilon: float) -> None:
        from benchmark.popri_method import run_popri_method

        start = time.time()
        train_file = write_user_jsonl(prep.splits.train, prep.folder / "private" / "train-users.jsonl")
        output = prep.folder / f"popri-eps{epsilon:g}"
        if self.config.resume and (output / "synthetic.jsonl").exists() and (output / "privacy.json").exists():
            result = _reuse_popri(output, self.config, self.assets)
            start -= read_seconds(output / "synthetic.jsonl")  # the run itself happened in an earlier invocation
        else:
            interrupted = self.config.resume and (output / "config.json").exists()
            if output.exists() and not interrupted:
                import shutil

                shutil.rmtree(output)  # a run of an earlier invocation (popri refuses to overwrite a run)
            result = run_popri_method(
                self.config,
                prep.spec,
                epsilon=epsilon,
                train_file=train_file,
                output=output,
                instruction=prep.instruction,
                embedding_dim=embedding_dimension(self.assets.embedder),
                resume=interrupted,
            )
            write_seconds(output / "synthetic.jsonl", result.seconds)
        self._score_corpus(prep, method="popri", epsilon=epsilon, result=result, start=start, run_folder=str(output))

    def _score_corpus(
        self, prep: Prepared, *, method: str, epsilon: float, result: Any, start: float, **extra: Any
    ) -> None:
        """Train the downstream model on a private synthetic corpus (PE or POPri) and record its row."""
        model, trained = self._finetune(prep, result.corpus, f"{method} eps={epsilon:g}")
        self._record(
            prep.splits.name,
            self._row(
                prep,
                method=method,
                epsilon=epsilon,
                model=model,
                validation=trained.selected_validation,
                selected=f"step {trained.selected_step}/{trained.steps}",
                start=start,
                epsilon_spent=result.epsilon,
                noise_multiplier=result.noise_multiplier,
                rounds=result.rounds,
                sample_rate=1.0,
                corpus_size=len(result.corpus),
                bytes_down_per_client_round=result.bytes_down_per_client_round,
                bytes_up_per_client_round=result.bytes_up_per_client_round,
                **extra,
            ),
        )

    # -- all -----------------------------------------------------------------------------------------------------

    def jobs(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        for method in self.config.methods:
            if method == "eps0":
                continue  # always run first: every other method starts from it
            if method == "epsinf":
                out.append((method, math.inf))
            else:
                out += [(method, float(e)) for e in self.config.epsilons]
        return out

    def run(self) -> dict[str, Any]:
        for spec in self.config.datasets:
            prep = self.prepare(spec)
            jobs = self.jobs()
            bar = tqdm(total=len(jobs) + 1, desc=prep.splits.name, disable=not self.config.progress, unit="run")
            bar.set_postfix_str("eps0")
            self.run_eps0(prep)
            bar.update(1)
            for method, epsilon in jobs:
                bar.set_postfix_str(f"{method} eps={epsilon:g}")
                if self.config.resume and self._done(prep.splits.name, method, epsilon):
                    logger.info("resume: %s eps=%g already in results.json", method, epsilon)
                elif method == "epsinf":
                    self.run_epsinf(prep)
                else:
                    getattr(self, f"run_{method}")(prep, epsilon)
                bar.update(1)
            bar.close()
        report.write_all(self.out, self.results)
        return self.results


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
