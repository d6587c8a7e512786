"""The numbers and figures of docs/matching.md: do SmolLM2-135M-Instruct and Gemma 3 270M learn the same SAE features?

One pass over WikiText-2 (raw test split) runs both models on the same documents and keeps the residual stream
and MLP neurons at two layers each (blocks 7 and 15 of SmolLM2's 30, 4 and 9 of Gemma's 18: relative depths 0.27 / 0.53 and
0.28 / 0.56), at the positions both tokenizers align on (word ends, saelab.analysis.alignment).
The first documents (--train-fraction of the aligned tokens) train a TopK SAE per hook with saelab's trainer (plus a
second seed at SmolLM2 block 7, for the same-model baseline); the remaining, held-out documents are matched:
every SAE of SmolLM2 against every SAE of Gemma (two layer pairs at matched relative depth, two not), MLP neurons
against MLP neurons (the neuron baseline), and the two SmolLM2 seeds (by activation and by decoder alone), each
beside its token-shuffle null and, for SAEs, an untrained twin of B's SAE (the library's baselines, as in
`saelab match`). Every stage is saved under --runs, so a rerun picks up where it stopped.

    nice -n 5 python scripts/match_report.py                           # ~45-60 min on a busy shared 2-core CPU
    python scripts/match_report.py --models /tiny/a:1:1 /tiny/b:1:1 --tokens 3000 --quick --runs /tmp/r --out /tmp/o
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import saelab
from saelab.activations.store import ActivationBatch
from saelab.analysis.alignment import AlignedChunk, Side, aligned_chunks, read_documents
from saelab.analysis.universality import MatchConfig, MatchResults, accumulate, compare_all, with_baselines
from saelab.options import add_flags, flag_values

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MODELS = ["smollm2-135m:7,15:7", "gemma-3-270m:4,9:"]
"""name:layers:layer that also gets a second-seed SAE."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class InMemory:
    """Shuffled batches of stored activations (several hooks of one model), repeated as epochs: a training source."""

    def __init__(self, acts: dict[str, torch.Tensor], model_name: str, batch_size: int, seed: int = 0):
        self.acts, self.model_name, self.batch_size, self.seed = acts, model_name, batch_size, seed
        self.hooks = list(acts)
        self.d = {h: a.shape[1] for h, a in acts.items()}

    def __iter__(self):
        n = len(next(iter(self.acts.values())))
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            order = torch.randperm(n, generator=generator)
            for start in range(0, n - self.batch_size + 1, self.batch_size):
                rows = order[start:start + self.batch_size]
                yield ActivationBatch({h: a[rows].float() for h, a in self.acts.items()}, torch.zeros(len(rows),
                                      dtype=torch.long), rows)


def collect(models, layers, documents, tokens: int, folder: Path, batch_size: int) -> dict:
    """Aligned residual and MLP-neuron activations of both models (float16), their words and documents."""
    store = folder / "aligned.safetensors"
    if store.exists():
        stored = load_file(store)
        meta = json.loads((folder / "aligned.json").read_text())
        return {"acts": stored, **meta}
    sides = [[Side(m, f"blocks.{layer}.{kind}") for layer in ls for kind in ("hook_resid_post", "mlp.hook_post")]
             for m, ls in zip(models, layers)]
    parts: dict[str, list[torch.Tensor]] = {}
    words, docs = [], []
    started = time.perf_counter()
    for chunk in aligned_chunks(sides[0], sides[1], documents, batch_size=batch_size, max_tokens=tokens,
                                progress=lambda n: log(f"  {n} aligned tokens") if n % 2000 < 400 else None):
        for which, features in (("a", chunk.a), ("b", chunk.b)):
            for label, x in features.items():
                parts.setdefault(f"{which}|{label}", []).append(x.half())
        words += chunk.words
        docs += chunk.document.tolist()
    acts = {k: torch.cat(v) for k, v in parts.items()}
    meta = {"words": words, "documents": docs, "seconds": time.perf_counter() - started}
    save_file(acts, store)
    (folder / "aligned.json").write_text(json.dumps(meta))
    log(f"collected {len(words)} aligned tokens in {meta['seconds']:.0f} s")
    return {"acts": acts, **meta}


