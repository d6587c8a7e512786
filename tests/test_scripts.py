"""The benchmark scripts run end to end at toy sizes and end with their machine-readable RESULT line."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_bench_train_prints_a_result_line(arch):
    args = ["--d", "32", "--n", "256", "--k", "4", "--batch", "64", "--steps", "1", "--rounds", "1", f"--arch={arch}"]
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_train.py"), *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"RESULT saelab_tok_s=\d+ ceiling_tok_s=\d+ ratio=[\d.]+ sparsify_tok_s=na saelens_tok_s=na",
                        result), result
    assert re.search(r"saelab \(sparse kernels\)\s+[\d,]+\s+[\d.]+\s+[\d.]+", proc.stdout)  # tokens/s, ratio, GB
