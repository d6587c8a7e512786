"""Code layouts: CSR rows (`CSRCodes`, `row_offsets`, `entry_rows`), and TopK codes sorted by latent (the CSR
layout of the transposed code matrix).

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
    order:   [N*k] int64, positions into the flattened [N, k] codes in that sorted order (by_latent: stable, so
             the rows of one latent stay in increasing batch order).
    rows:    [N*k] int64, the batch row of each sorted entry (order // k).
    offsets: [n + 1] int64, latent l's entries are order[offsets[l]:offsets[l + 1]] (empty for latents that
             never fire).
    """

    latents: torch.Tensor
    order: torch.Tensor
    rows: torch.Tensor
    offsets: torch.Tensor


@dataclass
class CSRCodes:
    """Sparse codes with any number of latents per row (CSR), the one form in which the kernels, an SAE's training
    step and saelab.codes hand them on: row b holds latents indices[offsets[b]:offsets[b + 1]] (ascending within
    a row) with those values, out of `width` latents.

    offsets: [N + 1] int64, from 0 to nnz.   indices: [nnz] latent ids.   values: [nnz] activations.
    """

    offsets: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    width: int

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def nnz(self) -> int:
        return self.indices.numel()

    def row_ids(self) -> torch.Tensor:
        """long [nnz]: the row of each entry."""
        return entry_rows(self.offsets, self.nnz)


def by_latent(indices: torch.Tensor, n: int) -> LatentCSR:
    """Group the entries of TopK indices [N, k] by latent id in [0, n)."""
    k = indices.shape[1]
    latents, order, offsets = _sorted(indices.reshape(-1).long(), n)
    rows = torch.div(order, k, rounding_mode="floor") if k > 0 else order
    return LatentCSR(latents=latents, order=order, rows=rows, offsets=offsets)


def entries_by_latent(latents: torch.Tensor, rows: torch.Tensor, n: int) -> LatentCSR:
    """Group a flat list of code entries (latent id, batch row) [nnz] by latent: codes with a variable number of
    latents per row (a batch-level selection), where the row of an entry is not its position // k."""
    # not a stable sort: on CSR rows (a run of ascending latents per row) torch's stable CPU sort is ~200x slower
    latents, order, offsets = _sorted(latents.long(), n, stable=False)
    return LatentCSR(latents=latents, order=order, rows=rows.long()[order], offsets=offsets)


def row_offsets(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """[n_rows + 1] CSR offsets of entries sorted by row: row b owns entries offsets[b]:offsets[b + 1]."""
    offsets = torch.zeros(n_rows + 1, dtype=torch.long, device=rows.device)
    torch.cumsum(torch.bincount(rows, minlength=n_rows), dim=0, out=offsets[1:])
    return offsets


def entry_rows(offsets: torch.Tensor, nnz: int) -> torch.Tensor:
    """The row of each of the nnz entries of CSR `offsets` [N + 1] (the inverse of row_offsets)."""
    counts = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(len(counts), device=offsets.device), counts, output_size=nnz)


def _sorted(flat: torch.Tensor, n: int, stable: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    latents, order = torch.sort(flat, stable=stable)
    return latents, order, row_offsets(flat, n)
