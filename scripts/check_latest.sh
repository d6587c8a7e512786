#!/usr/bin/env bash
# The early warning: today's newest releases in .venv-latest, then the fast tier there. Exits with the tests' status;
# .ci/run prints it but only the pinned environment decides whether CI passes.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --latest || { echo "LATEST: set-up failed"; exit 1; }
.venv-latest/bin/python -c 'import importlib.metadata as m; print("LATEST versions:", ", ".join(
    f"{n} {m.version(n)}" for n in ["torch", "transformers", "transformer-lens", "kernels", "huggingface-hub",
                                    "safetensors", "numpy", "scipy", "triton"]))'
SAELAB_UNPINNED=1 .venv-latest/bin/python -m pytest -q -p no:cacheprovider
