"""Transcoders against SAEs on real activations: at each layer, a TopK transcoder from the MLP's input to its output,
the same with a linear skip path, and a TopK SAE on the MLP's output (same width and k), all trained in one run over
one activation cache, each scored on the text after the cache (never trained on): the target's FVU and L0, and the
next-token loss with that layer's MLP output replaced (CE loss recovered, the CE increase over the clean model, KL).
Then the replacement model: every layer's transcoder replaced at once (saelab.evals.replacement).

    saelab cache --model smollm2-135m --hooks 'blocks.{3,12,20}.mlp.hook_in,blocks.{3,12,20}.hook_mlp_out' \\
        --text ../shared/data/wikitext-2-raw/wiki.test.raw --tokens 200k --batch-size 16 --out runs/transcoders/acts
    python scripts/transcoder_study.py --acts runs/transcoders/acts --out runs/transcoders

Prints one Markdown row per dictionary and per replacement model (docs/transcoders.md).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from saelab import SAESpec, TrainConfig, train
from saelab.activations import ActivationStore

KINDS = ("transcoder", "skip transcoder", "SAE on MLP out")
HEADER = ("| layer | dictionary | target FVU | L0 | CE clean | CE replaced | CE increase | CE zero-abl. increase "
          "| CE recovered | KL | KL zero-abl. |\n|---|---|---|---|---|---|---|---|---|---|---|")


def mlp_hooks(layer: int) -> tuple[str, str]:
    """The MLP's input and output hooks of a block (TransformerLens names)."""
    return f"blocks.{layer}.mlp.hook_in", f"blocks.{layer}.hook_mlp_out"


def dictionary_specs(layers: list[int], width: int, k: int) -> list[SAESpec]:
    """Per layer, in KINDS order: transcoder, skip transcoder, SAE on the MLP output."""
    specs = []
    for layer in layers:
        mlp_in, mlp_out = mlp_hooks(layer)
        specs += [SAESpec(arch="topk", width=width, k=k, hook=mlp_in, target_hook=mlp_out),
                  SAESpec(arch="topk", width=width, k=k, hook=mlp_in, target_hook=mlp_out, options={"skip": True}),
                  SAESpec(arch="topk", width=width, k=k, hook=mlp_out)]
    return specs


def kind_of(sae) -> tuple[int, str]:
    """(layer, one of KINDS) of a trained dictionary, from the hook it reconstructs."""
    if not sae.cfg.is_transcoder:
        return int(sae.cfg.hook_name.split(".")[1]), KINDS[2]
    return int(sae.cfg.target_hook.split(".")[1]), KINDS[1] if sae.cfg.skip else KINDS[0]


def row(layer: str, kind: str, spliced, fvu: float | None = None, l0: float | None = None) -> str:
    """One Markdown row: reconstruction of the target (when measured) and the spliced next-token loss."""
    def num(value, digits=3):
        return "–" if value is None else f"{value:.{digits}f}"

    return (f"| {layer} | {kind} | {num(fvu)} | {num(l0, 1)} | {num(spliced.ce_clean)} | {num(spliced.ce_sae)} "
            f"| {num(spliced.ce_sae - spliced.ce_clean)} | {num(spliced.ce_zero - spliced.ce_clean)} "
            f"| {num(spliced.ce_loss_recovered)} | {num(spliced.kl_sae)} | {num(spliced.kl_zero)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--acts", default="runs/transcoders/acts", help="a cache holding both hooks of every layer")
    parser.add_argument("--out", default="runs/transcoders")
    parser.add_argument("--layers", default="3,12,20")
    parser.add_argument("--width", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--epochs", type=float, default=0.5, help="training tokens, in passes over the cache")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens, after the cache")
    args = parser.parse_args()
    from saelab.evals.replacement import replacement_metrics
    from saelab.models import load_model

    store, layers = ActivationStore(args.acts), [int(layer) for layer in args.layers.split(",")]
    held_out, model = store.held_out_text(), load_model(store.model_name)
    tokens = int(args.epochs * store.n_tokens)
    print(f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; cache {args.acts} ({store.n_tokens:,} tokens); "
          f"training {tokens:,} tokens in batches of {args.batch_size}; held-out {args.eval_tokens:,} tokens",
          flush=True)
    started = time.perf_counter()
    trained = train(args.acts, dictionary_specs(layers, args.width, args.k),
                    TrainConfig(tokens=tokens, batch_size=args.batch_size, seed=args.seed), out=Path(args.out) / "run",
                    model=model, eval_text=held_out, eval_tokens=args.eval_tokens, progress=False)
    print(f"trained and evaluated {len(trained)} dictionaries ({trained[0].steps} steps) in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    ordered = sorted(trained, key=lambda t: (kind_of(t.sae)[0], KINDS.index(kind_of(t.sae)[1])))
    rows = [row(str(kind_of(t.sae)[0]), kind_of(t.sae)[1], t.metrics.spliced, t.metrics.reconstruction.fvu,
                t.metrics.reconstruction.l0) for t in ordered]
    for skip, kind in ((False, "transcoder"), (True, "skip transcoder")):
        transcoders = [t.sae for t in trained if t.sae.cfg.is_transcoder and t.sae.cfg.skip == skip]
        started = time.perf_counter()
        spliced = replacement_metrics(transcoders, model, held_out, tokens=args.eval_tokens, progress=False)
        rows.append(row(args.layers.replace(",", "+"), f"{kind}s, all at once", spliced))
        print(f"replacement model ({kind}s) in {time.perf_counter() - started:.0f} s", flush=True)
    print("\n".join([HEADER, *rows]))


if __name__ == "__main__":
    main()