def train_saes(model, which: str, layers, seed_layer, data: dict, train_rows: torch.Tensor, folder: Path,
               width: int, train_tokens: int, quick: bool) -> dict:
    """TopK SAEs (k=32) per residual hook on the training rows; a second seed at seed_layer."""
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in layers]
    acts = {h: data["acts"][f"{which}|{model.name}:{h}:units"][train_rows] for h in hooks}
    out = {}
    for seed in (0, 1):
        wanted = hooks if seed == 0 else ([f"blocks.{seed_layer}.hook_resid_post"] if seed_layer != "" else [])
        if not wanted:
            continue
        run = folder / f"{Path(model.name).name}-seed{seed}"
        paths = {h: run / h / f"topk-{width}-k32" for h in wanted}
        if not all((p / "cfg.json").exists() for p in paths.values()):
            source = InMemory({h: acts[h] for h in wanted}, model.name, 2048 if not quick else 256, seed)
            config = saelab.TrainConfig(tokens=train_tokens, batch_size=source.batch_size, seed=seed)
            saelab.train(source, [dict(arch="topk", width=width, k=32, hook=h) for h in wanted], config, out=run,
                         progress=False)
        for h, p in paths.items():
            out[(h, seed)] = saelab.load_sae(p)
    return out


def fvu(sae, x: torch.Tensor) -> float:
    with torch.no_grad():
        x = x.float()
        return float(((sae(x) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def build_parser() -> tuple[argparse.ArgumentParser, list[str]]:
    """The report's own flags and every MatchConfig setting (defaults and help from MatchConfig); returns the
    parser and the MatchConfig fields it added."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs=2, default=MODELS)
    parser.add_argument("--text", default=str(SHARED / "wikitext-2-raw" / "wiki.test.raw"))
    parser.add_argument("--tokens", type=int, default=64_000, help="aligned tokens in all (train + match)")
    parser.add_argument("--train-fraction", type=float, default=0.62)
    parser.add_argument("--train-tokens", type=int, default=160_000, help="SAE training tokens (epochs over the split)")
    parser.add_argument("--width", type=int, default=4608)
    parser.add_argument("--runs", default=str(ROOT / "runs" / "match_report"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "matching"))
    parser.add_argument("--quick", action="store_true", help="tiny SAEs, for a smoke run")
    matching = add_flags(parser.add_argument_group("matching (MatchConfig)"), MatchConfig)
    return parser, matching


def held_out_quality(models, saes, data: dict, match_rows: torch.Tensor) -> dict:
    """Each SAE's fraction of variance unexplained on the held-out (matching) rows."""
    quality = {}
    for m, which, trained in zip(models, "ab", saes):
        for (hook, seed), sae in trained.items():
            held_out = data["acts"][f"{which}|{m.name}:{hook}:units"][match_rows]
            quality[f"{m.name}:{hook}:seed{seed}"] = {"fvu_held_out": fvu(sae, held_out)}
            log(f"{m.name} {hook} seed {seed}: held-out FVU {quality[f'{m.name}:{hook}:seed{seed}']['fvu_held_out']:.3f}")
    return quality


def report_sides(models, layers, saes) -> tuple[list[Side], list[Side], list[tuple[Side, Side]]]:
    """Sides A and B (SAEs, second seeds, MLP neurons) and the pairs compared: same kind across models, and each
    second-seed SAE against the first at its hook."""
    sides = []
    for m, ls, trained in zip(models, layers, saes):
        group = []
        for layer in ls:
            hook = f"blocks.{layer}.hook_resid_post"
            group.append(Side(m, hook, trained[(hook, 0)], label=f"{m.name}:{hook}:sae"))
            if (hook, 1) in trained:
                group.append(Side(m, hook, trained[(hook, 1)], label=f"{m.name}:{hook}:sae-seed1"))
        for layer in ls:
            group.append(Side(m, f"blocks.{layer}.mlp.hook_post", label=f"{m.name}:blocks.{layer}.mlp.hook_post:units"))
        sides.append(group)
    sides_a, sides_b = sides
    pairs = [(a, b) for a in sides_a for b in sides_b if (a.sae is None) == (b.sae is None) and
             not a.label.endswith("seed1")]
    pairs += [(a, s) for a in sides_a for s in sides_a if s.label.endswith("seed1") and a.hook == s.hook and a is not s]
    return sides_a, sides_b, pairs


def held_out_chunks(sides_a, sides_b, data: dict, match_rows: torch.Tensor):
    """Held-out aligned rows, 2048 at a time."""
    docs = torch.tensor(data["documents"])
    for start in range(0, len(match_rows), 2048):
        rows = match_rows[start:start + 2048]
        features = {}
        for which, group in (("a", sides_a), ("b", sides_b)):
            features[which] = {s.label: s.features(data["acts"][f"{which}|{s.model.name}:{s.hook}:units"][rows]
                                                   .float()) for s in group}
        yield AlignedChunk(features["a"], features["b"], torch.zeros(len(rows), dtype=torch.long),
                           torch.zeros(len(rows), dtype=torch.long), docs[rows], torch.zeros(len(rows)),
                           [data["words"][int(r)] for r in rows])


def token_shuffle_control(results: MatchResults, models) -> dict:
    """The cross-model comparisons' token-shuffle nulls, by pair (kept in matching.json's alignment record, where
    docs/matching.md points)."""
    cross = [c for c in results.comparisons if c.token_shuffle is not None and
             c.a.startswith(f"{models[0].name}:") and c.b.startswith(f"{models[1].name}:")]
    shuffled_best = {f"{c.a} | {c.b}": {"mean_best_corr_a": c.token_shuffle.mean_best_corr_a,
                                        "frac_best_above_0.5": c.token_shuffle.frac_best_above["0.5"]} for c in cross}
    log(f"token-shuffle control: {json.dumps(shuffled_best)}")
    return shuffled_best


def main() -> None:
    parser, matching = build_parser()
    args = parser.parse_args()
    config = MatchConfig(**flag_values(args, matching))  # a bad setting is refused before any model loads
    runs, out = Path(args.runs), Path(args.out)
    runs.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    specs = [m.split(":") for m in args.models]
    models = [saelab.load_model(name) for name, _, _ in specs]
    layers = [[int(x) for x in ls.split(",")] for _, ls, _ in specs]
    log(f"loaded {models[0]} and {models[1]}")
    documents = read_documents(Path(args.text))
    data = collect(models, layers, documents, args.tokens, runs, batch_size=8)
    docs = torch.tensor(data["documents"])
    cut = int(docs[min(int(args.train_fraction * len(docs)), len(docs) - 1)])
    train_rows, match_rows = (docs < cut).nonzero().squeeze(1), (docs >= cut).nonzero().squeeze(1)
    log(f"{len(train_rows)} training rows (documents < {cut}), {len(match_rows)} held-out rows for matching")

    width = 256 if args.quick else args.width
    saes = [train_saes(m, which, ls, seed_layer, data, train_rows, runs / "sae", width, args.train_tokens,
                       args.quick) for m, which, ls, (_, _, seed_layer) in zip(models, "ab", layers, specs)]
    quality = held_out_quality(models, saes, data, match_rows)
    sides_a, sides_b, pairs, shuffled = with_baselines(*report_sides(models, layers, saes), config)
    started = time.perf_counter()
    acc = accumulate(held_out_chunks(sides_a, sides_b, data, match_rows), sides_a, sides_b, pairs=pairs,
                     shuffled=shuffled, seed=config.seed)
    log(f"correlations over {acc.n_tokens} held-out aligned tokens in {time.perf_counter() - started:.0f} s")
    results = compare_all(acc, [*sides_a, *sides_b], config, log=log, alignment={
        "text": Path(args.text).name, "mode": "word", "model_a": models[0].name, "model_b": models[1].name,
        "train_rows": len(train_rows), "sae_quality": quality, "width": width, "train_tokens": args.train_tokens})
    results.alignment["token_shuffle_control"] = token_shuffle_control(results, models)
    results.save(runs / "results")
    for name in ("similarity.png", "correlation.png", "layers.png", "matching.md", "matching.json"):
        if (runs / "results" / name).exists():
            shutil.copy(runs / "results" / name, out / name)
    log(f"wrote {runs / 'results'} and {out}")


if __name__ == "__main__":
    main()
