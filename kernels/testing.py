"""Checks of a backend against the fp64 dense reference (used by the tests and by scripts/bench_kernels.py).

`check_decode` / `check_encode` run one backend on given inputs, compare the forward result and every gradient
with plain fp64 autograd through the dense reference, and raise AssertionError on a mismatch. Tolerances scale
with the magnitude of the reference (fp32 tight, bf16/fp16 loose).

Top-k selections can legitimately differ between backends in near-ties (bf16 rounds pre-activations into ties,
and rows with fewer than k positive latents pad with arbitrary zero-valued latents), so `check_encode` verifies
that the backend's selection *is* a top-k of the fp64 pre-activations (up to tolerance) and then compares the
gradients with the reference evaluated at the backend's own selection.
"""

from __future__ import annotations

import torch

from .api import sparse_decode, topk_encode, topk_encode_with_aux

TOLERANCE = {torch.float64: 1e-9, torch.float32: 3e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _tol(*dtypes: torch.dtype) -> float:
    return max(TOLERANCE[dt] for dt in dtypes)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """|actual - expected| <= tol * (|expected| + max|expected|), elementwise, compared in fp64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if expected.numel() == 0:
        return
    scale = max(1.0, float(expected.abs().max()))
    err = (actual - expected).abs()
    bound = tol * (expected.abs() + scale)
    if not bool((err <= bound).all()):
        i = int((err - bound).argmax())
        raise AssertionError(
            f"{what}: max error {float(err.max()):.3g} (tol {tol:g}, scale {scale:.3g}); worst element "
            f"{float(actual.reshape(-1)[i]):.6g} vs {float(expected.reshape(-1)[i]):.6g}"
        )


def make_decode_inputs(N: int, n: int, d: int, k: int, dtype=torch.float32, device="cpu", seed: int = 0):
    """Random TopK codes (distinct latents per row when k <= n) and a decoder."""
    g = torch.Generator().manual_seed(seed)
    if N > 0 and k > 0:
        indices = torch.rand(N, n, generator=g).argsort(dim=1)[:, :k] if k <= n else torch.randint(0, n, (N, k), generator=g)
    else:
        indices = torch.zeros(N, k, dtype=torch.long)
    values = torch.rand(N, k, generator=g) * 2
    W_dec = torch.randn(n, d, generator=g) / d**0.5
    return indices.to(device), values.to(device, dtype), W_dec.to(device, dtype)


def make_encode_inputs(N: int, n: int, d: int, dtype=torch.float32, device="cpu", seed: int = 0, transposed=False):
    """Random x [N, d], W_enc [d, n] (as the transpose of an [n, d] tensor when `transposed`), b_enc [n]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g)
    W = torch.randn(n, d, generator=g) / d**0.5
    W_enc = W.T if transposed else W.T.contiguous()
    b_enc = torch.randn(n, generator=g) * 0.5
    return x.to(device, dtype), W_enc.to(device, dtype), b_enc.to(device, dtype)


def check_decode(indices, values, W_dec, kernel: str, seed: int = 1) -> None:
    """Forward and both gradients of sparse_decode(kernel) against fp64 dense autograd."""
    tol = _tol(values.dtype, W_dec.dtype)
    v = values.detach().clone().requires_grad_(True)
    W = W_dec.detach().clone().requires_grad_(True)
    out = sparse_decode(indices, v, W, kernel=kernel)
    assert out.dtype == values.dtype, f"output dtype {out.dtype}, expected {values.dtype}"
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    out.backward(grad_out)

    v64 = values.detach().double().requires_grad_(True)
    W64 = W_dec.detach().double().requires_grad_(True)
    k = indices.shape[-1]
    codes = torch.zeros(indices.reshape(-1, k).shape[0], W_dec.shape[0], dtype=torch.float64, device=W64.device)
    codes = codes.scatter_add(1, indices.reshape(-1, k).long(), v64.reshape(-1, k))
    ref = (codes @ W64).reshape(out.shape)
    ref.backward(grad_out.double())

    assert_close(out, ref, tol, f"decode[{kernel}] forward")
    assert_close(v.grad, v64.grad, tol, f"decode[{kernel}] grad values")
    assert_close(W.grad, W64.grad, tol, f"decode[{kernel}] grad W_dec")
    assert v.grad.dtype == values.dtype and W.grad.dtype == W_dec.dtype


