"""The fast PyTorch backend (`kernel="torch"`): the three sparse primitives from stock PyTorch ops.

Chosen by measurement on a 2-core CPU (fp32, d=576, n=16384, k=32, N=4096; milliseconds, best of 3):

    decode forward    F.embedding_bag(per_sample_weights)  12 | CSR @ W 23 | gather + bmm 169 | dense 441
    grad wrt values   torch.sparse.sampled_addmm (CSR)     17 | chunked gather + bmm 66 | dense+gather 642
    grad wrt W        sort by latent + embedding_bag(offsets) 19 | CSR^T @ G 29 | COO 56 | index_add_ 113
                      | dense 416

Notes: embedding_bag needs a contiguous weight table (a strided one is ~80x slower: 838 ms), so tables are made
contiguous first (free when they already are). sampled_addmm has no bf16/fp16 CPU kernel, so low-precision
inputs are upcast to fp32 for it; embedding_bag accumulates bf16 in fp32 on CPU (its results equal the fp32 sum
rounded once). Every function accepts any device; sampled_addmm is used on the CPU only (elsewhere a chunked
gather + bmm computes the same thing).

Readable references for each primitive: `saelab.kernels.reference`.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .layout import LatentCSR, entry_rows
from .reference import acc_dtype

NAME = "torch"


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    out = dtypes[0]
    for dt in dtypes[1:]:
        out = torch.promote_types(out, dt)
    return out


def gather_sum(
    indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """out[b] = sum_j weights[b, j] * table[indices[b, j]]   ([N, k], [N, k], [n, d] -> [N, d])."""
    N, k = indices.shape
    if k == 0 or N == 0:
        return torch.zeros(N, table.shape[1], dtype=out_dtype, device=table.device)
    cd = _compute_dtype(weights.dtype, table.dtype)
    table = table.to(cd).contiguous()
    out = F.embedding_bag(indices.long(), table, per_sample_weights=weights.to(cd), mode="sum")
    return out.to(out_dtype)


def sddmm(indices: torch.Tensor, a: torch.Tensor, table: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """out[b, j] = <a[b], table[indices[b, j]]>   ([N, k], [N, d], [n, d] -> [N, k])."""
    N, k = indices.shape
    if N == 0 or k == 0:
        return torch.zeros(N, k, dtype=out_dtype, device=a.device)
    if a.device.type == "cpu":
        return _sddmm_sampled_addmm(indices, a, table).to(out_dtype)
    return _sddmm_gather_bmm(indices, a, table).to(out_dtype)


def _sddmm_sampled_addmm(indices: torch.Tensor, a: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    N, k = indices.shape
    n = table.shape[0]
    cd = acc_dtype(a.dtype, table.dtype)
    crow = torch.arange(0, N * k + 1, k, dtype=torch.long, device=a.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(
            crow,
            indices.reshape(-1).long(),
            torch.zeros(N * k, dtype=cd, device=a.device),  # zeros, not empty: beta=0 still reads them (0*NaN)
            (N, n),
            check_invariants=False,  # duplicate / unsorted columns in a row are fine for this kernel
        )
        # mat2 = table^T; with a contiguous [n, d] table this is the layout the CPU kernel wants.
        out = torch.sparse.sampled_addmm(pattern, a.to(cd).contiguous(), table.to(cd).contiguous().T, beta=0.0)
    return out.values().view(N, k)


def _sddmm_gather_bmm(indices: torch.Tensor, a: torch.Tensor, table: torch.Tensor, chunk_elems: int = 1 << 25):
    """Same as sddmm, from a gather of the k rows + a batched matvec, in chunks of rows to bound memory."""
    N, k = indices.shape
    d = table.shape[1]
    cd = acc_dtype(a.dtype, table.dtype)
    out = torch.empty(N, k, dtype=cd, device=a.device)
    step = max(1, chunk_elems // max(1, k * d))
    for s in range(0, N, step):
        rows = table[indices[s : s + step].long()].to(cd)  # [c, k, d]
        out[s : s + step] = torch.bmm(rows, a[s : s + step].to(cd).unsqueeze(-1)).squeeze(-1)
    return out


def gather_sum_csr(
    offsets: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """out[b] = sum_{e in offsets[b]:offsets[b+1]} weights[e] * table[indices[e]]   (a variable number of latents
    per row: [N + 1], [nnz], [nnz], [n, d] -> [N, d])."""
    cd = _compute_dtype(weights.dtype, table.dtype)
    if indices.numel() == 0:
        return torch.zeros(len(offsets) - 1, table.shape[1], dtype=out_dtype, device=table.device)
    out = F.embedding_bag(indices.long(), table.to(cd).contiguous(), offsets, per_sample_weights=weights.to(cd),
                          mode="sum", include_last_offset=True)
    return out.to(out_dtype)


def sddmm_csr(
    offsets: torch.Tensor, indices: torch.Tensor, a: torch.Tensor, table: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """out[e] = <a[b], table[indices[e]]> for each entry e of row b   ([N + 1], [nnz], [N, d], [n, d] -> [nnz])."""
    nnz = indices.numel()
    if nnz == 0:
        return torch.zeros(0, dtype=out_dtype, device=a.device)
    cd = acc_dtype(a.dtype, table.dtype)
    if a.device.type == "cpu":
        with warnings.catch_warnings():  # "sparse CSR support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(offsets, indices.long(), torch.zeros(nnz, dtype=cd),
                                              (len(offsets) - 1, table.shape[0]), check_invariants=False)
            out = torch.sparse.sampled_addmm(pattern, a.to(cd).contiguous(), table.to(cd).contiguous().T, beta=0.0)
        return out.values().to(out_dtype)
    return _sddmm_csr_gather(offsets, indices, a, table).to(out_dtype)


def _sddmm_csr_gather(offsets, indices, a, table, chunk_elems: int = 1 << 25):
    """sddmm_csr off the CPU: gather each entry's two rows and take their dot product, in chunks of entries."""
    nnz, cd = indices.numel(), acc_dtype(a.dtype, table.dtype)
    rows = entry_rows(offsets, nnz)
    out = torch.empty(nnz, dtype=cd, device=a.device)
    step = max(1, chunk_elems // max(1, table.shape[1]))
    for s in range(0, nnz, step):
        out[s : s + step] = (table[indices[s : s + step].long()].to(cd) * a[rows[s : s + step]].to(cd)).sum(-1)
    return out


def segment_sum(
    csr: LatentCSR,
    weights: torch.Tensor,
    table: torch.Tensor,
    n: int,
    out_dtype: torch.dtype,
    weight_sum: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """out[l] = sum over entries (b, j) of latent l of weights[b, j] * table[b]   (-> [n, d]); optionally also
    the per-latent sums of weights (-> [n], fp32/fp64). `csr` = layout.by_latent(indices, n).

    Each latent is one embedding bag: bag l gathers the batch rows csr.rows[offsets[l]:offsets[l+1]].
    """
    d = table.shape[1]
    w_sorted = weights.reshape(-1)[csr.order]
    if w_sorted.numel() == 0:
        out = torch.zeros(n, d, dtype=out_dtype, device=table.device)
    else:
        cd = _compute_dtype(weights.dtype, table.dtype)
        out = F.embedding_bag(
            csr.rows,
            table.to(cd).contiguous(),
            csr.offsets,
            per_sample_weights=w_sorted.to(cd),
            mode="sum",
            include_last_offset=True,
        ).to(out_dtype)
    wsum = None
    if weight_sum:
        acc = acc_dtype(weights.dtype)
        wsum = torch.zeros(n, dtype=acc, device=weights.device).index_add_(0, csr.latents, w_sorted.to(acc))
    return out, wsum
