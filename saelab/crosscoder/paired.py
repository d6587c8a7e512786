"""The same text through two models, row by row: what a crosscoder across models (and its null) trains on.

Two tokenizers cut text differently, so rows are taken where both models have just read the same characters: the
last token of each word or punctuation mark (saelab.analysis.alignment). Each row then holds model A's activation
and model B's at the same point of the text. The rows live in memory and in one safetensors file (TensorSource):
aligned rows have no place in a cache's context layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from saelab.activations.tensors import TensorSource
from saelab.analysis.alignment import MODES, Side, aligned_chunks, read_documents

from saelab.activations.joined import MODEL_SEPARATOR, SEPARATOR, model_label


def paired_hook(model, hook: str) -> str:
    """A row's hook name in a two-model source: "<model label>:<hook>"."""
    return f"{model_label(model.name)}{MODEL_SEPARATOR}{hook}"


def paired_activations(model_a, hook_a: str, model_b, hook_b: str, text: str | Path | Sequence[str], *,
                       tokens: int, mode: str = "word", batch_size: int = 4096, seed: int = 0,
                       progress: bool = True) -> TensorSource:
    """Up to `tokens` aligned rows of `text` (a file, a string, or a list of documents) at hook_a of model_a and
    hook_b of model_b, as a TensorSource with hooks "<model>:<hook>" (see saelab.crosscoder.JoinedSource)."""
    if mode not in MODES:
        raise ValueError(f"alignment mode must be one of {MODES}, got {mode!r}")
    if model_label(model_a.name) == model_label(model_b.name):
        raise ValueError("both sides read the same model: join its hooks from one cache instead (JoinedSource)")
    side_a, side_b = Side(model_a, hook_a, None, "a"), Side(model_b, hook_b, None, "b")
    a, b, ids = [], [], []
    bar = tqdm(total=tokens, desc="aligned rows", unit="tok", unit_scale=True, disable=not progress)
    for chunk in aligned_chunks([side_a], [side_b], read_documents(text), mode=mode, max_tokens=tokens,
                                progress=lambda done: bar.update(done - bar.n)):
        a.append(chunk.a["a"].float())
        b.append(chunk.b["b"].float())
        ids.append(chunk.token_a)
    bar.close()
    if not a:
        raise ValueError("the text gave no aligned rows; give a longer text")
    acts = {paired_hook(model_a, side_a.hook): torch.cat(a), paired_hook(model_b, side_b.hook): torch.cat(b)}
    rows = len(next(iter(acts.values())))
    return TensorSource(acts, batch_size=min(batch_size, rows), seed=seed, token_ids=torch.cat(ids),
                        model_name=f"{model_a.name}{SEPARATOR}{model_b.name}")


def unpaired(source: TensorSource, hook: str, seed: int = 0) -> TensorSource:
    """The null of a two-model crosscoder: `hook`'s rows shuffled against the other side's, so the two models
    never read the same text in a row. A crosscoder trained on this should share (almost) no latents."""
    order = torch.randperm(source.n, generator=torch.Generator().manual_seed(seed))
    acts = {h: (x[order] if h == hook else x) for h, x in source.acts.items()}
    return TensorSource(acts, batch_size=source.batch_size, seed=source.seed, token_ids=source.token_ids,
                        model_name=source.model_name)