def check_encode(x, W_enc, b_enc, k: int, kernel: str, seed: int = 1, exact_selection: bool | None = None) -> None:
    """Forward selection/values and gradients wrt x, W_enc, b_enc of topk_encode(kernel) against fp64 autograd."""
    tol = _tol(x.dtype)
    n = W_enc.shape[1]
    xs = x.detach().clone().requires_grad_(True)
    Ws = W_enc.detach().clone().requires_grad_(True)
    bs = b_enc.detach().clone().requires_grad_(True)
    indices, values = topk_encode(xs, Ws, bs, k, kernel=kernel)
    lead = x.shape[:-1]
    assert indices.shape == (*lead, k) and values.shape == (*lead, k), (indices.shape, values.shape)
    assert indices.dtype == torch.int64 and values.dtype == x.dtype
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(*lead, n, generator=g).to(x.device, x.dtype)  # upstream gradient, defined per latent
    (values * G.gather(-1, indices)).sum().backward()

    x64 = x.detach().double().requires_grad_(True)
    W64 = W_enc.detach().double().requires_grad_(True)
    b64 = b_enc.detach().double().requires_grad_(True)
    pre = x64 @ W64 + b64
    relu_pre = pre.detach().relu()
    scale = max(1.0, float(relu_pre.abs().max())) if relu_pre.numel() else 1.0

    # 1. the selection is a top-k of relu(pre): distinct latents, values match, nothing left out is larger.
    if indices.numel():
        sorted_idx = indices.sort(dim=-1).values
        assert bool((sorted_idx[..., 1:] != sorted_idx[..., :-1]).all()), f"encode[{kernel}]: repeated latent"
        chosen = relu_pre.gather(-1, indices)
        assert_close(values, chosen, tol, f"encode[{kernel}] values")
        left_out = relu_pre.scatter(-1, indices, float("-inf")).amax(dim=-1) if k < n else None
        if left_out is not None:
            gap = chosen.amin(dim=-1) - left_out
            assert bool((gap >= -2 * tol * scale).all()), f"encode[{kernel}]: not a top-k (gap {float(gap.min()):.3g})"
    if exact_selection is None:
        exact_selection = x.dtype in (torch.float32, torch.float64)
    if exact_selection and indices.numel():  # same dense code matrix as the fp64 reference
        ref_vals, ref_idx = relu_pre.topk(k, dim=-1)
        dense = torch.zeros_like(relu_pre).scatter(-1, indices, values.detach().double())
        dense_ref = torch.zeros_like(relu_pre).scatter(-1, ref_idx, ref_vals)
        assert_close(dense, dense_ref, tol, f"encode[{kernel}] dense codes")

    # 2. gradients: fp64 autograd at the backend's own selection (and its own relu mask).
    active = (values.detach() > 0).double()
    ref_values = pre.gather(-1, indices) * active
    (ref_values * G.double().gather(-1, indices)).sum().backward()
    assert_close(xs.grad, x64.grad, tol, f"encode[{kernel}] grad x")
    assert_close(Ws.grad, W64.grad, tol, f"encode[{kernel}] grad W_enc")
    assert_close(bs.grad, b64.grad, tol, f"encode[{kernel}] grad b_enc")


def check_encode_with_aux(x, W_enc, b_enc, center, k: int, aux_columns, k_aux: int, kernel: str, seed: int = 2) -> None:
    """topk_encode_with_aux(kernel) with a centre: both selections are top-k's of the fp64 pre-activations (the
    aux one among aux_columns only), and the gradients wrt x, W_enc, b_enc, center match fp64 autograd at them."""
    tol = _tol(x.dtype)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, W_enc, b_enc, center)]
    indices, values, aux_indices, aux_values = topk_encode_with_aux(
        *leaves[:3], k, aux_columns, k_aux, kernel=kernel, center=leaves[3])
    assert aux_indices.shape == (len(x), k_aux) and aux_values.dtype == x.dtype
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(len(x), W_enc.shape[1], 2, generator=g).to(x.device, x.dtype)
    ((values * G[..., 0].gather(1, indices)).sum() + (aux_values * G[..., 1].gather(1, aux_indices)).sum()).backward()

    refs = [t.detach().double().requires_grad_(True) for t in (x, W_enc, b_enc, center)]
    pre = (refs[0] - refs[3]) @ refs[1] + refs[2]
    relu_pre = pre.detach().relu()
    for what, idx, vals, pool in (("main", indices, values, relu_pre), ("aux", aux_indices, aux_values, relu_pre[:, aux_columns])):
        assert_close(vals, relu_pre.gather(1, idx), tol, f"encode_with_aux[{kernel}] {what} values")
        best = pool.topk(idx.shape[1], dim=1).values
        assert_close(vals.detach().sort(dim=1, descending=True).values, best, tol, f"encode_with_aux[{kernel}] {what} top-k")
    allowed = torch.zeros(W_enc.shape[1], dtype=torch.bool)
    allowed[aux_columns] = True
    assert bool(allowed[aux_indices].all()), f"encode_with_aux[{kernel}]: aux pick outside aux_columns"

    ref_loss = 0
    for idx, vals, j in ((indices, values, 0), (aux_indices, aux_values, 1)):
        ref_loss = ref_loss + (pre.gather(1, idx) * (vals.detach() > 0) * G[..., j].double().gather(1, idx)).sum()
    ref_loss.backward()
    for name, got, ref in zip(("x", "W_enc", "b_enc", "center"), leaves, refs):
        assert_close(got.grad, ref.grad, tol, f"encode_with_aux[{kernel}] grad {name}")
