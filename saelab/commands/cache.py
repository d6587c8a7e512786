"""`saelab cache` and `saelab info`: write an activation cache, and say what one holds and whether it is whole."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from saelab.activations.writer import CacheSettings
from saelab.commands.common import CacheTextFlags, ModelFlags, Positional, Switch


@dataclass(kw_only=True)
class CacheCommand(ModelFlags, CacheTextFlags, CacheSettings):
    """Cache activations to sharded safetensors (resumable)."""

    hooks: list[str]
    """hook names or patterns, separated by commas or ';' (outside braces), e.g. 'blocks.{9,15}.hook_resid_post'"""
    out: str
    """output folder (re-run the same command to resume)"""
    keep_bos: Switch = False
    """also store the BOS position (an attention sink)"""
    overwrite: Switch = False
    """replace a different run found in --out (deletes only files saelab wrote)"""


def cmd_cache(args: CacheCommand) -> None:
    from saelab import distributed
    from saelab.activations import cache_activations
    from saelab.models import load_model

    world = distributed.init()  # under torchrun: each rank writes its share of the shards
    model = load_model(args.model, trust_remote_code=args.trust_remote_code, max_batch_tokens=args.max_batch_tokens)
    started = time.perf_counter()
    manifest = cache_activations(model, args.hooks, args.out, text=args.text_config(), tokens=args.tokens,
                                 batch_size=args.batch_size, shard_tokens=args.shard_tokens, dtype=args.dtype,
                                 drop_bos=not args.keep_bos, overwrite=args.overwrite)
    if world.main:
        print_cache_summary(args.out, manifest, time.perf_counter() - started)


@dataclass
class InfoCommand:
    """Describe an activation cache."""

    cache: Annotated[str, Positional]
    """the cache folder"""
    verify: Switch = True
    """check every shard's size and SHA-256; --no-verify skips the check (fast on a big cache)"""


def cmd_info(config: InfoCommand) -> None:
    """Describe a cache and, unless --no-verify, check every shard's size and SHA-256: "complete" must mean usable."""
    from saelab.activations import Manifest
    from saelab.activations.manifest import cache_command, check_shard
    from saelab.errors import CacheError

    folder = Path(config.cache)
    manifest = Manifest.read(folder)
    problems = []
    for record in manifest.shards if config.verify else []:
        try:
            check_shard(folder, record)
        except CacheError as error:
            problems.append(str(error).split(";")[0])
    written = {s.index for s in manifest.shards if s.contexts == manifest.expected_contexts(s.index)}
    problems += [f"shard {i} is not written yet" for i in range(manifest.n_shards) if i not in written]
    status = "complete, verified" if config.verify else "complete (not verified)"
    if problems:
        status = f"{'DAMAGED' if manifest.complete else 'INCOMPLETE'}: {len(problems)} shard(s) missing or damaged"
    print_cache_summary(folder, manifest, status=status)
    if problems:
        command = cache_command(folder, manifest)
        for problem in problems:
            print(f"problem    {problem}")
        raise CacheError(f"{folder}: {len(problems)} of {manifest.n_shards} shards missing or damaged; re-run the "
                         "cache command that made it to recompute only those" + (f": {command}" if command else ""))


def print_cache_summary(folder, manifest, seconds: float | None = None, status: str | None = None) -> None:
    size = sum((Path(folder) / s.file).stat().st_size for s in manifest.shards if (Path(folder) / s.file).exists())
    status = status or ("complete" if manifest.complete else "INCOMPLETE")
    print(f"cache      {folder}  ({status})")
    if manifest.exhausted_at is not None and manifest.exhausted_at < manifest.target_contexts:
        print(f"text       ran out after {manifest.n_contexts * manifest.context_len:,} of the "
              f"{manifest.target_contexts * manifest.context_len:,} tokens asked")
    print(f"model      {manifest.run['model']}")
    print(f"tokens     {manifest.tokens:,} positions from {manifest.n_contexts:,} contexts of {manifest.context_len}")
    print(f"shards     {len(manifest.shards)} files, {size / 2**20:.1f} MiB, {manifest.dtype}")
    for hook, info in manifest.hooks.items():
        print(f"hook       {hook}  d={info['d']}")
    if seconds:
        print(f"time       {seconds:.1f} s  ({manifest.tokens / seconds:,.0f} tokens/s, this run)")
