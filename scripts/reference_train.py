"""Reference SAEs for the quality comparison (issues 3, 15): SAELens and EleutherAI sparsify, trained on the same
cached activations, the same rows in the same order and the same budget as saelab, then scored on the same held-out
rows. --arch picks the architecture: topk (both libraries), or batchtopk, matryoshka, jumprelu, relu (SAELens's
batchtopk, matryoshka_batchtopk, jumprelu and standard SAEs; sparsify has only TopK). Runs in a separate virtual environment (SAELens pins transformer-lens < 4), so it imports nothing from saelab:

    python3 -m venv /work/ref-venv
    /work/ref-venv/bin/pip install torch==2.13.0          # the CPU wheel first, so pip keeps it
    /work/ref-venv/bin/pip install sae-lens eai-sparsify
    /work/ref-venv/bin/python scripts/reference_train.py --order runs/compare-quality/order.safetensors \
        --train-cache runs/quickstart/acts --heldout-cache runs/heldout-acts --width 4608 --k 32 --batch-size 4096

Usually scripts/compare_quality.py writes the order file and runs this for you.

Both libraries are driven through their own public training code, with their own defaults for everything the
comparison does not fix (width, k, batch size, tokens, data order, init seed):
  - SAELens: `TopKTrainingSAE(TopKTrainingSAEConfig(...))` (or the --arch's training class) stepped by
    `sae_lens.training.sae_trainer.SAETrainer` (the trainer that `LanguageModelSAETrainingRunner` uses) fed from an
    iterator over the given batches. The SAE that is scored is the inference SAE SAELens saves
    (`save_inference_model`; BatchTopK and Matryoshka are saved as JumpReLU), loaded back with `SAE.load_from_disk`.
  - sparsify: `sparsify.Trainer` itself (its hook-based loop: b_dec init, decoder renormalisation, parallel-gradient
    removal, optimiser, dead-latent bookkeeping, checkpointing), driven by a stand-in "model" whose only submodule
    returns cached activation rows for the row indices it is given as input_ids. The SAE that is scored is the
    one sparsify saves to disk at the end of training (schedule-free optimisers save their averaged weights).

With --save-dir, each library's saved SAE stays in <save-dir>/<impl> (its own format) for compare_quality.py's CE
scoring through saelab's loaders. The metrics are shared with compare_quality.py (it imports `heldout_metrics` and
`load_rows` from this file).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

MASSIVE = 10.0  # a token is "massive" when its norm exceeds this many times the median token norm


def key_value(text: str) -> tuple[str, object]:
    """A KEY=VALUE option, the value read as JSON when it parses (numbers, null) and as a string otherwise."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


