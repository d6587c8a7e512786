"""Reference SAEs: TopK SAEs on SmolLM2-135M and Gemma 3 270M, trained to a stated convergence, from one command.

    python scripts/reference_saes.py --plan          # what it would do, and how long, from measured rates
    nohup python scripts/reference_saes.py > runs/reference.log 2>&1 &

Per model: the offline texts are cut into 16k-character chunks and every 20th chunk of each text is held out
(<out>/corpus/heldout.txt), so the held-out slice samples every genre; the rest (<out>/corpus/train.txt) is cached
once, every hook in one forward. One run trains an SAE per hook (seed 0); a second run trains the seed hook again
with seed 1 (matching's seed-vs-seed ceiling). Every `--eval-every` steps each SAE's FVU on held-out activations is
recorded; an SAE is converged when its held-out FVU changed by less than `--tolerance` (relative) over the last tenth
of training at the full learning rate (CONVERGENCE). Each SAE is then saved with its core eval on the held-out text
(FVU all/typical, L0, dead share, CE loss recovered), its curve (JSON + PNG) and a model card, and <out>/table.md lists them all.

Every stage resumes after a kill: the caches and training runs resume themselves, a finished SAE (its row.json) is
not redone. A larger --tokens trains again from the same caches (training is minutes; caching is the slow part).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HOOK = "blocks.{}.hook_resid_post"
SMOLLM2_BLOCKS = (3, 7, 12, 15, 20)
SMOLLM2_LAYERS = 30


@dataclass(frozen=True)
class ModelPlan:
    """One model's SAEs: its blocks, the block trained with two seeds, the SAE width (d x 8) and cost rates."""

    name: str
    blocks: tuple[int, ...]
    seed_block: int
    width: int
    d: int
    cache_rate: float
    """tokens/s the cache forward reaches through one block (all blocks up to the deepest hook run)"""


def matched_blocks(blocks, layers_from: int, layers_to: int) -> tuple[int, ...]:
    """The blocks of a `layers_to`-block model at the relative depths (block + 1) / layers_from of `blocks`."""
    return tuple(max(0, round((b + 1) / layers_from * layers_to) - 1) for b in blocks)


