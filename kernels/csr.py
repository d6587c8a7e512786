"""Codes with a variable number of latents per row (CSR): the batch-level top-k, threshold codes, their decoder.

A batch top-k (BatchTopK, Matryoshka) keeps the k*N largest activations of a whole batch, so a row may hold none
or thousands of latents. Its codes are CSR rows (`CSRCodes`, from `layout`): offsets [N + 1] and, row after row,
indices [nnz] (latent ids, ascending within a row) and values [nnz]. Row b owns entries offsets[b]:offsets[b + 1].

    codes, cut, aux_i, aux_v = batch_topk_encode(x, W_enc, b_enc, k, center=b_dec)
    x_hat = sparse_decode_csr(codes, W_dec) + b_dec

The selection is exact (the same entries as sorting the whole batch, up to ties) and made without a per-row
top-k: a threshold estimated from a strided sample of the batch leaves somewhat more than k*N candidates above it
(one compare and one nonzero over the [N, n] pre-activations), and a top-k over those few picks the batch's; a
threshold that leaves too few is lowered and the pass redone. `threshold_encode` gives the codes of a ReLU or
JumpReLU SAE the same way, from a fixed threshold. Backward costs O(nnz d), as for TopK codes (`api`).
References: `reference.dense_batch_topk_encode`, `reference.dense_threshold_encode`, `reference.dense_decode_csr`.
"""

from __future__ import annotations

import functools
import math

import torch
from torch.autograd.function import once_differentiable

from . import reference
from .api import _check_decode, _check_encode, _ops, check_workspace, encoder_weight_grads, resolve_kernel
from .layout import CSRCodes, entries_by_latent, entry_rows, row_offsets

__all__ = ["CSRCodes", "batch_topk_encode", "keep_batch_top", "sparse_decode_csr", "threshold_encode"]

SAMPLE_STRIDE = 1021
"""Every 1021st pre-activation of the batch (a prime, so the sample walks across columns) estimates the threshold."""


def keep_batch_top(values: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, cut) of the `budget` largest entries of the flat `values` (all of them if fewer). cut lies halfway
    between the smallest kept value and the largest one left out, so a JumpReLU with that threshold makes the same
    choice on this batch (0 when there are no more values than the budget)."""
    if budget >= values.numel():
        return torch.ones_like(values, dtype=torch.bool), values.new_zeros(())
    top = values.topk(budget + 1, sorted=False)
    last = top.values.argmin()  # the largest value left out
    keep = torch.zeros_like(values, dtype=torch.bool)
    keep[top.indices] = True
    keep[top.indices[last]] = False
    smallest_kept = top.values.masked_fill(torch.arange(budget + 1, device=values.device) == last, float("inf")).min()
    return keep, (smallest_kept + top.values[last]) / 2


def _thresholds(flat: torch.Tensor, budget: int):
    """Candidate thresholds, highest first: values that a strided sample of the batch suggests leave about 2x, then
    8x, the budget above them; finally 0 (every positive entry), which always suffices."""
    sample = flat[::SAMPLE_STRIDE]
    for factor in (2, 8):
        take = math.ceil(factor * budget * sample.numel() / max(1, flat.numel()))
        if take >= sample.numel():
            break
        threshold = float(sample.topk(take, sorted=False).values.min())
        if threshold > 0:
            yield threshold
    yield 0.0


@torch.no_grad()
def select_batch_top(pre: torch.Tensor, mask: torch.Tensor | None = None, *, budget: int):
    """(rows, cols, values, cut) of the `budget` largest positive entries of pre [N, n], row-major (see
    keep_batch_top for cut). Usually one pass over pre: the entries above a threshold (into `mask`, a reused bool
    buffer, when given), lowered until more than `budget` are, then a top-k among those few."""
    flat = pre.view(-1)
    for threshold in _thresholds(flat, budget):
        above = torch.gt(flat, threshold, out=mask.view(-1)) if mask is not None else flat > threshold
        where = above.nonzero().squeeze(1)
        if len(where) > budget or threshold <= 0:
            break
    values = flat[where]
    keep, cut = keep_batch_top(values, budget)
    if len(values) > budget:
        where, values = where[keep], values[keep]
    return (*_rows_and_columns(where, pre.shape[1]), values, cut)


class SparseDecodeCSR(torch.autograd.Function):
    """out = S @ W_dec for the code matrix S given as CSR rows (offsets, indices, values)."""

    @staticmethod
    def forward(ctx, offsets, indices, values, W_dec, ops):
        ctx.ops = ops
        ctx.save_for_backward(offsets, indices, values, W_dec)
        return ops.gather_sum_csr(offsets, indices, values, W_dec, out_dtype=values.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        offsets, indices, values, W_dec = ctx.saved_tensors
        ops, n = ctx.ops, W_dec.shape[0]
        grad_values = grad_W = None
        if ctx.needs_input_grad[2]:
            grad_values = ops.sddmm_csr(offsets, indices, grad_out, W_dec, out_dtype=values.dtype)
        if ctx.needs_input_grad[3]:
            csr = entries_by_latent(indices, entry_rows(offsets, indices.numel()), n)
            grad_W, _ = ops.segment_sum(csr, values, grad_out, n, out_dtype=W_dec.dtype)
        return None, None, grad_values, grad_W, None


@torch.no_grad()
def select_above(pre: torch.Tensor, mask: torch.Tensor | None = None, *, threshold: torch.Tensor | float):
    """(rows, cols, values, 0) of the entries of pre [N, n] above `threshold` (a float or [n], >= 0), row-major."""
    above = torch.gt(pre, threshold, out=mask) if mask is not None else pre > threshold
    where = above.view(-1).nonzero().squeeze(1)
    return (*_rows_and_columns(where, pre.shape[1]), pre.view(-1)[where], pre.new_zeros(()))


def _rows_and_columns(where: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of flat row-major positions in a [N, width] matrix."""
    rows = torch.div(where, width, rounding_mode="floor")
    return rows, where - rows * width


