"""Benchmark: dashboard data for every latent of a 4,608-latent SAE over 1M cached tokens (target: < 5 min, < 4 GB on
a 2-core CPU).

Stages, each timed: the one streaming pass (encode + top / sample tables + histograms), the logit table and decoder
neighbours, every latent's card data, and writing the whole static dashboard (index + 4,608 pages).

Codes come from one of:
  default      a synthetic cache of the right shape: 1M tokens x d=576 (bf16), each token a sparse sum of ~20 of
               4,608 Zipf-frequent directions with log-normal sizes plus noise, read by a TopK SAE (k=32) whose
               decoder is those directions (so codes are sparse and latent densities heavy-tailed, as in real SAEs);
               token ids are Zipf-distributed over SmolLM2's vocabulary
  --acts --sae a real cache and SAE (e.g. runs/quickstart/acts and its SAE); --repeat N tiles the cache N times by
               symlinking its shards (the text repeats, the work is that of N x the tokens)

    python scripts/bench_explore.py [--tokens 1M] [--width 4608] [--acts runs/quickstart/acts --sae FOLDER --repeat 10]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from saelab.activations import ActivationStore
from saelab.activations.manifest import Manifest, ShardRecord, shard_name
from saelab.explore import explore
from saelab.files import file_sha256
from saelab.models import load_model
from saelab.options import parse_count
from saelab.sae import SAEConfig, create_sae

HOOK = "blocks.15.hook_resid_post"
CONTEXT = 128


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def synthetic(out: Path, tokens: int, width: int, d: int, vocab: int, model: str, seed: int = 0):
    """Write a synthetic cache of ~`tokens` rows and return the TopK SAE that reads it."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(width, d, generator=generator), dim=1)
    frequency = 1.0 / torch.arange(1, width + 1).double() ** 0.9
    frequency = frequency[torch.randperm(width, generator=generator)]
    token_weights = 1.0 / torch.arange(1, vocab + 1).double() ** 1.1
    contexts = -(-tokens // (CONTEXT - 1))
    shard_contexts = 512
    shards = []
    for index, first in enumerate(range(0, contexts, shard_contexts)):
        n = min(shard_contexts, contexts - first)
        rows = n * (CONTEXT - 1)
        active = torch.multinomial(frequency, 20 * rows, replacement=True, generator=generator).view(rows, 20)
        sizes = torch.exp(torch.randn(rows, 20, generator=generator) * 0.5)
        acts = torch.nn.functional.embedding_bag(active, directions, per_sample_weights=sizes.view(rows, 20).float(),
                                                 mode="sum")
        acts += 0.05 * torch.randn(rows, d, generator=generator)
        ids = torch.multinomial(token_weights, n * CONTEXT, replacement=True, generator=generator).view(n, CONTEXT)
        positions = (torch.arange(n)[:, None] * CONTEXT + torch.arange(1, CONTEXT)[None, :]).reshape(-1)
        name = shard_name(index)
        save_file({f"acts.{HOOK}": acts.bfloat16(), "tokens": ids.int(), "positions": positions.int()}, out / name)
        shards.append(ShardRecord(index, name, n, rows, (out / name).stat().st_size, file_sha256(out / name)))
    Manifest(run={"model": model, "synthetic": True}, hooks={HOOK: {"d": d, "shape": [d]}}, dtype="bfloat16",
             context_len=CONTEXT, shard_contexts=shard_contexts, target_contexts=contexts, shards=shards).write(out)
    sae = create_sae(SAEConfig(arch="topk", d_in=d, width=width, k=32, model_name=model, hook_name=HOOK))
    with torch.no_grad():
        sae.W_dec.copy_(directions)
        sae.W_enc.copy_(directions.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def tiled(acts: Path, out: Path, repeat: int) -> None:
    """A cache that holds `acts` `repeat` times over: its shards symlinked under new numbers, one manifest."""
    manifest = Manifest.read(acts)
    shards = []
    for copy in range(repeat):
        for record in manifest.shards:
            index = copy * len(manifest.shards) + record.index
            name = shard_name(index)
            (out / name).symlink_to((acts / record.file).resolve())
            shards.append(ShardRecord(index, name, record.contexts, record.rows, record.bytes, record.sha256))
    manifest.shards = shards
    manifest.target_contexts = manifest.n_contexts * repeat
    manifest.exhausted_at = None
    manifest.write(out)  # each copy's last shard may be short, so read it with allow_partial=True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=parse_count, default=parse_count("1M"))
    parser.add_argument("--width", type=int, default=4608)
    parser.add_argument("--model", default="smollm2-135m", help="gives the tokenizer and the unembedding")
    parser.add_argument("--acts", type=Path, help="a real cache (default: a synthetic one)")
    parser.add_argument("--sae", help="the SAE that reads --acts")
    parser.add_argument("--repeat", type=int, default=1, help="tile --acts this many times")
    parser.add_argument("--work", type=Path, help="where to put the benchmark cache (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the dashboard and the synthetic cache")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 gives a clean CPU time on a "
                                                     "shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="bench-explore-", dir=args.work))
    model = load_model(args.model)
    started = time.perf_counter()
    if args.acts:
        from saelab.hub import load_sae

        sae = load_sae(args.sae)
        acts = args.acts
        if args.repeat > 1:
            acts = work / "acts"
            acts.mkdir()
            tiled(args.acts, acts, args.repeat)
            acts = ActivationStore(acts, HOOK, batch_size=8192, shuffle=False, drop_last=False, allow_partial=True)
        source = f"{args.acts} x {args.repeat}"
    else:
        acts = work / "acts"
        acts.mkdir()
        sae = synthetic(acts, args.tokens, args.width, model.d_model, model.vocab_size, model.name)
        source = "synthetic"
    prepared = time.perf_counter() - started
    print(f"codes: {source}; cache ready in {prepared:.0f} s (not counted)")

    times = {}
    load_before = f"{os.getloadavg()[0]:.1f}"
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    features = explore(sae, acts, model, max_tokens=args.tokens, check_model=False)
    times["one pass: encode + top/sample tables + histograms"] = features.stats.seconds
    times["logit table (W_dec W_U) + decoder neighbours"] = time.perf_counter() - started - features.stats.seconds
    mark = time.perf_counter()
    cards = [features[i] for i in range(features.width)]
    times["card data for every latent"] = time.perf_counter() - mark
    mark = time.perf_counter()
    index = features.dashboard(work / "dashboard")
    times["static dashboard: index + one page per latent"] = time.perf_counter() - mark
    total = time.perf_counter() - started
    now = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = now.ru_utime + now.ru_stime - cpu.ru_utime - cpu.ru_stime
    size = sum(p.stat().st_size for p in (work / "dashboard").rglob("*.html"))

    alive = sum(1 for c in cards if c.count)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"{features.stats.n_tokens:,} tokens, {features.width} latents ({alive} fired), "
          f"{int(features.stats.count.sum()):,} nonzero codes; dashboard {size / 2**20:.0f} MiB in {index.parent}")
    print("\n| stage | seconds |\n|---|---:|")
    for stage, seconds in times.items():
        print(f"| {stage} | {seconds:.1f} |")
    print(f"| **total** | **{total:.1f}** |")
    print(f"\nCPU time {cpu_seconds:.0f} s over {torch.get_num_threads()} threads; load average before / after: "
          f"{load_before} / {os.getloadavg()[0]:.1f} (a shared machine stretches wall time, not CPU time)")
    if not args.keep:
        shutil.rmtree(work)
    print(f"RESULT tokens={features.stats.n_tokens} latents={features.width} seconds={total:.1f} "
          f"peak_gb={peak_gb():.2f}")


if __name__ == "__main__":
    main()
