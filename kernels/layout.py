"""Sorting TopK codes by latent (the CSR layout of the transposed code matrix).

The gradients wrt W_dec and W_enc are S^T @ dense for the N x n code matrix S. Sorting the N*k code entries by
latent turns that product into a segmented reduction: latent l owns the contiguous run
`order[offsets[l]:offsets[l+1]]`, so one program (or one embedding-bag bag) can own a whole latent and write
its output row once; no atomics, and deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LatentCSR:
    """Code entries grouped by latent.

    latents: [N*k] int64, the latent ids of all code entries, sorted.
    order:   [N*k] int64, positions into the flattened [N, k] codes in that sorted order (stable, so the rows of
             one latent stay in increasing batch order).
    rows:    [N*k] int64, the batch row of each sorted entry (order // k).
    offsets: [n + 1] int64, latent l's entries are order[offsets[l]:offsets[l + 1]] (empty for latents that
             never fire).
    """

    latents: torch.Tensor
    order: torch.Tensor
    rows: torch.Tensor
    offsets: torch.Tensor


def by_latent(indices: torch.Tensor, n: int) -> LatentCSR:
    """Group the entries of TopK indices [N, k] by latent id in [0, n)."""
    k = indices.shape[1]
    flat = indices.reshape(-1).long()
    latents, order = torch.sort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n)
    offsets = torch.zeros(n + 1, dtype=torch.long, device=indices.device)
    torch.cumsum(counts, dim=0, out=offsets[1:])
    rows = torch.div(order, k, rounding_mode="floor") if k > 0 else order
    return LatentCSR(latents=latents, order=order, rows=rows, offsets=offsets)
