"""Read a cache as shuffled token-level batches, with bounded memory and exact skip-ahead for resumed training.

Each epoch visits the shards in a seeded random order, a window of a few shards at a time: the window's rows are
permuted together and cut into batches, so a batch mixes tokens from several shards while memory stays at one
window. Batches are consecutive slices of the epoch's row sequence, which makes `iter_batches(start=b)` cheap:
it knows from the manifest which window batch b starts in and loads nothing before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from saelab.activations.manifest import Manifest, ShardRecord, check_shard
from saelab.data import TextConfig
from saelab.errors import CacheError, HookError, TrainingError


@dataclass
class ActivationBatch:
    """Activations of one batch of token positions, for each hook, with the tokens they came from.

    rows identify each position in its source (for a cache: the row index across shards, see ActivationStore.locate);
    contexts and positions say which context (0, 1, ... in text order) and which position in it each row is.
    """

    acts: dict[str, torch.Tensor]
    token_ids: torch.Tensor
    rows: torch.Tensor
    contexts: torch.Tensor | None = None
    positions: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.rows)


class ActivationStore:
    """Shuffled batches from an activation cache written by `cache_activations`.

    hooks: which cached hooks to read (default: all). shards_per_window bounds memory: about
    shards_per_window x shard rows x sum(d) x bytes per value. rank / world_size (data-parallel training): every
    rank walks the same sequence of batch_size-row batches and yields its own slice of each (equal when
    world_size divides the batch: the trainer asks that), so all ranks take the same number of steps and together
    see exactly the rows one process would (each rank still reads every window: the shuffle mixes rows of several
    shards).
    """

    def __init__(self, path: str | Path, hooks: list[str] | str | None = None, *, batch_size: int = 4096,
                 shuffle: bool = True, seed: int = 0, shards_per_window: int = 4, drop_last: bool = True,
                 rank: int = 0, world_size: int = 1, verify: bool = True, allow_partial: bool = False):
        self.path = Path(path)
        self.manifest = Manifest.read(self.path)
        if not self.manifest.complete and not allow_partial:
            raise CacheError(
                f"cache {self.path} is incomplete ({len(self.manifest.shards)} of {self.manifest.n_shards} shards); "
                "re-run the same `saelab cache` command to finish it, or pass allow_partial=True"
            )
        hooks = [hooks] if isinstance(hooks, str) else hooks
        self.hooks = list(self.manifest.hooks) if hooks is None else hooks
        for hook in self.hooks:
            if hook not in self.manifest.hooks:
                raise HookError(f"cache {self.path} has no hook {hook!r}; it holds {', '.join(self.manifest.hooks)}")
        if batch_size < 1 or shards_per_window < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1, shards_per_window >= 1, 0 <= rank < world_size; got "
                             f"{batch_size}, {shards_per_window}, rank={rank}, world_size={world_size}")
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.shards_per_window, self.drop_last = shards_per_window, drop_last
        self.rank, self.world_size, self.verify = rank, world_size, verify
        self._verified: set[int] = set()
        self._row_offsets, self._context_offsets = {}, {}
        rows = contexts = 0
        for record in self.manifest.shards:
            self._row_offsets[record.index], self._context_offsets[record.index] = rows, contexts
            rows, contexts = rows + record.rows, contexts + record.contexts

    @property
    def d(self) -> dict[str, int]:
        return {h: self.manifest.hooks[h]["d"] for h in self.hooks}

    @property
    def model_name(self) -> str:
        return self.manifest.run.get("model", "")

    def fingerprint(self) -> dict:
        """What a checkpoint must match to resume on this store: the cache and the order it is read in (not the
        ranks sharing it: a run resumes on any number of them)."""
        return {"cache": self.manifest.run, "tokens": self.n_tokens, "hooks": self.hooks, "seed": self.seed,
                "shuffle": self.shuffle, "shards_per_window": self.shards_per_window}

    def held_out_text(self, tokens: int | None = None) -> TextConfig:
        """The text that follows the cached contexts: held out from anything trained on this cache."""
        return TextConfig.from_fingerprint(self.manifest.run["text"]).after(self.manifest.n_contexts)

    @property
    def n_tokens(self) -> int:
        """Token positions in the whole cache."""
        return self.manifest.tokens

    def _epoch_shards(self, epoch: int) -> list[ShardRecord]:
        shards = list(self.manifest.shards)
        if self.shuffle:
            order = torch.randperm(len(shards), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            shards = [shards[i] for i in order]
        return shards

    def _epoch_rows(self, epoch: int) -> int:
        return sum(s.rows for s in self._epoch_shards(epoch))

    def batches_per_epoch(self, epoch: int = 0) -> int:
        rows = self._epoch_rows(epoch)
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch(0)

    def __iter__(self) -> Iterator[ActivationBatch]:
        return self.iter_batches()

    def iter_batches(self, epoch: int = 0, start: int = 0) -> Iterator[ActivationBatch]:
        """Batches of one epoch, from batch number `start` on (same batches as a full pass would give there)."""
        return self._walk(self._epoch_shards(epoch), epoch, start, self.shuffle, self.drop_last, self.hooks,
                          self.world_size > 1)

    def batches(self, start: int = 0) -> Iterator[ActivationBatch]:
        """The endless training sequence from batch number `start` on: epoch after epoch, each in its own order."""
        epoch = 0
        while True:
            per_epoch = self.batches_per_epoch(epoch)
            if per_epoch == 0:
                raise TrainingError(f"the cache holds fewer tokens than one batch ({self.batch_size})")
            if start < per_epoch:
                yield from self.iter_batches(epoch=epoch, start=start)
                start = 0
            else:
                start -= per_epoch
            epoch += 1

    def in_order(self, hooks: list[str] | None = None) -> Iterator[ActivationBatch]:
        """Every row of the cache once, in text order, whatever this store's shuffle, drop_last and rank; up to
        batch_size rows a batch. hooks: read only these of the store's hooks (default: all of them)."""
        for hook in hooks or []:
            if hook not in self.hooks:
                raise HookError(f"the store reads {', '.join(self.hooks)}, not {hook!r}")
        return self._walk(list(self.manifest.shards), 0, 0, False, False, hooks or self.hooks, False)

    def _walk(self, shards: list[ShardRecord], epoch: int, start: int, shuffle: bool, drop_last: bool,
              hooks: list[str], share: bool) -> Iterator[ActivationBatch]:
        windows = [shards[i : i + self.shards_per_window] for i in range(0, len(shards), self.shards_per_window)]
        skip = start * self.batch_size  # rows of the epoch sequence before the first batch we yield
        carry: dict[str, torch.Tensor] | None = None
        for number, window in enumerate(windows):
            rows = sum(s.rows for s in window)
            if skip >= rows:
                skip -= rows
                continue
            part = self._load_window(window, epoch, number, shuffle, hooks)
            if skip:
                part = {key: value[skip:] for key, value in part.items()}
                skip = 0
            if carry is not None:
                part = {key: torch.cat([carry[key], value]) for key, value in part.items()}
            n_full = len(part["rows"]) // self.batch_size * self.batch_size
            for begin in range(0, n_full, self.batch_size):
                yield self._batch(part, slice(begin, begin + self.batch_size), hooks, share)
            carry = {key: value[n_full:] for key, value in part.items()}
        if carry is not None and len(carry["rows"]) and not drop_last:
            yield self._batch(carry, slice(None), hooks, share)

    def _batch(self, part: dict[str, torch.Tensor], where: slice, hooks: list[str], share: bool) -> ActivationBatch:
        if share:  # this rank's share of the batch
            start, stop, _ = where.indices(len(part["rows"]))
            bounds = [start + (stop - start) * r // self.world_size for r in (self.rank, self.rank + 1)]
            where = slice(*bounds)
        return ActivationBatch({h: part[h][where] for h in hooks}, part["token_ids"][where], part["rows"][where],
                               part["contexts"][where], part["positions"][where])

    def _load_window(self, window: list[ShardRecord], epoch: int, number: int, shuffle: bool,
                     hooks: list[str]) -> dict[str, torch.Tensor]:
        parts = [self._load_shard(record, hooks) for record in window]
        joined = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        if shuffle:
            generator = torch.Generator().manual_seed((self.seed * 100_003 + epoch) * 10_007 + number + 1)
            order = torch.randperm(len(joined["rows"]), generator=generator)
            joined = {key: value[order] for key, value in joined.items()}
        return joined

    def _load_shard(self, record: ShardRecord, hooks: list[str]) -> dict[str, torch.Tensor]:
        if record.index not in self._verified:
            check_shard(self.path, record, checksum=self.verify)
            self._verified.add(record.index)
        file = self.path / record.file
        try:
            with safe_open(file, framework="pt") as shard:
                loaded = {hook: shard.get_tensor(f"acts.{hook}") for hook in hooks}
                tokens, positions = shard.get_tensor("tokens"), shard.get_tensor("positions").long()
        except (SafetensorError, OSError) as error:
            raise CacheError(f"shard {file} cannot be read ({error}); re-run the cache command to recompute it") from None
        loaded["token_ids"] = tokens.flatten()[positions].long()
        loaded["rows"] = torch.arange(record.rows) + self._row_offsets[record.index]
        length = self.manifest.context_len
        loaded["contexts"] = positions // length + self._context_offsets[record.index]
        loaded["positions"] = positions % length
        return loaded

    def context(self, number: int) -> torch.Tensor:
        """Token ids [context_len] of context `number` (as in ActivationBatch.contexts), BOS included if packed."""
        for record in self.manifest.shards:
            first = self._context_offsets[record.index]
            if first <= number < first + record.contexts:
                with safe_open(self.path / record.file, framework="pt") as shard:
                    return shard.get_slice("tokens")[number - first : number - first + 1][0].long()
        total = sum(r.contexts for r in self.manifest.shards)
        raise IndexError(f"context {number} is outside the cache ({total} contexts)")

    def locate(self, row: int) -> tuple[torch.Tensor, int]:
        """The context (token ids) that cache row `row` came from, and the position of that row within it."""
        for record in self.manifest.shards:
            offset = self._row_offsets[record.index]
            if offset <= row < offset + record.rows:
                with safe_open(self.path / record.file, framework="pt") as shard:
                    flat = int(shard.get_slice("positions")[row - offset : row - offset + 1][0])
                    context = shard.get_slice("tokens")[flat // self.manifest.context_len]
                return context.long(), flat % self.manifest.context_len
        raise IndexError(f"row {row} is outside the cache ({self.n_tokens} rows)")