class CSREncode(torch.autograd.Function):
    """CSR codes of the entries of relu((x - center) @ W_enc + b_enc) that `select` picks (the k*N largest of the
    batch, or those above a threshold), and optionally AuxK's top-k_aux among the `aux_columns` of each row (as
    topk_encode_with_aux). Backward touches only the selected entries."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, center, select, aux_columns, k_aux, workspace, mask, ops):
        bias = b_enc if center is None else torch.addmv(b_enc, W_enc.T, center, alpha=-1)
        pre = torch.addmm(bias, x, W_enc, out=workspace) if workspace is not None else torch.addmm(bias, x, W_enc)
        N = len(x)
        if aux_columns is None:
            aux_values, aux_indices = pre.new_empty(N, 0), torch.empty(N, 0, dtype=torch.long, device=x.device)
        else:
            aux_values, local = pre.index_select(1, aux_columns).topk(k_aux, dim=1, sorted=False)
            aux_indices = aux_columns[local]
            aux_values.clamp_(min=0)
        rows, cols, values, cut = select(pre, mask)
        offsets = row_offsets(rows, N)
        ctx.ops = ops
        ctx.save_for_backward(x, W_enc, center, offsets, rows, cols, values, aux_indices, aux_values)
        ctx.mark_non_differentiable(offsets, cols, cut, aux_indices)
        return offsets, cols, values, cut, aux_indices, aux_values

    @staticmethod
    @once_differentiable
    def backward(ctx, _offsets, _cols, grad_values, _cut, _aux_indices, grad_aux_values):
        x, W_enc, center, offsets, rows, cols, values, aux_indices, aux_values = ctx.saved_tensors
        ops = ctx.ops
        needs_x, needs_W, needs_b, needs_center = ctx.needs_input_grad[:4]
        g = torch.zeros_like(values) if grad_values is None else grad_values * (values > 0)
        g_aux = torch.zeros_like(aux_values) if grad_aux_values is None else grad_aux_values * (aux_values > 0)
        grad_x = grad_W = grad_b = grad_center = None
        if needs_x:
            grad_x = ops.gather_sum_csr(offsets, cols, g, W_enc.T, out_dtype=x.dtype)
            if aux_indices.shape[1]:
                grad_x += ops.gather_sum(aux_indices, g_aux, W_enc.T, out_dtype=x.dtype)
        if needs_W or needs_b or needs_center:
            N, k_aux = aux_indices.shape
            aux_rows = torch.arange(N, device=x.device).repeat_interleave(k_aux)
            csr = entries_by_latent(torch.cat([cols, aux_indices.reshape(-1)]), torch.cat([rows, aux_rows]),
                                    W_enc.shape[1])
            grad_W, grad_b, grad_center = encoder_weight_grads(
                ops, csr, torch.cat([g, g_aux.reshape(-1)]), x, W_enc, center, needs_W, needs_b, needs_center)
        return grad_x, grad_W, grad_b, grad_center, None, None, None, None, None, None


def sparse_decode_csr(codes: CSRCodes, W_dec: torch.Tensor, kernel: str = "auto", *,
                      check_indices: bool = True) -> torch.Tensor:
    """Decode CSR codes: out[b] = sum over row b's entries e of values[e] * W_dec[indices[e]].

    Args:
        codes: offsets [N + 1] int64, non-decreasing, offsets[0] = 0 and offsets[-1] = nnz; indices [nnz]
            int64/int32 latent ids in [0, n); values [nnz] (differentiable).
        W_dec: [n, d] (differentiable). kernel and check_indices as in `sparse_decode`.

    Returns [N, d] in values' dtype. Backward: O(nnz d), like `sparse_decode`.
    """
    if not isinstance(codes, CSRCodes):
        raise TypeError(f"codes must be CSRCodes (offsets, indices, values, width), got {type(codes).__name__}")
    offsets, indices, values = codes.offsets, codes.indices, codes.values
    _check_decode(indices, values, W_dec, check_indices)
    if indices.dim() != 1 or offsets.dim() != 1 or offsets.dtype != torch.int64 or len(offsets) == 0:
        raise ValueError(f"CSR codes need 1-D int64 offsets [N + 1] and 1-D indices, values [nnz]; got offsets "
                         f"{offsets.dtype} {tuple(offsets.shape)}, indices {tuple(indices.shape)}")
    if check_indices and (int(offsets[0]) != 0 or int(offsets[-1]) != indices.numel()
                          or bool((offsets.diff() < 0).any())):
        raise ValueError(f"offsets must rise from 0 to nnz={indices.numel()}")
    name = resolve_kernel(kernel, values.device)
    if name == "dense":
        return reference.dense_decode_csr(offsets, indices, values, W_dec)
    return SparseDecodeCSR.apply(offsets, indices, values, W_dec, _ops(name))


def batch_topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    kernel: str = "auto",
    *,
    center: torch.Tensor | None = None,
    aux_columns: torch.Tensor | None = None,
    k_aux: int = 0,
    workspace: torch.Tensor | None = None,
    mask_workspace: torch.Tensor | None = None,
):
    """Batch top-k encoder: the k*N largest entries of relu((x - center) @ W_enc + b_enc) over all N rows of x
    [N, d] (every positive one when there are fewer), as CSR codes.

    Args as `topk_encode_with_aux` (aux_columns None: no AuxK selection); k is the mean number of latents per row.
    mask_workspace: optional reused [N, n] bool buffer for the selection.

    Returns (CSRCodes, cut, aux_indices [N, k_aux], aux_values [N, k_aux]): cut (a 0-d tensor) lies halfway between the smallest value kept and the largest left out, 0 when all positive
    entries were kept. Gradients flow through values and aux_values.
    """
    _check_encode(x, W_enc, b_enc, k, center)
    if x.dim() != 2:
        raise ValueError(f"x must be [N, d] (a batch top-k mixes all rows), got shape {tuple(x.shape)}")
    if aux_columns is not None and (not 1 <= k_aux <= len(aux_columns) or aux_columns.dtype != torch.int64):
        raise ValueError(f"aux_columns must be int64 and k_aux in [1, {len(aux_columns)}], got k_aux={k_aux!r}")
    shape = (x.shape[0], W_enc.shape[1])
    check_workspace("workspace", workspace, shape, x.dtype, x.device)
    check_workspace("mask_workspace", mask_workspace, shape, torch.bool, x.device)
    name = resolve_kernel(kernel, x.device)
    if name == "dense":
        offsets, indices, values, *rest = reference.dense_batch_topk_encode(x, W_enc, b_enc, k, center, aux_columns,
                                                                            k_aux)
    else:
        select = functools.partial(select_batch_top, budget=k * len(x))
        offsets, indices, values, *rest = CSREncode.apply(x, W_enc, b_enc, center, select, aux_columns, k_aux,
                                                          workspace, mask_workspace, _ops(name))
    return CSRCodes(offsets, indices, values, W_enc.shape[1]), *rest


def threshold_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    threshold: torch.Tensor | float,
    kernel: str = "auto",
    *,
    center: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    mask_workspace: torch.Tensor | None = None,
) -> CSRCodes:
    """The entries of (x - center) @ W_enc + b_enc above `threshold` (a float or an [n] tensor, >= 0, not
    differentiated) as CSR codes: the sparse codes of a ReLU (0) or JumpReLU SAE. Gradients flow through values to x, W_enc, b_enc and center, touching only the nnz entries."""
    _check_encode(x, W_enc, b_enc, 1, center)
    if x.dim() != 2:
        raise ValueError(f"x must be [N, d], got shape {tuple(x.shape)}")
    if isinstance(threshold, torch.Tensor) and (threshold.shape not in ((), (W_enc.shape[1],)) or threshold.requires_grad):
        raise ValueError(f"threshold must be a float or a [{W_enc.shape[1]}] tensor without grad, got "
                         f"{tuple(threshold.shape)}")
    shape = (x.shape[0], W_enc.shape[1])
    check_workspace("workspace", workspace, shape, x.dtype, x.device)
    check_workspace("mask_workspace", mask_workspace, shape, torch.bool, x.device)
    name = resolve_kernel(kernel, x.device)
    if name == "dense":
        return CSRCodes(*reference.dense_threshold_encode(x, W_enc, b_enc, threshold, center), W_enc.shape[1])
    select = functools.partial(select_above, threshold=threshold)
    offsets, indices, values, *_ = CSREncode.apply(x, W_enc, b_enc, center, select, None, 0, workspace,
                                                   mask_workspace, _ops(name))
    return CSRCodes(offsets, indices, values, W_enc.shape[1])
