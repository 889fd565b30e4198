"""The performance harness: ``popri perf --output DIR [--quick]`` writes ``DIR/perf.json`` and ``DIR/perf.md``.

Split along its seams: :mod:`~benchmark.perf.schema` (comparisons, peers, sizes from the run schema; no torch),
:mod:`~benchmark.perf.timing` (interleaved timing, medians, ratios, the machine), :mod:`~benchmark.perf.inputs`
(models, prompts, samples, pairs), :mod:`~benchmark.perf.peers` (HF generate, llama.cpp, CTranslate2, OpenVINO
GenAI, vLLM CPU, the reference scoring loop, TRL; each behind an availability check), :mod:`~benchmark.perf.stages`
(what is measured), :mod:`~benchmark.perf.runner` (one run), :mod:`~benchmark.perf.report` (perf.json, perf.md) and
:mod:`~benchmark.perf.cli`. Names below load their module on first use, so ``popri --help`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "add_arguments": "cli",
    "add_subparser": "cli",
    "main": "cli",
    "COMPARISONS": "schema",
    "PerfSizes": "schema",
    "sizes_with_overrides": "schema",
    "PerfAssets": "inputs",
    "load_default_assets": "inputs",
    "perf_prompts": "inputs",
    "popri_samples": "inputs",
    "preference_pairs": "inputs",
    "saved_samples": "inputs",
    "PeerStatus": "peers",
    "reference_loop_scores": "peers",
    "render_markdown": "report",
    "run_perf": "runner",
    "GenerationPeers": "stages",
    "synthetic_private_embeddings": "stages",
    "interleaved": "timing",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'benchmark.perf' has no attribute {name!r}")
    return getattr(importlib.import_module(f"benchmark.perf.{_EXPORTS[name]}"), name)
