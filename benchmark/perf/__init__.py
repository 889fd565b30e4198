"""The performance harness: ``popri perf --output DIR [--quick]`` writes ``DIR/perf.json`` and ``DIR/perf.md``.

Split along its seams: :mod:`~benchmark.perf.timing` (interleaved timing, medians, ratios, the machine),
:mod:`~benchmark.perf.inputs` (sizes from the run schema, models, prompts, pairs), :mod:`~benchmark.perf.peers`
(HF generate, llama.cpp, CTranslate2, OpenVINO GenAI, vLLM CPU, the reference scoring loop, TRL; each behind an
availability check), :mod:`~benchmark.perf.stages` (what is measured), :mod:`~benchmark.perf.runner` (one run),
:mod:`~benchmark.perf.report` (perf.json, perf.md) and :mod:`~benchmark.perf.cli`. docs/perf.md has the results.
"""

from benchmark.perf.cli import add_arguments, add_subparser, main
from benchmark.perf.inputs import (
    PerfAssets,
    PerfSizes,
    load_default_assets,
    perf_prompts,
    popri_samples,
    preference_pairs,
    saved_samples,
    sizes_with_overrides,
)
from benchmark.perf.peers import PeerStatus, reference_loop_scores
from benchmark.perf.report import render_markdown
from benchmark.perf.runner import COMPARISONS, run_perf
from benchmark.perf.stages import GenerationPeers, synthetic_private_embeddings
from benchmark.perf.timing import interleaved

__all__ = [
    "COMPARISONS",
    "GenerationPeers",
    "PeerStatus",
    "PerfAssets",
    "PerfSizes",
    "add_arguments",
    "add_subparser",
    "interleaved",
    "load_default_assets",
    "main",
    "perf_prompts",
    "popri_samples",
    "preference_pairs",
    "reference_loop_scores",
    "render_markdown",
    "run_perf",
    "saved_samples",
    "sizes_with_overrides",
    "synthetic_private_embeddings",
]
