"""saelab.kernels: the PyTorch and dense backends, the references, the API surface and input checks."""

import pytest
import torch

from saelab.kernels import reference, torch_backend
from saelab.kernels.api import KERNELS, resolve_kernel, sparse_decode, topk_encode, topk_encode_with_aux
from saelab.kernels.layout import by_latent
from saelab.kernels.testing import (
    assert_close,
    check_decode,
    check_encode,
    check_encode_with_aux,
    make_decode_inputs,
    make_encode_inputs,
)

# (N, n, d, k): basic; k=1 with n not a power of two; k=n; empty batch; odd d; k and d spanning several blocks
SHAPES = [(8, 64, 32, 4), (5, 100, 24, 1), (4, 100, 20, 100), (0, 100, 16, 3), (7, 37, 13, 5), (6, 300, 150, 40)]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("kernel", ["torch", "dense"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_decode_matches_reference(kernel, dtype, shape):
    N, n, d, k = shape
    check_decode(*make_decode_inputs(N, n, d, k, dtype=dtype), kernel=kernel)


@pytest.mark.parametrize("kernel", ["torch", "dense"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_encode_matches_reference(kernel, dtype, shape):
    N, n, d, k = shape
    check_encode(*make_encode_inputs(N, n, d, dtype=dtype), k=k, kernel=kernel)


@pytest.mark.parametrize("transposed", [False, True])
def test_encode_strided_W_enc_and_clipped_rows(transposed):
    # W_enc as the .T view of an [n, d] parameter; a very negative bias leaves rows with < k positive latents.
    x, W_enc, b_enc = make_encode_inputs(6, 50, 16, transposed=transposed)
    check_encode(x, W_enc, b_enc - 3.0, k=10, kernel="torch")


def test_decode_repeated_indices_add_up():
    indices = torch.tensor([[3, 3, 1], [0, 0, 0]])
    values = torch.tensor([[1.0, 2.0, 0.5], [1.0, 1.0, -1.0]])
    W = torch.randn(5, 4)
    expected = torch.stack([3 * W[3] + 0.5 * W[1], W[0]])
    for kernel in ("torch", "dense"):
        assert_close(sparse_decode(indices, values, W, kernel=kernel), expected, 1e-6, kernel)
    check_decode(indices, values, W, kernel="torch")


def test_decode_mixed_dtypes_and_int32_indices():
    indices, values, W = make_decode_inputs(6, 40, 12, 4)
    check_decode(indices, values.bfloat16(), W, kernel="torch")  # bf16 codes, fp32 decoder
    check_decode(indices.int(), values, W, kernel="torch")


def test_leading_batch_dims():
    x, W_enc, b_enc = make_encode_inputs(6, 30, 8)
    x = x.reshape(2, 3, 8)
    check_encode(x, W_enc, b_enc, k=4, kernel="torch")
    idx, vals = topk_encode(x, W_enc, b_enc, 4, kernel="torch")
    W_dec = torch.randn(30, 8)
    out = sparse_decode(idx, vals, W_dec, kernel="torch")
    assert out.shape == (2, 3, 8)
    assert_close(out.reshape(6, 8), sparse_decode(idx.reshape(6, 4), vals.reshape(6, 4), W_dec, "dense"), 1e-5, "lead")


def test_gradcheck_decode_fp64():
    indices, values, W = make_decode_inputs(4, 11, 5, 3, dtype=torch.float64)
    indices[0, 1] = indices[0, 0]  # a repeated latent
    values.requires_grad_(True)
    W.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v, w: sparse_decode(indices, v, w, kernel="torch"), (values, W))


def test_gradcheck_encode_fp64():
    x, W_enc, b_enc = make_encode_inputs(3, 12, 5, dtype=torch.float64, transposed=True)
    for t in (x, W_enc, b_enc):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, w, b: topk_encode(a, w, b, 4, kernel="torch")[1], (x, W_enc, b_enc))


@pytest.mark.parametrize("kernel", ["torch", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n_aux,k_aux", [(1, 1), (9, 4), (60, 60)])
def test_encode_with_centre_and_aux_matches_reference(kernel, dtype, n_aux, k_aux):
    x, W_enc, b_enc = make_encode_inputs(7, 60, 10, dtype=dtype, transposed=True)
    center = torch.randn(10, generator=torch.Generator().manual_seed(3)).to(dtype)
    aux_columns = torch.randperm(60, generator=torch.Generator().manual_seed(4))[:n_aux]
    check_encode_with_aux(x, W_enc, b_enc, center, 5, aux_columns, k_aux, kernel=kernel)


def test_centre_is_the_same_as_subtracting_it():
    x, W_enc, b_enc = make_encode_inputs(6, 40, 8)
    center = torch.randn(8)
    idx, vals = topk_encode(x, W_enc, b_enc, 5, kernel="torch", center=center)
    idx2, vals2 = topk_encode(x - center, W_enc, b_enc, 5, kernel="torch")
    assert torch.equal(idx, idx2)
    assert_close(vals, vals2, 1e-5, "centre")


def test_gradcheck_encode_with_aux_fp64():
    x, W_enc, b_enc = make_encode_inputs(3, 12, 5, dtype=torch.float64, transposed=True)
    center = torch.randn(5, dtype=torch.float64)
    for t in (x, W_enc, b_enc, center):
        t.requires_grad_(True)
    cols = torch.tensor([1, 4, 7, 10, 11])

    def f(a, w, b, c):
        _, vals, _, aux_vals = topk_encode_with_aux(a, w, b, 4, cols, 2, kernel="torch", center=c)
        return vals, aux_vals

    assert torch.autograd.gradcheck(f, (x, W_enc, b_enc, center))


def test_encode_with_aux_rejects_bad_columns():
    x, W_enc, b_enc = make_encode_inputs(4, 20, 6)
    with pytest.raises(IndexError, match="aux_columns"):
        topk_encode_with_aux(x, W_enc, b_enc, 3, torch.tensor([0, 20]), 1, kernel="torch")
    with pytest.raises(ValueError, match="k_aux"):
        topk_encode_with_aux(x, W_enc, b_enc, 3, torch.tensor([0, 5]), 3, kernel="torch")
    with pytest.raises(TypeError, match="aux_columns"):
        topk_encode_with_aux(x, W_enc, b_enc, 3, torch.tensor([0.0, 5.0]), 1, kernel="torch")
    with pytest.raises(ValueError, match="center"):
        topk_encode(x, W_enc, b_enc, 3, kernel="torch", center=torch.zeros(5))


def test_sorted_flag():
    x, W_enc, b_enc = make_encode_inputs(5, 40, 8)
    idx, vals = topk_encode(x, W_enc, b_enc, 6, kernel="torch")
    assert bool((vals[:, 1:] <= vals[:, :-1]).all())
    idx2, vals2 = topk_encode(x, W_enc, b_enc, 6, kernel="torch", sorted=False)
    codes = torch.zeros(5, 40).scatter(1, idx, vals)
    assert_close(torch.zeros(5, 40).scatter(1, idx2, vals2), codes, 1e-6, "unsorted")


def test_only_needed_grads():
    indices, values, W = make_decode_inputs(4, 20, 6, 3)
    W.requires_grad_(True)
    sparse_decode(indices, values, W, kernel="torch").sum().backward()
    assert W.grad is not None and values.grad is None
    x, W_enc, b_enc = make_encode_inputs(4, 20, 6)
    x.requires_grad_(True)
    topk_encode(x, W_enc, b_enc, 3, kernel="torch")[1].sum().backward()
    assert x.grad is not None and W_enc.grad is None


# ---- primitives against their readable references ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_torch_primitives_match_references(dtype):
    N, n, d, k = 9, 70, 19, 6
    indices, w, table = make_decode_inputs(N, n, d, k, dtype=dtype)
    a = torch.randn(N, d).to(dtype)
    tol = {torch.float32: 3e-5, torch.bfloat16: 3e-2, torch.float64: 1e-9}[dtype]
    assert_close(
        torch_backend.gather_sum(indices, w, table, dtype), reference.gather_sum_reference(indices, w, table), tol, "gather"
    )
    assert_close(
        torch_backend.gather_sum(indices, w, table.T.contiguous().T, dtype),
        reference.gather_sum_reference(indices, w, table),
        tol,
        "gather strided table",
    )
    expected = reference.sddmm_reference(indices, a, table)
    assert_close(torch_backend.sddmm(indices, a, table, dtype), expected, tol, "sddmm")
    assert_close(torch_backend._sddmm_gather_bmm(indices, a, table, chunk_elems=2 * k * d), expected, tol, "sddmm bmm")
    out, wsum = torch_backend.segment_sum(by_latent(indices, n), w, a, n, dtype, weight_sum=True)
    ref_out, ref_wsum = reference.segment_sum_reference(indices, w, a, n)
    assert_close(out, ref_out, tol, "segment_sum")
    assert_close(wsum, ref_wsum, tol, "segment weight sums")


def test_by_latent_layout():
    indices = torch.tensor([[2, 0], [2, 1], [0, 2]])
    csr = by_latent(indices, 4)
    assert csr.offsets.tolist() == [0, 2, 3, 6, 6]
    assert csr.latents.tolist() == [0, 0, 1, 2, 2, 2]
    assert csr.rows.tolist() == [0, 2, 1, 0, 1, 2]  # stable: rows of a latent in batch order


def test_dense_reference_is_plain_math():
    indices, values, W = make_decode_inputs(3, 10, 4, 2)
    expected = torch.stack([sum(values[b, j] * W[indices[b, j]] for j in range(2)) for b in range(3)])
    assert_close(reference.dense_decode(indices, values, W), expected, 1e-6, "dense_decode")
    x, W_enc, b_enc = make_encode_inputs(3, 10, 4)
    idx, vals, *_ = reference.dense_topk_encode(x, W_enc, b_enc, 3)
    assert_close(vals, torch.relu(x @ W_enc + b_enc).sort(dim=1, descending=True).values[:, :3], 1e-6, "dense_topk")


# ---- backend selection and input checks ---------------------------------------------------------------------


def test_kernel_names():
    assert KERNELS == ("auto", "triton", "torch", "dense")
    assert resolve_kernel("auto", torch.device("cpu")) == "torch"
    indices, values, W = make_decode_inputs(2, 8, 4, 2)
    with pytest.raises(ValueError, match="'auto', 'triton', 'torch', 'dense'"):
        sparse_decode(indices, values, W, kernel="cuda")
    x, W_enc, b_enc = make_encode_inputs(2, 8, 4)
    with pytest.raises(ValueError, match="choose one of"):
        topk_encode(x, W_enc, b_enc, 2, kernel="fast")


def test_decode_input_errors():
    indices, values, W = make_decode_inputs(3, 8, 4, 2)
    with pytest.raises(IndexError, match=r"\[0, 8\)"):
        sparse_decode(indices + 7, values, W)
    with pytest.raises(IndexError, match="got values in"):
        sparse_decode(indices - 5, values, W)
    with pytest.raises(ValueError, match="same shape"):
        sparse_decode(indices, values[:, :1], W)
    with pytest.raises(ValueError, match="W_dec must be 2-D"):
        sparse_decode(indices, values, W[0])
    with pytest.raises(TypeError, match="int64 or int32"):
        sparse_decode(indices.float(), values, W)
    with pytest.raises(TypeError, match="floating"):
        sparse_decode(indices, values.long(), W)


def test_encode_input_errors():
    x, W_enc, b_enc = make_encode_inputs(3, 8, 4)
    with pytest.raises(ValueError, match="d=4"):
        topk_encode(x[:, :3], W_enc, b_enc, 2)
    with pytest.raises(ValueError, match="b_enc must be"):
        topk_encode(x, W_enc, b_enc[:5], 2)
    with pytest.raises(ValueError, match="1 <= k <= n_latents=8"):
        topk_encode(x, W_enc, b_enc, 9)
    with pytest.raises(ValueError, match="1 <= k"):
        topk_encode(x, W_enc, b_enc, 0)
    with pytest.raises(TypeError, match="share a dtype"):
        topk_encode(x.double(), W_enc, b_enc, 2)
    with pytest.raises(TypeError, match="k must be an int"):
        topk_encode(x, W_enc, b_enc, 2.0)


def test_empty_batch_shapes_and_grads():
    x, W_enc, b_enc = make_encode_inputs(0, 12, 4)
    W_enc.requires_grad_(True)
    idx, vals = topk_encode(x, W_enc, b_enc, 3, kernel="torch")
    assert idx.shape == (0, 3) and vals.shape == (0, 3)
    W_dec = torch.randn(12, 4, requires_grad=True)
    out = sparse_decode(idx, vals, W_dec, kernel="torch")
    assert out.shape == (0, 4)
    (out.sum() + vals.sum()).backward()
    assert W_dec.grad.abs().sum() == 0 and W_enc.grad.abs().sum() == 0


def test_fp16_and_fp64_inputs():
    for dtype in (torch.float16, torch.float64):
        check_decode(*make_decode_inputs(6, 50, 20, 5, dtype=dtype), kernel="torch")
        check_encode(*make_encode_inputs(6, 50, 20, dtype=dtype), k=5, kernel="torch")
