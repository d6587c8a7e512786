"""A crosscoder across two models with different tokenizers (SmolLM2-135M x Gemma 3 270M, residual stream at matched
relative depth), beside its null: the same training on rows where Gemma's side is shuffled against SmolLM2's, so the
two models never read the same text in a row. Reads the model-diffing readouts of each on held-out rows: per-part
FVU, the relative-decoder-norm histogram, shared / exclusive counts, latent scaling's verdict on the exclusive
latents, and the top activating words of a few latents per class (docs/crosscoders.md).

    python scripts/crosscoder_study.py --out runs/crosscoders                     # parts at unit variance
    python scripts/crosscoder_study.py --out runs/crosscoders --part-scale norm   # parts at unit mean squared norm

The aligned rows are cached under --out (rows-train.safetensors, rows-heldout.safetensors) and reused when present;
gathering them is most of the time on a CPU. Trained crosscoders are saved under --out/<part scale>/{real,null}/<arch> and
reused too (delete them to retrain).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from saelab import SAE, TrainConfig, train
from saelab.activations.tensors import TensorSource
from saelab.crosscoder import (JoinedSource, classify, diffing_report, latent_scaling, paired_activations,
                               relative_norm, split, unpaired)
from saelab.errors import TrainingError
from saelab.sae import estimate_input_scale

MASSIVE = 10.0
"""A row is massive where a part's norm exceeds this many times its median norm (saelab.evals.core.MASSIVE)."""