GEMMA_BLOCKS = matched_blocks(SMOLLM2_BLOCKS, SMOLLM2_LAYERS, 18)
SMOLLM2_CACHE_RATE = 1400 * 16
"""Measured: SmolLM2 caches about 1.4k tokens/s through 16 blocks (to block 15) on the 2-core CPU."""
MODELS = {
    "smollm2-135m": ModelPlan("smollm2-135m", SMOLLM2_BLOCKS, 12, 4608, 576, SMOLLM2_CACHE_RATE),
    # not measured: scaled from SmolLM2 by the square of the width (the matrix products dominate a block)
    "gemma-3-270m": ModelPlan("gemma-3-270m", GEMMA_BLOCKS, GEMMA_BLOCKS[2], 5120, 640,
                              SMOLLM2_CACHE_RATE * (576 / 640) ** 2),
}
TRAIN_RATE = 25_000 * 4608
"""Measured: a 4,608-latent TopK SAE trains at about 25k tokens/s here; the cost grows with the width."""
EVAL_RATE = 270
"""Measured: a full SmolLM2 forward runs at about 270 tokens/s; the core eval runs one per SAE and two per hook."""
K = 32
CHUNK_CHARS = 16_000
HOLD_OUT_EVERY = 20
CHARS_PER_TOKEN = 4.0
"""For --plan only: the text's token count before any tokenizer is loaded."""
CONVERGENCE = """held-out FVU where the learning rate starts to decay within `tolerance` (relative) of the held-out FVU
a tenth of training earlier: flat over the last tenth at the full rate (the decay itself lowers the FVU)"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- text
def offline_texts() -> dict[str, str]:
    """{name: text} of every offline text: WikiText-2 (raw test; the tokenised validation split where present),
    Tiny Shakespeare and the built-in reference documentation."""
    from pydoc_data.topics import topics

    from saelab.data import shared_data

    texts = {"wikitext-2 test": shared_data("wikitext-2-raw/wiki.test.raw").read_text(encoding="utf-8"),
             "tiny shakespeare": shared_data("tinyshakespeare/input.txt").read_text(encoding="utf-8"),
             "python reference": "\n\n".join(topics[name] for name in sorted(topics))}
    try:
        texts["wikitext-2 valid"] = shared_data("wikitext-2/valid.txt").read_text(encoding="utf-8")
    except Exception:  # noqa: BLE001 - an optional extra text
        pass
    return texts


def chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """`text` cut into pieces of about `size` characters, at line ends."""
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def write_corpus(folder: Path, texts: dict[str, str], every: int = HOLD_OUT_EVERY) -> tuple[Path, Path]:
    """train.txt and heldout.txt under `folder`: the texts' chunks interleaved, every `every`-th chunk of each text
    held out (so both halves hold every genre). Deterministic; written once."""
    train, heldout = folder / "train.txt", folder / "heldout.txt"
    if train.exists() and heldout.exists():
        return train, heldout
    folder.mkdir(parents=True, exist_ok=True)
    split = {name: chunks(text) for name, text in texts.items()}
    kept, held = [], []
    for i in range(max(len(c) for c in split.values())):
        for name in sorted(split):
            if i < len(split[name]):
                (held if i % every == every - 1 else kept).append(split[name][i])
    for path, parts in ((heldout, held), (train, kept)):  # train last: its presence marks the corpus finished
        path.with_suffix(".tmp").write_text("\n\n".join(parts), encoding="utf-8")
        path.with_suffix(".tmp").rename(path)
    return train, heldout


# -- convergence
def converged(curve: list[tuple[int, float]], tolerance: float = 0.01, tail: float = 0.1,
              decay_fraction: float = 0.0) -> dict:
    """Whether the held-out FVU curve [(step, fvu)] is flat over the last `tail` of training at the full learning
    rate: the relative change over that stretch within `tolerance`. The final `decay_fraction` of training, where the
    rate falls to 0, is left out: the decay lowers the FVU whether or not the SAE had stopped learning."""
    if len(curve) < 2:
        return {"converged": False, "change": None, "why": "fewer than two points on the curve"}
    points = sorted(curve)
    total = points[-1][0]
    full_rate = [p for p in points if p[0] <= (1 - decay_fraction) * total]
    if not full_rate:
        return {"converged": False, "change": None, "why": "no point before the decay: lower --eval-every"}
    end_step, last = full_rate[-1]
    before = [p for p in points if p[0] <= end_step - tail * total]
    if not before:
        return {"converged": False, "change": None, "why": "no point a tenth before the decay: lower --eval-every"}
    change = (last - before[-1][1]) / max(last, 1e-12)  # negative: still falling
    return {"converged": abs(change) < tolerance, "change": change, "from_step": before[-1][0], "to_step": end_step,
            "tolerance": tolerance}


@torch.no_grad()
def held_out_fvu(sae, x: torch.Tensor) -> float:
    """FVU of a training-time SAE (inputs scaled by cfg.input_scale) on raw activations x [N, d]."""
    scaled = x.float() * sae.cfg.input_scale
    error = (scaled - sae(scaled)).double().square().sum()
    return float(error / (scaled.double() - scaled.double().mean(0)).square().sum())


class CurveRecorder:
    """Trainer.on_checkpoint: each SAE's held-out FVU at every checkpoint, kept in a JSON file (keyed by step, so a
    resumed run rewrites the points it redoes with the same values)."""

    def __init__(self, path: Path, rows: dict[str, torch.Tensor]):
        self.path, self.rows = path, rows
        saved = json.loads(path.read_text()) if path.exists() else {}
        self.curves, self.seconds = saved.get("curves", {}), saved.get("seconds", 0.0)
        self._since = time.time()
        """Training time (curves included) is summed over the resumed parts of the run."""

    def __call__(self, trainer) -> None:
        for member in trainer.members:
            self.curves.setdefault(member.name, {})[str(trainer.step)] = {
                "tokens": trainer.tokens, "fvu": held_out_fvu(member.sae, self.rows[member.hook])}
        now = time.time()
        self.seconds, self._since = self.seconds + now - self._since, now
        self.path.write_text(json.dumps({"seconds": self.seconds, "curves": self.curves}, indent=1))

    def curve(self, name: str) -> list[tuple[int, float]]:
        return sorted((int(step), point["fvu"]) for step, point in self.curves.get(name, {}).items())


# -- the stages
def cache(model, hooks: list[str], folder: Path, text: Path, tokens: int, progress: bool = True):
    """Every hook of `model` over `tokens` tokens of `text` (all of it when the text is shorter), one forward."""
    import warnings

    from saelab.activations import ActivationStore, cache_activations
    from saelab.data import TextConfig

    with warnings.catch_warnings():  # asking for more than the text holds means "all of it"
        warnings.filterwarnings("ignore", message=".*ran out.*")
        cache_activations(model, hooks, folder, text=TextConfig(source=str(text)), tokens=tokens, dtype="bfloat16",
                          progress=progress)
    return ActivationStore(folder)


def held_out_rows(store, rows: int) -> dict[str, torch.Tensor]:
    """{hook: the first `rows` activations of the held-out cache}, for the curves."""
    found = {hook: [] for hook in store.hooks}
    for batch in store.in_order():
        for hook in store.hooks:
            found[hook].append(batch.acts[hook])
        if sum(len(t) for t in found[store.hooks[0]]) >= rows:
            break
    return {hook: torch.cat(parts)[:rows].float() for hook, parts in found.items()}


def train_run(store_path: Path, hooks: list[str], plan: ModelPlan, seed: int, tokens: int, folder: Path,
              rows: dict[str, torch.Tensor], eval_every: int, batch_size: int = 4096, lr_decay_fraction: float = 0.2,
              progress: bool = True):
    """One training run over the cache: a TopK SAE per hook at `seed`, its held-out curve recorded by checkpoint."""
    from saelab import SAESpec, TrainConfig
    from saelab.training.trainer import Trainer

    config = TrainConfig(tokens=tokens, batch_size=batch_size, seed=seed, checkpoint_every=eval_every,
                         lr_decay_fraction=lr_decay_fraction)
    specs = [SAESpec(arch="topk", width=plan.width, k=K, hook=hook) for hook in hooks]
    recorder = CurveRecorder(folder / "curve.json", rows)
    folder.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(str(store_path), specs, config, out=folder, progress=progress, on_checkpoint=recorder)
    return trainer.fit(), recorder


@torch.no_grad()
def dead_share(sae, store, hook: str) -> tuple[float, int]:
    """(share of latents that never fire on the held-out cache at `hook`, tokens read): the core eval's own dead
    share needs 10 x width tokens, more than its CE pass reads."""
    fired, tokens = torch.zeros(sae.cfg.width, dtype=torch.bool), 0
    for batch in store.in_order([hook]):
        fired |= (sae.encode(batch.acts[hook].float()) > 0).any(0)
        tokens += len(batch.acts[hook])
    return 1 - float(fired.float().mean()), tokens


def finished_row(folder: Path, tokens: int, lr_decay_fraction: float) -> dict | None:
    """The table row of an SAE already saved and evaluated in `folder` by a run of these settings, else None."""
    path = folder / "row.json"
    row = json.loads(path.read_text()) if path.exists() else None
    same = row is not None and (row["tokens"], row.get("lr_decay_fraction")) == (tokens, lr_decay_fraction)
    return row if same else None


def sae_folder(out: Path, model: str, trained, seed: int) -> Path:
    return out / model / trained.hook / f"{Path(trained.name).name}-seed{seed}"


def save_reference(trained, folder: Path, store, held, curve, verdict: dict, model, eval_text, eval_tokens: int,
                   baselines, seconds: float, progress: bool = True) -> dict:
    """The SAE, its core eval on held-out text, its curve (JSON, PNG), model card and table row, into `folder`."""
    from saelab.evals.core import evaluate
    from saelab.hub import CardEntry, build_model_card
    from saelab.hub.folder import read_metrics, read_run_keys, save_metrics, save_sae
    from saelab.hub.saelens import source_metadata

    if not (folder / "cfg.json").exists():
        save_sae(trained.sae, folder, metadata=source_metadata(store.fingerprint()))
    started = time.time()
    metrics = evaluate(trained.sae, model=model, text=eval_text, tokens=eval_tokens, baselines=baselines,
                       progress=progress)
    seconds += time.time() - started
    save_metrics(folder, metrics, trained.sae.cfg.width)
    (folder / "curve.json").write_text(json.dumps({"criterion": CONVERGENCE, **verdict,
                                                   "curve": [{"step": s, "fvu": f} for s, f in curve]}, indent=1))
    plot_curve(curve, folder / "curve.png", trained.name)
    entry = CardEntry(subfolder=".", cfg=trained.sae.cfg, metrics=read_metrics(folder) or {},
                      run=read_run_keys(folder))
    (folder / "README.md").write_text(build_model_card([entry], f"saelab-reference/{folder.parent.parent.name}"))
    rec, spliced = metrics.reconstruction, metrics.spliced
    dead, dead_tokens = dead_share(trained.sae, held, trained.hook)
    row = {"model": folder.parent.parent.name, "hook": trained.hook, "width": trained.sae.cfg.width, "k": K,
           "tokens": trained.sae.cfg.training_tokens, "steps": trained.steps, "fvu": rec.fvu,
           "fvu_typical": rec.fvu_typical, "l0": rec.l0, "dead": dead, "dead_tokens": dead_tokens,
           "ce_recovered": spliced.ce_loss_recovered if spliced else None, "converged": verdict["converged"],
           "change": verdict.get("change"), "seconds": seconds, "folder": str(folder)}
    (folder / "row.json").write_text(json.dumps(row, indent=1))
    return row


def plot_curve(curve, path: Path, title: str) -> None:
    from saelab.figures import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([s for s, _ in curve], [f for _, f in curve], marker=".")
    ax.set(xlabel="step", ylabel="held-out FVU", title=title, yscale="log")
    save_figure(fig, path)
    plt.close(fig)


def write_table(rows: list[dict], path: Path) -> str:
    """The Markdown table of every finished SAE."""
    def number(value, fmt):
        return "n/a" if value is None else format(value, fmt)

    lines = ["| model | hook | width | k | tokens | steps | FVU (typical) | L0 | dead (held-out cache) | CE recovered | "
             "converged? (FVU change, last tenth at full rate) | time (train + eval) |", "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['model']} | {r['hook']} ({Path(r['folder']).name}) | {r['width']:,} | {r['k']} | "
                     f"{r['tokens']:,} | {r['steps']:,} | {number(r['fvu'], '.4f')} ({number(r['fvu_typical'], '.4f')})"
                     f" | {number(r['l0'], '.1f')} | {number(r['dead'], '.1%')} | {number(r['ce_recovered'], '.3f')} | "
                     f"{'yes' if r['converged'] else 'NO'} ({number(r['change'], '+.2%')}) | "
                     f"{r['seconds'] / 60:.1f} min |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


# -- plan, progress and the run
@dataclass
class Settings:
    """What one invocation trains: the flags, less the models."""

    out: Path
    tokens: int = 20_000_000
    cache_tokens: int = 10_000_000
    heldout_tokens: int = 100_000
    curve_tokens: int = 20_000
    eval_tokens: int = 20_000
    eval_every: int = 100
    tolerance: float = 0.01
    batch_size: int = 4096
    lr_decay_fraction: float = 0.2
    progress: bool = True


def stages(plan: ModelPlan, settings: Settings, text_tokens: int) -> list[tuple[str, float]]:
    """[(what, estimated seconds)] of one model's work, from the measured rates."""
    cached = min(text_tokens, settings.cache_tokens)
    per_block = plan.cache_rate / (max(plan.blocks) + 1)
    eval_rate = EVAL_RATE * (576 / plan.d) ** 2  # Gemma's forward scaled like its cache
    n_saes = len(plan.blocks) + 1
    return [(f"{plan.name}: cache {cached:,} tokens at blocks {', '.join(map(str, plan.blocks))}", cached / per_block),
            (f"{plan.name}: cache {settings.heldout_tokens:,} held-out tokens", settings.heldout_tokens / per_block),
            (f"{plan.name}: train {len(plan.blocks)} SAEs (seed 0) on {settings.tokens:,} tokens each",
             settings.tokens * len(plan.blocks) * plan.width / TRAIN_RATE),
            (f"{plan.name}: train block {plan.seed_block} again (seed 1)", settings.tokens * plan.width / TRAIN_RATE),
            (f"{plan.name}: core eval of {n_saes} SAEs on {settings.eval_tokens:,} held-out tokens",
             settings.eval_tokens * (n_saes + 2 * len(plan.blocks)) / eval_rate)]


