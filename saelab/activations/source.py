"""What training, codes, evaluation and analyses read activations from, and the one place that builds it.

    source = open_source("runs/acts", batch_size=4096, seed=3)                       # a cache: ActivationStore
    source = open_source(model=model, hooks=["blocks.3.hook_resid_post"], text=text)  # live: ModelStream
    source.batches(start=b)   # training order, across epochs, from batch b (what a resumed run reads)
    source.in_order()         # every position once, in text order (codes, evaluation, analyses)

The CLI and the Python API both build their sources here, so the same settings give the same batches either way,
and ranks of a distributed run share them the same way (see source_share).
"""

from __future__ import annotations

import dataclasses
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Protocol, runtime_checkable

from saelab import distributed
from saelab.activations.store import ActivationBatch, ActivationStore
from saelab.activations.stream import ModelStream


@runtime_checkable
class ActivationSource(Protocol):
    """Batches of activations at some hooks of one model, with what a run needs to know about them."""

    hooks: list[str]
    batch_size: int
    rank: int
    world_size: int
    """This process's share: rank of world_size (0 of 1 when it reads every batch whole)."""

    @property
    def d(self) -> dict[str, int]:
        """The width of each hook's activations."""

    @property
    def model_name(self) -> str:
        """The model the activations come from ('' if unknown)."""

    def fingerprint(self) -> dict:
        """What a checkpoint must match to resume on this source (JSON-able)."""

    def batches(self, start: int = 0) -> Iterator[ActivationBatch]:
        """The training sequence from batch number `start` on (across epochs, where the source has them)."""

    def in_order(self, hooks: list[str] | None = None) -> Iterator[ActivationBatch]:
        """Every position once, in text order, at `hooks` (default: all the source's hooks)."""


class IterableSource:
    """Activations you already hold (an iterable of ActivationBatches that says its `hooks`, their widths `d` and
    its `batch_size`) as an ActivationSource: one pass, in the iterable's own order. A resumed run re-iterates it
    and skips the batches already trained on, so it must give the same batches each time."""

    def __init__(self, batches: Iterable[ActivationBatch]):
        self.source = batches
        self.hooks = list(batches.hooks)
        self.batch_size = batches.batch_size
        self.rank, self.world_size = getattr(batches, "rank", 0), getattr(batches, "world_size", 1)
        self.drop_last = getattr(batches, "drop_last", True)
        self.split_batches = getattr(batches, "split_batches", True)

    @property
    def d(self) -> dict[str, int]:
        return dict(self.source.d)

    @property
    def model_name(self) -> str:
        return getattr(self.source, "model_name", "")

    def fingerprint(self) -> dict:
        return {"source": type(self.source).__name__, "hooks": self.hooks}

    def batches(self, start: int = 0) -> Iterator[ActivationBatch]:
        return islice(iter(self.source), start, None)

    def in_order(self, hooks: list[str] | None = None) -> Iterator[ActivationBatch]:
        for batch in self.source:
            yield batch if hooks is None else dataclasses.replace(batch, acts={h: batch.acts[h] for h in hooks})

    def __iter__(self) -> Iterator[ActivationBatch]:
        return iter(self.source)


def open_source(source: str | Path | ActivationSource | Iterable[ActivationBatch] | None = None, *, model=None,
                hooks: list[str] | str | None = None, text=None, batch_size: int = 4096, seed: int = 0,
                share: distributed.World | None = None, buffer_tokens: int = 1 << 16) -> ActivationSource:
    """The activation source for `source` (a cache folder), or for `model` + `hooks` + `text` (a live stream).

    A cache is read in the order `seed` gives; a stream mixes its buffer of `buffer_tokens` positions with `seed`.
    share: how the ranks of a training run share the batches (run_share(config)); None reads every batch whole in
    this process. An
    ActivationStore, a ModelStream or another ActivationSource passes through as it is (its own batch size, seed
    and share); any other iterable of ActivationBatches with .hooks, .d and .batch_size is wrapped (IterableSource).
    """
    if model is not None:
        if source is not None:
            raise ValueError("give an activation source or a model to stream from, not both")
        if not hooks:
            raise ValueError("streaming from a model needs hooks")
        placing = source_share(share, stream=True) if share is not None else {}
        return ModelStream(model, hooks, text, batch_size=batch_size, seed=seed, buffer_tokens=buffer_tokens,
                           **placing)
    if isinstance(source, (str, Path)):
        if text is not None:
            raise ValueError("a cache holds the text it was made from; text= is for streaming from a model")
        return ActivationStore(source, hooks, batch_size=batch_size, seed=seed,
                               **source_share(share or distributed.SINGLE))
    if isinstance(source, (ActivationStore, ModelStream)):
        return source
    if all(hasattr(source, name) for name in ("__iter__", "hooks", "d", "batch_size")):
        return source if isinstance(source, ActivationSource) else IterableSource(source)
    raise TypeError(f"read activations from a cache folder, an ActivationStore, a ModelStream or an iterable of "
                    f"ActivationBatches with .hooks, .d and .batch_size; not {type(source).__name__}")


def source_share(share: distributed.World, stream: bool = False) -> dict:
    """The rank / world_size arguments of an ActivationStore (or, stream=True, a ModelStream) for a run that
    shares batches as `share` says: data-parallel ranks read equal slices of every batch; with parallel='saes'
    every rank reads whole batches (a stream's ranks still split the model forwards and gather them)."""
    if stream:
        world = distributed.current()
        return dict(rank=world.rank, world_size=world.size, gather=True, split_batches=share.distributed)
    return dict(rank=share.rank, world_size=share.size)


def run_share(config) -> distributed.World:
    """How the batches of a run under `config` (a TrainConfig) are shared among this process group's ranks:
    data-parallel ranks split every batch, otherwise each rank reads them whole."""
    world = distributed.current()
    return world if world.distributed and config.parallel == "data" else distributed.SINGLE


def check_share(source: ActivationSource, world: distributed.World, data_parallel: bool) -> None:
    """A data-parallel rank must read its equal slice of every batch; with parallel='saes', whole batches."""
    size = getattr(source, "world_size", 1) if getattr(source, "split_batches", True) else 1
    wanted = world.size if data_parallel else 1
    if isinstance(source, ModelStream) and source.world_size > 1 and not source.gather:
        size = -1  # ranks reading their own contexts would see different batches, and unequal numbers of them
    if data_parallel and (source.batch_size % world.size or not getattr(source, "drop_last", True)):
        raise ValueError(f"data-parallel training over {world.size} ranks needs batch_size a multiple of {world.size} "
                         f"(got {source.batch_size}) and whole batches only (drop_last=True), so that every rank "
                         "takes an equal share of every batch")
    if size != wanted or (data_parallel and getattr(source, "rank", 0) != world.rank):
        how = (f"rank={world.rank}, world_size={world.size}" if data_parallel else
               "world_size=1 for an ActivationStore, gather=True and split_batches=False for a ModelStream")
        raise ValueError(f"rank {world.rank} of {world.size} (parallel={'data' if data_parallel else 'saes'}) needs "
                         f"its activation source built with {how} (see saelab.activations.source.source_share); "
                         "or pass the cache folder and let the trainer build it")
