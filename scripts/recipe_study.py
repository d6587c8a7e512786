"""Recipe or architecture? Train a grid of SAEs on one activation cache (architectures x sparsities x learning-rate
scales x run lengths) and score each with the core eval on the held-out text after the cache, so a gap between two
architectures can be followed as the recipe changes around it, and the FVU-L0 front of each drawn.

    python scripts/recipe_study.py --acts runs/quickstart/acts --out runs/recipe \
        --archs topk,batchtopk,jumprelu,relu,matryoshka --ks 16,32,64 --lr-scales 1 --steps 132

Every (run length, learning-rate scale, option set) is one training run over the cache (one read feeds all its
SAEs). Each SAE is scored on the activations of the text that follows the cache (cached once, --heldout-tokens, to
<out>/heldout-acts): FVU over all tokens and over the typical ones (norm at most 10x the median, as the core eval
defines them) and L0, each with a bootstrap interval over held-out contexts; --core adds the core eval (CE loss
recovered, KL: a model forward per SAE). --option key=value (repeatable) sets an architecture option on the SAEs that take it, e.g.
`--option jumprelu_bandwidth=0.01`. ReLU and JumpReLU are steered to L0 k (target_l0); the others take k. Training
and evals resume: an SAE already trained or scored is not redone. Prints one Markdown row per SAE and writes the table to
<out>/table.md. Ends with `RESULT saes=... seconds=...`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from saelab import SAESpec, TrainConfig, train
from saelab.activations import ActivationStore
from saelab.evals.core import MASSIVE, CoreConfig
from saelab.evals.intervals import bootstrap_interval
from saelab.evals.suite import read_suite, run_suite
from saelab.sae import sae_class

CORE_METRICS = (("CE recovered", "core: model_performance_preservation.ce_loss_score"),
                ("KL score", "core: model_behavior_preservation.kl_div_score"))


def spec(arch: str, k: int, width: int, lr_scale: float, options: dict) -> SAESpec:
    """The SAE of `arch` at sparsity k, at lr_scale times its default learning rate, with the options it takes."""
    architecture = sae_class(arch)
    own = {key: value for key, value in options.items() if key in architecture.options_cls.names()}
    if not architecture.takes_k:
        own.setdefault("target_l0", float(k))
    base = SAESpec(arch=arch, width=width, k=k if architecture.takes_k else None, options=own)
    return SAESpec(arch=arch, width=width, k=base.k, options=own, lr=base.learning_rate * lr_scale)


def run_name(steps: int, lr_scale: float, betas: tuple[float, float], options: dict) -> str:
    parts = [f"steps{steps}", f"lr{lr_scale:g}"] + ([f"b1-{betas[0]:g}"] if betas[0] != 0.9 else [])
    return "-".join(parts + [f"{key}{value}" for key, value in sorted(options.items())])


def parse_option(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


def held_out_rows(acts: str, folder: Path, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [N, d] of the text after the cache, and each row's context; cached once under `folder`."""
    store = ActivationStore(acts)
    if not (folder / "manifest.json").exists() or not ActivationStore(folder).n_tokens:
        from saelab.activations import cache_activations
        from saelab.models import load_model

        cache_activations(load_model(store.model_name), store.hooks, folder, text=store.held_out_text(),
                          tokens=tokens, progress=False)
    held_out = ActivationStore(folder)
    batches = list(held_out.in_order())
    return (torch.cat([b.acts[store.hooks[0]] for b in batches]).double(),
            torch.cat([b.contexts for b in batches]))


