"""Quality comparison (issues 3, 15): a saelab SAE against SAELens and EleutherAI sparsify on the same cached
activations, with the same architecture, width, k, batch size, token budget and batch sequence, scored by FVU on
the same held-out rows (and, with --ce-tokens, by CE loss recovered with each saved SAE spliced into the model).

    python scripts/compare_quality.py [--arch topk] [--tokens 1228800] [--width 4608] [--k 32] [--batch-size 4096]
        [--train-cache runs/quickstart/acts] [--heldout-cache runs/heldout-acts] [--ref-python /work/ref-venv/bin/python]
        [--ce-tokens 4096]

--arch batchtopk | matryoshka | jumprelu | relu compare with SAELens's implementation of the same architecture
(sparsify has only TopK). For jumprelu and relu, --k is saelab's target_l0 and --saelens-coefficient SAELens's
L0 / L1 coefficient (tune it so that SAELens lands near k). Every trained SAE is saved under <work-dir>/<impl>
in its own library's format; the CE scoring loads all of them through saelab's loaders (saelab.hub.load_sae),
so one code path scores all three. --score-only adds CE to an earlier run's results.json without training.

The batch sequence is the one saelab's ActivationStore gives (seed 0, shuffled, epochs repeated until the budget is
spent); it is written to <work-dir>/order.safetensors and scripts/reference_train.py (run with --ref-python, a venv
holding sae-lens and eai-sparsify, see its docstring) feeds exactly those rows, in that order, to both references.
Each library otherwise keeps its own defaults. The references are reported as `na` when --ref-python is absent.

FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over all held-out tokens (float64). Ends with one line:
RESULT saelab_fvu=... saelens_fvu=... sparsify_fvu=... rel_gap_saelens=... rel_gap_sparsify=...
(rel_gap = saelab_fvu / reference_fvu - 1; negative means saelab reconstructs better).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from saelab.activations import ActivationStore

try:
    from saelab.training import SAESpec, TrainConfig, train
except ImportError:  # older layout
    from saelab.train import SAESpec, TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = Path(__file__).resolve().parent / "reference_train.py"


def _reference_module():
    """scripts/reference_train.py as a module: its data loading and metrics are shared, so all three are scored
    by the same code (it imports only torch and safetensors at the top)."""
    spec = importlib.util.spec_from_file_location("reference_train", REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def batch_order(store: ActivationStore, steps: int) -> torch.Tensor:
    """Row ids [steps, batch] of the batches saelab's trainer reads from `store` (epoch after epoch)."""
    rows, epoch = [], 0
    while len(rows) < steps:
        if store.batches_per_epoch(epoch) == 0:
            raise SystemExit(f"the cache holds fewer rows than one batch ({store.batch_size})")
        for batch in store.iter_batches(epoch=epoch):
            rows.append(batch.rows.clone())
            if len(rows) == steps:
                break
        epoch += 1
    return torch.stack(rows).long()


def saelab_spec(args) -> SAESpec:
    """The saelab SAE to train: --arch at --k (target_l0 for the architectures steered to an L0), with any
    --saelab-option KEY=VALUE added to SAESpec.options."""
    options = dict(args.saelab_option)
    if args.arch in ("jumprelu", "relu"):
        options.setdefault("target_l0", float(args.k))
        return SAESpec(arch=args.arch, width=args.width, lr=args.saelab_lr, options=options)
    return SAESpec(arch=args.arch, width=args.width, k=args.k, lr=args.saelab_lr, options=options)


def reconstruct_with(sae):
    """reconstruct(x) -> (x_hat, l0 per token) for heldout_metrics; TopK on its sparse path, the rest dense."""
    def reconstruct(x):
        if hasattr(sae, "encode_topk"):
            indices, values = sae.encode_topk(x)
            return sae.decode_topk(indices, values), (values > 0).sum(-1)
        codes = sae.encode(x)
        return sae.decode(codes), (codes != 0).sum(-1)

    return reconstruct


