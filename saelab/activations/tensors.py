"""Activations held in memory (or in one safetensors file) as a training source with epochs.

For rows no cache layout describes, such as the word-aligned rows of two models with different tokenizers
(saelab.crosscoder.paired): every epoch visits all rows once in an order its number and the seed fix, so batch b is
the same on every read and a resumed run continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
from itertools import count
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from saelab.activations.store import ActivationBatch
from saelab.errors import CacheError
from saelab.files import name_problem

TOKEN_IDS = "token_ids"
"""The file's tensor of token ids (one per row); every other tensor is a hook's activations."""


class TensorSource:
    """Rows [n, d] at each hook (the same n tokens at every hook), read in shuffled epochs of whole batches."""

    rank, world_size = 0, 1

    def __init__(self, acts: dict[str, Tensor], *, batch_size: int = 4096, seed: int = 0, model_name: str = "",
                 token_ids: Tensor | None = None):
        if not acts:
            raise ValueError("a tensor source needs activations at one hook at least")
        rows = {hook: (tuple(x.shape)) for hook, x in acts.items()}
        if any(len(shape) != 2 for shape in rows.values()) or len({shape[0] for shape in rows.values()}) != 1:
            raise ValueError(f"every hook must hold [rows, d] activations of the same rows, got shapes {rows}")
        for hook in acts:
            if problem := name_problem(hook):
                raise ValueError(f"hook name {hook!r} {problem}")
        self.acts, self.n = acts, next(iter(rows.values()))[0]
        if not 1 <= batch_size <= self.n:
            raise ValueError(f"batch_size must be in 1..{self.n} (the rows held), got {batch_size}")
        self.hooks, self.batch_size, self.seed, self.model_name = list(acts), batch_size, seed, model_name
        self.token_ids = token_ids if token_ids is not None else torch.zeros(self.n, dtype=torch.long)

    @property
    def d(self) -> dict[str, int]:
        return {hook: x.shape[1] for hook, x in self.acts.items()}

    def fingerprint(self) -> dict:
        return {"source": "tensors", "hooks": self.hooks, "rows": self.n, "seed": self.seed,
                "batch_size": self.batch_size}

    def batches(self, start: int = 0) -> Iterator[ActivationBatch]:
        per_epoch = self.n // self.batch_size  # the last partial batch of an epoch is dropped, as a cache's is
        for b in count(start):
            epoch, i = divmod(b, per_epoch)
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
            yield self._batch(order[i * self.batch_size:(i + 1) * self.batch_size])

    def __iter__(self) -> Iterator[ActivationBatch]:
        return self.batches()

    def in_order(self, hooks: list[str] | None = None) -> Iterator[ActivationBatch]:
        for start in range(0, self.n, self.batch_size):
            batch = self._batch(torch.arange(start, min(start + self.batch_size, self.n)))
            yield batch if hooks is None else dataclasses.replace(batch, acts={h: batch.acts[h] for h in hooks})

    def _batch(self, rows: Tensor) -> ActivationBatch:
        return ActivationBatch({hook: x[rows] for hook, x in self.acts.items()}, self.token_ids[rows], rows)

    def save(self, path: str | Path) -> None:
        """One safetensors file: each hook's rows and the token ids; the model name in its metadata."""
        save_file({**{h: x.contiguous() for h, x in self.acts.items()}, TOKEN_IDS: self.token_ids.contiguous()},
                  str(path), metadata={"model_name": self.model_name, "hooks": json.dumps(self.hooks)})

    @classmethod
    def load(cls, path: str | Path, **kwargs) -> "TensorSource":
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
        except (OSError, SafetensorError) as error:
            raise CacheError(f"{path}: not a readable safetensors file of activations ({error})") from error
        token_ids = tensors.pop(TOKEN_IDS, None)
        order = json.loads(metadata.get("hooks", "[]"))  # the file itself keeps its tensors sorted by name
        if sorted(order) == sorted(tensors):
            tensors = {hook: tensors[hook] for hook in order}
        rows = len(next(iter(tensors.values()))) if tensors else 0
        kwargs.setdefault("batch_size", max(1, min(4096, rows)))
        return cls(tensors, token_ids=token_ids, model_name=kwargs.pop("model_name", metadata.get("model_name", "")),
                   **kwargs)