@torch.no_grad()
def score(sae, x: torch.Tensor, contexts: torch.Tensor) -> dict:
    """L0 and FVU over all and over typical tokens, each with a bootstrap interval over held-out contexts."""
    codes = sae.encode(x.float())
    error = (x - sae.decode(codes).double()).square().sum(-1)
    norms = x.norm(dim=-1)
    typical = norms <= MASSIVE * norms.median()
    _, context = contexts.unique(return_inverse=True)
    n = int(context.max()) + 1

    def sums(mask: torch.Tensor) -> torch.Tensor:
        """Per context: rows, error, sum of x, sum of |x|^2 (FVU is recomputed from resampled sums)."""
        out = torch.zeros(n, 3 + x.shape[1], dtype=torch.float64)
        m = mask.double()
        out[:, 0].index_add_(0, context, m)
        out[:, 1].index_add_(0, context, error * m)
        out[:, 2].index_add_(0, context, x.square().sum(-1) * m)
        out[:, 3:].index_add_(0, context, x * m[:, None])
        return out

    def fvu(units: torch.Tensor) -> float:
        total = units.sum(0)
        return float(total[1] / (total[2] - total[3:].square().sum() / total[0]))

    l0 = torch.zeros(n, 2, dtype=torch.float64)
    l0[:, 0].index_add_(0, context, torch.ones_like(error))
    l0[:, 1].index_add_(0, context, (codes > 0).sum(-1).double())
    return {"L0": bootstrap_interval(l0, lambda u: float(u[:, 1].sum() / u[:, 0].sum())),
            "FVU typical": bootstrap_interval(sums(typical), fvu),
            "FVU all": bootstrap_interval(sums(torch.ones_like(typical)), fvu)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--acts", default="runs/quickstart/acts")
    parser.add_argument("--out", default="runs/recipe")
    parser.add_argument("--archs", default="topk,batchtopk,jumprelu,relu,matryoshka")
    parser.add_argument("--ks", default="32")
    parser.add_argument("--width", type=int, default=4608)
    parser.add_argument("--lr-scales", default="1")
    parser.add_argument("--steps", default="132", help="run lengths in steps of --batch-size tokens")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--beta1", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--option", action="append", default=[], help="key=value, on the SAEs that take it")
    parser.add_argument("--heldout-tokens", type=int, default=16384)
    parser.add_argument("--heldout-acts", default=None, help="default: <out>/heldout-acts")
    parser.add_argument("--core", action="store_true", help="also run the core eval (CE loss recovered, KL)")
    parser.add_argument("--core-tokens", type=int, default=4096)
    args = parser.parse_args()
    started = time.perf_counter()
    out = Path(args.out)
    options = dict(parse_option(text) for text in args.option)
    betas = (args.beta1, 0.99)
    archs, ks = args.archs.split(","), [int(k) for k in args.ks.split(",")]
    print(f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; cache {args.acts}; out {out}", flush=True)
    x, contexts = held_out_rows(args.acts, Path(args.heldout_acts or out / "heldout-acts"), args.heldout_tokens)
    print(f"held out: {len(x)} tokens in {len(contexts.unique())} contexts", flush=True)
    names = ["L0", "FVU typical", "FVU all"] + ([name for name, _ in CORE_METRICS] if args.core else [])
    rows = []
    for steps in (int(s) for s in args.steps.split(",")):
        for lr_scale in (float(s) for s in args.lr_scales.split(",")):
            folder = out / run_name(steps, lr_scale, betas, options)
            specs = [spec(arch, k, args.width, lr_scale, options) for arch in archs for k in ks]
            config = TrainConfig(tokens=steps * args.batch_size, batch_size=args.batch_size, seed=args.seed,
                                 adam_betas=betas, allow_diverged=True)  # a study reports a bad recipe
            tick = time.perf_counter()
            trained = train(args.acts, specs, config, out=folder, progress=False)
            print(f"{folder.name}: {len(trained)} SAEs trained in {time.perf_counter() - tick:.0f} s "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
            unscored = [sae.folder for sae in trained if not (sae.folder / "evals" / "core.json").exists()]
            if args.core and unscored:  # one call: the suite loads the model once for all of them
                held_out = ActivationStore(args.acts).held_out_text()
                run_suite(unscored, ["core"], progress=False,
                          configs={"core": CoreConfig(text=held_out, tokens=args.core_tokens)})
            for sae in trained:
                values = score(sae.sae, x, contexts)
                if args.core:
                    headline = read_suite([sae.folder])[0].headline()
                    values.update({name: headline.get(key) for name, key in CORE_METRICS})
                (sae.folder / "recipe_study.json").write_text(json.dumps(
                    {name: [v.estimate, v.low, v.high] for name, v in values.items() if v is not None}))
                rows.append((sae.folder.name, steps, lr_scale, [values.get(name) for name in names]))
                print(f"  {sae.folder.name}: " + ", ".join(f"{n} {v}" for n, v in zip(names, rows[-1][3])), flush=True)
    table = "\n".join(["| SAE | steps | lr scale | " + " | ".join(names) + " |", "|" + "---|" * (3 + len(names))]
                      + [f"| {name} | {steps} | {lr:g} | " + " | ".join(str(v) for v in values) + " |"
                         for name, steps, lr, values in rows])
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    print(table)
    print(f"RESULT saes={len(rows)} seconds={time.perf_counter() - started:.1f}")


if __name__ == "__main__":
    main()
