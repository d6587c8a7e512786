"""Benchmark: the eval suite (core + absorption + sparse probing by default) on one saved SAE, each eval's wall time
and the process's peak memory after it (target on a 2-core CPU for a 4,608-latent SmolLM2 SAE: under 10 minutes
and 4 GB for the three together).

    python scripts/bench_evals.py [--sae runs/quickstart/sae/blocks.15.hook_resid_post/topk-4608-k32]
                                  [--acts runs/quickstart/acts] [--suite core,absorption,sparse_probing]
                                  [--out /tmp/bench-evals]

The SAE defaults to the quickstart's (run `saelab` first); the core eval reads the text after its cache (--acts). Records go to --out (default: a temporary folder), so
the SAE's own evals/ folder is left as it is. The model loads once, before the clock starts.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

from saelab.activations import ActivationStore
from saelab.evals.core import CoreConfig
from saelab.evals.suite import DEFAULT_SUITE, eval_module
from saelab.evals.saebench import read_intervals, write_output
from saelab.hub import load_sae
from saelab.models import load_model

QUICKSTART_SAE = "runs/quickstart/sae/blocks.15.hook_resid_post/topk-4608-k32"
QUICKSTART_ACTS = "runs/quickstart/acts"


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sae", default=QUICKSTART_SAE)
    parser.add_argument("--suite", default=",".join(DEFAULT_SUITE))
    parser.add_argument("--acts", default=QUICKSTART_ACTS, help="the SAE's training cache: core reads the text after it")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not Path(args.sae).exists():
        raise SystemExit(f"{args.sae} does not exist: run `saelab` (the quickstart) first, or pass --sae")
    suite = [name.strip() for name in args.suite.split(",") if name.strip()]
    modules = {name: eval_module(name) for name in suite}
    configs = {"core": CoreConfig(text=ActivationStore(args.acts).held_out_text())} if Path(args.acts).exists() else {}
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-evals-"))
    sae = load_sae(args.sae)
    model = load_model(sae.cfg.model_name)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}; SAE {args.sae} ({sae.cfg.width} latents); core text: "
          f"{'held out after ' + args.acts if configs else 'the default'}; records in {out}")
    print("| eval | seconds | peak GB after | headline metrics |\n|---|---:|---:|---|")
    total = 0.0
    for name, module in modules.items():
        start = time.perf_counter()
        result = module.run(sae, model, configs.get(name), progress=False)
        seconds = time.perf_counter() - start
        total += seconds
        record = result.saebench(sae)
        write_output(record, out)
        headline = "; ".join(f"{metric} {interval}" for metric, interval in read_intervals(record).items())
        print(f"| {name} | {seconds:.1f} | {peak_gb():.2f} | {headline} |", flush=True)
    print(f"| total | {total:.1f} | {peak_gb():.2f} | |")
    print(f"RESULT seconds={total:.1f} peak_gb={peak_gb():.2f} latents={sae.cfg.width}")


if __name__ == "__main__":
    main()
