"""Pearson correlation between every feature of A and every feature of B, from running sums over chunks.

    acc = RunningCorrelation(width_a, width_b)
    for chunk in aligned_chunks:                       # row i of a and of b: the same text position
        acc.update(chunk.a, chunk.b)                   # Codes (sparse) or dense [n, w] tensors
    corr = acc.correlation()                           # float32 [width_a, width_b], 0 where undefined

The sums (count, sum, sum of squares) are float64 vectors; the cross-products A^T B are one float32 [wa, wb]
matrix, accumulated chunk by chunk with a sparse-sparse product (scipy's CSR kernel, O(tokens x k_a x k_b)) for
codes, or a GEMM for dense features (MLP neurons). Memory is that one matrix plus a chunk: 16k x 16k latents over
1M tokens fit in ~1.1 GB, where the dense route (z-scored tokens x latents matrices) needs ~130 GB.

A feature that is constant over the tokens seen (a latent that never fires, or always fires at one value) has no
correlation with anything: its row / column is 0, never NaN, and `constant_a` / `constant_b` say which.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from saelab.codes import Codes

Features = Codes | Tensor
"""One chunk of one side: sparse SAE codes, or a dense float tensor [n, width] (MLP neurons, raw hooks)."""

RELATIVE_VARIANCE_FLOOR = 1e-10
"""A feature whose variance is below this fraction of its mean square counts as constant."""


def as_scipy(features: Features | sp.csr_matrix | np.ndarray) -> sp.csr_matrix | np.ndarray:
    """Codes -> scipy CSR (float32); a dense tensor -> float32 numpy (either of those: as it is)."""
    if sp.issparse(features) or isinstance(features, np.ndarray):
        return features
    if isinstance(features, Codes):
        return sp.csr_matrix((features.values.float().numpy(), features.latents.numpy(), features.crow.numpy()),
                             shape=(len(features), features.width))
    return features.detach().float().cpu().numpy()


def width_of(features: Features | sp.csr_matrix | np.ndarray) -> int:
    return features.width if isinstance(features, Codes) else features.shape[1]


def rows_of(features: Features | sp.csr_matrix | np.ndarray) -> int:
    return features.shape[0] if sp.issparse(features) else len(features)


def take_rows(features: Features | sp.csr_matrix | np.ndarray, rows: np.ndarray) -> sp.csr_matrix | np.ndarray:
    """The given rows of one chunk's features, as scipy CSR (codes) or numpy (dense): what `update` reads."""
    return as_scipy(features)[np.asarray(rows)]


def column_sums(m: sp.csr_matrix | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sum, sum of squares) per column, float64."""
    if sp.issparse(m):
        values = m.data.astype(np.float64)
        return (np.bincount(m.indices, values, minlength=m.shape[1]),
                np.bincount(m.indices, values * values, minlength=m.shape[1]))
    m64 = m.astype(np.float64)
    return m64.sum(0), (m64 * m64).sum(0)


def add_cross_products(out: np.ndarray, a: sp.csr_matrix | np.ndarray, b: sp.csr_matrix | np.ndarray) -> None:
    """out += a^T b, without forming a dense [n, width] matrix from sparse codes."""
    if sp.issparse(a) and sp.issparse(b):
        product = a.T.tocsr() @ b  # CSR x CSR: only the (latent, latent) pairs that fire together
        rows = np.repeat(np.arange(product.shape[0], dtype=np.int64), np.diff(product.indptr))
        flat = torch.from_numpy(rows * out.shape[1] + product.indices)
        torch.from_numpy(out).view(-1).index_add_(0, flat, torch.from_numpy(product.data.astype(out.dtype,
                                                                                              copy=False)))
    elif sp.issparse(a):
        out += (a.T @ b).astype(out.dtype, copy=False)  # sparse^T x dense
    elif sp.issparse(b):
        out += (b.T @ a).T.astype(out.dtype, copy=False)
    else:
        out += a.T @ b


@dataclass
class Correlation:
    """Pearson correlation of two feature sets over n aligned tokens, with what is needed to trust it."""

    matrix: np.ndarray
    """float32 [width_a, width_b]; 0 where a feature is constant."""
    n_tokens: int
    mean_a: np.ndarray
    mean_b: np.ndarray
    std_a: np.ndarray
    std_b: np.ndarray
    constant_a: np.ndarray
    """bool [width_a]: constant over the tokens (e.g. never fired); correlation undefined, reported as 0."""
    constant_b: np.ndarray
    fire_a: np.ndarray
    """float64 [width_a]: fraction of tokens where the feature is nonzero."""
    fire_b: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.matrix.shape

    def best_b(self) -> tuple[np.ndarray, np.ndarray]:
        """(index, correlation) of each A feature's most correlated B feature."""
        index = self.matrix.argmax(1)
        return index, self.matrix[np.arange(len(index)), index]

    def best_a(self) -> tuple[np.ndarray, np.ndarray]:
        index = self.matrix.argmax(0)
        return index, self.matrix[index, np.arange(len(index))]


