"""Which latents a dashboard shows first: a sample that shows the whole SAE, not only its densest latents.

    latents = sample_latents(features.stats, 50)     # equal shares of log-spaced firing-density bands

The densest latents (newlines, punctuation, "the") are the least telling, yet a most-active list is nothing else.
Here the live latents are split into bands of firing density, log-spaced from the rarest to the densest (one band
a decade by default, the densest latents one band among them), and each band gets an equal share of the sample,
drawn at random with a fixed seed. Dead latents are left out, and so are the latents that fire only on massive-norm
tokens (attention sinks), which would otherwise fill the densest band.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from saelab.explore.html import percent


@dataclass
class Band:
    """Live latents whose firing density lies in [lo, hi) (the last band also holds hi itself)."""

    lo: float
    hi: float
    latents: list[int]


def candidates(stats) -> torch.Tensor:
    """bool [width]: the latents a sample may draw (fired in the pass, and not only on massive tokens)."""
    live = stats.count > 0
    if stats.massive_only is not None:
        live &= ~stats.massive_only
    return live


def density_bands(stats, bands: int | None = None) -> list[Band]:
    """The live latents in `bands` log-spaced bands of firing density (default: one a decade, at least one),
    rarest first; empty bands are kept, so the edges stay where they are."""
    if bands is not None and bands < 1:
        raise ValueError(f"bands must be at least 1, got {bands}")
    live = candidates(stats).nonzero().squeeze(1)
    if not len(live):
        return []
    logs = torch.log10(stats.density[live])
    low, high = float(logs.min()), float(logs.max())
    count = bands or max(1, math.ceil(high - low - 1e-9))
    edges = [low + (high - low) * j / count for j in range(count + 1)]
    which = ((logs - low) / max(high - low, 1e-12) * count).floor().long().clamp(0, count - 1)
    return [Band(10 ** edges[j], 10 ** edges[j + 1], live[which == j].tolist()) for j in range(count)]


def sample_latents(stats, n: int, seed: int = 0, bands: int | None = None) -> list[int]:
    """`n` latents (fewer if fewer are live) drawn across the density bands: an equal share from each band, a share
    a small band cannot fill going to the others, picked at random within a band (the same for the same seed).
    Returned densest band first, each band's picks in latent order."""
    if n < 1:
        raise ValueError(f"a sample needs at least one latent, got n={n}")
    groups = density_bands(stats, bands)
    shares = _shares([len(band.latents) for band in groups], n)
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for band, share in zip(reversed(groups), reversed(shares)):
        order = torch.randperm(len(band.latents), generator=generator)[:share]
        picked.extend(sorted(band.latents[i] for i in order.tolist()))
    return picked


def _shares(sizes: list[int], n: int) -> list[int]:
    """How many latents each band gives: equal shares, capped by the band's size, the leftover spread over the
    bands with room (densest first), until `n` are given or every band is used up."""
    shares = [0] * len(sizes)
    left = min(n, sum(sizes))
    while left:
        open_bands = [j for j in range(len(sizes)) if shares[j] < sizes[j]]
        each, extra = divmod(left, len(open_bands))
        for rank, j in enumerate(reversed(open_bands)):  # the densest band first gets the remainder
            give = min(each + (rank < extra), sizes[j] - shares[j])
            shares[j] += give
            left -= give
    return shares


def describe(stats, latents: list[int], bands: int | None = None) -> str:
    """One line on what a sample holds: how many latents from how many density bands, over what range."""
    groups = density_bands(stats, bands)
    if not groups:
        return "no live latents"
    chosen = set(latents)
    counts = ", ".join(str(sum(i in chosen for i in band.latents)) for band in reversed(groups))
    return (f"{len(latents)} latents sampled across {len(groups)} firing-density bands from "
            f"{percent(groups[-1].hi)} down to {percent(groups[0].lo)} of tokens ({counts}, densest band first)")
