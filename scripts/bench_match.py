"""Benchmark cross-model feature matching: streaming correlation + 1:1 matching of two TopK code streams.

Synthetic TopK codes (k=32 per token, skewed firing frequencies like real SAEs; half of B's firings follow a
hidden permutation of A's latents, so there is structure to find) arrive in chunks, as from two SAEs over aligned
text. The streaming path (saelab.analysis.correlation.RunningCorrelation + matching.one_to_one) never forms a
tokens x latents matrix: its memory is one float32 [width_a, width_b] matrix plus a chunk. The dense in-memory path
(z-score both [tokens, width] matrices, C = Z_a^T Z_b / n) runs in a child process at the largest token count
that fits the same memory budget (or --dense-tokens), for the ratio; its time is extrapolated linearly to the
streaming run's token count.

    nice -n 5 python scripts/bench_match.py                            # 1M tokens x 16384 x 16384, k=32
    python scripts/bench_match.py --tokens 50000 --width 2048 --dense-tokens 4096   # a smoke run
Ends with `RESULT tokens=... latents=... seconds=... peak_gb=...` (peak: the streaming process's max RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from saelab.analysis.correlation import RunningCorrelation
from saelab.analysis.matching import one_to_one
from saelab.codes import Codes


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def topk_chunk(rng: np.random.Generator, n: int, width: int, k: int, cdf: np.ndarray,
               follow: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Latents [n, k] (distinct per row, drawn by frequency) and values; with `follow=(perm, latents_a)`, half of
    each row's latents are perm[latent of A] at the same token."""
    draws = np.searchsorted(cdf, rng.random((n, k + k // 4)))
    if follow is not None:
        perm, latents_a = follow
        take = rng.random((n, k)) < 0.5
        draws[:, :k] = np.where(take, perm[latents_a], draws[:, :k])
    draws = np.minimum(draws, width - 1)
    draws.sort(axis=1)
    duplicate = np.zeros_like(draws, dtype=bool)
    duplicate[:, 1:] = draws[:, 1:] == draws[:, :-1]
    keyed = np.where(duplicate, width, draws)  # duplicates last
    keyed.sort(axis=1)
    latents = keyed[:, :k]
    return latents, rng.exponential(size=latents.shape).astype(np.float32)


def as_codes(latents: np.ndarray, values: np.ndarray, width: int) -> Codes:
    valid = latents < width
    crow = np.zeros(len(latents) + 1, dtype=np.int64)
    crow[1:] = valid.sum(1).cumsum()
    n = len(latents)
    zeros = torch.zeros(n, dtype=torch.long)
    return Codes(torch.from_numpy(crow), torch.from_numpy(latents[valid]), torch.from_numpy(values[valid]), width,
                 zeros, torch.arange(n), zeros, zeros)


def streams(tokens: int, width: int, k: int, chunk: int, seed: int):
    rng = np.random.default_rng(seed)
    frequency = 1.0 / (np.arange(width) + 20.0) ** 0.8
    cdf = np.cumsum(rng.permutation(frequency))
    cdf /= cdf[-1]
    perm = rng.permutation(width)
    for start in range(0, tokens, chunk):
        n = min(chunk, tokens - start)
        latents_a, values_a = topk_chunk(rng, n, width, k, cdf)
        latents_b, values_b = topk_chunk(rng, n, width, k, cdf, (perm, latents_a))
        yield as_codes(latents_a, values_a, width), as_codes(latents_b, values_b, width)


def run_streaming(tokens: int, width: int, k: int, chunk: int, seed: int) -> dict:
    """Wall and CPU seconds of the streaming path (code generation excluded from both)."""
    generate = accumulate = generate_cpu = 0.0
    cpu_start = time.process_time()
    acc = RunningCorrelation(width, width)
    t, c = time.perf_counter(), time.process_time()
    for codes_a, codes_b in streams(tokens, width, k, chunk, seed):
        t1, c1 = time.perf_counter(), time.process_time()
        generate, generate_cpu = generate + t1 - t, generate_cpu + c1 - c
        acc.update(codes_a, codes_b)
        t, c = time.perf_counter(), time.process_time()
        accumulate += t - t1
    t0 = time.perf_counter()
    corr = acc.correlation(in_place=True)
    t1 = time.perf_counter()
    pairs = one_to_one(corr.matrix)
    t2 = time.perf_counter()
    cpu = time.process_time() - cpu_start - generate_cpu
    return {"tokens": tokens, "width": width, "accumulate_s": accumulate, "correlation_s": t1 - t0,
            "matching_s": t2 - t1, "generate_s": generate, "seconds": accumulate + (t2 - t0), "cpu_s": cpu,
            "pairs": len(pairs), "pairs_corr_gt_0.1": int((pairs.corr > 0.1).sum()), "peak_gb": peak_gb()}


def run_dense(tokens: int, width: int, k: int, seed: int) -> dict:
    """The in-memory approach: dense [tokens, width] codes, z-scored, one GEMM."""
    a_parts, b_parts = [], []
    t = time.perf_counter()
    for codes_a, codes_b in streams(tokens, width, k, 8192, seed):
        a_parts.append(codes_a.dense().numpy())
        b_parts.append(codes_b.dense().numpy())
    a, b = np.concatenate(a_parts), np.concatenate(b_parts)
    del a_parts, b_parts
    build = time.perf_counter() - t
    t0 = time.perf_counter()
    for m in (a, b):
        m -= m.mean(0)
        std = m.std(0)
        m /= np.where(std > 0, std, 1)
    corr = a.T @ b
    corr /= tokens
    t1 = time.perf_counter()
    pairs = one_to_one(corr)
    t2 = time.perf_counter()
    return {"tokens": tokens, "width": width, "build_s": build, "correlation_s": t1 - t0, "matching_s": t2 - t1,
            "seconds": t2 - t0, "pairs": len(pairs), "peak_gb": peak_gb()}


def dense_fit(width: int, budget_gb: float) -> int:
    """Tokens whose two dense float32 [tokens, width] matrices plus the [width, width] result fit the budget."""
    free = budget_gb * 2**30 - 4 * width * width * 1.2 - 0.5 * 2**30
    return max(1024, int(free / (2 * 4 * width)) // 1024 * 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--width", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--budget-gb", type=float, default=4.0)
    parser.add_argument("--dense-tokens", type=int, default=None,
                        help="tokens for the dense path (default: the most that fit --budget-gb)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dense-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dense_only:
        print(json.dumps(run_dense(args.dense_tokens, args.width, args.k, args.seed)))
        return
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}")
    streaming = run_streaming(args.tokens, args.width, args.k, args.chunk, args.seed)
    dense_tokens = args.dense_tokens or dense_fit(args.width, args.budget_gb)
    child = subprocess.run([sys.executable, __file__, "--dense-only", "--dense-tokens", str(dense_tokens),
                            "--width", str(args.width), "--k", str(args.k), "--seed", str(args.seed)],
                           capture_output=True, text=True, check=True)
    dense = json.loads(child.stdout.strip().splitlines()[-1])
    dense_per_token = dense["correlation_s"] / dense["tokens"]
    dense_at_n = dense_per_token * args.tokens + dense["matching_s"]
    dense_memory_at_n = (2 * 4 * args.width * args.tokens + 4 * args.width**2) / 2**30
    print(f"\n{args.tokens} aligned tokens x {args.width} x {args.width} latents, k={args.k}, chunks of {args.chunk}")
    print("| path | tokens | correlation s | matching s | total s | peak GB |")
    print("|---|---|---|---|---|---|")
    print(f"| streaming (sparse sums) | {args.tokens} | {streaming['accumulate_s'] + streaming['correlation_s']:.1f} "
          f"| {streaming['matching_s']:.1f} | {streaming['seconds']:.1f} | {streaming['peak_gb']:.2f} |")
    print(f"| dense in memory | {dense['tokens']} | {dense['correlation_s']:.1f} | {dense['matching_s']:.1f} | "
          f"{dense['seconds']:.1f} | {dense['peak_gb']:.2f} |")
    print(f"| dense, extrapolated | {args.tokens} | {dense_per_token * args.tokens:.0f} | {dense['matching_s']:.1f} | "
          f"{dense_at_n:.0f} | {dense_memory_at_n:.0f}{' (does not fit)' if dense_memory_at_n > args.budget_gb else ''} |")
    print(f"\nthe dense path fits {dense_fit(args.width, args.budget_gb)} tokens in {args.budget_gb:g} GB; it ran at "
          f"{dense['tokens']}")
    print(f"\nstreaming: {streaming['pairs']} 1:1 pairs ({streaming['pairs_corr_gt_0.1']} above 0.1); synthetic "
          f"code generation {streaming['generate_s']:.0f} s, not counted; dense / streaming time at "
          f"{args.tokens} tokens: {dense_at_n / streaming['seconds']:.1f}x; streaming CPU time {streaming['cpu_s']:.0f} s "
          f"(both cores; load average now {os.getloadavg()[0]:.1f})")
    print(f"RESULT tokens={args.tokens} latents={args.width} seconds={streaming['seconds']:.1f} "
          f"peak_gb={streaming['peak_gb']:.2f} cpu_seconds={streaming['cpu_s']:.0f} dense_tokens={dense['tokens']} dense_seconds={dense['seconds']:.1f} "
          f"dense_peak_gb={dense['peak_gb']:.2f} dense_extrapolated_seconds={dense_at_n:.0f}")


if __name__ == "__main__":
    main()
