"""The `saelab` command. With no arguments it runs the quickstart: the main job on an embedded default."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

QUICKSTART_MODEL = "smollm2-135m"
QUICKSTART_HOOK = "blocks.15.hook_resid_post"


def parse_count(text: str) -> int:
    """'300k' -> 300000, '1.5M' -> 1500000."""
    scale = {"k": 1_000, "m": 1_000_000, "b": 1_000_000_000}.get(text[-1:].lower(), 1)
    number = text[:-1] if scale != 1 else text
    try:
        return int(float(number) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (examples: 5000, 300k, 1.5M)") from None


def _text_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", default="default",
                        help="text file, folder, JSONL file, Hub dataset name, or 'default' (built-in prose)")
    parser.add_argument("--field", default="text", help="JSONL / dataset field holding the text")
    parser.add_argument("--context-len", type=int, default=128, help="tokens per context")
    parser.add_argument("--no-bos", action="store_true", help="do not start each context with BOS")
    parser.add_argument("--seed", type=int, default=None, help="shuffle contexts in windows with this seed")


def _text_config(args):
    from saelab.data import TextConfig

    return TextConfig(source=args.text, field=args.field, context_len=args.context_len,
                      prepend_bos=not args.no_bos, seed=args.seed)


def cmd_cache(args) -> None:
    from saelab.activations import cache_activations
    from saelab.models import load_model

    model = load_model(args.model, trust_remote_code=args.trust_remote_code)
    started = time.perf_counter()
    manifest = cache_activations(model, args.hooks.split(";"), args.out, text=_text_config(args), tokens=args.tokens,
                                 batch_size=args.batch_size, shard_tokens=args.shard_tokens, dtype=args.dtype,
                                 drop_bos=not args.keep_bos, overwrite=args.overwrite)
    print_cache_summary(args.out, manifest, time.perf_counter() - started)


def cmd_info(args) -> None:
    from saelab.activations import Manifest

    print_cache_summary(args.cache, Manifest.read(Path(args.cache)))


def print_cache_summary(folder, manifest, seconds: float | None = None) -> None:
    size = sum((Path(folder) / s.file).stat().st_size for s in manifest.shards if (Path(folder) / s.file).exists())
    print(f"cache      {folder}  ({'complete' if manifest.complete else 'INCOMPLETE'})")
    print(f"model      {manifest.run['model']}")
    print(f"tokens     {manifest.tokens:,} positions from {manifest.n_contexts:,} contexts of {manifest.context_len}")
    print(f"shards     {len(manifest.shards)} files, {size / 2**20:.1f} MiB, {manifest.dtype}")
    for hook, info in manifest.hooks.items():
        print(f"hook       {hook}  d={info['d']}")
    if seconds:
        print(f"time       {seconds:.1f} s  ({manifest.tokens / seconds:,.0f} tokens/s, this run)")


def cmd_quickstart(args) -> None:
    """Cache a mid-depth residual stream of the offline SmolLM2-135M on built-in text and describe it."""
    import torch

    from saelab.activations import ActivationStore, cache_activations
    from saelab.data import TextConfig
    from saelab.models import load_model

    print(f"loading {QUICKSTART_MODEL} (offline; the first load de-quantises and caches the weights)")
    model = load_model(QUICKSTART_MODEL)
    out = Path(args.out)
    started = time.perf_counter()
    manifest = cache_activations(model, QUICKSTART_HOOK, out, text=TextConfig(context_len=128), tokens=args.tokens)
    print_cache_summary(out, manifest, time.perf_counter() - started)
    store = ActivationStore(out, batch_size=1024)
    acts = torch.cat([batch.acts[QUICKSTART_HOOK] for batch in store])
    norms = acts.norm(dim=1)
    print(f"norms      mean {norms.mean():.2f}  min {norms.min():.2f}  max {norms.max():.2f}")
    centred = acts - acts.mean(0)
    spectrum = torch.linalg.svdvals(centred).pow(2)
    share = (spectrum.cumsum(0) / spectrum.sum() < 0.9).sum().item() + 1
    print(f"geometry   {share} of {acts.shape[1]} principal directions hold 90% of the variance")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saelab", description=__doc__)
    commands = parser.add_subparsers(dest="command")

    quick = commands.add_parser("quickstart", help="the main job on built-in defaults (what `saelab` alone runs)")
    quick.add_argument("--out", default="runs/quickstart-acts")
    quick.add_argument("--tokens", type=parse_count, default=parse_count("20k"))
    quick.set_defaults(run=cmd_quickstart)

    cache = commands.add_parser("cache", help="cache activations to sharded safetensors (resumable)")
    cache.add_argument("--model", required=True, help="smollm2-135m, gemma-3-270m, a Hub id or a local folder")
    cache.add_argument("--hooks", required=True,
                       help="hook names or patterns separated by ';', e.g. 'blocks.{9,15}.hook_resid_post'")
    cache.add_argument("--out", required=True, help="output folder (re-run the same command to resume)")
    cache.add_argument("--tokens", type=parse_count, default=parse_count("100k"), help="tokens to cache, e.g. 300k")
    cache.add_argument("--batch-size", type=int, default=8, help="contexts per model forward")
    cache.add_argument("--shard-tokens", type=parse_count, default=1 << 16, help="approximate tokens per shard")
    cache.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    cache.add_argument("--keep-bos", action="store_true", help="also store the BOS position (an attention sink)")
    cache.add_argument("--overwrite", action="store_true", help="replace a different run found in --out")
    cache.add_argument("--trust-remote-code", action="store_true", help="allow a Hub model's own code to run")
    _text_arguments(cache)
    cache.set_defaults(run=cmd_cache)

    info = commands.add_parser("info", help="describe an activation cache")
    info.add_argument("cache")
    info.set_defaults(run=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    from saelab.errors import SaelabError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["quickstart", *(argv or [])])
    try:
        args.run(args)
    except (SaelabError, ValueError) as error:
        print(f"saelab: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
