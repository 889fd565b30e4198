"""The performance harness end to end in its --quick form, on tiny models built in code (no targets enforced)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.perf.inputs import PerfAssets
from benchmark.perf.peers import reference_loop_scores
from benchmark.perf.runner import run_perf
from benchmark.perf.schema import PerfSizes, sizes_with_overrides
from benchmark.perf.stages import synthetic_private_embeddings
from benchmark.perf.timing import interleaved
from popri.data import read_user_file
from popri.embedding import load_embedder
from popri.scoring import clipped_scores_sum, user_embedding_sums
from tests.tiny_models import byte_tokenizer, tiny_causal_lm


def test_reference_loop_and_vectorised_scoring_agree():
    # Prepare: 50 users with random unit embeddings
    private, owner, samples = synthetic_private_embeddings(users=50, texts_per_user=5, samples=24, seed=0)
    bounds = np.searchsorted(owner, np.arange(51))
    per_user = [torch.from_numpy(private[bounds[u] : bounds[u + 1]]) for u in range(50)]

    # Execute
    ours = clipped_scores_sum(samples, user_embedding_sums(private, owner, 50))
    loop = reference_loop_scores(torch.from_numpy(samples), per_user)

    # Assert
    assert np.allclose(ours, loop, atol=1e-4)


def test_interleaved_alternates_the_order():
    calls: list[str] = []
    times, _ = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert len(times["a"]) == len(times["b"]) == 3


def test_quick_perf_writes_every_comparison(tiny_model_dir: Path, user_file: Path, tmp_path: Path):
    # Prepare: the tiny LM in memory and on disk (the round loads it as a local folder), tiny private users
    tok = byte_tokenizer()
    users = read_user_file(user_file)
    assets = PerfAssets(
        model=tiny_causal_lm(tok),
        tokenizer=tok,
        embedder=load_embedder(),
        generator_id=str(tiny_model_dir),
        cache_users=users,
        round_data=str(user_file),
    )
    sizes = dataclasses.replace(PerfSizes.quick(), users=400, repeats_scoring=2)  # 2,000 in the CLI's --quick
    out = tmp_path / "perf"

    # Execute
    result = run_perf(out, quick=True, assets=assets, sizes=sizes, cache_dir=str(tmp_path / "cache"), threads=1)

    # Assert: both files, every comparison with positive times, a ratio = peer/popri
    saved = json.loads((out / "perf.json").read_text())
    assert saved["comparisons"] == result["comparisons"]
    rows = {r["name"]: r for r in saved["comparisons"]}
    assert {"generation", "generation_llama_cpp", "scoring", "dpo", "dpo_fp32", "round"} <= set(rows)
    for name in ("generation", "scoring", "dpo", "dpo_fp32", "round"):
        row = rows[name]
        assert row["popri_s"] > 0 and row["peer_s"] > 0
        assert row["ratio"] == pytest.approx(row["peer_s"] / row["popri_s"], rel=0.02)
    assert rows["generation_llama_cpp"]["measured"] is False  # no GGUF for the tiny model
    for peer in ("ctranslate2", "openvino", "vllm"):  # installed in their own venvs, not in the test interpreter
        assert rows[f"generation_{peer}"]["measured"] is False and rows[f"generation_{peer}"]["why"]
        assert saved["peers"][peer]["available"] is False
    assert saved["commit"] and saved["machine"]["processor"]
    assert rows["scoring"]["users"] == sizes.users and rows["scoring"]["max_abs_difference"] < 1e-4
    assert rows["generation"]["popri_detail"]["tokens"] > 0
    first = saved["dpo_first_step_fp32"]
    assert first["abs_difference"] <= 1e-5 and not math.isclose(first["popri_loss"], math.log(2), abs_tol=1e-6)
    cache = saved["embedding_cache"]
    assert cache["private_texts"] == len(users.texts)
    for precision in ("fp32", "bf16"):  # the second call, as in every later round, hits the cache: embeds nothing
        calls = cache["precisions"][precision]
        assert calls["first_call_embedded_texts"] == len(users.texts) and calls["second_call_embedded_texts"] == 0
    assert cache["bf16_speedup"] > 0 and 0 <= cache["agreement"]["shift_over_noise"] < 1
    stages = saved["stages"]
    assert {"generate", "embed", "collect", "dpo"} <= set(stages["seconds"]) and stages["peak_rss_mib"] > 0
    comm = saved["communication"]
    assert comm["popri"]["down_bytes"] >= sizes.prompts * sizes.samples_per_prompt * 384 * 4
    assert comm["popri"]["up_bytes"] >= sizes.prompts * sizes.samples_per_prompt * 8
    assert comm["dpfedavg"]["down_bytes"] >= 4 * comm["dpfedavg"]["parameters"]
    text = (out / "perf.md").read_text()
    assert "| generation |" in text and "Communication per client per round" in text and "## Private embedding" in text
    assert f"Measured {saved['date']} at commit {saved['commit']}" in text


def test_rerun_of_one_comparison_keeps_the_others(tmp_path: Path):
    # Prepare: a perf.json holding a generation row from an earlier run
    out = tmp_path / "perf"
    out.mkdir()
    old = {"name": "generation", "popri_s": 1.0, "peer": "x", "peer_s": 2.0, "ratio": 2.0, "target": 1.5}
    (out / "perf.json").write_text(json.dumps({"comparisons": [old]}))
    tok = byte_tokenizer()
    assets = PerfAssets(model=tiny_causal_lm(tok), tokenizer=tok, embedder=None)
    sizes = PerfSizes(users=20, texts_per_user=3, repeats_scoring=1)

    # Execute: only communication
    result = run_perf(out, quick=True, only=("communication",), assets=assets, sizes=sizes, threads=1)

    # Assert
    assert result["comparisons"] == [old]
    assert result["communication"]["popri"]["down_bytes"] > 0


def test_size_overrides_parse_and_reject_unknown_fields():

    sizes = sizes_with_overrides(PerfSizes(), ["prompts=16", "texts-per-user=7.5"])
    assert sizes.prompts == 16 and sizes.texts_per_user == 7.5
    with pytest.raises(ValueError, match="invalid --perf-size"):
        sizes_with_overrides(PerfSizes(), ["nope=1"])


def test_sizes_default_to_a_default_run():
    # Prepare
    from popri.config import GenerationConfig, TrainConfig

    generation, train = GenerationConfig(), TrainConfig()

    # Execute
    sizes = PerfSizes()

    # Assert: the harness measures what `popri run` does
    assert (sizes.prompts, sizes.samples_per_prompt) == (generation.prompts, generation.samples_per_prompt)
    assert (sizes.max_new_tokens, sizes.token_budget) == (generation.max_new_tokens, generation.token_budget)
    assert sizes.generation_batch == generation.generation_batch_size
    assert sizes.round_initial_set == generation.initial_set_size
    assert (sizes.rejected_rank, sizes.dpo_batch) == (train.rejected_rank, train.batch_size)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("samples-per-prompt=1", "samples-per-prompt"),  # the run schema's own check names its key
        ("prompts=many", "expected int"),
        ("repeats_dpo=0", "repeats-dpo"),
        ("prompts", "KEY=VALUE"),
    ],
)
def test_bad_size_override_names_the_key_and_the_fix(override: str, message: str):
    # Prepare
    from popri.config import ConfigError

    # Execute / Assert
    with pytest.raises(ConfigError, match=message):
        sizes_with_overrides(PerfSizes(), [override])


def test_cpu_model_and_flags_are_read_from_cpuinfo():
    # Prepare
    from benchmark.perf.timing import cpu_flags, cpu_model

    cpuinfo = "processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse avx2 fma avx512f amx_bf16 amx_tile\n"

    # Execute
    model, flags = cpu_model(cpuinfo), cpu_flags(cpuinfo)

    # Assert: the flags that pick kernels, in the harness's order; unrelated flags dropped
    assert model == "Test CPU 9000"
    assert flags == ["avx2", "fma", "avx512f", "amx_tile", "amx_bf16"]


FAKE_WORKER = """
import json, sys
if "broken" in sys.argv[sys.argv.index("--model") + 1]:
    print(json.dumps({"ready": False, "error": "RuntimeError: cannot convert the model"}), flush=True)
    sys.exit(1)
