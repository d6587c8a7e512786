"""Every architecture against the synthetic ground truth (saelab.evals.synthetic): five architectures x two L0s x
three seeds on one generator config small enough for a 2-core CPU, each SAE trained through saelab.train on the
synthetic stream and scored on fresh tokens; prints a Markdown table of the mean and the min-max over seeds per
cell, and writes every run's scores and the table to --out.

    python scripts/synthetic_table.py [--out runs/synthetic_table] [--tokens 1200000] [--seeds 0 1 2] [--l0s 8 16]

A seed sets the SAE's initialisation and its training stream; the dictionary (the data's own seed) is the same for
all, so the spread over seeds is the training's, not the data's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from saelab import SAESpec, TrainConfig, train
from saelab.evals.synthetic import HOOK, SyntheticData, score_synthetic
from saelab.evals.synthetic_recipe import BENCH_DATA, SyntheticEvalConfig, recipe

CONFIG = BENCH_DATA
ARCHS = ("topk", "batchtopk", "matryoshka", "jumprelu", "relu")
METRICS = ("mcc", "f1", "uniqueness", "absorption", "absorption_parents", "fvu", "l0")


def spec(arch: str, width: int, l0: int) -> SAESpec:
    """k for the architectures that take one, a steered target L0 for the others (the suite's recipe)."""
    return recipe(arch, SyntheticEvalConfig(width=width, l0=l0))


def run_cell(data: SyntheticData, args, seed: int, l0: int) -> list[dict]:
    """Train the five architectures at one L0 on one seed's stream (one pass feeds them all), saved under --out
    (an SAE already there is loaded, not retrained: --rescore scores them again); their scores."""
    from saelab.hub import load_sae

    folder = args.out / f"seed{seed}-l0{l0}"
    if args.rescore:
        saes = [load_sae(next((folder / HOOK).glob(f"{arch}-*"))) for arch in ARCHS]
    else:
        started = time.perf_counter()
        trained = train(data.source(batch_size=args.batch_size, seed=seed),
                        [spec(arch, args.width, l0) for arch in ARCHS],
                        TrainConfig(tokens=args.tokens, batch_size=args.batch_size, seed=seed, allow_diverged=True),
                        out=folder, progress=False)
        print(f"seed {seed}, L0 {l0}: trained in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        saes = [result.sae for result in trained]
    rows = []
    for arch, sae in zip(ARCHS, saes):
        scores = score_synthetic(sae, data, tokens=args.score_tokens)
        rows.append({"arch": arch, "l0_asked": l0, "seed": seed, **{m: getattr(scores, m) for m in
                                                                       (*METRICS, "recovery", "dead_latents")}})
        print(f"  {arch}: " + ", ".join(f"{m} {rows[-1][m]:.3f}" for m in METRICS), file=sys.stderr, flush=True)
    return rows


def cell(values: list[float]) -> str:
    """mean (min-max) over seeds."""
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ({min(values):.3g}-{max(values):.3g})"


def table(rows: list[dict]) -> str:
    """Markdown: one row per architecture and asked L0, one column per metric."""
    lines = ["| architecture | L0 asked | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for l0 in sorted({r["l0_asked"] for r in rows}):
        for arch in ARCHS:
            mine = [r for r in rows if r["arch"] == arch and r["l0_asked"] == l0]
            if mine:
                lines.append(f"| {arch} | {l0} | " + " | ".join(cell([r[m] for r in mine]) for m in METRICS) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/synthetic_table"))
    parser.add_argument("--tokens", type=int, default=1_200_000)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--score-tokens", type=int, default=65_536)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--l0s", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine one thread ran 5x faster than two)")
    parser.add_argument("--rescore", action="store_true", help="score the SAEs an earlier run saved in --out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    data = SyntheticData(CONFIG)
    print(f"true L0 {float(data.probabilities.sum()):.2f}", file=sys.stderr, flush=True)
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for l0 in args.l0s:
            rows += run_cell(data, args, seed, l0)
            (args.out / "runs.json").write_text(json.dumps(rows, indent=1) + "\n")
    text = table(rows)
    (args.out / "table.md").write_text(text)
    (args.out / "config.json").write_text(json.dumps({"data": dataclasses.asdict(CONFIG), **{
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}, indent=1) + "\n")
    print(text)
    print(f"{len(rows)} SAEs in {time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
