#!/usr/bin/env bash
# Run here (CPU) before scripts/gpu_check.sh: caches 32k tokens of real SmolLM2-135M-Instruct activations (WikiText-2,
# blocks.6.hook_resid_post, bfloat16, about 36 MB) under .gpu/acts for the GPU's training run. The model itself
# (93 MB, plus transformer_lens, which the GPU image lacks) cannot travel to the GPU machine; its activations can.
# Then: device run, carry [".gpu"], command `bash scripts/gpu_check.sh $OUT/gpu_check`.
set -euo pipefail
cd "$(dirname "$0")/.."
TEXT=${TEXT:-../shared/data/wikitext-2-raw/wiki.test.raw}
.venv/bin/saelab cache --model smollm2-135m --hooks blocks.6.hook_resid_post --text "$TEXT" \
    --tokens 32768 --dtype bfloat16 --out .gpu/acts --overwrite
du -sh .gpu/acts
