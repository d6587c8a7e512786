"""saelab.kernels.csr: the batch-level top-k (CSR codes) and its decoder against dense references that sort."""

import pytest
import torch

import saelab.kernels.csr as csr
from saelab.kernels import reference, torch_backend
from saelab.kernels.csr import CSRCodes, batch_topk_encode, sparse_decode_csr, threshold_encode
from saelab.kernels.layout import entries_by_latent, entry_rows, row_offsets
from saelab.kernels.testing import assert_close


def csr_inputs(N=7, n=30, d=5, dtype=torch.float64, seed=0):
    """CSR codes with empty rows, a busy row and a repeated latent, plus a decoder."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 5, (N,), generator=g)
    counts[0], counts[1] = 0, n  # an empty row and one that takes every latent
    indices = torch.cat([torch.randperm(n, generator=g)[:c].sort().values for c in counts.tolist()])
    indices[-1] = indices[-2] if counts[-1] > 1 else indices[-1]
    offsets = torch.zeros(N + 1, dtype=torch.long)
    offsets[1:] = counts.cumsum(0)
    return offsets, indices, torch.randn(len(indices), generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype)


def sorted_batch_top(pre, k):
    """The reference selection: sort the whole batch, keep the k*N largest positive entries."""
    flat = pre.relu().flatten()
    order = flat.argsort(descending=True)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[order[: min(k * pre.shape[0], int((flat > 0).sum()))]] = True
    return keep.view_as(pre)


def test_primitives_match_references():
    offsets, indices, w, table = csr_inputs()
    a = torch.randn(len(offsets) - 1, table.shape[1], dtype=torch.float64)
    assert_close(torch_backend.gather_sum_csr(offsets, indices, w, table, torch.float64),
                 reference.gather_sum_csr_reference(offsets, indices, w, table), 1e-12, "gather_sum_csr")
    assert_close(torch_backend.sddmm_csr(offsets, indices, a, table, torch.float64),
                 reference.sddmm_csr_reference(offsets, indices, a, table), 1e-12, "sddmm_csr")
    assert_close(torch_backend._sddmm_csr_gather(offsets, indices, a, table, chunk_elems=16),  # the GPU path
                 reference.sddmm_csr_reference(offsets, indices, a, table), 1e-12, "sddmm_csr by gathers")
    rows = entry_rows(offsets, len(indices))
    assert torch.equal(row_offsets(rows, len(offsets) - 1), offsets)
    layout = entries_by_latent(indices, rows, table.shape[0])
    assert torch.equal(indices[layout.order], layout.latents) and torch.equal(rows[layout.order], layout.rows)


@pytest.mark.parametrize("kernel", ["torch", "dense"])
def test_decode_matches_dense_codes(kernel):
    offsets, indices, values, W = csr_inputs()
    codes = torch.zeros(len(offsets) - 1, W.shape[0], dtype=torch.float64)
    codes.index_put_((entry_rows(offsets, len(indices)), indices), values, accumulate=True)
    torch.testing.assert_close(sparse_decode_csr(CSRCodes(offsets, indices, values, W.shape[0]), W, kernel), codes @ W)


def test_gradcheck_decode_fp64():
    offsets, indices, values, W = csr_inputs(N=5, n=9, d=3)
    values.requires_grad_(True)
    W.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v, w: sparse_decode_csr(CSRCodes(offsets, indices, v, 9), w, "torch"),
                                    (values, W))


def test_decode_rejects_bad_offsets():
    offsets, indices, values, W = csr_inputs()
    with pytest.raises(ValueError, match="rise from 0"):
        sparse_decode_csr(CSRCodes(offsets[:-1], indices, values, W.shape[0]), W)
    with pytest.raises(ValueError, match="1-D int64 offsets"):
        sparse_decode_csr(CSRCodes(offsets.int(), indices, values, W.shape[0]), W)
    with pytest.raises(TypeError, match="CSRCodes"):
        sparse_decode_csr((offsets, indices, values), W)


@pytest.mark.parametrize("kernel", ["torch", "dense"])
@pytest.mark.parametrize("with_aux", [False, True])
def test_batch_topk_encode_selects_and_differentiates_like_sorting(kernel, with_aux):
    g = torch.Generator().manual_seed(1)
    N, d, n, k = 23, 6, 40, 3
    x = torch.randn(N, d, generator=g, dtype=torch.float64)
    x[4] *= 20  # a row that takes far more than k latents
    W, b, c = (torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(True) for s in ((d, n), (n,), (d,)))
    aux = dict(aux_columns=torch.tensor([1, 5, 7, 30]), k_aux=2) if with_aux else {}
    codes, cut, aux_indices, aux_values = batch_topk_encode(x, W, b, k, kernel, center=c, **aux)
    offsets, indices, values = codes.offsets, codes.indices, codes.values
    assert codes.width == n and len(codes) == N and torch.equal(codes.row_ids(), entry_rows(offsets, codes.nnz))
    pre = (x - c) @ W + b
    keep = sorted_batch_top(pre.detach(), k)
    assert int(keep[4].sum()) > 3 * k
    assert torch.equal(offsets, row_offsets(keep.nonzero()[:, 0], N))
    assert torch.equal(indices, keep.nonzero()[:, 1])  # row-major, ascending latents within a row
    kept = pre.detach()[keep]
    left = pre.detach().relu()[~keep].max()
    torch.testing.assert_close(cut, (kept.min() + left) / 2)
    # gradients: the same function of the parameters as the dense selection
    weights = torch.randn(len(values), generator=g, dtype=torch.float64)
    ours = (values * weights).sum() + (aux_values.square().sum() if with_aux else 0)
    theirs = (pre[keep] * weights).sum()
    if with_aux:
        dense_aux = pre.relu()[:, aux["aux_columns"]].topk(2, dim=1).values
        theirs = theirs + dense_aux.square().sum()
        assert torch.equal(aux_indices.sort(1).values, aux["aux_columns"][pre[:, aux["aux_columns"]].topk(2, dim=1).indices].sort(1).values)
    for got, want in zip(torch.autograd.grad(ours, (W, b, c)), torch.autograd.grad(theirs, (W, b, c))):
        torch.testing.assert_close(got, want)


def test_threshold_lowered_when_the_sample_misses_the_busy_entries(monkeypatch):
    """The sample's top values are far above the rest, so its thresholds leave too few entries: the selection
    retries lower, ends at 0 and is still the sorted one."""
    g = torch.Generator().manual_seed(2)
    N, n, k = 16, 256, 2
    pre = torch.randn(N, n, generator=g, dtype=torch.float64) * 0.01
    pre.view(-1)[:: csr.SAMPLE_STRIDE] = 100.0  # every sampled entry
    tried = []
    original = csr._thresholds
    monkeypatch.setattr(csr, "_thresholds", lambda flat, budget: (tried.append(t) or t for t in original(flat, budget)))
    rows, cols, values, cut = csr.select_batch_top(pre, torch.empty(N, n, dtype=torch.bool), budget=k * N)
    assert tried[-1] == 0.0 and len(tried) >= 2
    keep = sorted_batch_top(pre, k)
    assert torch.equal(torch.stack([rows, cols], 1), keep.nonzero())
    torch.testing.assert_close(values, pre[keep])


def test_fewer_positive_entries_than_the_budget_keeps_them_all():
    pre = -torch.ones(4, 10, dtype=torch.float64)
    pre[1, 3], pre[2, 7] = 0.5, 0.25
    rows, cols, values, cut = csr.select_batch_top(pre, budget=8)
    assert rows.tolist() == [1, 2] and cols.tolist() == [3, 7] and float(cut) == 0.0
    assert values.tolist() == [0.5, 0.25]


def test_encode_input_errors():
    x, W, b = torch.randn(3, 4), torch.randn(4, 9), torch.zeros(9)
    with pytest.raises(ValueError, match="mixes all rows"):
        batch_topk_encode(x.view(3, 1, 4), W, b, 2)
    with pytest.raises(ValueError, match="mask_workspace"):
        batch_topk_encode(x, W, b, 2, mask_workspace=torch.empty(3, 9))
    with pytest.raises(ValueError, match="k_aux"):
        batch_topk_encode(x, W, b, 2, aux_columns=torch.tensor([1]), k_aux=2)


@pytest.mark.parametrize("kernel", ["torch", "dense"])
@pytest.mark.parametrize("per_latent", [False, True])
def test_threshold_encode_keeps_the_entries_above_and_differentiates_like_dense(kernel, per_latent):
    g = torch.Generator().manual_seed(3)
    N, d, n = 9, 5, 12
    x = torch.randn(N, d, generator=g, dtype=torch.float64)
    W, b, c = (torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(True) for s in ((d, n), (n,), (d,)))
    threshold = torch.rand(n, generator=g, dtype=torch.float64) if per_latent else 0.0
    codes = threshold_encode(x, W, b, threshold, kernel, center=c)
    offsets, indices, values = codes.offsets, codes.indices, codes.values
    pre = (x - c) @ W + b
    above = pre.detach() > threshold
    assert 0 < int(above.sum()) < N * n
    assert torch.equal(offsets, row_offsets(above.nonzero()[:, 0], N)) and torch.equal(indices, above.nonzero()[:, 1])
    weights = torch.randn(len(values), generator=g, dtype=torch.float64)
    ours = torch.autograd.grad((values * weights).sum(), (W, b, c))
    for got, want in zip(ours, torch.autograd.grad((pre[above] * weights).sum(), (W, b, c))):
        torch.testing.assert_close(got, want)
