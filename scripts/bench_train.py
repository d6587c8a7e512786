"""Benchmark: training throughput of a TopK SAE (fp32, Adam, AuxK on) in tokens/s.

Side by side in one run: saelab's trainer step on the sparse kernels, the same step on the dense PyTorch reference
path, the ceiling (the encoder's x @ W_enc + top-k alone: no TopK step can be faster), and EleutherAI sparsify /
SAELens when a reference venv is given (they cannot share saelab's environment: SAELens pins transformer-lens < 4):

    python scripts/bench_train.py                                   # d=576, n=16384, k=32, batch 4096
    python scripts/bench_train.py --ref-python /work/ref-venv/bin/python   # + sparsify and SAELens
    python scripts/bench_train.py --sweep                           # also n in 4k..65k and k in 16..128
    python scripts/bench_train.py --ranks 2                         # 2 data-parallel gloo ranks beside 1 process
    python scripts/bench_train.py --arch transcoder --n 4608        # TopK transcoder (and skip) beside the TopK SAE
    python scripts/bench_train.py --arch crosscoder --n 4608        # TopK crosscoder of two hooks beside the TopK SAE

Make the reference venv with: python3 -m venv /work/ref-venv && /work/ref-venv/bin/pip install torch==2.13.0 &&
/work/ref-venv/bin/pip install eai-sparsify sae-lens
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from reference_speed import peak_rss_gb  # a sibling script (scripts/ is on the path when run as a script)
from saelab.activations import ActivationBatch
from saelab.activations.joined import JoinedSource
from saelab.sae import sae_class
from saelab.training import SAESpec, TrainConfig, Trainer

HOOK = "bench"
TARGET = "bench_target"


class RandomActivations:
    """An in-memory activation source: one fixed random batch, repeated (the data path is not what is measured).
    With d_out, a second hook (TARGET) of that width for transcoders to reconstruct."""

    def __init__(self, d: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 d_out: int | None = None):
        self.d = {HOOK: d} if d_out is None else {HOOK: d, TARGET: d_out}
        self.hooks = list(self.d)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        generator = torch.Generator().manual_seed(seed)
        share = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)  # a rank's rows
        acts = {hook: torch.randn(batch_size, width, generator=generator)[share] for hook, width in self.d.items()}
        self.batch = ActivationBatch(acts, torch.zeros(batch_size, dtype=torch.long)[share],
                                     torch.arange(batch_size)[share])

    def __iter__(self):
        while True:
            yield self.batch


def saelab_step(d: int, n: int, k: int, batch: int, kernel: str, arch: str = "topk", d_out: int | None = None,
                skip: bool = False):
    """One Trainer.train_on call: loss, backward, decoder-gradient projection, Adam, renormalisation, dead clocks.
    With d_out, a TopK transcoder from HOOK to TARGET (skip: with its linear skip path) instead of an SAE.

    dead_tokens is one batch, so latents that miss a step are dead for the next and AuxK runs on them."""
    source = RandomActivations(d, batch, d_out=d_out)
    config = TrainConfig(tokens=batch * 10_000, batch_size=batch, kernel=kernel, dead_tokens=batch)
    takes_k = sae_class(arch).takes_k
    spec = SAESpec(arch=arch, width=n, k=k) if takes_k else SAESpec(arch=arch, width=n, options={"target_l0": k})
    if d_out is not None:
        spec = SAESpec(arch=arch, width=n, k=k, hook=HOOK, target_hook=TARGET, options={"skip": skip})
    trainer = Trainer(source, [spec], config, progress=False)
    for _ in range(3):  # the first call also initialises b_dec (geometric median) and the input scale
        trainer.train_on(source.batch)
        if arch == "relu":  # as when the steered L1 has brought it near its target (a fresh ReLU SAE fires half)
            at_target_l0(trainer.members[0].sae, source.batch.acts[HOOK] * trainer.members[0].sae.cfg.input_scale, k)
    return lambda: trainer.train_on(source.batch)


@torch.no_grad()
def at_target_l0(sae, x: torch.Tensor, l0: int) -> None:
    """Shift each latent's encoder bias so that it fires on l0 / width of the batch's tokens."""
    rank = max(1, round(len(x) * (1 - l0 / sae.cfg.width)))
    sae.b_enc.sub_(sae.pre_acts(x).kthvalue(rank, dim=0).values)


def ceiling_step(d: int, n: int, k: int, batch: int, reuse_buffer: bool = True):
    """Encoder matmul + bias + top-k only. With reuse_buffer, as fast as PyTorch does it (the pre-activations go
    into one buffer, as saelab's step does); without, a fresh [batch, n] result every call."""
    x, W, b = torch.randn(batch, d), torch.randn(d, n) / d**0.5, torch.zeros(n)
    pre = torch.empty(batch, n) if reuse_buffer else None

    @torch.no_grad()
    def step():
        torch.addmm(b, x, W, out=pre).topk(k, dim=1, sorted=False) if reuse_buffer else \
            torch.addmm(b, x, W).topk(k, dim=1, sorted=False)

    step()
    return step


def tokens_per_s(steps_by_name: dict, steps: int, rounds: int, batch: int) -> dict[str, float]:
    """Tokens/s of each step function: the fastest of `rounds` timings of `steps` calls (the least disturbed by
    other processes). Rounds interleave the functions, so a slow spell of the machine hits all of them."""
    best = dict.fromkeys(steps_by_name, float("inf"))
    for _ in range(rounds):
        for name, step in steps_by_name.items():
            started = time.perf_counter()
            for _ in range(steps):
                step()
            best[name] = min(best[name], time.perf_counter() - started)
    return {name: batch * steps / seconds for name, seconds in best.items()}


def rank_worker(shape: dict, steps: int) -> None:
    """One rank (or the only process) of a --ranks timing: `steps` data-parallel steps between two barriers;
    rank 0 prints the global tokens/s."""
    from saelab import distributed

    world = distributed.init()
    source = RandomActivations(shape["d"], shape["batch"], rank=world.rank, world_size=world.size)
    config = TrainConfig(tokens=shape["batch"] * 10_000, batch_size=shape["batch"], dead_tokens=shape["batch"])
    trainer = Trainer(source, [SAESpec(width=shape["n"], k=shape["k"])], config, progress=False)
    for _ in range(3):
        trainer.train_on(source.batch)
    world.barrier()
    started = time.perf_counter()
    for _ in range(steps):
        trainer.train_on(source.batch)
    world.barrier()
    if world.main:
        print(shape["batch"] * steps / (time.perf_counter() - started))
    distributed.finish()


def ranks_tokens_per_s(shape: dict, steps: int, world: int) -> float:
    """Tokens/s of `world` gloo ranks on one torch thread each (as torchrun starts them), or of one process on all
    the machine's threads (world=1): fresh processes, their start-up not timed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, __file__, *[f"--{key}={value}" for key, value in shape.items()], f"--steps={steps}",
            "--rank-worker"]
    procs = []
    for rank in range(world):
        env = dict(os.environ)
        if world > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // world)))
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [proc.communicate() for proc in procs]
    if procs[0].returncode:
        raise SystemExit(f"the {world}-rank timing failed: {outputs[0][1].strip().splitlines()[-1:]}")
    return float(outputs[0][0].strip().splitlines()[-1])


def compare_ranks(shape: dict, steps: int, rounds: int, world: int) -> None:
    """--ranks: data-parallel throughput beside one process, rounds interleaved; the best round of each counts."""
    best = {1: 0.0, world: 0.0}
    for round_ in range(rounds):
        for size in best:
            best[size] = max(best[size], ranks_tokens_per_s(shape, steps, size))
            print(f"round {round_ + 1}: {size} process(es): {best[size]:,.0f} tokens/s (best so far)", flush=True)
    print(f"{'processes':<34}{'tokens/s':>12}\n{'1 (all threads)':<34}{best[1]:>12,.0f}\n"
          f"{f'{world} gloo ranks (1 thread each)':<34}{best[world]:>12,.0f}")
    print(f"RESULT ranks={world} one_process_tok_s={best[1]:.0f} ranks_tok_s={best[world]:.0f} "
          f"speedup={best[world] / best[1]:.3f} cpus={os.cpu_count()} load={os.getloadavg()[0]:.2f}")


def compare_transcoders(shape: dict, d_out: int, steps: int, rounds: int) -> None:
    """--arch transcoder: a TopK transcoder (d -> d_out) and a skip transcoder beside the TopK SAE of the same width
    and k and the ceiling, rounds interleaved; the best round of each counts."""
    timed = tokens_per_s({"transcoder": saelab_step(**shape, kernel="auto", d_out=d_out),
                          "skip": saelab_step(**shape, kernel="auto", d_out=d_out, skip=True),
                          "sae": saelab_step(**shape, kernel="auto"), "ceiling": ceiling_step(**shape)},
                         steps, rounds, shape["batch"])
    ours, ceiling = timed["transcoder"], timed["ceiling"]
    rows = [("ceiling: encoder matmul + top-k", ceiling), ("TopK SAE (d -> d)", timed["sae"]),
            (f"TopK transcoder (d -> {d_out})", ours), ("TopK skip transcoder", timed["skip"])]
    print(f"{'implementation':<34}{'tokens/s':>12}{'x ceiling':>11}{'x SAE':>8}")
    for name, value in rows:
        print(f"{name:<34}{value:>12,.0f}{value / ceiling:>11.2f}{value / timed['sae']:>8.2f}")
    print(f"RESULT saelab_tok_s={ours:.0f} ceiling_tok_s={ceiling:.0f} ratio={ours / ceiling:.3f} sparsify_tok_s=na "
          f"saelens_tok_s=na sae_tok_s={timed['sae']:.0f} skip_tok_s={timed['skip']:.0f} "
          f"vs_sae={ours / timed['sae']:.3f} skip_vs_sae={timed['skip'] / timed['sae']:.3f}")


def crosscoder_step(d: int, n: int, k: int, batch: int, d_other: int):
    """One Trainer.train_on call of a TopK crosscoder reading HOOK (d) and TARGET (d_other) joined."""
    source = JoinedSource(RandomActivations(d, batch, d_out=d_other), [HOOK, TARGET], batch_size=batch)
    config = TrainConfig(tokens=batch * 10_000, batch_size=batch, dead_tokens=batch)
    trainer = Trainer(source, [SAESpec(arch="topk", width=n, k=k, hook=source.name)], config, progress=False)
    joined = next(source.batches())
    for _ in range(3):  # the first call also initialises b_dec and the input scale
        trainer.train_on(joined)
    return lambda: trainer.train_on(joined)


def compare_crosscoders(shape: dict, d_other: int, steps: int, rounds: int) -> None:
    """--arch crosscoder: a TopK crosscoder of two hooks (d + d_other wide) beside the TopK SAE of one hook with the
    same width and k, and the ceiling of each input width, rounds interleaved; the best round of each counts."""
    wide = dict(shape, d=shape["d"] + d_other)
    timed = tokens_per_s({"crosscoder": crosscoder_step(**shape, d_other=d_other),
                          "sae": saelab_step(**shape, kernel="auto"), "ceiling": ceiling_step(**wide),
                          "sae_ceiling": ceiling_step(**shape)}, steps, rounds, shape["batch"])
    ours, ceiling = timed["crosscoder"], timed["ceiling"]
    rows = [(f"ceiling at d = {wide['d']}", ceiling), (f"TopK crosscoder ({shape['d']} + {d_other})", ours),
            (f"ceiling at d = {shape['d']}", timed["sae_ceiling"]), (f"TopK SAE ({shape['d']})", timed["sae"])]
    print(f"{'implementation':<34}{'tokens/s':>12}{'x its ceiling':>15}{'x SAE':>8}")
    for (name, value), bound in zip(rows, (ceiling, ceiling, timed["sae_ceiling"], timed["sae_ceiling"])):
        print(f"{name:<34}{value:>12,.0f}{value / bound:>15.2f}{value / timed['sae']:>8.2f}")
    print(f"RESULT saelab_tok_s={ours:.0f} ceiling_tok_s={ceiling:.0f} ratio={ours / ceiling:.3f} sparsify_tok_s=na "
          f"saelens_tok_s=na sae_tok_s={timed['sae']:.0f} vs_sae={ours / timed['sae']:.3f} "
          f"sae_ratio={timed['sae'] / timed['sae_ceiling']:.3f}")


def peak_memory_of(kernel: str, shape: dict, arch: str = "topk") -> float:
    """Peak resident memory (GB) of a fresh process that builds the trainer and runs a few steps on `kernel`."""
    args = [f"--{key}={value}" for key, value in shape.items()] + [f"--arch={arch}"]
    result = subprocess.run([sys.executable, __file__, *args, f"--memory-of={kernel}"], capture_output=True, text=True)
    return float(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 else float("nan")


def references(ref_python: str | None, d: int, n: int, k: int, batch: int, steps: int, rounds: int,
               libraries: tuple[str, ...] = ("sparsify", "saelens")) -> dict[str, dict]:
    """sparsify and SAELens tokens/s and peak memory from scripts/reference_speed.py in the reference venv (each in
    its own process; 'na' without the venv)."""
    found = {library: {"tokens_per_s": "na", "peak_rss_gb": "na"} for library in libraries}
    if not ref_python or not Path(ref_python).exists():
        return found
    script = Path(__file__).with_name("reference_speed.py")
    for library in found:
        result = subprocess.run([ref_python, str(script), library, *map(str, (d, n, k, batch, steps, rounds))],
                                capture_output=True, text=True)
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        if result.returncode == 0 and lines:
            found[library] = json.loads(lines[-1])
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
    parser.add_argument("--steps", type=int, default=5, help="steps per timing")
    parser.add_argument("--rounds", type=int, default=3, help="timings per implementation; the best one counts")
    parser.add_argument("--ref-python", default=None, help="python of a venv with eai-sparsify and sae-lens")
    parser.add_argument("--sweep", action="store_true", help="also sweep n and k (saelab, ceiling, sparsify)")
    parser.add_argument("--arch", default="topk",
                        choices=["topk", "batchtopk", "matryoshka", "jumprelu", "relu", "transcoder", "crosscoder"],
                        help="the architecture saelab trains (the references run TopK only, so only with topk); "
                             "jumprelu and relu run at L0 = k (thresholds from the first batch, ReLU biases shifted); "
                             "transcoder: a TopK transcoder d -> d_out and a skip one beside the TopK SAE, instead")
    parser.add_argument("--d-out", type=int, default=None, help="--arch transcoder: width of its target; crosscoder: of its second hook (default d)")
    parser.add_argument("--ranks", type=int, default=None,
                        help="time this many data-parallel gloo ranks (TopK) beside one process, instead")
    parser.add_argument("--memory-of", choices=["auto", "dense"], help=argparse.SUPPRESS)  # used by peak_memory_of
    parser.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)  # used by ranks_tokens_per_s
    args = parser.parse_args()

    shape = dict(d=args.d, n=args.n, k=args.k, batch=args.batch)
    if args.rank_worker:
        rank_worker(shape, args.steps)
        return
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"{args.arch} SAE fp32, Adam, AuxK on; d={args.d} n={args.n} k={args.k} batch={args.batch}, "
          f"{args.steps} steps")
    if args.ranks:
        compare_ranks(shape, args.steps, args.rounds, args.ranks)
        return
    if args.arch == "transcoder":
        compare_transcoders(shape, args.d_out or args.d, args.steps, args.rounds)
        return
    if args.arch == "crosscoder":
        compare_crosscoders(shape, args.d_out or args.d, args.steps, args.rounds)
        return
    if args.memory_of:
        step = saelab_step(**shape, kernel=args.memory_of, arch=args.arch)
        step()
        print(peak_rss_gb())
        return
    ours = saelab_step(**shape, kernel="auto", arch=args.arch)
    fast = tokens_per_s({"saelab": ours, "ceiling": ceiling_step(**shape),
                         "plain": ceiling_step(**shape, reuse_buffer=False)}, args.steps, args.rounds, args.batch)
    ceiling, plain, saelab = fast["ceiling"], fast["plain"], fast["saelab"]
    dense = tokens_per_s({"dense": saelab_step(**shape, kernel="dense", arch=args.arch)}, 2, 1, args.batch)["dense"]
    rss_sparse, rss_dense = peak_memory_of("auto", shape, args.arch), peak_memory_of("dense", shape, args.arch)
    refs = references(args.ref_python if args.arch == "topk" else None, **shape, steps=args.steps, rounds=args.rounds)
    rows = [("ceiling: encoder matmul + top-k", ceiling, "na"), ("  same, fresh output each call", plain, "na"),
            ("saelab (sparse kernels)", saelab, rss_sparse),
            ("saelab dense PyTorch path", dense, rss_dense)]
    rows += [(name, refs[lib]["tokens_per_s"], refs[lib]["peak_rss_gb"])
             for name, lib in (("EleutherAI sparsify", "sparsify"), ("SAELens", "saelens"))]
    print(f"{'implementation':<34}{'tokens/s':>12}{'x ceiling':>11}{'peak GB':>10}")
    for name, value, peak in rows:
        ratio = f"{value / ceiling:.2f}" if isinstance(value, float) else "na"
        print(f"{name:<34}{fmt(value):>12}{ratio:>11}{peak if peak == 'na' else f'{peak:.2f}':>10}")
    print("peak GB: peak resident memory (VmHWM) of a separate process that only builds that trainer and runs "
          "a few steps (torch and the imports included)")

    if args.sweep:
        print(f"\n{'n':>7}{'k':>6}{'saelab tok/s':>15}{'ceiling tok/s':>15}{'ratio':>8}{'sparsify tok/s':>16}")
        for n, k in [(4096, 32), (8192, 32), (16384, 32), (32768, 32), (65536, 32),
                     (16384, 16), (16384, 64), (16384, 128)]:
            sweep = dict(d=args.d, n=n, k=k, batch=args.batch)
            timed = tokens_per_s({"saelab": saelab_step(**sweep, kernel="auto"), "ceiling": ceiling_step(**sweep)},
                                 args.steps, 2, args.batch)
            ours, top = timed["saelab"], timed["ceiling"]
            theirs = references(args.ref_python, **sweep, steps=args.steps, rounds=1, libraries=("sparsify",))
            print(f"{n:>7}{k:>6}{ours:>15,.0f}{top:>15,.0f}{ours / top:>8.2f}{fmt(theirs['sparsify']['tokens_per_s']):>16}")

    def key(value):
        return f"{value:.0f}" if isinstance(value, float) else value

    print(f"RESULT saelab_tok_s={key(saelab)} ceiling_tok_s={key(ceiling)} ratio={saelab / ceiling:.3f} "
          f"sparsify_tok_s={key(refs['sparsify']['tokens_per_s'])} saelens_tok_s={key(refs['saelens']['tokens_per_s'])}")


if __name__ == "__main__":
    main()
