#!/usr/bin/env bash
# Both test tiers: fast tests (tiny random model), then the slow tier with the real offline models and text.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
python -m pytest -q
python -m pytest -q -m slow --durations=25  # the slowest real-model steps, timed in every CI log