# -- data and metrics (shared with compare_quality.py)
def load_rows(cache: str | Path, hook: str | None = None) -> tuple[torch.Tensor, str]:
    """All rows of a saelab activation cache as one float32 tensor, shards in manifest order (= saelab row ids)."""
    cache = Path(cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    hook = hook or next(iter(manifest["hooks"]))
    parts = []
    for record in manifest["shards"]:
        with safe_open(cache / record["file"], framework="pt") as shard:
            parts.append(shard.get_tensor(f"acts.{hook}").float())
    return torch.cat(parts), hook


@torch.no_grad()
def heldout_metrics(reconstruct, x: torch.Tensor, chunk: int = 4096) -> dict:
    """FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over all rows (float64 sums), mean L0, and the same FVU
    without the few "massive activation" tokens (norm > 10 x median), which hold most of the variance here.

    reconstruct(x_chunk) -> (x_hat [n, d], l0 [n]) on raw activations.
    """
    x64 = x.double()
    centred = (x64 - x64.mean(0)).pow(2).sum(-1)
    norms = x64.norm(dim=-1)
    typical = norms <= MASSIVE * norms.median()
    err = torch.empty(len(x), dtype=torch.float64)
    l0 = torch.empty(len(x), dtype=torch.float64)
    for begin in range(0, len(x), chunk):
        x_hat, active = reconstruct(x[begin : begin + chunk])
        err[begin : begin + chunk] = (x64[begin : begin + chunk] - x_hat.double()).pow(2).sum(-1)
        l0[begin : begin + chunk] = active.double()
    typical_mean = x64[typical].mean(0)
    typical_var = (x64[typical] - typical_mean).pow(2).sum()
    return {"fvu": float(err.sum() / centred.sum()), "l0": float(l0.mean()),
            "fvu_typical": float(err[typical].sum() / typical_var), "massive_tokens": int((~typical).sum()),
            "heldout_tokens": len(x)}


def batches(acts: torch.Tensor, order: torch.Tensor):
    for rows in order:
        yield acts[rows]


def saved_folder(args, impl: str) -> Path:
    """Where `impl`'s saved SAE stays (--save-dir), or a temporary folder removed at exit."""
    root = Path(args.save_dir) if args.save_dir else Path(tempfile.mkdtemp(prefix="reference-"))
    folder = root / impl
    shutil.rmtree(folder, ignore_errors=True)
    return folder


# -- SAELens
def saelens_config(args, d_in: int):
    """SAELens's training config for --arch: its own defaults, with width, k (or the coefficient) and no
    input normalisation unless asked. Matryoshka gets saelab's default nested widths (width/16, /8, /4, /2, 1)."""
    import sae_lens

    common = dict(d_in=d_in, d_sae=args.width, device="cpu", dtype="float32",
                  normalize_activations=args.saelens_normalize, **dict(args.saelens_option))
    if args.arch == "topk":
        return sae_lens.TopKTrainingSAEConfig(k=args.k, **common)
    if args.arch == "batchtopk":
        return sae_lens.BatchTopKTrainingSAEConfig(k=args.k, **common)
    if args.arch == "matryoshka":
        widths = [args.width // 2**i for i in range(4, 0, -1)] + [args.width]
        return sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(k=args.k, matryoshka_widths=widths, **common)
    coefficient = {} if args.saelens_coefficient is None else (
        {"l0_coefficient": args.saelens_coefficient} if args.arch == "jumprelu" else
        {"l1_coefficient": args.saelens_coefficient})
    if args.arch == "jumprelu":
        return sae_lens.JumpReLUTrainingSAEConfig(**coefficient, **common)
    return sae_lens.StandardTrainingSAEConfig(**coefficient, **common)


def train_saelens(acts, order, heldout, args) -> dict:
    import sae_lens
    from sae_lens import SAE, LanguageModelSAERunnerConfig, LoggingConfig
    from sae_lens.registry import get_sae_training_class
    from sae_lens.training.sae_trainer import SAETrainer

    steps, batch_size = order.shape
    torch.manual_seed(args.seed)
    cfg = saelens_config(args, acts.shape[1])
    sae = get_sae_training_class(cfg.architecture())[0](cfg)
    # the trainer settings LanguageModelSAETrainingRunner would use (its config's defaults), minus the LM and I/O
    runner_cfg = LanguageModelSAERunnerConfig(sae=cfg, training_tokens=steps * batch_size,
                                              train_batch_size_tokens=batch_size, device="cpu",
                                              logger=LoggingConfig(log_to_wandb=False), checkpoint_path=None,
                                              output_path=None, n_batches_for_norm_estimate=1)
    trainer_cfg = runner_cfg.to_sae_trainer_config()
    data = batches(acts, order)
    if args.saelens_normalize != "none":  # the scale estimate reads the first batch once more, before training
        data = itertools.chain([acts[order[0]]], data)
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=data)
    started = time.perf_counter()
    trained = trainer.fit()
    seconds = time.perf_counter() - started
    name = "saelens" if args.saelens_normalize == "none" else f"saelens+{args.saelens_normalize}"
    folder = saved_folder(args, name)
    trained.save_inference_model(folder)
    sae = SAE.load_from_disk(folder, device="cpu").eval()  # what SAELens saved (BatchTopK: as JumpReLU)

    def reconstruct(x):
        codes = sae.encode(x)
        return sae.decode(codes), (codes != 0).sum(-1)

    settings = {
        "sae": {k: v for k, v in cfg.to_dict().items() if k not in ("metadata", "device")},
        "trainer": {k: getattr(trainer_cfg, k) for k in (
            "lr", "lr_scheduler_name", "lr_warm_up_steps", "lr_decay_steps", "lr_end", "adam_beta1", "adam_beta2",
            "dead_feature_window", "autocast")},
        "notes": "Adam, constant LR, no warm-up/decay; grad-norm clipping at 1.0 (hard-coded in SAETrainer); "
                 "b_dec starts at 0; decoder rows start at norm 0.1 and are not renormalised (TopK selection and "
                 "decoding use W_dec-norm-rescaled activations); AuxK after dead_feature_window steps without firing.",
    }
    dead = int(trainer.dead_neurons.sum())
    return {"impl": name, "version": sae_lens.__version__, "arch": args.arch, "seconds": seconds, "steps": steps,
            "tokens": steps * batch_size, "dead_at_end": dead, "settings": settings,
            "folder": str(folder) if args.save_dir else None, **heldout_metrics(reconstruct, heldout)}


# -- sparsify
class _Rows(torch.nn.Module):
    """Returns the cached activation rows whose indices arrive as "input_ids": a hook point for sparsify.Trainer."""

    def __init__(self, acts: torch.Tensor):
        super().__init__()
        self.acts = acts

    def forward(self, input_ids):
        return self.acts[input_ids]


class _CachedModel(torch.nn.Module):
    """The smallest stand-in for a Hugging Face model that sparsify.Trainer accepts (hookpoint "acts")."""

    def __init__(self, acts: torch.Tensor):
        super().__init__()
        self.acts = _Rows(acts)
        self.dummy_inputs = {"input_ids": torch.zeros(1, 2, dtype=torch.long)}

    @property
    def base_model(self):
        return self

    @property
    def device(self):
        return torch.device("cpu")

    def forward(self, input_ids):
        return self.acts(input_ids)


def train_sparsify(acts, order, heldout, args) -> dict:
    from importlib.metadata import version

    from sparsify import SaeConfig, SparseCoder, Trainer, TrainConfig

    if args.arch != "topk":
        raise SystemExit(f"sparsify has no {args.arch} SAE: use --impls saelens")
    steps, batch_size = order.shape
    dataset = [{"input_ids": rows} for rows in order]  # one "sequence" of batch_size rows per step
    folder = saved_folder(args, "sparsify")
    with tempfile.TemporaryDirectory() as save_dir:
        cfg = TrainConfig(SaeConfig(num_latents=args.width, k=args.k), batch_size=1, hookpoints=["acts"],
                          init_seeds=[args.seed], log_to_wandb=False, save_dir=save_dir, run_name="ref")
        trainer = Trainer(cfg, dataset, _CachedModel(acts))
        started = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - started
        dead = int((trainer.num_tokens_since_fired["acts"] > cfg.dead_feature_threshold).sum())
        shutil.copytree(Path(save_dir) / "ref" / "acts", folder)
    sae = SparseCoder.load_from_disk(folder).eval()  # what sparsify saved (averaged weights)

    def reconstruct(x):
        out = sae(x)
        return out.sae_out, (out.latent_acts > 0).sum(-1)

    lr = trainer.optimizers[0].param_groups[0].get("lr")
    settings = {
        "sae": {k: getattr(cfg.sae, k) for k in ("activation", "num_latents", "k", "normalize_decoder", "multi_topk",
                                                 "skip_connection")},
        "trainer": {"optimizer": cfg.optimizer, "lr": lr, "lr_warmup_steps": cfg.lr_warmup_steps,
                    "loss_fn": cfg.loss_fn, "auxk_alpha": cfg.auxk_alpha,
                    "dead_feature_threshold": cfg.dead_feature_threshold},
        "notes": "optimizer 'signum' = ScheduleFreeWrapper(SignSGD, momentum=0.95), lr 5e-3/sqrt(width/2^14), no "
                 "schedule; loss = batch FVU; b_dec = mean of the first batch; decoder = copy of the nn.Linear "
                 "encoder init, renormalised to unit rows before every step, parallel gradient removed; "
                 "AuxK off (auxk_alpha 0); no input normalisation.",
    }
    return {"impl": "sparsify", "version": version("eai-sparsify"), "arch": args.arch, "seconds": seconds,
            "steps": steps, "tokens": steps * batch_size, "dead_at_end": dead, "settings": settings,
            "folder": str(folder) if args.save_dir else None, **heldout_metrics(reconstruct, heldout)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-cache", required=True)
    parser.add_argument("--heldout-cache", required=True)
    parser.add_argument("--order", required=True, help="safetensors file with 'rows' [steps, batch] (row ids)")
    parser.add_argument("--arch", default="topk", choices=["topk", "batchtopk", "matryoshka", "jumprelu", "relu"])
    parser.add_argument("--width", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32, help="k (topk, batchtopk, matryoshka; unused otherwise)")
    parser.add_argument("--saelens-coefficient", type=float, default=None,
                        help="SAELens's l0 (jumprelu) / l1 (relu) coefficient; default: SAELens's own (1.0)")
    parser.add_argument("--saelens-option", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                        help="a field of SAELens's SAE config, e.g. jumprelu_sparsity_loss_mode=quadratic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--impls", default="saelens,sparsify")
    parser.add_argument("--saelens-normalize", default="none", choices=["none", "expected_average_only_in"],
                        help="SAELens normalize_activations (its default: none)")
    parser.add_argument("--json-out", help="also write the results (a JSON list) here")
    parser.add_argument("--save-dir", help="keep each saved SAE in <save-dir>/<impl> (default: a temporary folder)")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")

    acts, hook = load_rows(args.train_cache)
    heldout, _ = load_rows(args.heldout_cache, hook)
    order = load_file(args.order)["rows"].long()
    if int(order.max()) >= len(acts):
        sys.exit(f"the order file names row {int(order.max())} but {args.train_cache} holds {len(acts)} rows")
    print(f"reference: {len(acts)} cached rows, {order.shape[0]} steps of {order.shape[1]}, "
          f"{len(heldout)} held-out rows, torch {torch.__version__}, {torch.get_num_threads()} threads",
          file=sys.stderr)

    results = []
    for impl in args.impls.split(","):
        train_fn = {"saelens": train_saelens, "sparsify": train_sparsify}[impl]
        result = train_fn(acts, order, heldout, args)
        results.append(result)
        print(json.dumps(result), flush=True)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
