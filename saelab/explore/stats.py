"""One streaming pass over an SAE's codes that gathers everything a feature card shows, for every latent at once.

    stats = collect(sae, "runs/acts")        # or a ModelStream; bounded memory: O(width x (top + sample) x window)

Per latent: firing count, sum and max of activations, a histogram over fixed log-spaced bins (decided from the first
chunk's median, so no second pass is needed), the top-n activating examples and a uniform sample of its firings
(for true quantiles), each example with the tokens around it and the latent's activation on each of them.
Codes come from `saelab.codes.iter_codes`, in text order; nothing [tokens x width] is ever held.

It also keeps every token's activation norm (4 bytes a token) to flag the latents whose top examples all sit at
"massive" tokens (norm above saelab.evals.core.MASSIVE x the median norm of the pass): attention sinks and the like,
which such a latent reconstructs rather than a feature of the text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from saelab.codes import Codes, Source, iter_codes
from saelab.evals.core import MASSIVE
from saelab.explore.examples import ExampleTable, Window

BINS_PER_DECADE = 20
DECADES_BELOW, DECADES_ABOVE = 4, 3
"""Histogram edges span [median / 1e4, median * 1e3] of the first chunk's activations; outliers go to the end bins."""


@dataclass
class LatentStats:
    """What one pass over the codes found, for all `width` latents (CPU tensors)."""

    width: int
    n_tokens: int
    count: Tensor
    """long [width]: tokens on which the latent fired (activation != 0)."""
    total: Tensor
    """float64 [width]: sum of its activations."""
    max: Tensor
    """float [width]: its largest activation (0 if it never fired)."""
    edges: Tensor
    """float [bins + 1]: log-spaced histogram edges (the first and last bins also hold what falls outside)."""
    hist: Tensor
    """long [width, bins]: each latent's activation histogram over `edges`."""
    top: ExampleTable
    """Each latent's top activating examples, best first."""
    sample: ExampleTable
    """A uniform random sample of each latent's firings (all of them if it fired at most `sample.n` times)."""
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)
    """Where the codes came from: source, hook, SAE name."""
    massive_only: Tensor | None = None
    """bool [width]: every top example of the latent is at a massive token (None: the codes carried no norms)."""
    massive_norm: float | None = None
    """The norm above which a token counts as massive: MASSIVE x the median activation norm of the pass."""

    @property
    def density(self) -> Tensor:
        """Fraction of tokens each latent fires on."""
        return self.count.double() / max(self.n_tokens, 1)

    @property
    def mean(self) -> Tensor:
        """Mean activation when firing (0 if never)."""
        return (self.total / self.count.clamp(min=1)).float()


def log_edges(first_values: Tensor) -> Tensor:
    """Fixed log-spaced edges around the median positive activation of a first chunk (or 1 if there is none)."""
    positive = first_values[first_values > 0]
    centre = float(positive.median()) if len(positive) else 1.0
    exponents = torch.linspace(-DECADES_BELOW, DECADES_ABOVE, (DECADES_BELOW + DECADES_ABOVE) * BINS_PER_DECADE + 1,
                               dtype=torch.float64)
    return (centre * 10.0 ** exponents).float()


def collect(sae, source: Source, *, hook: str | None = None, top: int = 20, sample: int = 50, before: int = 12,
            after: int = 4, batch_size: int = 8192, max_tokens: int | None = None, seed: int = 0,
            check_model: bool = True, progress: Callable[[int], None] | None = None) -> LatentStats:
    """Read every code of `source` once and keep, per latent, counts, a histogram, the `top` best examples and a
    uniform sample of `sample` firings, each with `before` tokens before and `after` after the firing token.

    progress: called with the number of tokens done after each chunk.
    """
    if top < 1 or sample < 0 or before < 0 or after < 0:
        raise ValueError(f"need top >= 1, sample >= 0, before >= 0, after >= 0; got {top}, {sample}, {before}, {after}")
    if batch_size <= before + after:
        raise ValueError(f"batch_size ({batch_size}) must be larger than the window ({before} + {after} tokens)")
    started = time.perf_counter()
    width = sae.cfg.width
    generator = torch.Generator().manual_seed(seed)
    tops = ExampleTable(width, top, before, after)
    samples = ExampleTable(width, max(sample, 1), before, after)
    count = torch.zeros(width, dtype=torch.long)
    total = torch.zeros(width, dtype=torch.float64)
    largest = torch.zeros(width)
    edges: Tensor | None = None
    hist: Tensor | None = None
    previous: Window | None = None
    current: Window | None = None
    norms: list[Tensor | None] = []
    done = 0
    for codes in iter_codes(sae, source, hook=hook, batch_size=batch_size, max_tokens=max_tokens,
                            check_model=check_model):
        rows = codes.row_ids() + done
        latents, values = codes.latents, codes.values
        if edges is None:
            edges = log_edges(values)
            hist = torch.zeros(width, len(edges) - 1, dtype=torch.long)
        count += torch.bincount(latents, minlength=width)
        total += torch.zeros(width, dtype=torch.float64).index_add_(0, latents, values.double())
        largest = largest.scatter_reduce(0, latents, values, "amax")
        bins = (torch.bucketize(values, edges) - 1).clamp(0, hist.shape[1] - 1)
        hist += torch.bincount(latents * hist.shape[1] + bins, minlength=hist.numel()).view_as(hist)
        contexts, positions = codes.contexts[rows - done], codes.positions[rows - done]
        tops.offer(latents, values, values, rows, contexts, positions)
        if sample:
            priority = torch.rand(len(latents), generator=generator)
            samples.offer(latents, priority, values, rows, contexts, positions)
        chunk = _window(codes, done)
        if current is not None:  # the previous chunk's new examples now have their right-hand context too
            _fill((tops, samples), [w for w in (previous, current, chunk) if w is not None], current)
        previous, current = current, chunk
        norms.append(codes.norms)
        done += len(codes)
        if progress:
            progress(done)
    if current is None:
        raise ValueError("the source holds no tokens")
    _fill((tops, samples), [w for w in (previous, current) if w is not None], current)
    tops.sort()
    samples.sort()
    if not sample:
        samples = ExampleTable(width, 0, before, after)
    return LatentStats(width, done, count, total, largest, edges, hist, tops, samples,
                       seconds=time.perf_counter() - started, **_massive_only(tops, norms))


def _massive_only(tops: ExampleTable, chunk_norms: list[Tensor | None]) -> dict:
    """LatentStats' massive_only (the latent has top examples and all of them are at massive tokens) and
    massive_norm (the cutoff); left unset when some chunk's codes carried no norms."""
    if any(norms is None for norms in chunk_norms):
        return {}
    norms = torch.cat(chunk_norms)
    cutoff = MASSIVE * float(norms.median())
    filled = tops.row >= 0
    massive = torch.zeros_like(filled)
    massive[filled] = norms[tops.row[filled]] > cutoff
    return {"massive_only": filled.any(1) & (massive | ~filled).all(1), "massive_norm": cutoff}


def _window(codes: Codes, start: int) -> Window:
    keys = (codes.row_ids() + start) * codes.width + codes.latents
    return Window(start, codes.token_ids.long(), codes.contexts.long(), keys, codes.values)


def _fill(tables: tuple[ExampleTable, ...], parts: list[Window], chunk: Window) -> None:
    window = Window.join(parts)
    for table in tables:
        table.fill(window, chunk.start, chunk.end)
