"""Activations straight from the model, no disk: the same batches interface as ActivationStore.

Consecutive tokens of one context are highly correlated, so a mixing buffer holds `buffer_tokens` positions from
many contexts; each refill shuffles the buffer and hands out its first half as batches.
"""

from __future__ import annotations

from itertools import islice
from typing import Iterator

import torch

from saelab.activations.store import ActivationBatch
from saelab.data import TextConfig, token_batches


class ModelStream:
    """Shuffled token-level batches of `hooks` activations, computed on the fly from `model` over `text`.

    max_tokens: stop after this many positions (None: until the text runs out). rank / world_size: this process
    takes every world_size-th context (for data-parallel training). rows are global position ids
    (context_index * context_len + position).
    """

    def __init__(self, model, hooks: list[str] | str, text: TextConfig | str | None = None, *,
                 batch_size: int = 4096, buffer_tokens: int = 1 << 16, model_batch_size: int = 8, seed: int = 0,
                 drop_bos: bool = True, dtype: torch.dtype = torch.float32, max_tokens: int | None = None,
                 rank: int = 0, world_size: int = 1):
        self.model = model
        self.hooks = model.resolve_hooks(hooks)
        self.text = text if isinstance(text, TextConfig) else TextConfig(source=text or "default")
        if self.text.context_len > model.n_ctx:
            raise ValueError(f"context_len {self.text.context_len} is longer than {model.name} allows ({model.n_ctx})")
        if buffer_tokens < 2 * batch_size:
            raise ValueError(f"buffer_tokens ({buffer_tokens}) must hold at least two batches ({2 * batch_size})")
        self.batch_size, self.buffer_tokens, self.model_batch_size = batch_size, buffer_tokens, model_batch_size
        self.seed, self.drop_bos, self.dtype, self.max_tokens = seed, drop_bos, dtype, max_tokens
        self.rank, self.world_size = rank, world_size

    @property
    def d(self) -> dict[str, int]:
        return {h: self.model.hook_dim(h) for h in self.hooks}

    def in_order(self) -> Iterator[ActivationBatch]:
        """Unshuffled batches of up to model_batch_size contexts each, in text order (for analyses that show
        contexts); max_tokens and batch_size do not apply."""
        length = self.text.context_len
        for chunk in self._positions():
            rows = chunk["rows"]
            yield ActivationBatch({h: chunk[h] for h in self.hooks}, chunk["token_ids"], rows, rows // length,
                                  rows % length)

    def _positions(self) -> Iterator[dict[str, torch.Tensor]]:
        """Model outputs in chunks of kept positions: {hook: [n, d], 'token_ids': [n], 'rows': [n]}."""
        length = self.text.context_len
        contexts = islice(enumerate(self.text.contexts(self.model.tokenizer)), self.rank, None, self.world_size)
        tokenizer = self.model.tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        while chunk := list(islice(contexts, self.model_batch_size)):
            numbers, token_lists = zip(*chunk)
            batch = next(token_batches(token_lists, len(chunk), length, pad_id=pad_id,
                                       drop_bos=self.drop_bos and self.text.prepend_bos))
            keep = batch.mask.flatten()
            acts = self.model.activations(batch.tokens, self.hooks, flatten=True)
            out = {h: acts[h].flatten(0, 1)[keep.to(acts[h].device)].to("cpu", self.dtype) for h in self.hooks}
            out["token_ids"] = batch.tokens.flatten()[keep]
            out["rows"] = (torch.tensor(numbers).unsqueeze(1) * length + torch.arange(length)).flatten()[keep]
            yield out

    def __iter__(self) -> Iterator[ActivationBatch]:
        generator = torch.Generator().manual_seed(self.seed)
        buffer: dict[str, torch.Tensor] | None = None
        produced, budget = 0, self.max_tokens
        source = self._positions()
        exhausted = False
        while True:
            chunks = [] if buffer is None else [buffer]
            held = 0 if buffer is None else len(buffer["rows"])
            while not exhausted and held < self.buffer_tokens:
                chunk = next(source, None)
                if chunk is None:
                    exhausted = True
                    break
                chunks.append(chunk)
                held += len(chunk["rows"])
            if held < self.batch_size:
                return
            buffer = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
            order = torch.randperm(len(buffer["rows"]), generator=generator)
            buffer = {k: v[order] for k, v in buffer.items()}
            n_out = len(buffer["rows"]) if exhausted else len(buffer["rows"]) // 2
            n_out = n_out // self.batch_size * self.batch_size
            for begin in range(0, n_out, self.batch_size):
                if budget is not None and produced + self.batch_size > budget:
                    return
                where = slice(begin, begin + self.batch_size)
                rows = buffer["rows"][where]
                yield ActivationBatch({h: buffer[h][where] for h in self.hooks}, buffer["token_ids"][where], rows,
                                      rows // self.text.context_len, rows % self.text.context_len)
                produced += self.batch_size
            buffer = {k: v[n_out:] for k, v in buffer.items()}