print("noise a backend prints", file=sys.stderr)
print(json.dumps({"ready": True, "version": "0.0-test", "load_s": 0.5}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if req["seed"] < 0:
        print(json.dumps({"error": "EngineDeadError: the engine died"}), flush=True)
        continue
    texts = [f"sample {k}.{j} of {req['max_new_tokens']}\\nOriginal Text Sample 5\\nmore"
             for k in range(len(req["prompts"])) for j in range(req["samples_per_prompt"])]
    print(json.dumps({"texts": texts}), flush=True)
"""


def test_worker_peer_speaks_json_lines_and_applies_popris_clean_up(tmp_path: Path):
    # Prepare: a stand-in worker in the test's own folder (the product's worker needs a peer library)
    import sys

    from benchmark.perf.peers import WorkerPeer

    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    tok = byte_tokenizer()
    peer = WorkerPeer(
        "ctranslate2", python=sys.executable, model_dir=tmp_path, work_dir=tmp_path / "w", threads=1, worker=script
    )

    # Execute
    try:
        texts = peer.generate(
            ["p1", "p2"], samples_per_prompt=3, max_new_tokens=7, token_budget=100, tokenizer=tok, seed=0
        )
    finally:
        peer.close()

    # Assert: K x J texts in prompt order, cut at the next sample header like popri's own samples
    assert peer.version == "0.0-test" and peer.load_s == 0.5
    assert "noise a backend prints" in peer.log_path.read_text()  # the engine's output goes to its log, not stdout
    assert texts == [f"sample {k}.{j} of 7" for k in range(2) for j in range(3)]


def test_worker_peer_failing_a_request_raises_a_peer_failure_naming_it(tmp_path: Path):
    # Prepare: the stand-in worker answers an error for a negative seed, as a crashed engine would
    import sys

    from benchmark.perf.peers import PeerFailure, WorkerPeer

    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    peer = WorkerPeer(
        "vllm", python=sys.executable, model_dir=tmp_path, work_dir=tmp_path / "w", threads=1, worker=script
    )

    # Execute / Assert: the harness can tell which peer failed and why, and drop it from the measurement
    try:
        with pytest.raises(PeerFailure, match="vllm peer failed: EngineDeadError") as failure:
            peer.generate(
                ["p"], samples_per_prompt=2, max_new_tokens=3, token_budget=10, tokenizer=byte_tokenizer(), seed=-1
            )
    finally:
        peer.close()
    assert failure.value.name == "vllm"


def test_worker_peer_that_cannot_load_raises_its_reason(tmp_path: Path):
    # Prepare
    import sys

    from benchmark.perf.peers import WorkerPeer

    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)

    # Execute / Assert
    with pytest.raises(RuntimeError, match="cannot convert the model"):
        WorkerPeer(
            "vllm", python=sys.executable, model_dir=tmp_path / "broken", work_dir=tmp_path, threads=1, worker=script
        )


def test_peer_without_its_interpreter_is_a_status_saying_why(tmp_path: Path):
    # Prepare
    from benchmark.perf.peers import worker_peer_status

    missing = tmp_path / "venv" / "bin" / "python"

    # Execute
    status = worker_peer_status("openvino", str(missing))

    # Assert
    assert status.available is False and str(missing) in str(status.why) and status.install


def test_perf_subcommand_parses_its_flags_and_rejects_an_unknown_peer(tmp_path: Path):
    # Prepare
    import argparse

    from benchmark.perf.cli import add_subparser, handle, main

    parser = argparse.ArgumentParser(prog="popri")
    add_subparser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "perf"

    # Execute
    args = parser.parse_args(["perf", "--output", str(out), "--only", "scoring", "--size", "prompts=8"])
    bad = parser.parse_args(["perf", "--output", str(out), "--peer-python", "tensorrt=/usr/bin/python3"])

    # Assert: flags land where main reads them; a bad flag is exit code 2 and measures nothing
    assert args.func is handle and args.perf_only == ["scoring"] and args.perf_size == ["prompts=8"]
    assert main(bad) == 2 and not out.exists()
