"""The figures and tables of docs/probes.md: three concepts from offline text on SmolLM2-135M-Instruct and Gemma 3 270M.

Per model: cache 64k tokens of WikiText at one layer and train a small TopK SAE there with saelab's Python API;
probe residual dimensions at four layers, that layer's MLP neurons and the SAE's latents for genre (Wikipedia /
Shakespeare / Python docs), calendar words (day and month names vs other nouns in templates) and languages
(iso-codes' country and language names in de / fr / es / it / nl); then sweep a steering strength along the
calendar direction, measuring the target effect and the side effects on unrelated text.

    nice -n 10 python scripts/probe_report.py --out docs/probes   # 25-60 min on a shared 2-core CPU
    python scripts/probe_report.py --models /path/to/tiny:0,1:1 --quick --out /tmp/report   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import saelab
from saelab.analysis import (CausalInnerProduct, Features, LogitDiff, ProbeConfig, Steer, WordFrequency, builtin,
                             concept_direction, neuron_hook, run_probes, sweep, word_pair_direction)
from saelab.analysis.concepts import DAYS, MONTHS
from saelab.analysis.report import position_of
from saelab.analysis.steering import side_passages
from saelab.options import add_flags, flag_values

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MODELS = ["smollm2-135m:4,8,12,16:12", "gemma-3-270m:3,6,9,12:9"]
PROMPTS = ["I will see you on", "The next meeting is on", "We are going to the", "It all started with",
           "My favourite thing is", "They wrote a letter about"]
GEN_PROMPTS = ["Let me tell you about my plans for", "The best time to visit is", "She said that the party is"]
OTHERS = [" London", " Paris", " table", " house", " water", " Robert"]
PROBE_FLAGS = ["k", "positions", "seed"]
REPORT_KS = [1, 2, 4, 8, 16, 32]
"""The report's sparse probe sizes: ProbeConfig's, and 32 beside them (where the SAE's curves level off)."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def one_token(model, words):
    return [w for w in words if len(model.tokenizer(w, add_special_tokens=False)["input_ids"]) == 1]


def train_sae(model, hook: str, folder: Path, quick: bool):
    """A small TopK SAE on WikiText activations at `hook` (cached once; reruns reuse cache and SAE)."""
    sae_folder = folder / "sae" / hook / "topk-4608-k32"
    if (sae_folder / "cfg.json").exists():
        return saelab.load_sae(sae_folder)
    text = saelab.TextConfig(source=str(SHARED / "wikitext-2-raw" / "wiki.test.raw"), context_len=128)
    tokens = 20_000 if quick else 64_000
    saelab.cache_activations(model, hook, folder / "acts", text=text, tokens=tokens)
    config = saelab.TrainConfig(tokens=(50 if quick else 200) * 2048, batch_size=2048)
    (trained,) = saelab.train(folder / "acts", [dict(arch="topk", width=512 if quick else 4608, k=32)], config,
                              out=folder / "sae", progress=False, model=model, eval_text=text.after(tokens // 128),
                              eval_tokens=2048)
    log(f"SAE at {hook}: {json.dumps({k: round(v, 4) for k, v in trained.metrics.metrics().items() if v is not None})}")
    return trained.sae


def steering_section(model, sae_hook: str, theta: torch.Tensor, words: int, quick: bool, runs: Path,
                     out: Path) -> tuple[str, list[str]]:
    """Sweep a steering strength along the calendar direction at the SAE's layer (alpha in units of the mean
    residual norm): the target, the generated words and the side effects, as a Markdown section."""
    side = side_passages(str(SHARED / "tinyshakespeare" / "input.txt"), 6 if quick else 16, words)
    steer = Steer.direction(model, sae_hook, theta, side)
    up = one_token(model, [" " + w for w in DAYS + MONTHS]) or [" the"]  # (the tiny test model has none)
    target = LogitDiff(PROMPTS, up=up, down=one_token(model, OTHERS), name="logit(day/month) - logit(other)")
    alphas = [0, 0.125, 0.25, 0.5, 1, 2]
    result = sweep(model, steer, alphas, target, side, batch_size=4, log=log)
    generated = WordFrequency(GEN_PROMPTS, DAYS + MONTHS, n_new=10, name="day/month share of generated words")
    freq = {a: generated.measure(model, steer.patch(a) if a else None) for a in alphas}
    gens = {}
    for a in (0, 0.5, 1):
        generated.measure(model, steer.patch(a) if a else None)
        gens[a] = generated.samples[0]
    result.save(runs, "steering")
    short = runs.name
    result.plot(out / f"{short}_steering.png", title=f"{model.name}: {steer.describe()}")
    lines = [f"Steering along the calendar difference of means at {sae_hook} (alpha x {steer.norm:.1f}, the mean "
             f"residual norm there; KL and CE on {result.side_tokens} tokens of Shakespeare, clean CE "
             f"{result.ce_clean:.3f}):\n",
             "| alpha | logit(day/month) - logit(other) | day/month share of generated words | KL (nats) | CE |",
             "|---|---|---|---|---|"]
    lines += [f"| {p.alpha:g} | {p.target:.2f} | {freq[p.alpha]:.3f} | {p.kl:.3f} | {p.ce:.3f} |"
              for p in result.points]
    lines += ["", *(f"- alpha {a:g}: {GEN_PROMPTS[0]!r} -> {g!r}" for a, g in gens.items()), ""]
    return "\n".join(lines), up


def causal_section(model, sae_hook: str, theta: torch.Tensor, up: list[str]) -> str:
    """Park et al.'s causal inner product: the calendar direction vs an unembedding concept direction."""
    causal = CausalInnerProduct.from_model(model)
    pairs = [(o, d) for o, d in zip(one_token(model, OTHERS) or [" a"], up)]
    gamma = word_pair_direction(model, pairs)
    return (f"Cosine of the calendar direction at {sae_hook} with the unembedding direction "
            f"mean(gamma(day/month) - gamma(other)): Euclidean "
            f"{float(torch.nn.functional.cosine_similarity(theta.double(), gamma, dim=0)):.3f}, "
            f"causal inner product {causal.cosine(theta, gamma):.3f}; with the causal direction "
            f"Cov(gamma)^-1 gamma: {float(torch.nn.functional.cosine_similarity(theta, causal.embed(gamma), dim=0)):.3f}\n")


def build_parser() -> argparse.ArgumentParser:
    """The report's own flags, and the probe settings it lets through from ProbeConfig (defaults and help from
    ProbeConfig, except k: REPORT_KS)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS, help="name:layers:sae_layer")
    parser.add_argument("--out", default=str(ROOT / "docs" / "probes"))
    parser.add_argument("--runs", default=str(ROOT / "runs" / "probe_report"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    add_flags(parser.add_argument_group("probes (ProbeConfig)"), ProbeConfig, PROBE_FLAGS, defaults={"k": REPORT_KS})
    return parser


def main() -> None:
    args = build_parser().parse_args()
    settings = {"k": REPORT_KS, **flag_values(args, PROBE_FLAGS)}
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    sizes = dict(per_label=40, words=20) if args.quick else dict(per_label=100, words=40)
    concepts = {"genre": builtin("genre", SHARED, **sizes), "calendar": builtin("calendar"),
                "languages": builtin("languages")}
    if args.quick:
        concepts["languages"] = concepts["languages"].subset(range(0, len(concepts["languages"]), 4))
    summary = []
    for spec in args.models:
        name, layers, sae_layer = spec.split(":")
        short = Path(name).name
        started = time.perf_counter()
        hooks = [f"blocks.{layer}.hook_resid_post" for layer in layers.split(",")]
        model = saelab.load_model(name)
        log(f"loaded {model}")
        sae_hook = f"blocks.{sae_layer}.hook_resid_post"
        sae = train_sae(model, sae_hook, runs / short, args.quick)
        features = [Features(h) for h in hooks] + [Features(neuron_hook(model, int(sae_layer))), Features(sae=sae)]
        summary.append(f"## {model.name}\n")
        for concept, data in concepts.items():
            config = ProbeConfig(model=name, hooks=";".join(hooks), data=concept, **settings)
            results = run_probes(model, data, features, ks=config.k, positions=position_of(config.positions),
                                 seed=config.seed, log=log)
            results.save(runs / short / concept)
            results.plot(out / f"{short}_{concept}.png", title=f"{concept} on {model.name}")
            summary.append(results.table(ks=(1, 4, 16)))
            log(f"{concept}: {results.seconds:.0f} s")
        data = concepts["calendar"]
        positive = torch.tensor([label == "calendar" for label in data.labels]).long()
        theta = concept_direction(model.activations_at(data.texts, sae_hook, "mean")[sae_hook], positive)
        section, up = steering_section(model, sae_hook, theta, sizes["words"], args.quick, runs / short, out)
        summary += [section, causal_section(model, sae_hook, theta, up)]
        log(f"{model.name} done in {time.perf_counter() - started:.0f} s")
        (out / "summary.md").write_text("\n".join(summary))
        del model
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