class Progress:
    """Stage-by-stage progress with an ETA: the plan's estimates, scaled by how the finished stages compared."""

    def __init__(self, planned: list[tuple[str, float]]):
        self.planned, self.done, self.spent, self.started = planned, 0, 0.0, time.time()

    def start(self, what: str) -> None:
        index = next((i for i, (name, _) in enumerate(self.planned) if name == what), self.done)
        self.done, self.started = index, time.time()
        estimated = sum(seconds for _, seconds in self.planned[:index])
        pace = self.spent / estimated if self.spent and estimated else 1.0
        left = pace * sum(seconds for _, seconds in self.planned[index:])
        log(f"stage {index + 1}/{len(self.planned)}: {what} (about {_duration(left)} left in all)")

    def finish(self) -> None:
        self.spent += time.time() - self.started


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def text_tokens(train: Path) -> int:
    return int(train.stat().st_size / CHARS_PER_TOKEN)


def run_model(model, plan: ModelPlan, settings: Settings, corpus: tuple[Path, Path], progress: Progress) -> list[dict]:
    """One model's stages; returns its table rows. Each stage resumes where a killed run stopped."""
    from saelab.data import TextConfig
    from saelab.evals.core import Baselines

    train_text, heldout_text = corpus
    root = settings.out / plan.name
    hooks = [HOOK.format(block) for block in plan.blocks]
    planned = stages(plan, settings, text_tokens(train_text))
    progress.start(planned[0][0])
    store = cache(model, hooks, root / "acts", train_text, settings.cache_tokens, settings.progress)
    progress.finish()
    progress.start(planned[1][0])
    held = cache(model, hooks, root / "heldout-acts", heldout_text, settings.heldout_tokens, settings.progress)
    rows = held_out_rows(held, settings.curve_tokens)
    progress.finish()
    eval_text = TextConfig(source=str(heldout_text))
    baselines, found = {}, []
    runs = ((0, hooks, planned[2][0]), (1, [HOOK.format(plan.seed_block)], planned[3][0]))
    for seed, run_hooks, what in runs:
        progress.start(what)
        decay = "" if settings.lr_decay_fraction == 0.2 else f"-decay{settings.lr_decay_fraction:g}"
        folder = root / "runs" / f"seed{seed}-tokens{settings.tokens}{decay}"
        trained, recorder = train_run(root / "acts", run_hooks, plan, seed, settings.tokens, folder, rows,
                                               settings.eval_every, settings.batch_size, settings.lr_decay_fraction,
                                               settings.progress)
        progress.finish()
        for result in trained:
            target = sae_folder(settings.out, plan.name, result, seed)
            if (done := finished_row(target, result.sae.cfg.training_tokens, settings.lr_decay_fraction)):
                found.append(done)
                continue
            if result.hook not in baselines:
                baselines[result.hook] = Baselines.compute(model, eval_text, result.hook, tokens=settings.eval_tokens,
                                                           progress=settings.progress)
            curve = recorder.curve(result.name)
            verdict = converged(curve, settings.tolerance, decay_fraction=settings.lr_decay_fraction)
            found.append(save_reference(result, target, store, held, curve, verdict, model,
                                        eval_text, settings.eval_tokens, baselines[result.hook],
                                        recorder.seconds / len(trained), settings.progress))
            found[-1]["lr_decay_fraction"] = settings.lr_decay_fraction
            (target / "row.json").write_text(json.dumps(found[-1], indent=1))
            log(f"{plan.name} {result.name} seed {seed}: held-out FVU {found[-1]['fvu']:.4f}, converged: "
                f"{found[-1]['converged']}")
    return found


