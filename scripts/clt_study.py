"""A cross-layer transcoder against per-layer transcoders of the same total width and the same L0 summed over layers:
over contiguous layers, one CLT (each layer's MLP input joined, each layer's MLP output joined, cross_layer) and one
transcoder per layer, all BatchTopK (exported as JumpReLU, so each layer's codes depend on that layer's input alone
and the replacement model is one forward), trained in one run over one cache. Scored on the text after the cache:
each layer's target FVU (inputs clean) and held-out L0, and the replacement model (every layer's MLP output replaced
at once) against the clean model and against zero-ablating all those MLP outputs.

    saelab cache --model smollm2-135m --hooks 'blocks.{3,4,5,6,7,8}.mlp.hook_in,blocks.{3,4,5,6,7,8}.hook_mlp_out' \\
        --text ../shared/data/wikitext-2-raw/wiki.test.raw --tokens 100k --batch-size 16 --out runs/clt/acts
    python scripts/clt_study.py --acts runs/clt/acts --out runs/clt

Prints one Markdown row per layer and per replacement model.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from saelab import SAESpec, TrainConfig, train
from saelab.activations import ActivationStore
from saelab.activations.joined import JoinedSource

HEADER = "| layer | dictionary | target FVU | L0 |\n|---|---|---|---|"
REPLACEMENT_HEADER = ("| replacement model | CE clean | CE replaced | CE zero-abl. | CE recovered | KL | KL zero-abl. |\n"
                      "|---|---|---|---|---|---|---|")


def held_out_acts(model, text, hooks: list[str], tokens: int) -> dict[str, torch.Tensor]:
    """{hook: [rows, d]} raw activations of the held-out text (real tokens after each context's BOS)."""
    from saelab.evals.core import _context_batches

    acts: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    for ids, mask in _context_batches(model, text, tokens, 8):
        got = model.activations(ids, hooks, flatten=True)
        keep = mask.clone()
        keep[:, 0] = False
        for hook in hooks:
            acts[hook].append(got[hook][keep.to(got[hook].device)].float().cpu())
    return {hook: torch.cat(rows) for hook, rows in acts.items()}


def fvu_and_l0(y: torch.Tensor, y_hat: torch.Tensor, codes: torch.Tensor) -> tuple[float, float]:
    y, y_hat = y.double(), y_hat.double()
    return float((y - y_hat).square().sum() / (y - y.mean(0)).square().sum()), float((codes != 0).sum(1).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--acts", default="runs/clt/acts", help="a cache holding every layer's MLP input and output")
    parser.add_argument("--out", default="runs/clt")
    parser.add_argument("--layers", default="3,4,5,6,7,8")
    parser.add_argument("--width", type=int, default=512, help="latents per layer (the CLT has layers x width)")
    parser.add_argument("--k", type=int, default=16, help="L0 per layer (the CLT's k is layers x k)")
    parser.add_argument("--epochs", type=float, default=1.0, help="training tokens, in passes over the cache")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens, after the cache")
    args = parser.parse_args()
    from saelab.evals.clt import clt_fvu, clt_replacement_metrics, group_codes
    from saelab.evals.replacement import replacement_metrics
    from saelab.models import load_model

    layers = [int(layer) for layer in args.layers.split(",")]
    inputs, targets = [f"blocks.{n}.mlp.hook_in" for n in layers], [f"blocks.{n}.hook_mlp_out" for n in layers]
    store = ActivationStore(args.acts, batch_size=args.batch_size, seed=args.seed)
    source = JoinedSource(JoinedSource(store, inputs), targets)
    held_out, model = store.held_out_text(), load_model(store.model_name)
    tokens = int(args.epochs * store.n_tokens)
    print(f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; cache {args.acts} ({store.n_tokens:,} tokens); "
          f"training {tokens:,} tokens in batches of {args.batch_size}; held-out {args.eval_tokens:,} tokens",
          flush=True)
    n = len(layers)
    specs = [SAESpec(arch="batchtopk", width=n * args.width, k=n * args.k, hook=source.hooks[-2],
                     target_hook=source.hooks[-1], options={"cross_layer": True})]
    specs += [SAESpec(arch="batchtopk", width=args.width, k=args.k, hook=i, target_hook=t)
              for i, t in zip(inputs, targets)]
    started = time.perf_counter()
    clt, *per_layer = train(source, specs, TrainConfig(tokens=tokens, batch_size=args.batch_size, seed=args.seed),
                            out=Path(args.out) / "run", progress=False)
    print(f"trained the CLT and {len(per_layer)} transcoders ({clt.steps} steps) in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    acts = held_out_acts(model, held_out, [*inputs, *targets], args.eval_tokens)
    rows, clt_sae = [], clt.sae
    with torch.no_grad():
        fvus = clt_fvu(clt_sae, [acts])
        raw = clt_sae.fold_input_scale()
        for g, (layer, i, t, tc) in enumerate(zip(layers, inputs, targets, per_layer)):
            l0 = float((group_codes(raw, g, acts[i]) != 0).sum(1).float().mean())
            rows.append(f"| {layer} | CLT | {fvus[t]:.3f} | {l0:.1f} |")
            codes = tc.sae.encode(acts[i])
            fvu, l0 = fvu_and_l0(acts[t], tc.sae.decode(codes), codes)
            rows.append(f"| {layer} | transcoder | {fvu:.3f} | {l0:.1f} |")
    replaced = []
    for name, evaluate in (("CLT", lambda: clt_replacement_metrics(clt_sae, model, held_out, tokens=args.eval_tokens,
                                                                    progress=False)),
                           ("per-layer transcoders", lambda: replacement_metrics(
                               [t.sae for t in per_layer], model, held_out, tokens=args.eval_tokens, progress=False))):
        started = time.perf_counter()
        m = evaluate()
        replaced.append(f"| {name} | {m.ce_clean:.3f} | {m.ce_sae:.3f} | {m.ce_zero:.3f} | {m.ce_loss_recovered:.3f} "
                        f"| {m.kl_sae:.3f} | {m.kl_zero:.3f} |")
        print(f"replacement model ({name}) in {time.perf_counter() - started:.0f} s", flush=True)
    print("\n".join([HEADER, *rows, "", REPLACEMENT_HEADER, *replaced]))


if __name__ == "__main__":
    main()
