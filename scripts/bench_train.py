"""Benchmark: training throughput of a TopK SAE (fp32, Adam, AuxK on) in tokens/s.

Side by side in one run: saelab's trainer step on the sparse kernels, the same step on the dense PyTorch reference
path, the ceiling (the encoder's x @ W_enc + top-k alone: no TopK step can be faster), and EleutherAI sparsify /
SAELens when a reference venv is given (they cannot share saelab's environment: SAELens pins transformer-lens < 4):

    python scripts/bench_train.py                                   # d=576, n=16384, k=32, batch 4096
    python scripts/bench_train.py --ref-python /work/ref-venv/bin/python   # + sparsify and SAELens
    python scripts/bench_train.py --sweep                           # also n in 4k..65k and k in 16..128

Make the reference venv with: python3 -m venv /work/ref-venv && /work/ref-venv/bin/pip install torch==2.13.0 &&
/work/ref-venv/bin/pip install eai-sparsify sae-lens
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from saelab.activations import ActivationBatch
from saelab.training import SAESpec, TrainConfig, Trainer

HOOK = "bench"


class RandomActivations:
    """An in-memory activation source: one fixed random batch, repeated (the data path is not what is measured)."""

    hooks = [HOOK]

    def __init__(self, d: int, batch_size: int, seed: int = 0):
        self.d = {HOOK: d}
        self.batch_size = batch_size
        generator = torch.Generator().manual_seed(seed)
        self.batch = ActivationBatch({HOOK: torch.randn(batch_size, d, generator=generator)},
                                     torch.zeros(batch_size, dtype=torch.long), torch.arange(batch_size))

    def __iter__(self):
        while True:
            yield self.batch


def saelab_tokens_per_s(d: int, n: int, k: int, batch: int, kernel: str, steps: int, warmup: int = 2) -> float:
    """Tokens/s of Trainer.train_on: loss, backward, decoder-gradient projection, Adam, renormalisation, dead clocks.

    dead_tokens is one batch, so latents that miss a step are dead for the next and AuxK runs on them."""
    source = RandomActivations(d, batch)
    config = TrainConfig(tokens=batch * (steps + warmup + 1), batch_size=batch, kernel=kernel, dead_tokens=batch)
    trainer = Trainer(source, [SAESpec(arch="topk", width=n, k=k)], config, progress=False)
    for _ in range(warmup + 1):  # the first call also initialises b_dec (geometric median) and the input scale
        trainer.train_on(source.batch)
    started = time.perf_counter()
    for _ in range(steps):
        trainer.train_on(source.batch)
    return batch * steps / (time.perf_counter() - started)


@torch.no_grad()
def ceiling_tokens_per_s(d: int, n: int, k: int, batch: int, steps: int) -> float:
    """Encoder matmul + bias + top-k only."""
    x, W, b = torch.randn(batch, d), torch.randn(d, n) / d**0.5, torch.zeros(n)
    torch.addmm(b, x, W).topk(k, dim=1)
    started = time.perf_counter()
    for _ in range(steps):
        torch.addmm(b, x, W).topk(k, dim=1, sorted=False)
    return batch * steps / (time.perf_counter() - started)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def references(ref_python: str | None, d: int, n: int, k: int, batch: int, steps: int) -> dict[str, float | str]:
    """sparsify and SAELens tokens/s from scripts/reference_speed.py in the reference venv ('na' without one)."""
    if not ref_python or not Path(ref_python).exists():
        return {"sparsify": "na", "saelens": "na"}
    script = Path(__file__).with_name("reference_speed.py")
    found = {"sparsify": "na", "saelens": "na"}
    for library in found:
        result = subprocess.run([ref_python, str(script), library, str(d), str(n), str(k), str(batch), str(steps)],
                                capture_output=True, text=True)
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        if result.returncode == 0 and lines:
            found[library] = json.loads(lines[-1])["tokens_per_s"]
        else:
            print(f"{library}: failed ({(result.stderr or result.stdout).strip().splitlines()[-1:]})", file=sys.stderr)
    return found


def fmt(value) -> str:
    return f"{value:,.0f}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--ref-python", default=None, help="python of a venv with eai-sparsify and sae-lens")
    parser.add_argument("--sweep", action="store_true", help="also sweep n and k (saelab torch path vs ceiling)")
    args = parser.parse_args()

    shape = dict(d=args.d, n=args.n, k=args.k, batch=args.batch)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"TopK SAE fp32, Adam, AuxK on; d={args.d} n={args.n} k={args.k} batch={args.batch}, {args.steps} steps")
    rss_before = peak_rss_gb()
    ceiling = ceiling_tokens_per_s(**shape, steps=args.steps)
    saelab = saelab_tokens_per_s(**shape, kernel="auto", steps=args.steps)
    rss_sparse = peak_rss_gb()
    dense = saelab_tokens_per_s(**shape, kernel="dense", steps=max(2, args.steps // 3))
    rss_dense = peak_rss_gb()
    refs = references(args.ref_python, **shape, steps=args.steps)
    rows = [("ceiling: encoder matmul + top-k", ceiling), ("saelab (sparse kernels)", saelab),
            ("saelab dense PyTorch path", dense), ("EleutherAI sparsify", refs["sparsify"]), ("SAELens", refs["saelens"])]
    print(f"{'implementation':<34}{'tokens/s':>12}{'x ceiling':>11}")
    for name, value in rows:
        ratio = f"{value / ceiling:.2f}" if isinstance(value, float) else "na"
        print(f"{name:<34}{fmt(value):>12}{ratio:>11}")
    print(f"peak process memory: {rss_before:.2f} GB before, {rss_sparse:.2f} GB after the sparse runs, "
          f"{rss_dense:.2f} GB after the dense run (ru_maxrss, cumulative)")

    if args.sweep:
        print(f"\n{'n':>7}{'k':>6}{'saelab tok/s':>15}{'ceiling tok/s':>15}{'ratio':>8}")
        for n, k in [(4096, 32), (8192, 32), (16384, 32), (32768, 32), (65536, 32),
                     (16384, 16), (16384, 64), (16384, 128)]:
            sweep = dict(d=args.d, n=n, k=k, batch=args.batch)
            ours = saelab_tokens_per_s(**sweep, kernel="auto", steps=max(3, args.steps // 2))
            top = ceiling_tokens_per_s(**sweep, steps=max(3, args.steps // 2))
            print(f"{n:>7}{k:>6}{ours:>15,.0f}{top:>15,.0f}{ours / top:>8.2f}")

    def key(value):
        return f"{value:.0f}" if isinstance(value, float) else value

    print(f"RESULT saelab_tok_s={key(saelab)} ceiling_tok_s={key(ceiling)} ratio={saelab / ceiling:.3f} "
          f"sparsify_tok_s={key(refs['sparsify'])} saelens_tok_s={key(refs['saelens'])}")


if __name__ == "__main__":
    main()
