"""Helpers the tests share: tiny private data, a tiny run config, and the real ServerApp run in this process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.grid import InProcessGrid, run_server_app

__all__ = ["ROLES", "InProcessGrid", "run_server", "tiny_perf_run", "tiny_run_config"]

ROLES = {
    "sailor": ["the sea is wide and the wind is cold tonight", "hoist the sails before the storm", "we sail at dawn"],
    "baker": ["the bread rises in the warm oven", "flour and butter and a pinch of salt", "fresh loaves at dawn"],
    "king": ["my crown weighs heavy on my head", "bring me the traitor in chains", "the realm must hold"],
    "poet": ["the moon is a silver coin in the sky", "my verses fade like morning dew", "love is a red rose"],
}


def tiny_run_config(model_dir: Path, data: Path, output: Path, **overrides: Any) -> dict[str, Any]:
    flat = {
        "model": str(model_dir),
        "data": str(data),
        "output": str(output),
        "cache-dir": str(output.parent / "cache"),
        "rounds": 2,
        "prompts": 3,
        "samples-per-prompt": 3,
        "rejected-rank": 2,
        "max-new-tokens": 12,
        "token-budget": 16,
        "initial-set-size": 6,
        "final-samples": 4,
        "batch-size": 2,
        "epsilon": 7.0,
        "num-nodes": 2,
        "validation-fraction": 0.25,
        "min-text-chars": 5,
        "noise-seed": 123,
    }
    flat.update(overrides)
    return flat


def run_server(grid: InProcessGrid, run_config: dict[str, Any]) -> None:
    """The real ServerApp main, in this process, against ``grid`` (:func:`server.grid.run_server_app`)."""
    run_server_app(grid, run_config)


def tiny_perf_run(out: Path, comparison: str, **sizes: Any) -> dict[str, Any]:
    """One ``run_perf(only=(comparison,))`` into ``out`` on the tiny LM and MiniLM, at the quick sizes with 4 new
    tokens, an 8-token budget and ``sizes`` on top; returns the perf.json it wrote."""
    import dataclasses
    import json

    from benchmark.perf.inputs import PerfAssets
    from benchmark.perf.runner import run_perf
    from benchmark.perf.schema import PerfSizes
    from popri.embedding import load_embedder
    from tests.tiny_models import byte_tokenizer, tiny_causal_lm

    tok = byte_tokenizer()
    assets = PerfAssets(model=tiny_causal_lm(tok), tokenizer=tok, embedder=load_embedder())
    perf_sizes = dataclasses.replace(PerfSizes.quick(), max_new_tokens=4, token_budget=8, **sizes)
    run_perf(out, only=(comparison,), assets=assets, sizes=perf_sizes, threads=1)
    return json.loads((out / "perf.json").read_text())
