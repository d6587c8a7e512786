"""The real-model eval table: saelab's five architectures at one L0, several seeds each, trained on one activation
cache and scored by the eval suite, pooled over seeds with each recipe compared against the seed spread.

    python scripts/evals_table.py [--acts runs/quickstart/acts] [--out runs/evals-table] [--seeds 3]
                                  [--suite core,absorption,sparse_probing] [--seed-suite core]

Every SAE gets --seed-suite (cheap evals, on every seed); the first seed also gets --suite. Training and evals
resume: an SAE already trained, or an eval already written beside it, is not redone. Prints Markdown tables for
docs/evals.md and writes them to <out>/table.md.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from saelab import SAESpec, TrainConfig, train
from saelab.evals.core import CoreConfig
from saelab.evals.suite import read_suite, run_suite, seeds_table, suite_table

ARCHS = ("topk", "batchtopk", "jumprelu", "relu", "matryoshka")


def sae_folders(out: Path, seed: int) -> list[Path]:
    return sorted(p.parent for p in (out / f"seed{seed}").rglob("cfg.json"))


def train_seed(acts: str, out: Path, seed: int, width: int, k: int, tokens: int) -> list[Path]:
    folder = out / f"seed{seed}"
    if len(sae_folders(out, seed)) < len(ARCHS):
        specs = [SAESpec(arch=arch, width=width, k=k if arch in ("topk", "batchtopk", "matryoshka") else None,
                         options={} if arch in ("topk", "batchtopk", "matryoshka") else {"target_l0": k})
                 for arch in ARCHS]
        train(acts, specs, TrainConfig(tokens=tokens, seed=seed), out=folder)
    return sae_folders(out, seed)


MODELS: dict = {}


def shared_model(sae, folder):
    """One model for every SAE of the table (run_suite is called per SAE so that each resumes on its own)."""
    from saelab.models import load_model

    if sae.cfg.model_name not in MODELS:
        MODELS[sae.cfg.model_name] = load_model(sae.cfg.model_name)
    return MODELS[sae.cfg.model_name]


def evaluate(folders: list[Path], suite: list[str], held_out, tokens: int) -> None:
    """Run the evals of `suite` each SAE has no record of yet."""
    from saelab.evals.suite import eval_module

    ids = {name: eval_module(name).EVAL_TYPE_ID for name in suite}
    for folder in folders:
        missing = [name for name in suite if not (folder / "evals" / f"{ids[name]}.json").exists()]
        if missing:
            start = time.perf_counter()
            run_suite([folder], missing, configs={"core": CoreConfig(text=held_out, tokens=tokens)}, progress=False,
                      load_model=shared_model)
            print(f"{folder}: {', '.join(missing)} in {time.perf_counter() - start:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--acts", default="runs/quickstart/acts")
    parser.add_argument("--out", default="runs/evals-table")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--width", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=540_672, help="training tokens (132 steps of 4,096)")
    parser.add_argument("--suite", default="core,absorption,sparse_probing")
    parser.add_argument("--seed-suite", default="core")
    parser.add_argument("--core-tokens", type=int, default=8192, help="held-out tokens of the core eval")
    args = parser.parse_args()
    from saelab.activations import ActivationStore

    out, held_out = Path(args.out), ActivationStore(args.acts).held_out_text()
    print(f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; cache {args.acts}; out {out}", flush=True)
    folders = {seed: train_seed(args.acts, out, seed, args.width, args.k, args.tokens) for seed in range(args.seeds)}
    for seed, found in folders.items():
        evaluate(found, args.seed_suite.split(","), held_out, args.core_tokens)
        if seed == 0:
            evaluate(found, args.suite.split(","), held_out, args.core_tokens)
    every = [f for found in folders.values() for f in found]
    tables = ("## Seed 0, every eval\n\n" + suite_table(read_suite(folders[0])) + "\n\n## Pooled over seeds\n\n"
              + seeds_table(read_suite(every)) + "\n")
    (out / "table.md").write_text(tables)
    print(tables)


if __name__ == "__main__":
    main()
