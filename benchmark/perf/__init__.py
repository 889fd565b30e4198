"""The performance harness: ``popri perf --output DIR [--quick]`` writes ``DIR/perf.json`` and ``DIR/perf.md``.

Split along its seams: :mod:`~benchmark.perf.schema` (comparisons, peers, sizes from the run schema; no torch),
:mod:`~benchmark.perf.timing` (interleaved timing, medians, ratios, the machine), :mod:`~benchmark.perf.inputs`
(models, prompts, samples, pairs), :mod:`~benchmark.perf.peers` (HF generate, llama.cpp, CTranslate2, OpenVINO
GenAI, vLLM CPU, the reference scoring loop, TRL; each behind an availability check), :mod:`~benchmark.perf.stages`
(what is measured), :mod:`~benchmark.perf.runner` (one run), :mod:`~benchmark.perf.report` (perf.json, perf.md) and
:mod:`~benchmark.perf.cli`. Import what you need from
the submodule that defines it; this package imports only the light command-line module.
"""

from __future__ import annotations

from benchmark.perf.cli import add_subparser, main

__all__ = ["add_subparser", "main"]
