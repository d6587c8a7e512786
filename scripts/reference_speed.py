"""Training-step throughput of the reference libraries, for scripts/bench_train.py. Runs in a separate venv
(SAELens pins transformer-lens < 4) and imports nothing from saelab:

    /work/ref-venv/bin/python scripts/reference_speed.py sparsify|saelens D N K BATCH STEPS [ROUNDS]

Each step mirrors saelab's: fp32, Adam, AuxK on (latents that did not fire in the previous step count as dead),
using each library's own public SAE class and loss. Prints one JSON line with tokens_per_s (the best of ROUNDS
timings of STEPS steps, as bench_train.py times saelab) and the process's peak resident memory.
"""

from __future__ import annotations

import json
import resource
import sys
import time

import torch


def sparsify_step_fn(d: int, n: int, k: int):
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k))
    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4)
    dead = torch.zeros(n, dtype=torch.bool)

    def step(x):
        nonlocal dead
        out = sae(x, dead_mask=dead)
        (out.fvu + out.auxk_loss / 32).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        sae.set_decoder_norm_to_unit_norm()
        fired = torch.zeros(n, dtype=torch.bool)
        fired[out.latent_indices.flatten()] = True
        dead = ~fired

    return step


def saelens_step_fn(d: int, n: int, k: int):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=n, k=k, device="cpu", dtype="float32"))
    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4)
    dead = torch.zeros(n, dtype=torch.bool)
    count = 0

    def step(x):
        nonlocal dead, count
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                       n_training_steps=count, is_logging_step=False))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)  # as SAELens's SAETrainer does every step
        optimizer.step()
        optimizer.zero_grad()
        dead = (out.feature_acts > 0).sum(0) == 0
        count += 1

    return step


def peak_rss_gb() -> float:
    """This process's peak resident memory: VmHWM (which, unlike ru_maxrss, does not carry over the parent's
    peak through fork + exec), or ru_maxrss where /proc is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    library, d, n, k, batch, steps = sys.argv[1], *map(int, sys.argv[2:7])
    rounds = int(sys.argv[7]) if len(sys.argv) > 7 else 3
    step = {"sparsify": sparsify_step_fn, "saelens": saelens_step_fn}[library](d, n, k)
    x = torch.randn(batch, d, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        step(x)
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(steps):
            step(x)
        best = min(best, time.perf_counter() - started)
    peak_gb = peak_rss_gb()
    print(json.dumps({"library": library, "tokens_per_s": batch * steps / best, "peak_rss_gb": peak_gb}))


if __name__ == "__main__":
    main()