def model_plans(names: list[str], layers: list[int] | None) -> list[ModelPlan]:
    """The plans of the models asked for; --layers gives SmolLM2 blocks, Gemma's follow at matched depths."""
    from dataclasses import replace

    plans = []
    for name in names:
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}: pick from {', '.join(MODELS)}")
        plan = MODELS[name]
        if layers:
            blocks = tuple(layers) if name == "smollm2-135m" else matched_blocks(layers, SMOLLM2_LAYERS, 18)
            plan = replace(plan, blocks=blocks, seed_block=blocks[len(blocks) // 2])
        plans.append(plan)
    return plans


def parse_tokens(text: str) -> int:
    """'20M', '300k' or '4096' as a count."""
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:].lower(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", action="store_true", help="print the stages and their estimated time, then stop")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--layers", default=None, help="SmolLM2 blocks, e.g. 3,7,12 (Gemma: matched depths)")
    parser.add_argument("--tokens", default="20M", help="training tokens per SAE (epochs over the cache)")
    parser.add_argument("--cache-tokens", default="10M", help="at most this many training-text tokens cached")
    parser.add_argument("--heldout-tokens", default="100k", help="held-out tokens cached (curves read the first "
                        "--curve-tokens of them)")
    parser.add_argument("--curve-tokens", default="20k")
    parser.add_argument("--eval-tokens", default="20k", help="held-out tokens of the core eval (CE recovered)")
    parser.add_argument("--eval-every", type=int, default=100, help="steps between held-out FVU points")
    parser.add_argument("--tolerance", type=float, default=0.01,
                        help="relative FVU change over the last tenth at the full rate")
    parser.add_argument("--batch-size", type=int, default=4096, help="tokens per training step")
    parser.add_argument("--lr-decay-fraction", type=float, default=0.2, help="share of training over which the "
                        "learning rate decays to 0 (0: constant, so a flat last tenth is a plateau, not the decay)")
    parser.add_argument("--out", type=Path, default=Path("runs/reference"))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    settings = Settings(out=args.out, tokens=parse_tokens(args.tokens), cache_tokens=parse_tokens(args.cache_tokens),
                        heldout_tokens=parse_tokens(args.heldout_tokens), curve_tokens=parse_tokens(args.curve_tokens),
                        eval_tokens=parse_tokens(args.eval_tokens), eval_every=args.eval_every,
                        tolerance=args.tolerance, batch_size=args.batch_size,
                        lr_decay_fraction=args.lr_decay_fraction)
    plans = model_plans(args.models.split(","), [int(b) for b in args.layers.split(",")] if args.layers else None)
    corpus = write_corpus(settings.out / "corpus", offline_texts())
    planned = [stage for plan in plans for stage in stages(plan, settings, text_tokens(corpus[0]))]
    if args.plan:
        print(f"text: {corpus[0]} (about {text_tokens(corpus[0]):,} tokens; held out: {corpus[1]}, every "
              f"{HOLD_OUT_EVERY}th {CHUNK_CHARS // 1000}k-character chunk of each text)")
        for what, seconds in planned:
            print(f"  {_duration(seconds):>8}  {what}")
        print(f"  {_duration(sum(s for _, s in planned)):>8}  in all (2-core CPU rates; see the script's constants)")
        return
    from saelab.models import load_model

    progress, rows = Progress(planned), []
    for plan in plans:
        log(f"loading {plan.name}")
        rows += run_model(load_model(plan.name), plan, settings, corpus, progress)
        print(write_table(rows, settings.out / "table.md"), flush=True)
    log(f"done: {len(rows)} SAEs, table in {settings.out / 'table.md'}")


if __name__ == "__main__":
    main()