def run_saelab(store, args, heldout, ref) -> dict:
    spec = saelab_spec(args)
    config = TrainConfig(tokens=args.tokens, batch_size=args.batch_size, seed=args.seed,
                         lr_warmup_steps=args.saelab_warmup, lr_decay_fraction=args.saelab_decay_fraction,
                         normalize_activations=not args.saelab_no_normalize, b_dec_init=args.saelab_b_dec_init,
                         adam_betas=tuple(args.saelab_betas),
                         **({"dead_tokens": args.saelab_dead_tokens} if args.saelab_dead_tokens else {}))
    started = time.perf_counter()
    trained = train(store, [spec], config, progress=False)[0]
    seconds = time.perf_counter() - started
    sae = trained.sae.eval()
    sae.save(args.work_dir / "saelab")  # what the CE scoring loads
    import saelab

    settings = {"lr": spec.learning_rate, "lr_warmup_steps": config.warmup_steps,
                "lr_decay_fraction": config.lr_decay_fraction, "adam_betas": list(config.adam_betas),
                "normalize_activations": config.normalize_activations, "b_dec_init": config.b_dec_init,
                "dead_window_tokens": config.dead_window, "options": spec.options,
                "auxk_coefficient": getattr(sae.cfg.options, "auxk_coefficient", None),
                "k_aux": getattr(sae.cfg.options, "k_aux", None) or sae.cfg.d_in // 2}
    return {"impl": "saelab", "version": saelab.__version__, "arch": args.arch, "seconds": seconds,
            "steps": trained.steps, "tokens": trained.steps * args.batch_size, "settings": settings,
            "folder": str(args.work_dir / "saelab"), **ref.heldout_metrics(reconstruct_with(sae), heldout)}


def add_ce_recovered(results: list[dict], args, hook: str) -> None:
    """CE loss recovered of every saved SAE (saelab's, SAELens's, sparsify's), loaded by saelab.hub.load_sae and
    scored by saelab.evals.core.spliced_metrics on the same held-out contexts of --ce-text."""
    from saelab.data import TextConfig
    from saelab.evals.core import spliced_metrics
    from saelab.hub import load_sae
    from saelab.models import load_model

    model = load_model(args.ce_model)
    text = TextConfig(source=args.ce_text, start=args.ce_start)
    for result in results:
        if not result.get("folder"):
            continue
        sae = load_sae(result["folder"])
        started = time.perf_counter()
        spliced = spliced_metrics(sae, model, text, hook=hook, tokens=args.ce_tokens)
        result.update(ce_loss_recovered=spliced.ce_loss_recovered, ce_sae=spliced.ce_sae, ce_clean=spliced.ce_clean,
                      ce_zero=spliced.ce_zero, kl_sae=spliced.kl_sae, ce_predictions=spliced.n_predictions)
        print(f"{result['impl']}: CE recovered {spliced.ce_loss_recovered:.4f} on {spliced.n_predictions} "
              f"predictions ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)


def run_references(order_file: Path, args) -> list[dict]:
    ref_python = Path(args.ref_python)
    if not args.impls:
        return []
    if not ref_python.exists():
        print(f"reference venv python {ref_python} not found: SAELens and sparsify are reported as na", file=sys.stderr)
        return []
    json_out = order_file.parent / "reference.json"
    json_out.unlink(missing_ok=True)
    command = [str(ref_python), str(REFERENCE), "--train-cache", str(args.train_cache), "--heldout-cache",
               str(args.heldout_cache), "--order", str(order_file), "--width", str(args.width), "--k", str(args.k),
               "--seed", str(args.seed), "--impls", args.impls, "--json-out", str(json_out), "--arch", args.arch,
               "--save-dir", str(order_file.parent)]
    if args.saelens_coefficient is not None:
        command += ["--saelens-coefficient", str(args.saelens_coefficient)]
    for option in args.saelens_option:
        command += ["--saelens-option", option]
    if args.saelens_normalize != "none":
        command += ["--saelens-normalize", args.saelens_normalize]
    print("running:", " ".join(command), file=sys.stderr, flush=True)
    done = subprocess.run(command, stdout=sys.stderr, cwd=ROOT)  # its progress goes to our stderr
    results = json.loads(json_out.read_text()) if json_out.exists() else []
    if done.returncode != 0:
        print(f"reference_train.py exited with {done.returncode}; got {len(results)} result(s)", file=sys.stderr)
    return results


def fmt(value, spec=".4f") -> str:
    return "na" if value is None else format(value, spec)


def main() -> None:
    ref = _reference_module()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="topk", choices=["topk", "batchtopk", "matryoshka", "jumprelu", "relu"])
    parser.add_argument("--train-cache", type=Path, default=ROOT / "runs/quickstart/acts")
    parser.add_argument("--heldout-cache", type=Path, default=ROOT / "runs/heldout-acts",
                        help="make it with: saelab cache --model smollm2-135m --hooks blocks.15.hook_resid_post "
                             "--text /work/shared/data/wikitext-2-raw/wiki.test.raw --tokens 20k --out runs/heldout-acts")
    parser.add_argument("--width", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32, help="k, or saelab's target_l0 for jumprelu and relu")
    parser.add_argument("--saelens-coefficient", type=float, default=None,
                        help="SAELens's l1 (relu) / l0 (jumprelu) coefficient; default: SAELens's own")
    parser.add_argument("--saelens-normalize", default="none", choices=["none", "expected_average_only_in"],
                        help="SAELens's normalize_activations (its default: none)")
    parser.add_argument("--saelens-option", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to SAELens's SAE config, e.g. jumprelu_sparsity_loss_mode=quadratic")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=300 * 4096, help="training tokens per SAE (a multiple of batch)")
    parser.add_argument("--seed", type=int, default=0, help="SAE initialisation seed (all three)")
    parser.add_argument("--ref-python", default="/work/ref-venv/bin/python")
    parser.add_argument("--impls", default="saelens,sparsify",
                        help="references to train (comma-separated; '' for none)")
    parser.add_argument("--skip-saelab", action="store_true", help="only run the references")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs/compare-quality")
    parser.add_argument("--json-out", type=Path, help="write all results here (default: <work-dir>/results.json)")
    # saelab's public knobs, for investigating a gap (defaults = saelab's defaults)
    parser.add_argument("--saelab-lr", type=float, default=None, help="default: 4e-4 / sqrt(width / 2^14)")
    parser.add_argument("--saelab-warmup", type=int, default=None, help="default: min(100, steps // 20)")
    parser.add_argument("--saelab-decay-fraction", type=float, default=TrainConfig.lr_decay_fraction)
    parser.add_argument("--saelab-no-normalize", action="store_true")
    parser.add_argument("--saelab-b-dec-init", default=TrainConfig.b_dec_init)
    parser.add_argument("--saelab-dead-tokens", type=int, default=None)
    parser.add_argument("--saelab-betas", type=float, nargs=2, default=TrainConfig.adam_betas, metavar=("B1", "B2"))
    parser.add_argument("--saelab-option", type=ref.key_value, action="append", default=[], metavar="KEY=VALUE",
                        help="an SAESpec option, e.g. auxk_coefficient=0 (repeatable)")
    # CE loss recovered of the saved SAEs, all scored by saelab.evals.core on held-out text
    parser.add_argument("--ce-tokens", type=int, default=0, help="held-out positions for CE recovered (0: skip)")
    parser.add_argument("--ce-model", default="smollm2-135m")
    parser.add_argument("--ce-text", default="/work/shared/data/wikitext-2-raw/wiki.test.raw",
                        help="text source for CE recovered ('default': saelab's built-in text)")
    parser.add_argument("--ce-start", type=int, default=0,
                        help="skip this many contexts of --ce-text (the training cache's, for text like it, held out)")
    parser.add_argument("--score-only", action="store_true",
                        help="no training: add CE recovered (--ce-tokens) to <work-dir>/results.json")
    args = parser.parse_args()
    if args.tokens % args.batch_size:
        parser.error("--tokens must be a multiple of --batch-size (every library then takes the same steps)")
    steps = args.tokens // args.batch_size

    args.work_dir.mkdir(parents=True, exist_ok=True)
    store = ActivationStore(args.train_cache, batch_size=args.batch_size)  # what train(cache_path, ...) builds
    results_file = args.json_out or args.work_dir / "results.json"
    if args.score_only:
        if not args.ce_tokens:
            parser.error("--score-only needs --ce-tokens")
        results = json.loads(results_file.read_text())
        add_ce_recovered(results, args, store.hooks[0])
        results_file.write_text(json.dumps(results, indent=1))
        report(results, args, ref)
        return
    order = batch_order(store, steps)
    order_file = args.work_dir / "order.safetensors"
    save_file({"rows": order}, order_file)
    heldout, hook = ref.load_rows(args.heldout_cache, store.hooks[0])
    print(f"{store.n_tokens} cached rows ({hook}), {steps} steps of {args.batch_size} = {args.tokens} tokens "
          f"({args.tokens / store.n_tokens:.1f} passes), {len(heldout)} held-out rows; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}", file=sys.stderr)

    results = [] if args.skip_saelab else [run_saelab(store, args, heldout, ref)]
    if results:
        print(json.dumps(results[0]), file=sys.stderr, flush=True)
    results += run_references(order_file, args)
    results_file.write_text(json.dumps(results, indent=1))
    if args.ce_tokens:
        add_ce_recovered(results, args, hook)
        results_file.write_text(json.dumps(results, indent=1))
    report(results, args, ref)


def report(results: list[dict], args, ref) -> None:
    """The table, then one RESULT line."""
    by_impl = {r["impl"]: r for r in results}
    header = (f"{'implementation':<16}{'arch':>11}{'width':>7}{'k':>5}{'tokens':>10}{'FVU':>9}{'FVU typ.':>10}"
              f"{'CE rec.':>9}{'L0':>7}{'seconds':>9}")
    print(header)
    print("-" * len(header))
    for impl in ["saelab", *filter(None, args.impls.split(","))]:
        r = by_impl.get(impl)
        name = f"{impl} {r['version']}" if r else impl
        print(f"{name:<16}{args.arch:>11}{args.width:>7}{args.k:>5}{args.tokens:>10}{fmt(r and r['fvu']):>9}"
              f"{fmt(r and r['fvu_typical']):>10}{fmt(r and r.get('ce_loss_recovered')):>9}"
              f"{fmt(r and r['l0'], '.1f'):>7}{fmt(r and r['seconds'], '.0f'):>9}")
    if results:
        r = results[0]
        print(f"(held-out: {r['heldout_tokens']} tokens; FVU typ. leaves out {r['massive_tokens']} massive-activation "
              f"tokens with norm > {ref.MASSIVE:g}x the median)")

    def gap(impl):
        ours, theirs = by_impl.get("saelab"), by_impl.get(impl)
        return None if ours is None or theirs is None else ours["fvu"] / theirs["fvu"] - 1

    values = {"saelab_fvu": by_impl.get("saelab"), "saelens_fvu": by_impl.get("saelens"),
              "sparsify_fvu": by_impl.get("sparsify")}
    line = " ".join(f"{key}={fmt(r and r['fvu'], '.5f')}" for key, r in values.items())
    line += f" rel_gap_saelens={fmt(gap('saelens'), '+.4f')} rel_gap_sparsify={fmt(gap('sparsify'), '+.4f')}"
    print("RESULT " + line)


if __name__ == "__main__":
    main()
