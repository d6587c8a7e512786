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
from saelab.errors import HookError


class ModelStream:
    """Shuffled token-level batches of `hooks` activations, computed on the fly from `model` over `text`.

    max_tokens: stop after this many positions (None: until the text runs out). rows are global position ids
    (context_index * context_len + position).

    rank / world_size: this process takes every world_size-th context (independent shares, which may give
    ranks unequal batch counts). gather=True (training under torch.distributed, see saelab.distributed): the ranks
    instead share the model forwards (rank r runs chunks r, r + world_size, ... of model_batch_size contexts) and
    gather the activations, so every rank holds the buffer one process would; it then yields its equal slice of
    every batch (split_batches, data-parallel training) or the whole batch (several SAEs spread over the ranks).

    progress: a bar (on stderr, rank 0) while the buffer first fills, which takes buffer_tokens positions of model
    forwards before the first batch comes out.
    """

    def __init__(self, model, hooks: list[str] | str, text: TextConfig | str | None = None, *,
                 batch_size: int = 4096, buffer_tokens: int = 1 << 16, model_batch_size: int = 8, seed: int = 0,
                 drop_bos: bool = True, dtype: torch.dtype = torch.float32, max_tokens: int | None = None,
                 rank: int = 0, world_size: int = 1, gather: bool = False, split_batches: bool = True,
                 progress: bool = True):
        self.model = model
        self.hooks = model.resolve_hooks(hooks)
        self.text = text if isinstance(text, TextConfig) else TextConfig(source=text or "default")
        if self.text.context_len > model.n_ctx:
            raise ValueError(f"context_len {self.text.context_len} is longer than {model.name} allows ({model.n_ctx})")
        if buffer_tokens < 2 * batch_size:
            raise ValueError(f"buffer_tokens ({buffer_tokens}) must hold at least two batches ({2 * batch_size})")
        self.batch_size, self.buffer_tokens, self.model_batch_size = batch_size, buffer_tokens, model_batch_size
        self.seed, self.drop_bos, self.dtype, self.max_tokens = seed, drop_bos, dtype, max_tokens
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if gather and split_batches and batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} does not split into {world_size} equal shares; give a "
                             "multiple of world_size")
        self.rank, self.world_size, self.gather = rank, world_size, gather
        self.split_batches = split_batches and gather
        self.progress = progress

    @property
    def d(self) -> dict[str, int]:
        return {h: self.model.hook_dim(h) for h in self.hooks}

    @property
    def model_name(self) -> str:
        return self.model.name

    def fingerprint(self) -> dict:
        """What a checkpoint must match to resume on this stream (not how ranks share it: a run resumes on any
        number of them)."""
        return {"model": self.model.name, "hooks": self.hooks, "text": self.text.fingerprint(), "seed": self.seed,
                "buffer_tokens": self.buffer_tokens}

    def held_out_text(self, tokens: int) -> TextConfig:
        """The text after every context a run of `tokens` training tokens can read: the buffer is filled past the
        last batch, and each context gives at most context_len - 1 positions (its BOS dropped)."""
        used = -(-(tokens + self.buffer_tokens) // (self.text.context_len - 1)) + 1
        return self.text.after(used)

    def batches(self, start: int = 0) -> Iterator[ActivationBatch]:
        """The batches from batch number `start` on. A live stream cannot seek: it replays (deterministic for its
        seed) up to there."""
        batches = iter(self)
        for _ in range(start):
            next(batches, None)
        yield from batches

    def in_order(self, hooks: list[str] | None = None) -> Iterator[ActivationBatch]:
        """Unshuffled batches of up to model_batch_size contexts each, in text order (for analyses that show
        contexts); max_tokens and batch_size do not apply. hooks: only these of the stream's hooks (default: all)."""
        hooks = hooks or self.hooks
        for hook in hooks:
            if hook not in self.hooks:
                raise HookError(f"the stream reads {', '.join(self.hooks)}, not {hook!r}")
        length = self.text.context_len
        for chunk in self._positions():
            rows = chunk["rows"]
            yield ActivationBatch({h: chunk[h] for h in hooks}, chunk["token_ids"], rows, rows // length,
                                  rows % length)

    def _positions(self) -> Iterator[dict[str, torch.Tensor]]:
        """Model outputs in chunks of kept positions: {hook: [n, d], 'token_ids': [n], 'rows': [n]}."""
        contexts = enumerate(self.text.contexts(self.model.tokenizer))
        if not self.gather:
            contexts = islice(contexts, self.rank, None, self.world_size)
        chunks = iter(lambda: list(islice(contexts, self.model_batch_size)), [])
        if not self.gather or self.world_size == 1:
            yield from map(self._forward, chunks)
            return
        world = self._world()
        while True:  # one round: each rank forwards one chunk, then all ranks gather the round's chunks in order
            mine = {}
            for number, chunk in enumerate(islice(chunks, self.world_size)):
                if number == self.rank:
                    mine = self._forward(chunk)
            if not mine:
                mine = {h: torch.zeros(0, d, dtype=self.dtype) for h, d in self.d.items()}
                mine.update(token_ids=torch.zeros(0, dtype=torch.long), rows=torch.zeros(0, dtype=torch.long))
            every = {key: world.gather_rows(value.to(world.device)) for key, value in mine.items()}
            if not any(len(rows) for rows in every["rows"]):
                return
            for part in range(self.world_size):
                if len(every["rows"][part]):
                    yield {key: parts[part].cpu() for key, parts in every.items()}

    def _world(self):
        from saelab.distributed import current

        world = current()
        if (world.rank, world.size) != (self.rank, self.world_size):
            raise ValueError(f"ModelStream(rank={self.rank}, world_size={self.world_size}) needs the torch.distributed "
                             f"process group of that size joined first (saelab.distributed.init()); this process is "
                             f"rank {world.rank} of {world.size}")
        return world

    def _forward(self, chunk: list[tuple[int, list[int]]]) -> dict[str, torch.Tensor]:
        length = self.text.context_len
        tokenizer = self.model.tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        numbers, token_lists = zip(*chunk)
        batch = next(token_batches(token_lists, len(chunk), length, pad_id=pad_id,
                                   drop_bos=self.drop_bos and self.text.prepend_bos))
        keep = batch.mask.flatten()
        acts = self.model.activations(batch.tokens, self.hooks, flatten=True)
        out = {h: acts[h].flatten(0, 1)[keep.to(acts[h].device)].to("cpu", self.dtype) for h in self.hooks}
        out["token_ids"] = batch.tokens.flatten()[keep]
        out["rows"] = (torch.tensor(numbers).unsqueeze(1) * length + torch.arange(length)).flatten()[keep]
        return out

    def _filling_bar(self):
        from tqdm.auto import tqdm

        return tqdm(total=self.buffer_tokens, desc="filling the mixing buffer", leave=False,
                    disable=not (self.progress and self.rank == 0),
                    bar_format="{desc}: {n:,} of {total:,} tokens |{bar}| [{elapsed}<{remaining}, {rate_fmt}]",
                    unit="tok")

    def __iter__(self) -> Iterator[ActivationBatch]:
        generator = torch.Generator().manual_seed(self.seed)
        buffer: dict[str, torch.Tensor] | None = None
        produced, budget = 0, self.max_tokens
        source = self._positions()
        exhausted = False
        while True:
            chunks = [] if buffer is None else [buffer]
            held = 0 if buffer is None else len(buffer["rows"])
            filling = self._filling_bar() if buffer is None else None
            while not exhausted and held < self.buffer_tokens:
                chunk = next(source, None)
                if chunk is None:
                    exhausted = True
                    break
                chunks.append(chunk)
                held += len(chunk["rows"])
                if filling is not None:
                    filling.update(min(held, self.buffer_tokens) - filling.n)
            if filling is not None:
                filling.close()
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
                if self.split_batches:  # this rank's share of the batch
                    share = self.batch_size // self.world_size
                    where = slice(begin + self.rank * share, begin + (self.rank + 1) * share)
                rows = buffer["rows"][where]
                yield ActivationBatch({h: buffer[h][where] for h in self.hooks}, buffer["token_ids"][where], rows,
                                      rows // self.text.context_len, rows % self.text.context_len)
                produced += self.batch_size
            buffer = {k: v[n_out:] for k, v in buffer.items()}
