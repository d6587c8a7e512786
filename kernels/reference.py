"""Readable PyTorch references for everything in `saelab.kernels`.

Two kinds of reference live here:

* the whole operations, written the plain dense way (build the N x n code matrix and matmul). These are the
  `kernel="dense"` backend and the ground truth the tests compare every other backend against;
* one reference per low-level primitive that the Triton kernels (and the fast PyTorch path) implement, so
  each kernel has a few lines of obvious PyTorch next to it that say what it computes.

Nothing here is meant to be fast.
"""

from __future__ import annotations

import torch

__all__ = [
    "acc_dtype",
    "dense_batch_topk_encode",
    "dense_decode",
    "dense_decode_csr",
    "dense_threshold_encode",
    "dense_topk_encode",
    "gather_sum_reference",
    "sddmm_reference",
    "segment_sum_reference",
]


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 when any input is fp64, else fp32 (also for bf16 / fp16 inputs)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


# ---------------------------------------------------------------------------------------------------------------
# Whole operations (the "dense" backend)
# ---------------------------------------------------------------------------------------------------------------


def dense_decode(indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """out[b] = sum_j values[b, j] * W_dec[indices[b, j]], via the dense code matrix.

    indices, values: [N, k]; W_dec: [n, d]. Accumulates in fp32 (fp64 for fp64 inputs) and returns values' dtype.
    Repeated indices in a row add up (scatter_add), as in the sparse kernels.
    """
    acc = acc_dtype(values.dtype, W_dec.dtype)
    N, n = indices.shape[0], W_dec.shape[0]
    codes = torch.zeros(N, n, dtype=acc, device=values.device)
    codes = codes.scatter_add(1, indices.long(), values.to(acc))
    return (codes @ W_dec.to(acc)).to(values.dtype)


def dense_topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    sorted: bool = True,
    center: torch.Tensor | None = None,
    aux_columns: torch.Tensor | None = None,
    k_aux: int = 0,
):
    """pre = relu((x - center) @ W_enc + b_enc); (values, indices) = top-k of pre along the latents.

    Plain autograd: the backward pass is dense (an N x n gradient of pre). Returns (indices, values,
    aux_indices, aux_values), the last two being the top-k_aux among `aux_columns` (empty without them).
    """
    if center is not None:
        x = x - center
    pre = torch.relu(x @ W_enc + b_enc)
    values, indices = pre.topk(k, dim=-1, sorted=sorted)
    if aux_columns is None:
        return indices, values, indices[:, :0], values[:, :0]
    aux_values, local = pre[:, aux_columns].topk(k_aux, dim=-1, sorted=sorted)
    return indices, values, aux_columns[local], aux_values


def dense_decode_csr(offsets: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor):
    """out[b] = sum over row b's entries e (offsets[b]:offsets[b+1]) of values[e] * W_dec[indices[e]], via the
    dense code matrix."""
    acc = acc_dtype(values.dtype, W_dec.dtype)
    N = len(offsets) - 1
    rows = torch.repeat_interleave(torch.arange(N, device=offsets.device), offsets.diff())
    codes = torch.zeros(N, W_dec.shape[0], dtype=acc, device=values.device)
    codes = codes.index_put((rows, indices.long()), values.to(acc), accumulate=True)
    return (codes @ W_dec.to(acc)).to(values.dtype)


def dense_batch_topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    center: torch.Tensor | None = None,
    aux_columns: torch.Tensor | None = None,
    k_aux: int = 0,
):
    """Batch top-k: the k*N largest entries of relu((x - center) @ W_enc + b_enc) over the whole batch (all of the
    positive ones when there are fewer), as CSR rows, by sorting. Returns (offsets [N + 1], indices [nnz], values
    [nnz], cut, aux_indices, aux_values); cut lies halfway between the smallest value kept and the largest left
    out (0 when every positive entry is kept); the aux selection is dense_topk_encode's."""
    if center is not None:
        x = x - center
    pre = torch.relu(x @ W_enc + b_enc)
    N, n = pre.shape
    flat = pre.detach().flatten()
    ranked = flat.argsort(descending=True, stable=True)
    positive = int((flat > 0).sum())
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[ranked[: min(k * N, positive)]] = True
    cut = (flat[ranked[k * N - 1]] + flat[ranked[k * N]]) / 2 if positive > k * N else flat.new_zeros(())
    rows, cols = keep.view(N, n).nonzero(as_tuple=True)
    offsets = torch.zeros(N + 1, dtype=torch.long, device=x.device)
    offsets[1:] = torch.bincount(rows, minlength=N).cumsum(0)
    if aux_columns is None:
        aux_indices, aux_values = cols.new_zeros(N, 0), pre.new_zeros(N, 0)
    else:
        aux_values, local = pre[:, aux_columns].topk(k_aux, dim=-1)
        aux_indices = aux_columns[local]
    return offsets, cols, pre[rows, cols], cut, aux_indices, aux_values


