"""Result writing (JSON, Markdown, PNG), gap closure, the configuration checks and the command line."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pytest

from benchmark import cli, report
from benchmark.config import (
    METHODS,
    POPRI_MANAGED_KEYS,
    BenchConfigError,
    DataSpec,
    DownstreamConfig,
    DPFedAvgConfig,
    PEConfig,
    PopriMethodConfig,
    preset_config,
)
from benchmark.methods import REGISTRY


def _rows() -> list[dict[str, object]]:
    base = {"cross_entropy": 4.0, "wall_seconds": 1.0, "selected": "step 1/1"}
    return [
        {**base, "method": "eps0", "epsilon": 0.0, "accuracy": 0.20, "epsilon_spent": 0.0},
        {**base, "method": "epsinf", "epsilon": math.inf, "accuracy": 0.40, "epsilon_spent": math.inf},
        {
            **base,
            "method": "popri",
            "epsilon": 1.0,
            "accuracy": 0.30,
            "epsilon_spent": 0.99,
            "bytes_down_per_client_round": 196608,
            "bytes_up_per_client_round": 1024,
            "noise_multiplier": 19.3,
        },
        {**base, "method": "dpfedavg", "epsilon": 1.0, "accuracy": 0.19, "epsilon_spent": 0.98},
    ]


def test_gap_closure_formula() -> None:
    assert report.gap_closure(0.30, eps0=0.20, epsinf=0.40) == pytest.approx(0.5)
    assert report.gap_closure(0.19, eps0=0.20, epsinf=0.40) == pytest.approx(-0.05)
    assert report.gap_closure(0.30, eps0=None, epsinf=0.40) is None
    assert report.gap_closure(0.30, eps0=0.2, epsinf=0.2) is None
    # the paper's bioRxiv ε=1 numbers: POPri 34.8, ε0 27.9, ε∞ 41.5 -> 50.7 %
    assert report.gap_closure(34.8, eps0=27.9, epsinf=41.5) == pytest.approx(0.507, abs=1e-3)


def test_write_all_outputs(tmp_path: Path) -> None:
    # Prepare
    results = {"preset": "quick", "delta": 3e-6, "accountant": "rdp", "datasets": {"shakespeare": {"results": _rows()}}}

    # Execute
    report.write_all(tmp_path, results)

    # Assert: strict JSON (inf as a string), gap closure filled in, table and plot written.
    data = json.loads((tmp_path / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"bad JSON {c}"))
    rows = {r["method"]: r for r in data["datasets"]["shakespeare"]["results"]}
    assert rows["epsinf"]["epsilon"] == "inf"
    assert rows["popri"]["gap_closure"] == pytest.approx(0.5)
    assert rows["eps0"]["gap_closure"] == 0.0 and rows["epsinf"]["gap_closure"] == 1.0
    table = (tmp_path / "results.md").read_text()
    assert "| POPri |  | 30.00 (50%) |  |" in table
    assert "| ε=0 (public only) | 20.00 |" in table
    assert "196.6 KB" in table
    assert (tmp_path / "privacy_utility.png").stat().st_size > 1000


def test_config_errors_name_the_key() -> None:
    with pytest.raises(BenchConfigError, match=r"'dpfedavg\.sample-rate'"):
        DPFedAvgConfig(sample_rate=0.0)
    with pytest.raises(BenchConfigError, match=r"'pe\.keep'"):
        PEConfig(population=8, keep=9)
    with pytest.raises(BenchConfigError, match=r"'data\.test-fraction'"):
        DataSpec(validation_fraction=0.5, test_fraction=0.5)
    with pytest.raises(BenchConfigError, match="'methods'"):
        preset_config("quick", methods=("eps0", "fedprox"))
    with pytest.raises(BenchConfigError, match="'epsilons'"):
        preset_config("quick", epsilons=(0.0,))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="popri")
    cli.add_subparser(parser.add_subparsers(dest="command"))
    return parser


def test_every_flag_has_help() -> None:
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["bench"]
    for action in sub._actions:
        assert action.help, f"{action.option_strings or action.dest} has no help"


def test_cli_flags_reach_the_config(tmp_path: Path) -> None:
    args = _parser().parse_args(
        [
            "bench",
            "--preset",
            "quick",
            "--output",
            str(tmp_path),
            "--methods",
            "eps0",
            "popri",
            "--epsilons",
            "2",
            "--dataset",
            "congress",
            "--data-file",
            "speeches.jsonl",
            "--seed",
            "5",
            "--popri-backend",
            "simulation",
        ]
    )
    config = cli.config_from_args(args)
    assert args.func is cli.handle
    assert config.methods == ("eps0", "popri") and config.epsilons == (2.0,)
    assert config.datasets[0].dataset == "congress" and config.datasets[0].data_file == "speeches.jsonl"
    assert config.datasets[0].max_users == 60  # the preset's other data settings are kept
    assert config.seed == 5 and config.popri.backend == "simulation" and config.output == str(tmp_path)


def test_cli_set_overrides_any_setting() -> None:
    args = _parser().parse_args(
        [
            "bench",
            "--set",
            "dpfedavg.rounds=9",
            "--set",
            "data.max-users=200",
            "--set",
            "delta=1e-5",
            "--set",
            "popri.backend=simulation",
            "--set",
            "downstream.dropout=0.0",
        ]
    )
    config = cli.config_from_args(args)
    assert config.dpfedavg.rounds == 9 and config.datasets[0].max_users == 200 and config.delta == 1e-5
    assert config.popri.backend == "simulation" and config.downstream.dropout == 0.0
    for bad, match in [
        ("dpfedavg.rounds=x", "expected int"),
        ("dpfedavg.round=3", "unknown field"),
        ("fedprox.mu=1", "sections are"),
        ("pe.keep=0", r"'pe\.keep'"),
        ("rounds", "KEY=VALUE"),
    ]:
        with pytest.raises(BenchConfigError, match=match):
            cli.config_from_args(_parser().parse_args(["bench", "--set", bad]))


def test_cli_data_files_for_several_sets() -> None:
    args = _parser().parse_args(["bench", "--dataset", "congress", "biorxiv", "--data-file", "biorxiv=b.json"])
    specs = {d.dataset: d.data_file for d in cli.config_from_args(args).datasets}
    assert specs == {"congress": "", "biorxiv": "b.json"}
    bad = _parser().parse_args(["bench", "--dataset", "congress", "biorxiv", "--data-file", "x.json"])
    with pytest.raises(BenchConfigError, match="NAME=PATH"):
        cli.config_from_args(bad)


def test_popri_section_takes_any_popri_run_key() -> None:
    # Prepare
    args = _parser().parse_args(
        ["bench", "--preset", "quick", "--set", "popri.beta=0.05", "--set", "popri.rounds=3", "--seeds", "4"]
    )

    # Execute
    config = cli.config_from_args(args)
    run = config.popri.run_config()

    # Assert: the value reaches popri's own schema (typed there); the quick preset's other POPri keys are kept.
    assert run.train.beta == 0.05 and run.rounds == 3 and config.popri.rounds == 3
    assert config.popri.prompts == 4 and config.seeds == 4 and config.seed_values() == [0, 1, 2, 3]
    for bad, match in [
        ("popri.betta=1", r"'popri\.betta': not a popri run key"),
        ("popri.beta=abc", r"'popri\.beta'"),
        ("popri.delta=1e-5", "use 'delta' instead"),
        ("popri.rejected-rank=9", "rejected"),
    ]:
        with pytest.raises(BenchConfigError, match=match):
            cli.config_from_args(_parser().parse_args(["bench", "--set", bad]))


def test_every_managed_popri_key_is_a_popri_run_key() -> None:
    from popri.config import known_keys

    assert set(POPRI_MANAGED_KEYS) <= set(known_keys())
    with pytest.raises(BenchConfigError, match=r"'popri\.epsilon'"):
        PopriMethodConfig(settings=(("epsilon", 1.0),))


def test_registry_holds_every_method_with_its_privacy() -> None:
    assert tuple(REGISTRY) == METHODS
    assert {m for m, method in REGISTRY.items() if method.private} == {"dpfedavg", "pe", "popri"}
    assert REGISTRY["oracle"].fixed_epsilon == math.inf and REGISTRY["eps0"].fixed_epsilon == 0.0


def test_downstream_kind_is_checked() -> None:
    with pytest.raises(BenchConfigError, match=r"'downstream\.kind'"):
        DownstreamConfig(kind="bert")
    args = _parser().parse_args(["bench", "--set", "downstream.kind=pretrained-lora", "--set", "downstream.lora-r=8"])
    config = cli.config_from_args(args)
    assert config.downstream.kind == "pretrained-lora" and config.downstream.lora_r == 8


def _replicate(seed: int, texts: list[str], samples: int) -> object:
    from types import SimpleNamespace

    train = SimpleNamespace(texts=texts)
    return SimpleNamespace(
        seed=seed,
        prepared=SimpleNamespace(splits=SimpleNamespace(train=train)),
        bench=SimpleNamespace(config=SimpleNamespace(corpus=SimpleNamespace(samples=samples))),
    )


def test_oracle_draws_n_distinct_real_texts_per_seed() -> None:
    # Prepare: 50 private train texts, corpus size 10.
    texts = [f"private text {i}" for i in range(50)]

    # Execute
    first = REGISTRY["oracle"].run(_replicate(0, texts, 10), epsilon=math.inf)  # type: ignore[arg-type]
    again = REGISTRY["oracle"].run(_replicate(0, texts, 10), epsilon=math.inf)  # type: ignore[arg-type]
    other = REGISTRY["oracle"].run(_replicate(1, texts, 10), epsilon=math.inf)  # type: ignore[arg-type]

    # Assert: N distinct real texts, the same draw for the same seed, a new draw for a new seed, labelled non-private.
    assert first.corpus is not None and len(set(first.corpus)) == 10 and set(first.corpus) <= set(texts)
    assert first.corpus == again.corpus and first.corpus != other.corpus
    assert first.row["non_private"] is True and math.isinf(first.epsilon_spent)


def _popri_flat(tmp_path: Path, *assignments: str) -> tuple[Any, dict[str, Any]]:
    """The benchmark configuration of ``popri bench ASSIGNMENTS`` and the popri run config it gives at ε=1, seed 0."""
    from benchmark.popri_method import popri_flat_config

    config = cli.config_from_args(_parser().parse_args(["bench", *assignments]))
    flat = popri_flat_config(
        config,
        config.datasets[0],
        epsilon=1.0,
        seed=0,
        noise_seed=None,
        train_file=tmp_path / "train.jsonl",
        output=tmp_path / "run",
        instruction="Say one line.",
    )
    return config, flat


def test_corpus_sampling_is_one_knob_shared_with_the_popri_run(tmp_path: Path) -> None:
    # Prepare / Execute: a cooler, nucleus-truncated sampler for every corpus.
    config, flat = _popri_flat(tmp_path, "--set", "corpus.temperature=0.7", "--set", "corpus.top-p=0.9")

    # Assert: POPri's rounds and final corpus sample as eps0's and PE's corpora do; popri may not set it alone.
    run = config.popri.run_config(flat)
    assert (run.generation.temperature, run.generation.top_p) == (0.7, 0.9)
    for bad, match in [
        ("corpus.temperature=0", r"'corpus\.temperature'"),
        ("corpus.top-p=1.5", r"'corpus\.top-p'"),
        ("popri.temperature=0.5", "use 'corpus.temperature' instead"),
    ]:
        with pytest.raises(BenchConfigError, match=match):
            cli.config_from_args(_parser().parse_args(["bench", "--set", bad]))


def test_popri_embeds_in_fp32_like_the_other_methods_unless_set(tmp_path: Path) -> None:
    # Execute / Assert: fp32 by default (popri run's own default is 'auto'), a --set wins
    assert _popri_flat(tmp_path)[1]["embedding-precision"] == "fp32"
    assert _popri_flat(tmp_path, "--set", "popri.embedding-precision=bf16")[1]["embedding-precision"] == "bf16"


def test_grid_is_the_cartesian_product_and_bad_grids_name_the_key() -> None:
    # Prepare / Execute
    from benchmark.search import parse_grid, point_configs

    grid = parse_grid(["corpus.temperature=0.7,1.0", "popri.beta=0.1,0.5,1"])
    configs = point_configs(preset_config("quick", output="runs/s"), grid)

    # Assert: 6 points, the first key slowest; every point is a tuning run in its own folder, with its values.
    assert [p.assignments for p in grid][:2] == [
        ("corpus.temperature=0.7", "popri.beta=0.1"),
        ("corpus.temperature=0.7", "popri.beta=0.5"),
    ]
    assert len({c.output for _, c in configs}) == 6 and all(c.tune for _, c in configs)
    assert all("," not in p.name for p in grid)  # a comma in a path breaks Flower's FAB manifest
    assert configs[-1][1].corpus.temperature == 1.0 and configs[-1][1].popri.run_config().train.beta == 1.0
    for bad, match in [
        (["corpus.temperature=0.7,,1"], r"'grid corpus\.temperature'"),
        (["corpus.temperature=1,1"], "listed twice"),
        (["corpus.tempo=1,2"], "unknown field"),
        (["corpus.generator=a,b"], "cannot vary the models"),
    ]:
        with pytest.raises(BenchConfigError, match=match):
            point_configs(preset_config("quick"), parse_grid(bad))


def test_a_search_compares_each_point_with_the_first_over_the_same_scoring_users() -> None:
    # Prepare: two points scored on the same 40 users; at the second, popri gets 3 more tokens right per user and
    # eps0 is unchanged.
    from benchmark.search import GridPoint, markdown, point_differences

    def results(popri_bonus: int) -> dict:
        def row(method: str, epsilon: float, bonus: int) -> dict:
            correct = [10 + (u % 7) + bonus for u in range(40)]
            tokens = [100] * 40
            return {
                "method": method,
                "epsilon": epsilon,
                "seed": 0,
                "test_user_correct": correct,
                "test_user_tokens": tokens,
            }

        return {"datasets": {"shakespeare": {"results": [row("eps0", 0.0, 0), row("popri", 7.0, popri_bonus)]}}}

    first, second = GridPoint(("popri.beta=0.1",)), GridPoint(("popri.beta=0.5",))

    # Execute
    diffs = point_differences([(first, results(0)), (second, results(3))], resamples=500)
    search = {"date": "d", "commit": "c", "preset": "quick", "seeds": [0], "rows": [], "best": [], "differences": diffs}
    page = markdown(search)

    # Assert: popri +3 points with an interval above zero, eps0 exactly 0 and not resolved; the page shows both
    by_method = {d["method"]: d for d in diffs}
    assert set(by_method) == {"eps0", "popri"}
    assert by_method["popri"]["diff_mean"] == pytest.approx(3.0) and by_method["popri"]["diff_ci95"][0] > 0
    assert by_method["popri"]["reading"] == "this point better"
    assert by_method["popri"]["point"] == ["popri.beta=0.5"] and by_method["popri"]["versus"] == ["popri.beta=0.1"]
    assert by_method["eps0"]["diff_mean"] == 0.0 and by_method["eps0"]["reading"] == "not resolved"
    assert "## Each point against the first one" in page and "+3.00" in page


def test_round_samples_cover_every_round_not_only_the_kept_checkpoints(tmp_path: Path) -> None:
    # Prepare: a popri run folder with four rounds' samples (popri prunes checkpoints to the newest two).
    from benchmark.popri_method import round_samples
    from popri.report import save_round_samples

    for t in range(4):
        save_round_samples(tmp_path, t, [{"prompt": 0, "text": f"round {t} a"}, {"prompt": 0, "text": f"round {t} b"}])

    # Execute
    rounds = round_samples(tmp_path)

    # Assert: rounds numbered from 1, each with its own texts.
    assert sorted(rounds) == [1, 2, 3, 4] and rounds[4] == ["round 3 a", "round 3 b"]


def test_set_values_follow_the_run_config_parsing_rules() -> None:
    from benchmark.config import apply_overrides

    # Prepare / Execute: an optional int set to none, a float given as an int.
    config = apply_overrides(preset_config("quick", noise_seed=3), ["noise-seed=none", "delta=1e-5"])

    # Assert: typed by the declared field type; NaN, a word or a fraction for an int are refused by key.
    assert config.noise_seed is None and config.delta == 1e-5
    for bad, match in [
        ("downstream.learning-rate=nan", r"'downstream\.learning-rate'"),
        ("seeds=true", r"'seeds': expected int"),
        ("dpfedavg.rounds=2.5", r"'dpfedavg\.rounds'"),
    ]:
        with pytest.raises(BenchConfigError, match=match):
            apply_overrides(preset_config("quick"), [bad])
