"""Cache activations of several hook points from one model pass into sharded safetensors.

Resumable by construction: contexts come from a deterministic stream and shard i holds a fixed slice of it, so a
second run with the same arguments recomputes exactly the shards that are missing or damaged, and nothing else.
"""

from __future__ import annotations

import hashlib
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm

import saelab
from saelab.activations.manifest import MANIFEST, Manifest, ShardRecord, check_shard, shard_name, write_atomic
from saelab.data import TextConfig, token_batches
from saelab.errors import CacheError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_activations(
    model,
    hooks: str | list[str],
    out: str | Path,
    *,
    text: TextConfig | str | None = None,
    tokens: int = 100_000,
    batch_size: int = 8,
    shard_tokens: int = 1 << 16,
    dtype: str = "float32",
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
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if text.context_len > model.n_ctx:
        raise ValueError(f"context_len {text.context_len} is longer than {model.name} allows ({model.n_ctx})")
    if tokens < 1 or batch_size < 1:
        raise ValueError(f"tokens and batch_size must be positive, got tokens={tokens}, batch_size={batch_size}")
    shard_contexts = max(batch_size, shard_tokens // text.context_len // batch_size * batch_size)
    fresh = Manifest(
        run={"model": model.name, "hooks": hooks, "dtype": dtype, "drop_bos": drop_bos, "batch_size": batch_size,
             "shard_contexts": shard_contexts, "text": text.fingerprint()},
        hooks={h: {"d": model.hook_dim(h), "shape": list(model.hook_shape(h))} for h in hooks},
        dtype=dtype,
        context_len=text.context_len,
        shard_contexts=shard_contexts,
        target_contexts=-(-tokens // text.context_len),
        saelab_version=saelab.__version__,
    )
    out = Path(out)
    manifest = _open_run(out, fresh, overwrite)
    todo = _shards_to_compute(out, manifest)
    bar = tqdm(total=len(todo), desc=f"caching {len(hooks)} hook(s)", unit="shard", disable=not progress)
    contexts = text.contexts(model.tokenizer)
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    with ThreadPoolExecutor(max_workers=1) as io:  # serialise + hash + write the last shard while computing the next
        pending: Future | None = None
        for index in range(manifest.n_shards):
            chunk = list(islice(contexts, manifest.expected_contexts(index)))
            if len(chunk) < manifest.expected_contexts(index):  # the text ran out: the cache ends here
                manifest.exhausted_at = index * shard_contexts + len(chunk)
            if index not in todo or not chunk:
                continue
            batches = token_batches(chunk, batch_size, text.context_len, pad_id=pad_id,
                                    drop_bos=drop_bos and text.prepend_bos)
            tensors = _compute_shard(model, hooks, batches, DTYPES[dtype], index)
            if pending is not None:
                pending.result()
            pending = io.submit(_write_shard, out, manifest, index, len(chunk), tensors)
            pending.add_done_callback(lambda _: bar.update())
        if pending is not None:
            pending.result()
    bar.close()
    manifest.shards = [s for s in manifest.shards if s.index < manifest.n_shards]
    manifest.write(out)
    if not manifest.complete:
        raise CacheError(f"{out}: cache incomplete after the run; re-run the same command to finish it")
    return manifest


def _open_run(out: Path, fresh: Manifest, overwrite: bool) -> Manifest:
    """Start a new run in `out`, or continue the same run found there."""
    if overwrite and out.exists():
        shutil.rmtree(out)
    if (out / MANIFEST).exists():
        existing = Manifest.read(out)
        if existing.run != fresh.run:
            changed = sorted(k for k in fresh.run if existing.run.get(k) != fresh.run[k])
            raise CacheError(
                f"{out} holds a different run (differs in: {', '.join(changed)}); choose another folder or pass "
                "overwrite=True (--overwrite) to replace it"
            )
        existing.target_contexts = fresh.target_contexts
        existing.exhausted_at = None if fresh.target_contexts > existing.n_contexts else existing.exhausted_at
        return existing
    if out.exists() and any(out.iterdir()):
        raise CacheError(f"{out} is not empty and holds no activation cache; choose another folder")
    out.mkdir(parents=True, exist_ok=True)
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
def _compute_shard(model, hooks, batches, dtype, index) -> dict[str, torch.Tensor]:
    acts = {h: [] for h in hooks}
    all_tokens, positions = [], []
    offset = 0
    for batch in batches:
        out = model.activations(batch.tokens, hooks, flatten=True)
        keep = batch.mask.flatten()
        for hook in hooks:
            rows = out[hook].flatten(0, 1)[keep.to(out[hook].device)]
            if not torch.isfinite(rows).all():
                raise CacheError(f"{model.name} produced NaN/Inf activations at {hook} in shard {index}; "
                                 "try a float32 model or check the input text")
            acts[hook].append(rows.to("cpu", dtype))
        positions.append(keep.nonzero().squeeze(1) + offset)
        all_tokens.append(batch.tokens)
        offset += batch.tokens.numel()
    tensors = {f"acts.{h}": torch.cat(acts[h]) for h in hooks}
    tensors["tokens"] = torch.cat(all_tokens).to(torch.int32)
    tensors["positions"] = torch.cat(positions).to(torch.int32)
    return tensors


def _write_shard(out: Path, manifest: Manifest, index: int, n_contexts: int, tensors: dict) -> None:
    payload = safetensors_bytes(tensors, metadata={"format": "saelab-activations-shard", "index": str(index)})
    name = shard_name(index)
    write_atomic(out / name, payload)
    record = ShardRecord(index, name, n_contexts, int(tensors["positions"].numel()), len(payload),
                         hashlib.sha256(payload).hexdigest())
    manifest.shards = sorted([s for s in manifest.shards if s.index != index] + [record], key=lambda s: s.index)
    manifest.write(out)