def paired_rows(args, which: str, text: str, tokens: int, models: dict) -> TensorSource:
    """The aligned rows of `text`, from the cache file under --out when it is there (models load only if not)."""
    path = Path(args.out) / f"rows-{which}.safetensors"
    if path.exists():
        return TensorSource.load(path, batch_size=args.batch_size)
    if not models:
        from saelab.models import load_model
        models.update(a=load_model(args.model_a), b=load_model(args.model_b))
    started = time.perf_counter()
    rows = paired_activations(models["a"], args.hook_a, models["b"], args.hook_b, text, tokens=tokens,
                              batch_size=args.batch_size, progress=False)
    print(f"gathered {rows.n:,} aligned {which} rows from {text} in {time.perf_counter() - started:.0f} s",
          flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows.save(path)
    return rows


def paired_hooks(args) -> list[str]:
    """Model A's and model B's hook names in the rows, in that order (a safetensors file keeps its own order)."""
    return [f"{Path(args.model_a).name}:{args.hook_a}", f"{Path(args.model_b).name}:{args.hook_b}"]


def centred_scale(x: torch.Tensor) -> float:
    """The scale giving a part unit mean squared distance from its mean: a part whose norm is mostly one constant
    direction (Gemma's residual stream) then weighs in the loss by what varies, as much as the other part."""
    return float((x.float() - x.float().mean(0)).square().sum(1).mean().rsqrt())


def crosscoder(rows: TensorSource, folder: Path, arch: str, args) -> SAE | None:
    """The `arch` crosscoder trained on `rows` (saved under `folder`), or loaded from there; None if it diverged."""
    saved = [path.parent for path in folder.glob("**/cfg.json") if path.parent.name.split("-")[0] == arch]
    if saved:
        return SAE.load(saved[0])
    hooks = paired_hooks(args)
    scale = estimate_input_scale if args.part_scale == "norm" else centred_scale
    scales = [scale(rows.acts[hook].float()) for hook in hooks]
    source = JoinedSource(rows, hooks, seed=args.seed, batch_size=args.batch_size, scales=scales)
    sparsity = dict(k=args.k) if arch in ("topk", "batchtopk") else dict(options=dict(target_l0=float(args.k)))
    rate = {"lr": args.relu_lr} if arch == "relu" else {}
    spec = dict(arch=arch, width=args.width, hook=source.name, **sparsity, **rate)
    config = TrainConfig(tokens=int(args.epochs * rows.n), batch_size=args.batch_size, seed=args.seed, log_every=50,
                         lr_warmup_steps=args.warmup)
    started = time.perf_counter()
    try:
        [trained] = train(source, [spec], config, out=folder / arch, progress=False)
    except TrainingError as error:
        print(f"{arch} on {folder.name} rows: {error}", flush=True)
        return None
    print(f"trained {arch} on {folder.name} rows: {trained.steps} steps in {time.perf_counter() - started:.0f} s",
          flush=True)
    return trained.sae


def part_fvu(x: torch.Tensor, error: torch.Tensor) -> float:
    return float(error.square().sum() / (x - x.mean(0)).square().sum())


@torch.no_grad()
def heldout_readout(sae: SAE, rows: TensorSource) -> dict:
    """Per-part FVU and L0 on `rows`, every latent's codes, and the diffing report and latent scaling. FVU comes
    over all rows and over the typical ones: rows where a part's norm exceeds MASSIVE x its median norm (massive
    activations) are left out of the second, as saelab.evals.core's fvu_typical does for one hook."""
    source = JoinedSource.for_crosscoder(rows, sae, batch_size=rows.batch_size)
    x = torch.cat([batch.acts[source.name].float() for batch in source.in_order([source.name])])
    codes = torch.cat([sae.encode(chunk) for chunk in x.split(rows.batch_size)])
    recon = torch.cat([sae.decode(chunk) for chunk in codes.split(rows.batch_size)])
    inputs, errors = split(sae.cfg.parts, x), split(sae.cfg.parts, x - recon)
    norms = [part.norm(dim=1) for part in inputs]
    typical = torch.stack([n <= MASSIVE * n.median() for n in norms]).all(0)
    rows_in_order = lambda: source.in_order([source.name])  # noqa: E731
    return dict(fvu=[part_fvu(xp, ep) for xp, ep in zip(inputs, errors)],
                fvu_typical=[part_fvu(xp[typical], ep[typical]) for xp, ep in zip(inputs, errors)],
                massive=int((~typical).sum()), l0=float((codes > 0).sum(1).float().mean()), codes=codes,
                report=diffing_report(sae, rows_in_order()), scaling=latent_scaling(sae, rows_in_order()))


def summary_row(name: str, readout: dict) -> str:
    report = readout["report"]
    counts, live = report.counts, report.live
    share = lambda c: f"{counts[c]} ({100 * counts[c] / max(live, 1):.1f} %)"  # noqa: E731
    fvu, typical = readout["fvu"], readout["fvu_typical"]
    return (f"| {name} | {fvu[0]:.3f} / {typical[0]:.3f} | {fvu[1]:.3f} / {typical[1]:.3f} | {readout['massive']} "
            f"| {readout['l0']:.1f} | {live} "
            f"| {share('a-only')} | {share('b-only')} | {share('shared')} | {share('between')} "
            f"| {report.confirmed['a-only']} / {counts['a-only']} "
            f"| {report.confirmed['b-only']} / {counts['b-only']} |")


SUMMARY_HEADER = ("| crosscoder | held-out FVU A (all / typical) | FVU B (all / typical) | massive rows | L0 | live "
                  "| A-only | B-only | shared | between | A-only confirmed | B-only confirmed |\n"
                  "|---|---|---|---|---|---|---|---|---|---|---|---|")


def histogram_table(readouts: dict[str, dict]) -> str:
    """Live latents per relative-norm bin (0: writes only to A, 1: only to B), one column per crosscoder."""
    names = list(readouts)
    bins = len(next(iter(readouts.values()))["report"].histogram)
    lines = ["| relative norm | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i in range(bins):
        counts = [readouts[name]["report"].histogram[i] for name in names]
        lines.append(f"| {i / bins:.2f}-{(i + 1) / bins:.2f} | " + " | ".join(map(str, counts)) + " |")
    return "\n".join(lines)


def example_latents(sae: SAE, readout: dict, count: int, seed: int) -> dict[str, list[int]]:
    """A few latents per class, drawn at random among those firing on 8 held-out rows or more (not the top firing,
    which would pick the most generic ones); exclusive ones only where latent scaling confirms them. Where no
    latent is exclusive, the most A-leaning and most B-leaning ones stand in, labelled so."""
    fires = (readout["codes"] > 0).sum(0)
    relative = relative_norm(sae)
    by_norm, by_fit = classify(relative), classify(readout["scaling"].relative())
    order = torch.randperm(len(fires), generator=torch.Generator().manual_seed(seed)).tolist()
    picked = {}
    for name in ("a-only", "b-only", "shared"):
        wanted = [j for j in order if fires[j] >= 8 and by_norm[j] == name and (name == "shared" or by_fit[j] == name)]
        picked[name] = wanted[:count]
    frequent = [j for j in relative.argsort().tolist() if fires[j] >= 8]
    if not picked["a-only"]:
        picked["most A-leaning"] = frequent[:count]
    if not picked["b-only"]:
        picked["most B-leaning"] = frequent[::-1][:count]
    return {name: latents for name, latents in picked.items() if latents}


def top_words(readout: dict, latent: int, token_ids, tokenizer, top: int = 8, context: int = 3) -> str:
    """The rows where `latent` fires most, each as model A's last tokens of the words before it and [its own]."""
    values, rows = readout["codes"][:, latent].topk(top)
    shown = []
    for value, row in zip(values.tolist(), rows.tolist()):
        before = "".join(tokenizer.decode([t]) for t in token_ids[max(row - context, 0):row].tolist())
        word = tokenizer.decode([int(token_ids[row])])
        shown.append(f"`{(before[-24:] + '[' + word + ']').strip()}` {value:.3g}".replace("|", "\\|"))
    return "; ".join(shown)


def examples_table(sae: SAE, readout: dict, rows: TensorSource, tokenizer, count: int, seed: int) -> str:
    relative = relative_norm(sae)
    fitted = readout["scaling"].relative()
    fires = (readout["codes"] > 0).sum(0)
    lines = ["| class | latent | rel. norm | fitted rel. norm | held-out fires "
             "| top 8 rows (A's tokens before, [the row's]) |",
             "|---|---|---|---|---|---|"]
    for name, latents in example_latents(sae, readout, count, seed).items():
        for j in latents:
            lines.append(f"| {name} | {j} | {relative[j]:.2f} | {fitted[j]:.2f} | {int(fires[j])} "
                         f"| {top_words(readout, j, rows.token_ids, tokenizer)} |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/crosscoders")
    parser.add_argument("--model-a", default="smollm2-135m")
    parser.add_argument("--hook-a", default="blocks.12.hook_resid_post")
    parser.add_argument("--model-b", default="gemma-3-270m")
    parser.add_argument("--hook-b", default="blocks.7.hook_resid_post")
    parser.add_argument("--train-text", default="/work/reference/corpus/train.txt")
    parser.add_argument("--heldout-text", default="/work/reference/corpus/heldout.txt")
    parser.add_argument("--train-rows", type=int, default=14_000)
    parser.add_argument("--heldout-rows", type=int, default=6_000)
    parser.add_argument("--archs", default="batchtopk", help="crosscoder architectures, trained side by side")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32, help="BatchTopK's k; the L1 crosscoder is steered to this L0")
    parser.add_argument("--epochs", type=float, default=4.0, help="training rows, in passes over the train rows")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--relu-lr", type=float, default=4e-4, help="the L1 crosscoder's learning rate")
    parser.add_argument("--warmup", type=int, default=20, help="learning-rate warm-up steps")
    parser.add_argument("--part-scale", choices=("norm", "variance"), default="variance",
                        help="each part at unit mean squared norm (JoinedSource's default) or unit variance")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples", type=int, default=3, help="latents shown per class")
    parser.add_argument("--rows-only", action="store_true", help="gather and cache the aligned rows, then stop")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    models: dict = {}
    print(f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}", flush=True)
    heldout = paired_rows(args, "heldout", args.heldout_text, args.heldout_rows, models)
    rows = paired_rows(args, "train", args.train_text, args.train_rows, models)
    if args.rows_only:
        return
    hook_b = paired_hooks(args)[1]
    sources = {"real": (rows, heldout),
               "null": (unpaired(rows, hook_b, seed=args.seed), unpaired(heldout, hook_b, seed=args.seed))}
    readouts, trained = {}, {}
    for kind, (train_rows, heldout_rows) in sources.items():
        for arch in args.archs.split(","):
            sae = crosscoder(train_rows, Path(args.out) / args.part_scale / kind, arch, args)
            if sae is None:
                continue
            trained[f"{arch} {kind}"] = sae
            readouts[f"{arch} {kind}"] = heldout_readout(sae, heldout_rows)
    print(f"\n{rows.n:,} train rows x {args.epochs:g} epochs, batch {args.batch_size}, width {args.width}, "
          f"k / target L0 {args.k}, parts at unit {args.part_scale}; {heldout.n:,} held-out rows "
          "(the null's: B shuffled against A there too)\n")
    print("\n".join([SUMMARY_HEADER, *(summary_row(name, r) for name, r in readouts.items())]) + "\n")
    print(histogram_table(readouts) + "\n")
    from saelab.models import load_model
    tokenizer = models["a"].tokenizer if models else load_model(args.model_a).tokenizer
    for arch in [arch for arch in args.archs.split(",") if f"{arch} real" in trained]:
        print(f"{arch}, real rows:\n" + examples_table(trained[f"{arch} real"], readouts[f"{arch} real"], heldout,
                                                      tokenizer, args.examples, args.seed) + "\n")


if __name__ == "__main__":
    main()