class RunningCorrelation:
    """Accumulates count, sums, sums of squares and cross-products of two aligned feature streams."""

    def __init__(self, width_a: int, width_b: int, dtype=np.float32):
        self.width_a, self.width_b = width_a, width_b
        self.n = 0
        self.sum_a, self.sq_a = np.zeros(width_a), np.zeros(width_a)
        self.sum_b, self.sq_b = np.zeros(width_b), np.zeros(width_b)
        self.nnz_a, self.nnz_b = np.zeros(width_a), np.zeros(width_b)
        self.cross = np.zeros((width_a, width_b), dtype=dtype)

    def update(self, a: Features | sp.csr_matrix | np.ndarray, b: Features | sp.csr_matrix | np.ndarray) -> None:
        """Add one chunk: row i of `a` is paired with row i of `b` (the same text position, or for a null, not)."""
        if rows_of(a) != rows_of(b):
            raise ValueError(f"aligned chunks must have as many rows on both sides, got {rows_of(a)} and {rows_of(b)}")
        if width_of(a) != self.width_a or width_of(b) != self.width_b:
            raise ValueError(f"chunk widths {width_of(a)} x {width_of(b)} differ from the accumulator's "
                             f"{self.width_a} x {self.width_b}")
        ma, mb = as_scipy(a), as_scipy(b)
        for m, total, squares, nnz in ((ma, self.sum_a, self.sq_a, self.nnz_a), (mb, self.sum_b, self.sq_b, self.nnz_b)):
            s, q = column_sums(m)
            total += s
            squares += q
            nnz += np.bincount(m.indices, minlength=m.shape[1]) if sp.issparse(m) else (m != 0).sum(0)
        add_cross_products(self.cross, ma, mb)
        self.n += rows_of(a)

    def correlation(self, *, in_place: bool = False, block_rows: int = 1024) -> Correlation:
        """Pearson correlation (float32). in_place turns the cross-product matrix itself into the correlation
        matrix (no second [wa, wb] matrix; the accumulator cannot be updated afterwards)."""
        if self.n < 2:
            raise ValueError(f"correlation needs at least 2 aligned tokens, got {self.n}")
        n = self.n
        mean_a, mean_b = self.sum_a / n, self.sum_b / n
        var_a = np.maximum(self.sq_a / n - mean_a**2, 0.0)
        var_b = np.maximum(self.sq_b / n - mean_b**2, 0.0)
        constant_a = var_a <= RELATIVE_VARIANCE_FLOOR * np.maximum(self.sq_a / n, np.finfo(float).tiny)
        constant_b = var_b <= RELATIVE_VARIANCE_FLOOR * np.maximum(self.sq_b / n, np.finfo(float).tiny)
        std_a, std_b = np.sqrt(var_a), np.sqrt(var_b)
        inv_a = np.where(constant_a, 0.0, 1.0 / np.where(constant_a, 1.0, std_a))
        inv_b = np.where(constant_b, 0.0, 1.0 / np.where(constant_b, 1.0, std_b))
        out = self.cross if in_place else np.empty_like(self.cross)
        for start in range(0, self.width_a, block_rows):  # block by block: no full-size temporaries
            rows = slice(start, start + block_rows)
            block = self.cross[rows].astype(np.float64) / n - np.outer(mean_a[rows], mean_b)
            block *= inv_a[rows, None]
            block *= inv_b[None, :]
            out[rows] = np.clip(block, -1.0, 1.0)
        return Correlation(out, n, mean_a, mean_b, std_a, std_b, constant_a, constant_b, self.nnz_a / n,
                           self.nnz_b / n)


def dense_correlation(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The in-memory reference: z-score [n, wa] and [n, wb], C = Z_a^T Z_b / n (constant columns give 0)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    sx, sy = x.std(0), y.std(0)
    zx = np.where(sx > 0, (x - x.mean(0)) / np.where(sx > 0, sx, 1), 0.0)
    zy = np.where(sy > 0, (y - y.mean(0)) / np.where(sy > 0, sy, 1), 0.0)
    return zx.T @ zy / len(x)


class TopActivations:
    """Each feature's n largest activations so far, with the token and aligned row behind each (for filters,
    semantic groups and reports). Ties keep the earlier token."""

    def __init__(self, width: int, n: int = 8):
        self.width, self.n = width, n
        self.values = torch.full((width, n), -torch.inf)
        self.token_ids = torch.full((width, n), -1, dtype=torch.long)
        self.rows = torch.full((width, n), -1, dtype=torch.long)

    def update(self, features: Features, token_ids: Tensor, first_row: int) -> None:
        """Add a chunk whose row i is aligned row first_row + i, holding token token_ids[i]."""
        if isinstance(features, Codes):
            rows, feats, values = features.row_ids(), features.latents, features.values.float()
        else:
            top = features.float().topk(min(self.n, len(features)), dim=0)  # dense: each column's best rows
            rows = top.indices.flatten()
            feats = torch.arange(features.shape[1]).repeat(top.indices.shape[0])
            values = top.values.flatten()
        keep = values > 0
        rows, feats, values = rows[keep], feats[keep], values[keep]
        all_feats = torch.cat([torch.arange(self.width).repeat_interleave(self.n), feats])
        all_values = torch.cat([self.values.flatten(), values])
        all_tokens = torch.cat([self.token_ids.flatten(), token_ids[rows]])
        all_rows = torch.cat([self.rows.flatten(), rows + first_row])
        order = torch.argsort(all_values, descending=True, stable=True)
        order = order[torch.argsort(all_feats[order], stable=True)]  # by feature, largest first inside
        feats_sorted = all_feats[order]
        starts = torch.searchsorted(feats_sorted, feats_sorted, right=False)
        rank = torch.arange(len(order)) - starts
        keep = rank < self.n
        slot_feat, slot_rank, chosen = feats_sorted[keep], rank[keep], order[keep]
        self.values[slot_feat, slot_rank] = all_values[chosen]
        self.token_ids[slot_feat, slot_rank] = all_tokens[chosen]
        self.rows[slot_feat, slot_rank] = all_rows[chosen]

    def tokens(self, feature: int, k: int | None = None) -> list[int]:
        """Token ids of the feature's top activations (only real ones, best first)."""
        ids = self.token_ids[feature, : k or self.n]
        return [int(t) for t in ids[ids >= 0]]


__all__ = ["Correlation", "RunningCorrelation", "TopActivations", "dense_correlation", "take_rows"]
