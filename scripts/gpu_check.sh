#!/usr/bin/env bash
# The GPU check, in one call on a machine with one CUDA GPU (torch and Triton preinstalled, no network):
#   1. install saelab from this tree (no dependencies fetched; wheels carried in .whl/ are installed first)
#   2. the Triton kernel tests, compiled for the GPU (not the interpreter)
#   3. scripts/bench_kernels.py: dense vs torch vs triton at n = 16k and 262k, the fused encoder on, then off
#   4. a short real training run (TopK and BatchTopK, width 16k) on the GPU, from the real SmolLM2 activations that
#      scripts/gpu_prepare.sh cached here, then the saved SAEs scored on the GPU (triton) and the CPU (torch)
# Each step has its own time limit and log under LOG_DIR; a failed step is reported and the next one runs.
# About 6 minutes on an H100. Usage: bash scripts/gpu_check.sh LOG_DIR [ACTIVATION_CACHE (default .gpu/acts)]
set -u
LOG=$(mkdir -p "${1:?usage: gpu_check.sh LOG_DIR [ACTIVATION_CACHE]}" && cd "$1" && pwd)
cd "$(dirname "$0")/.."
CACHE=${2:-.gpu/acts}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
failed=()

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to LOG/NAME.log, record the outcome
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" bash -c '"$@"' _ "$@" >"$LOG/$name.log" 2>&1  # bash -c: COMMAND may be a function below
  rc=$?
  tail -n 15 "$LOG/$name.log"
  echo "$name: rc=$rc, $((SECONDS - start)) s" | tee -a "$LOG/summary.txt"
  [ "$rc" = 0 ] || failed+=("$name")
}

install() {
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || return 1
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || return 1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c "import torch, triton, saelab; print('torch', torch.__version__, '| triton', triton.__version__,
'| cuda', torch.version.cuda, '|', torch.cuda.get_device_name(), '| saelab', saelab.__version__)"
}

score_on_both_devices() {  # the saved SAEs on 8,192 cached tokens: GPU (triton) against CPU (torch)
  "$PY" - "$LOG/train" "$CACHE" <<'EOF'
import sys
from pathlib import Path

import torch

from saelab import SAE, ActivationStore

run, cache = Path(sys.argv[1]), sys.argv[2]
x = next(iter(ActivationStore(cache, batch_size=8192, shuffle=False))).acts
x = next(iter(x.values())).float()
folders = sorted(p.parent for p in run.rglob("cfg.json"))
if not folders:
    sys.exit(f"no saved SAE under {run}")
worst = 0.0
for folder in folders:
    scores = {}
    for device in ("cuda", "cpu"):
        sae = SAE.load(folder, device=device)
        with torch.no_grad():
            codes = sae.encode(x.to(device))
            x_hat = sae.decode(codes)
        fvu = ((x_hat.cpu() - x).square().sum() / (x - x.mean(0)).square().sum()).item()
        scores[device] = (fvu, (codes != 0).float().sum(1).mean().item())
    gap = abs(scores["cuda"][0] - scores["cpu"][0]) / scores["cpu"][0]
    worst = max(worst, gap)
    print(f"{folder.name}: FVU cuda {scores['cuda'][0]:.4f} / cpu {scores['cpu'][0]:.4f}, "
          f"L0 cuda {scores['cuda'][1]:.1f} / cpu {scores['cpu'][1]:.1f}")
sys.exit(0 if worst < 0.01 else f"the GPU and CPU scores differ by {worst:.2%}")
EOF
}

export -f install score_on_both_devices
export LOG CACHE PY
compgen -G ".whl/*.whl" >/dev/null && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
step install 180 install
step triton_tests 240 env SAELAB_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py
step bench_kernels_fused 150 "$PY" scripts/bench_kernels.py --n 16384 262144 --tf32
step bench_kernels_unfused 120 "$PY" scripts/bench_kernels.py --n 262144 --backends torch triton --tf32 --fuse never --no-check
if [ -f "$CACHE/manifest.json" ]; then
  step train 180 "$PY" -m saelab.cli train --acts "$CACHE" --out "$LOG/train" --no-resume --eval-tokens 0 \
    --arch topk,batchtopk --width 16384 --tokens 819200 --device cuda --kernel triton --log-every 50
  step score 90 score_on_both_devices
else
  echo "no activation cache at $CACHE (run scripts/gpu_prepare.sh here and carry .gpu): training skipped" | tee -a "$LOG/summary.txt"
  failed+=(train)
fi
echo "failed steps: ${failed[*]:-none}" | tee -a "$LOG/summary.txt"
[ ${#failed[@]} = 0 ]
