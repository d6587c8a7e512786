"""Stage 1 of docs/matching.md: cache WikiText activations and train the TopK SAEs that scripts/match_report.py
matches (SmolLM2-135M at blocks 10 and 20, Gemma 3 270M at blocks 6 and 12; a second seed at SmolLM2 block 10 for
the same-model baseline). Reruns reuse what exists.

    nice -n 5 python scripts/match_report_train.py             # ~30-40 min on a shared 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import saelab

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MODELS = {"smollm2-135m": (10, 20), "gemma-3-270m": (6, 12)}
SEED_BASELINE = ("smollm2-135m", 10)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=str(ROOT / "runs" / "match_report"))
    parser.add_argument("--tokens", type=int, default=120_000, help="cached tokens per model")
    parser.add_argument("--train-tokens", type=int, default=400_000)
    parser.add_argument("--width", type=int, default=4608)
    args = parser.parse_args()
    text = saelab.TextConfig(source=str(SHARED / "wikitext-2-raw" / "wiki.test.raw"), context_len=128)
    for name, layers in MODELS.items():
        folder = Path(args.runs) / name
        hooks = [f"blocks.{layer}.hook_resid_post" for layer in layers]
        seeds = [0, 1] if name == SEED_BASELINE[0] else [0]
        if all((folder / f"sae-seed{s}" / hooks[0] / f"topk-{args.width}-k32" / "cfg.json").exists() for s in seeds):
            continue
        model = saelab.load_model(name)
        log(f"loaded {model}; caching {args.tokens} tokens at {hooks}")
        saelab.cache_activations(model, hooks, folder / "acts", text=text, tokens=args.tokens, progress=False)
        for seed in seeds:
            specs = [dict(arch="topk", width=args.width, k=32, hook=h) for h in hooks
                     if seed == 0 or h == f"blocks.{SEED_BASELINE[1]}.hook_resid_post"]
            config = saelab.TrainConfig(tokens=args.train_tokens, batch_size=2048, seed=seed)
            trained = saelab.train(folder / "acts", specs, config, out=folder / f"sae-seed{seed}", progress=False,
                                   model=model, eval_text=text.after(args.tokens // 128 + 1), eval_tokens=4096)
            for t in trained:
                metrics = {k: round(v, 4) for k, v in t.metrics.metrics().items() if isinstance(v, float)}
                log(f"{name} {t.hook} seed {seed}: {json.dumps(metrics)}")
        del model


if __name__ == "__main__":
    main()
