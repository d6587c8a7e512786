"""Cache activations of several hook points from one model pass into sharded safetensors.

Resumable by construction: contexts come from a deterministic stream and shard i holds a fixed slice of it, so a
second run with the same arguments recomputes exactly the shards that are missing or damaged, and nothing else.
The same property spreads a run over torchrun's ranks: rank r computes and writes shards r, r + N, ...; rank 0
alone opens the run and writes the manifest (listing every rank's finished shards every LIST_EVERY_ROUNDS rounds
and at the end), so the cache is the one a single process writes, and a single process reads it as usual.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from saelab import distributed
from saelab.activations.manifest import MANIFEST, Manifest, ShardRecord, check_shard, shard_name, written_by_saelab
from saelab.data import TextConfig, token_batches
from saelab.errors import CacheError, DataError
from saelab.files import LOCK_FILE, FolderLock, remove_owned, safetensors_bytes, write_atomic
from saelab.options import PositiveInt
from saelab.version import __version__

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LIST_EVERY_ROUNDS = 2
"""Distributed: rank 0 lists every rank's finished shards in the manifest every this many rounds of one shard per
rank, so a run killed midway keeps them (each listing waits for the rank's last write)."""


@dataclass(kw_only=True)
class CacheSettings:
    """How much a cache holds and how it is cut and stored: the defaults of cache_activations and the fields
    `saelab cache` turns into flags, written once."""

    tokens: PositiveInt = 100_000
    """tokens to cache, e.g. 300k"""
    batch_size: PositiveInt = 8
    """contexts per model forward"""
    shard_tokens: PositiveInt = 1 << 16
    """approximate tokens per shard"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype the activations are stored in"""


def cache_activations(
    model,
    hooks: str | list[str],
    out: str | Path,
    *,
    text: TextConfig | str | None = None,
    tokens: int = CacheSettings.tokens,
    batch_size: int = CacheSettings.batch_size,
    shard_tokens: int = CacheSettings.shard_tokens,
    dtype: str = CacheSettings.dtype,
    drop_bos: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest:
    """Run `model` over `tokens` tokens of `text` and store activations of every hook in `hooks` under `out`.

    hooks: names or patterns ('blocks.{9,15}.hook_resid_post'). text: a TextConfig or just a source (file, folder,
    JSONL, Hub dataset, None for the built-in default). Re-running with the same arguments resumes; a folder
    holding a different run is refused unless overwrite=True. Returns the finished manifest.
    """
    text = text if isinstance(text, TextConfig) else TextConfig(source=text or "default")
    hooks = model.resolve_hooks(hooks)
    _check_settings(model, text, tokens, batch_size, dtype)
    contexts = _contexts(text, model.tokenizer)
    shard_contexts = max(batch_size, shard_tokens // text.context_len // batch_size * batch_size)
    fresh = Manifest(
        run={"model": model.name, "hooks": hooks, "dtype": dtype, "drop_bos": drop_bos, "batch_size": batch_size,
             "shard_contexts": shard_contexts, "text": text.fingerprint()},
        hooks={h: {"d": model.hook_dim(h), "shape": list(model.hook_shape(h))} for h in hooks},
        dtype=dtype,
        context_len=text.context_len,
        shard_contexts=shard_contexts,
        target_contexts=-(-tokens // text.context_len),
        saelab_version=__version__,
    )
    out = Path(out)
    world = distributed.current()
    world.check_same([fresh.run, fresh.target_contexts, str(out), overwrite], "cache settings")
    with contextlib.ExitStack() as held:
        def open_run():  # on rank 0 alone: the folder's checks, its lock, the manifest and the shards still to do
            _check_folder(out, overwrite)  # before the lock, which would leave a lock file in a folder we must not touch
            held.enter_context(FolderLock(out, "activation cache"))
            opened = _open_run(out, fresh, overwrite, tokens)
            return opened, _shards_to_compute(out, opened)

        manifest, todo = world.main_first(open_run, f"open the activation cache {out}") or (None, None)
        if world.distributed:
            manifest = Manifest.from_dict(json.loads(world.broadcast_json(manifest and manifest.to_json())))
            todo = set(range(manifest.n_shards)) - {s.index for s in manifest.shards}
        _write_shards(model, hooks, out, manifest, contexts, text, dtype, drop_bos, progress, todo, world)
    if not manifest.complete:
        raise CacheError(f"{out}: cache incomplete after the run; re-run the same command to finish it")
    if manifest.exhausted_at is not None and manifest.exhausted_at < manifest.target_contexts:
        warnings.warn(f"the text {text.source!r} ran out: the cache holds {manifest.n_contexts * text.context_len:,} "
                      f"tokens, fewer than the {manifest.target_contexts * text.context_len:,} asked", stacklevel=2)
    return manifest


def _check_settings(model, text: TextConfig, tokens: int, batch_size: int, dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if text.context_len > model.n_ctx:
        raise ValueError(f"context_len {text.context_len} is longer than {model.name} allows ({model.n_ctx})")
    if tokens < 1 or batch_size < 1:
        raise ValueError(f"tokens and batch_size must be positive, got tokens={tokens}, batch_size={batch_size}")


def _contexts(text: TextConfig, tokenizer):
    """The run's context stream; a text too short for even one context is an error, not an empty cache."""
    contexts = text.contexts(tokenizer)
    first = next(contexts, None)
    if first is None:
        raise DataError(f"the text {text.source!r} is too short for one context of {text.context_len} tokens"
                        + (f" after skipping {text.start}" if text.start else "") + "; use a longer text")
    return chain([first], contexts)


def _write_shards(model, hooks, out: Path, manifest: Manifest, contexts, text: TextConfig, dtype: str,
                  drop_bos: bool, progress: bool, todo: set[int], world: distributed.World) -> None:
    """Compute and write every shard in `todo` that is this rank's, reading the whole context stream in order.
    The bar counts tokens (a shard can take minutes) and says how many shards are written."""
    todo = {index for index in todo if index % world.size == world.rank}
    bar = tqdm(total=sum(manifest.expected_contexts(index) for index in todo) * text.context_len,
               desc=f"caching {len(hooks)} hook(s)", unit="tok", unit_scale=True, disable=not (progress and world.main))
    written = []

    def shard_written(_) -> None:
        written.append(1)
        bar.set_postfix_str(f"{len(written)}/{len(todo)} shards written")
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    with ThreadPoolExecutor(max_workers=1) as io:  # serialise + hash + write the last shard while computing the next
        pending: Future | None = None
        for index in range(manifest.n_shards):
            if world.distributed and index and index % (LIST_EVERY_ROUNDS * world.size) == 0:
                if pending is not None:
                    pending.result()
                _list_every_ranks_shards(out, manifest, todo, world)
            chunk = list(islice(contexts, manifest.expected_contexts(index)))
            if len(chunk) < manifest.expected_contexts(index):  # the text ran out: the cache ends here
                manifest.exhausted_at = index * manifest.shard_contexts + len(chunk)
                bar.total = bar.n + (len(chunk) * text.context_len if index in todo else 0)  # not the cap asked
                bar.refresh()
            if index not in todo or not chunk:
                continue
            batches = token_batches(chunk, manifest.run["batch_size"], text.context_len, pad_id=pad_id,
                                    drop_bos=drop_bos and text.prepend_bos)
            tensors = _compute_shard(model, hooks, batches, dtype, index, bar)
            if pending is not None:
                pending.result()
            pending = io.submit(_write_shard, out, manifest, index, len(chunk), tensors, not world.distributed)
            pending.add_done_callback(shard_written)
        if pending is not None:
            pending.result()
    bar.close()
    if world.distributed:
        _list_every_ranks_shards(out, manifest, todo, world)
    else:
        manifest.write(out)


def _list_every_ranks_shards(out: Path, manifest: Manifest, mine: set[int], world: distributed.World) -> None:
    """Every rank's finished shards into every rank's manifest (rank `r` sends those of `mine` it wrote); rank 0
    writes it."""
    theirs = [ShardRecord(**record) for part in world.gather_json([vars(s) for s in manifest.shards if s.index in mine])
              for record in part]
    listed = {s.index for s in theirs}
    manifest.shards = sorted([s for s in manifest.shards if s.index not in listed] + theirs, key=lambda s: s.index)
    if world.main:
        manifest.write(out)


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


def _check_folder(out: Path, overwrite: bool) -> None:
    """Refuse a folder holding anything but an activation cache, before anything in it is written or deleted."""
    if out.exists() and not out.is_dir():
        raise CacheError(f"{out} is a file, not a folder; choose another output folder")
    if not out.is_dir():
        return
    names = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
    foreign = [name for name in names if not written_by_saelab(name)]
    if overwrite and foreign:
        raise CacheError(f"{out} holds files that are not part of an activation cache ({_shown(foreign)}); "
                         "overwrite deletes only what saelab wrote, so nothing was deleted: remove them yourself "
                         "or choose another folder")
    if not overwrite and names and not (out / MANIFEST).exists():
        raise CacheError(f"{out} is not empty and holds no activation cache ({_shown(names)}); choose another "
                         "folder" + ("" if foreign else ", or pass overwrite=True (--overwrite) to clear these leftovers"))


def _differences(old: dict, new: dict) -> list[str]:
    """Which run settings differ, one level into nested settings ('text.sha256'), so the error can name them."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            changed += [f"{key}.{sub}" for sub in sorted(set(a) | set(b)) if a.get(sub) != b.get(sub)]
        else:
            changed.append(key)
    return changed


def _open_run(out: Path, fresh: Manifest, overwrite: bool, tokens: int) -> Manifest:
    """Start a new run in `out`, or continue the same run found there (never with fewer contexts than it has)."""
    _check_folder(out, overwrite)
    if overwrite:
        remove_owned(out, {p.name for p in out.iterdir() if written_by_saelab(p.name)}, "activation cache")
    if (out / MANIFEST).exists():
        existing = Manifest.read(out)
        if existing.run != fresh.run:
            changed = _differences(existing.run, fresh.run)
            why = ""
            if "text.sha256" in changed:
                source = fresh.run["text"]["source"]
                why = (f"; the content of {source} is not the text this cache was made from" if
                       existing.run.get("text", {}).get("sha256") else
                       f"; this cache was written by an older saelab that did not record the content of {source}, "
                       "so it cannot be extended safely")
            raise CacheError(
                f"{out} holds a different run (differs in: {', '.join(changed)}){why}; choose another folder or pass "
                "overwrite=True (--overwrite) to replace it"
            )
        if existing.n_contexts > fresh.target_contexts:  # only overwrite may shrink a cache
            held = existing.n_contexts * existing.context_len
            warnings.warn(f"{out} holds {held:,} tokens, more than the {tokens:,} asked; keeping them "
                          "(overwrite=True / --overwrite rebuilds it smaller)", stacklevel=3)
        elif fresh.target_contexts > existing.n_contexts:
            existing.exhausted_at = None  # asked for more than the text gave last time: look again
        existing.target_contexts = max(existing.target_contexts, fresh.target_contexts)
        return existing
    fresh.write(out)
    return fresh


def _shards_to_compute(out: Path, manifest: Manifest) -> set[int]:
    """Indices of shards that are missing, damaged, or cover a different slice than this run needs."""
    for leftover in out.glob("*.tmp"):
        leftover.unlink()
    good = []
    for record in manifest.shards:
        try:
            check_shard(out, record)
        except CacheError:
            continue
        if record.index < manifest.n_shards and record.contexts == manifest.expected_contexts(record.index):
            good.append(record)
    manifest.shards = good
    return set(range(manifest.n_shards)) - {s.index for s in good}


@torch.inference_mode()
def _compute_shard(model, hooks, batches, dtype: str, index, bar=None) -> dict[str, torch.Tensor]:
    acts = {h: [] for h in hooks}
    all_tokens, positions = [], []
    offset = 0
    for batch in batches:
        out = model.activations(batch.tokens, hooks, flatten=True)
        keep = batch.mask.flatten()
        for hook in hooks:
            raw = out[hook].flatten(0, 1)[keep.to(out[hook].device)]
            rows = raw.to(DTYPES[dtype])
            if not torch.isfinite(rows).all():  # check what is stored: a finite value can overflow float16
                raise _non_finite(model, hook, index, raw, dtype)
            acts[hook].append(rows.to("cpu"))
        positions.append(keep.nonzero().squeeze(1) + offset)
        all_tokens.append(batch.tokens)
        offset += batch.tokens.numel()
        if bar is not None:
            bar.update(batch.tokens.numel())
    tensors = {f"acts.{h}": torch.cat(acts[h]) for h in hooks}
    tensors["tokens"] = torch.cat(all_tokens).to(torch.int32)
    tensors["positions"] = torch.cat(positions).to(torch.int32)
    return tensors


def _non_finite(model, hook: str, index: int, raw: torch.Tensor, dtype: str) -> CacheError:
    if not torch.isfinite(raw).all():
        return CacheError(f"{model.name} produced NaN/Inf activations at {hook} in shard {index}; "
                          "try a float32 model or check the input text")
    wider = "bfloat16 or float32" if dtype == "float16" else "float32"
    return CacheError(f"activations at {hook} in shard {index} overflow {dtype} (largest magnitude "
                      f"{raw.abs().max().item():.4g}; {dtype} holds up to {torch.finfo(DTYPES[dtype]).max:.4g}); "
                      f"cache with --dtype {wider} instead")


def _write_shard(out: Path, manifest: Manifest, index: int, n_contexts: int, tensors: dict,
                 list_it: bool = True) -> None:
    payload = safetensors_bytes(tensors, metadata={"format": "saelab-activations-shard", "index": str(index)})
    name = shard_name(index)
    write_atomic(out / name, payload)
    record = ShardRecord(index, name, n_contexts, int(tensors["positions"].numel()), len(payload),
                         hashlib.sha256(payload).hexdigest())
    manifest.shards = sorted([s for s in manifest.shards if s.index != index] + [record], key=lambda s: s.index)
    if list_it:  # a single process; distributed ranks' shards are listed by _list_every_ranks_shards
        manifest.write(out)