def dense_threshold_encode(x, W_enc, b_enc, threshold, center=None):
    """(offsets, indices, values): the entries of (x - center) @ W_enc + b_enc above `threshold` (float or [n]),
    as CSR rows, with plain autograd through the dense pre-activations."""
    pre = (x if center is None else x - center) @ W_enc + b_enc
    rows, cols = (pre.detach() > threshold).nonzero(as_tuple=True)
    offsets = torch.zeros(len(x) + 1, dtype=torch.long, device=x.device)
    offsets[1:] = torch.bincount(rows, minlength=len(x)).cumsum(0)
    return offsets, cols, pre[rows, cols]


# ---------------------------------------------------------------------------------------------------------------
# Primitives (what each Triton kernel / fast torch path computes)
# ---------------------------------------------------------------------------------------------------------------


def gather_sum_reference(
    indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Embedding-bag: out[b] = sum_j weights[b, j] * table[indices[b, j]].

    indices, weights: [N, k]; table: [n, d] -> [N, d]. Used for the decoder forward (table = W_dec) and for the
    encoder's input gradient (table = W_enc^T, weights = the k-sparse gradient of pre).
    """
    acc = acc_dtype(weights.dtype, table.dtype)
    rows = table.to(acc)[indices.long()]  # [N, k, d]
    out = (weights.to(acc).unsqueeze(-1) * rows).sum(dim=1)
    return out.to(out_dtype or weights.dtype)


def sddmm_reference(
    indices: torch.Tensor, a: torch.Tensor, table: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Sampled dense-dense product: out[b, j] = <a[b], table[indices[b, j]]>.

    indices: [N, k]; a: [N, d]; table: [n, d] -> [N, k]. This is (a @ table^T) evaluated only at the k sampled
    columns of each row; the decoder uses it for the gradient wrt the active values.
    """
    acc = acc_dtype(a.dtype, table.dtype)
    rows = table.to(acc)[indices.long()]  # [N, k, d]
    out = (rows * a.to(acc).unsqueeze(1)).sum(dim=-1)
    return out.to(out_dtype or a.dtype)


def segment_sum_reference(
    indices: torch.Tensor,
    weights: torch.Tensor,
    table: torch.Tensor,
    n: int,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Transposed sparse product: out[l] = sum over (b, j) with indices[b, j] == l of weights[b, j] * table[b].

    indices, weights: [N, k]; table: [N, d] -> ([n, d], [n]). This is S^T @ table for the N x n sparse matrix S
    with S[b, indices[b, j]] = weights[b, j]; the second output is the per-latent weight sum S^T @ 1 (the bias
    gradient). The kernels compute the same thing as a segmented reduction over entries sorted by latent.
    """
    acc = acc_dtype(weights.dtype, table.dtype)
    N = indices.shape[0]
    S = torch.zeros(N, n, dtype=acc, device=table.device)
    S = S.scatter_add(1, indices.long(), weights.to(acc))
    out = S.T @ table.to(acc)
    return out.to(out_dtype or table.dtype), S.sum(dim=0)


def gather_sum_csr_reference(offsets: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                             table: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`gather_sum` with a variable number of entries per row: out[b] = sum_{e in offsets[b]:offsets[b+1]}
    weights[e] * table[indices[e]] ([N + 1], [nnz], [nnz], [n, d] -> [N, d])."""
    acc = acc_dtype(weights.dtype, table.dtype)
    rows = torch.repeat_interleave(torch.arange(len(offsets) - 1, device=offsets.device), offsets.diff())
    out = torch.zeros(len(offsets) - 1, table.shape[1], dtype=acc, device=table.device)
    out.index_add_(0, rows, weights.to(acc).unsqueeze(-1) * table.to(acc)[indices.long()])
    return out.to(out_dtype or weights.dtype)


def sddmm_csr_reference(offsets: torch.Tensor, indices: torch.Tensor, a: torch.Tensor, table: torch.Tensor,
                        out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`sddmm` with a variable number of entries per row: out[e] = <a[b], table[indices[e]]> for entry e of row b."""
    acc = acc_dtype(a.dtype, table.dtype)
    rows = torch.repeat_interleave(torch.arange(len(offsets) - 1, device=offsets.device), offsets.diff())
    out = (table.to(acc)[indices.long()] * a.to(acc)[rows]).sum(-1)
    return out.to(out_dtype or a.dtype)
