"""Benchmark: tokens/s of caching one mid-depth hook of SmolLM2-135M-Instruct, against the bare forward to that layer
and a naive full-forward `run_with_cache`. All three see the same contexts of the same text.

The methods take turns, round after round (in a rotating order), and each reports its median round: a machine that
gets busier or quieter during the benchmark slows every method alike instead of favouring the one measured then.

    python scripts/bench_cache.py [--tokens 4096] [--rounds 3] [--hook blocks.15.hook_resid_post] [--text default]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from itertools import islice

import torch

from saelab.activations import cache_activations
from saelab.data import TextConfig
from saelab.models import load_model


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--hook", default="blocks.15.hook_resid_post")
    parser.add_argument("--text", default="default")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--context-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each method reports its median")
    args = parser.parse_args()

    model = load_model(args.model)
    text = TextConfig(source=args.text, context_len=args.context_len)
    n_contexts = args.tokens // args.context_len
    contexts = torch.tensor(list(islice(text.contexts(model.tokenizer), n_contexts)))
    batches = contexts.split(args.batch_size)
    tokens = contexts.numel()
    stop = model.stop_layer([args.hook])

    @torch.inference_mode()
    def bare_forward():
        for batch in batches:
            model.bridge(batch, stop_at_layer=stop, return_type=None)

    @torch.inference_mode()
    def naive_run_with_cache():
        kept = []
        for batch in batches:
            _, cache = model.bridge.run_with_cache(batch, names_filter=[args.hook])
            kept.append(cache[args.hook].clone())

    def cache_to_disk():
        with tempfile.TemporaryDirectory() as folder:
            cache_activations(model, args.hook, folder, text=text, tokens=tokens, batch_size=args.batch_size,
                              progress=False)

    model.activations(batches[0], [args.hook])  # warm-up: first-call allocations and hook-shape probe
    cache_to_disk()
    methods = [("bare forward to layer", bare_forward), ("saelab cache (disk)", cache_to_disk),
               ("naive run_with_cache (full)", naive_run_with_cache)]
    rounds = {name: [] for name, _ in methods}
    for number in range(args.rounds):
        shift = number % len(methods)  # rotate who goes first, so no method always follows the same one
        for name, fn in methods[shift:] + methods[:shift]:
            rounds[name].append(timed(fn))
    results = {name: statistics.median(times) for name, times in rounds.items()}

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}")
    print(f"model {args.model}, hook {args.hook} (forward stops after block {stop - 1 if stop else 'last'}), "
          f"{tokens} tokens = {n_contexts} x {args.context_len}, batch {args.batch_size}, "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'method':<30}{'seconds':>10}{'best':>8}{'tokens/s':>12}{'vs bare':>10}")
    bare = results["bare forward to layer"]
    for name, seconds in results.items():
        print(f"{name:<30}{seconds:>10.2f}{min(rounds[name]):>8.2f}{tokens / seconds:>12,.0f}{seconds / bare:>9.2f}x")
    cached = results["saelab cache (disk)"]
    print(f"RESULT cache_tok_s={tokens / cached:.0f} forward_tok_s={tokens / bare:.0f} "
          f"overhead={cached / bare - 1:.3f}")


if __name__ == "__main__":
    main()
