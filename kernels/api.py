"""Sparse SAE kernels: the public entry points (installed as `saelab.kernels.api`; CSR codes in `saelab.kernels.csr`).

The top-level `kernels/` folder has no `__init__.py` on purpose: the checkout root is on `sys.path` whenever Python
starts there, and a regular package named `kernels` would shadow Hugging Face's `kernels`, which transformers imports.

TopK codes are (indices [N, k] int64, values [N, k]); W_enc [d, n], b_enc [n], W_dec [n, d], x [N, d].

    indices, values = topk_encode(x, W_enc, b_enc, k)        # relu(x @ W_enc + b_enc), top-k
    *codes, aux_idx, aux_val = topk_encode_with_aux(x, W_enc, b_enc, k, dead, k_aux)  # + AuxK's pick, same matmul
    x_hat = sparse_decode(indices, values, W_dec)            # sum_j values[:, j] * W_dec[indices[:, j]]

A batch-level top-k (k*N over the whole batch) gives CSR codes, a variable number of latents per row (`csr`):

    codes, cut, aux_idx, aux_val = batch_topk_encode(x, W_enc, b_enc, k)   # codes: CSRCodes (offsets, indices,
    x_hat = sparse_decode_csr(codes, W_dec)                                 # values, width)
    codes = threshold_encode(x, W_enc, b_enc, threshold)                    # ReLU / JumpReLU codes, as CSR

Both are autograd functions whose backward passes cost O(N k d): the encoder's dense x @ W_enc is the only
O(N n d) work of a training step. `kernel=` picks the backend:

    "auto"   triton for CUDA tensors when triton imports, else torch
    "triton" Triton kernels (GPU; CPU tensors only under TRITON_INTERPRET=1, for tests); the encoder's top-k is
             fused into its GEMM for wide fp32 SAEs (triton_backend.tile_topk)
    "torch"  stock PyTorch sparse ops (embedding_bag, sampled_addmm): the fast CPU path
    "dense"  the readable reference: dense N x n code matrix + matmul, plain autograd

`reference` holds a readable PyTorch reference for every kernel.

The autograd logic is written once (two `torch.autograd.Function`s below); a backend only supplies three
primitives with the same signatures (see `torch_backend` / `triton_backend`, references in `reference`):

    gather_sum(indices, weights, table, out_dtype)      out[b]    = sum_j w[b,j] table[i[b,j]]
    sddmm(indices, a, table, out_dtype)                 out[b,j]  = <a[b], table[i[b,j]]>
    segment_sum(csr, weights, table, n, out_dtype, ws)  out[l]    = sum_{(b,j): i[b,j]=l} w[b,j] table[b]

so every step of a TopK SAE except the encoder's x @ W_enc (and its top-k) costs O(N k d).
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

from . import reference
from . import torch_backend
from .layout import by_latent

KERNELS = ("auto", "triton", "torch", "dense")

__all__ = ["KERNELS", "sparse_decode", "topk_encode", "topk_encode_with_aux", "resolve_kernel", "triton_available"]


# ---------------------------------------------------------------------------------------------------------------
# Backend selection
# ---------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _triton_module() -> ModuleType | None:
    # Imported on first use, so that TRITON_INTERPRET set by a test before that point is honoured.
    try:
        from . import triton_backend
    except Exception:  # triton missing, or unusable on this platform
        return None
    return triton_backend


def triton_available() -> bool:
    """Whether the Triton backend imports here."""
    return _triton_module() is not None


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """Map `kernel` ("auto" | "triton" | "torch" | "dense") to the backend that will run for tensors on `device`."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(repr(k) for k in KERNELS)}")
    if kernel == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if kernel == "triton":
        mod = _triton_module()
        if mod is None:
            raise RuntimeError("kernel='triton' but triton is not importable here; use kernel='torch' or 'auto'")
        if device.type != "cuda" and not mod.interpreted():
            raise ValueError(
                f"kernel='triton' needs CUDA tensors (got {device.type}); CPU tensors run only under the Triton "
                "interpreter (TRITON_INTERPRET=1 set before triton is imported). Use kernel='torch' on the CPU."
            )
    return kernel


def _ops(name: str) -> ModuleType:
    return _triton_module() if name == "triton" else torch_backend  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------
# Autograd functions
# ---------------------------------------------------------------------------------------------------------------


class SparseDecode(torch.autograd.Function):
    """out = S @ W_dec for the k-sparse code matrix S given as (indices, values) [N, k]."""

    @staticmethod
    def forward(ctx, indices, values, W_dec, ops):
        ctx.ops = ops
        ctx.save_for_backward(indices, values, W_dec)
        return ops.gather_sum(indices, values, W_dec, out_dtype=values.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        indices, values, W_dec = ctx.saved_tensors
        ops = ctx.ops
        grad_values = grad_W = None
        if ctx.needs_input_grad[1]:  # sampled dense-dense product: <grad_out[b], W_dec[i[b,j]]>
            grad_values = ops.sddmm(indices, grad_out, W_dec, out_dtype=values.dtype)
        if ctx.needs_input_grad[2]:  # S^T @ grad_out, one segment per latent
            csr = by_latent(indices, W_dec.shape[0])
            grad_W, _ = ops.segment_sum(csr, values, grad_out, W_dec.shape[0], out_dtype=W_dec.dtype)
        return None, grad_values, grad_W, None


class TopKEncode(torch.autograd.Function):
    """(indices, values) = top-k of relu((x - center) @ W_enc + b_enc), and optionally AuxK's top-k_aux among the
    `aux_columns` (dead latents) of the same pre-activations. Backward touches only the selected latents."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, center, k, sorted, aux_columns, k_aux, workspace, ops):
        # b_enc - center @ W_enc is a [n] bias: centring costs no [N, d] product, forward or backward.
        bias = b_enc if center is None else torch.addmv(b_enc, W_enc.T, center, alpha=-1)
        # [N, n]: the one dense product of a TopK SAE step (into a reused buffer when given: a fresh N x n
        # allocation is page-faulted in on every call, which costs about a fifth of the product on a CPU)
        if aux_columns is None and _fuses(ops, x, W_enc, k):  # wide SAE on a GPU: top-k inside the GEMM
            values, indices = ops.tile_topk(x, W_enc, bias, k)
            values = values.to(x.dtype)
        else:
            pre = torch.addmm(bias, x, W_enc, out=workspace) if workspace is not None else torch.addmm(bias, x, W_enc)
            values, indices = pre.topk(k, dim=1, sorted=sorted)  # relu commutes with top-k (monotone) ...
        if aux_columns is None:
            aux_values, aux_indices = values.new_empty(len(x), 0), indices.new_empty(len(x), 0)
        else:
            aux_values, local = pre.index_select(1, aux_columns).topk(k_aux, dim=1, sorted=sorted)
            aux_indices = aux_columns[local]
            del pre
        values, aux_values = values.clamp_(min=0), aux_values.clamp_(min=0)  # ... so apply it to the winners only
        ctx.ops, ctx.k = ops, k
        ctx.save_for_backward(x, W_enc, center, torch.cat([indices, aux_indices], 1), torch.cat([values, aux_values], 1))
        ctx.mark_non_differentiable(indices, aux_indices)
        return indices, values, aux_indices, aux_values

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_indices, grad_values, grad_aux_indices, grad_aux_values):
        x, W_enc, center, indices, values = ctx.saved_tensors
        ops, k = ctx.ops, ctx.k
        n = W_enc.shape[1]
        needs_x, needs_W, needs_b, needs_center = ctx.needs_input_grad[:4]
        grad_x = grad_W = grad_b = grad_center = None
        # Gradient of pre: sparse (main and aux selections side by side), zero where relu clipped.
        g = torch.zeros_like(values)
        if grad_values is not None:
            g[:, :k] = grad_values
        if grad_aux_values is not None:
            g[:, k:] = grad_aux_values
        g *= values > 0
        if needs_x:  # sparse(g) @ W_enc^T: gather the selected columns of W_enc
            grad_x = ops.gather_sum(indices, g, W_enc.T, out_dtype=x.dtype)
        if needs_W or needs_b or needs_center:
            grad_W, grad_b, grad_center = encoder_weight_grads(
                ops, by_latent(indices, n), g, x, W_enc, center, needs_W, needs_b, needs_center)
        return grad_x, grad_W, grad_b, grad_center, None, None, None, None, None, None


def encoder_weight_grads(ops, csr, g, x, W_enc, center, needs_W, needs_b, needs_center):
    """(grad W_enc, grad b_enc, grad center) of pre = (x - center) @ W_enc + b_enc from the sparse gradient g of
    pre, whose entries `csr` groups by latent: (x - center)^T @ sparse(g) and the per-latent sums of g."""
    n = W_enc.shape[1]
    grad_W = grad_b = grad_center = None
    sums_needed = needs_b or needs_center or (needs_W and center is not None)
    grad_Wt, wsum = ops.segment_sum(csr, g, x, n, out_dtype=W_enc.dtype, weight_sum=sums_needed)
    if needs_W:
        if center is not None:
            grad_Wt.addr_(wsum.to(W_enc.dtype), center.to(W_enc.dtype), alpha=-1)
        grad_W = grad_Wt.T  # [d, n] view of the [n, d] result
    if needs_b:
        grad_b = wsum.to(W_enc.dtype)
    if needs_center:
        grad_center = -(W_enc.to(wsum.dtype) @ wsum).to(center.dtype)
    return grad_W, grad_b, grad_center


def _fuses(ops, x: torch.Tensor, W_enc: torch.Tensor, k: int) -> bool:
    """Whether the backend fuses the encoder's top-k into its GEMM for this call: Triton, wide fp32 SAEs, k <= 256,
    and on a GPU only when torch allows TF32 matmuls (otherwise cuBLAS's exact fp32 GEMM is the faster path)."""
    tf32_ok = not x.is_cuda or torch.backends.cuda.matmul.allow_tf32  # CPU tensors: the interpreter, in tests
    return (hasattr(ops, "tile_topk") and W_enc.shape[1] >= ops.FUSED_MIN_LATENTS and x.dtype == torch.float32
            and k <= 256 and tf32_ok)


# ---------------------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------------------

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor (fp32, bf16, fp16 or fp64), got {t.dtype}")


def _check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError("all inputs must be on one device, got " + ", ".join(f"{k} on {v}" for k, v in devices.items()))


def _check_decode(indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor, check_indices: bool) -> None:
    if not isinstance(indices, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise TypeError("indices and values must be tensors (the TopK codes)")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must be int64 or int32, got {indices.dtype}")
    _check_float("values", values)
    _check_float("W_dec", W_dec)
    if indices.shape != values.shape:
        raise ValueError(
            f"indices and values must have the same shape [N, k], got {tuple(indices.shape)} and {tuple(values.shape)}"
        )
    if indices.dim() < 1:
        raise ValueError("indices and values must have at least one dimension (the k active latents)")
    if W_dec.dim() != 2:
        raise ValueError(f"W_dec must be 2-D [n_latents, d], got shape {tuple(W_dec.shape)}")
    _check_same_device(indices=indices, values=values, W_dec=W_dec)
    n = W_dec.shape[0]
    if check_indices and indices.numel() > 0:
        lo, hi = int(indices.min()), int(indices.max())  # a device sync on GPUs: pass check_indices=False to skip
        if lo < 0 or hi >= n:
            raise IndexError(f"indices must lie in [0, {n}) for W_dec with {n} latents, got values in [{lo}, {hi}]")


def check_workspace(name: str, workspace, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    if workspace is not None and (tuple(workspace.shape) != shape or workspace.dtype != dtype
                                  or workspace.device != device):
        raise ValueError(f"{name} must be a {list(shape)} {dtype} tensor on {device}, got "
                         f"{list(workspace.shape)} {workspace.dtype} on {workspace.device}")


def _check_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, center=None) -> None:
    for name, t in (("x", x), ("W_enc", W_enc), ("b_enc", b_enc)) + ((("center", center),) if center is not None else ()):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        _check_float(name, t)
    if W_enc.dim() != 2:
        raise ValueError(f"W_enc must be 2-D [d, n_latents], got shape {tuple(W_enc.shape)}")
    d, n = W_enc.shape
    if x.dim() < 1 or x.shape[-1] != d:
        raise ValueError(f"x must be [..., d] with d={d} to match W_enc {tuple(W_enc.shape)}, got {tuple(x.shape)}")
    if b_enc.shape != (n,):
        raise ValueError(f"b_enc must be [n_latents]=[{n}] to match W_enc {tuple(W_enc.shape)}, got {tuple(b_enc.shape)}")
    if center is not None and center.shape != (d,):
        raise ValueError(f"center must be [d]=[{d}] to match W_enc {tuple(W_enc.shape)}, got {tuple(center.shape)}")
    dtypes = {x.dtype, W_enc.dtype, b_enc.dtype} | ({center.dtype} if center is not None else set())
    if len(dtypes) > 1:
        raise TypeError(
            f"x, W_enc, b_enc (and center) must share a dtype, got {x.dtype}, {W_enc.dtype}, {b_enc.dtype}"
            + (f", {center.dtype}" if center is not None else "") + " (cast x to the SAE dtype)"
        )
    _check_same_device(x=x, W_enc=W_enc, b_enc=b_enc, **({"center": center} if center is not None else {}))
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= n:
        raise ValueError(f"k must satisfy 1 <= k <= n_latents={n}, got k={k}")


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


def sparse_decode(
    indices: torch.Tensor,
    values: torch.Tensor,
    W_dec: torch.Tensor,
    kernel: str = "auto",
    *,
    check_indices: bool = True,
) -> torch.Tensor:
    """Decode TopK codes: out[b] = sum_j values[b, j] * W_dec[indices[b, j]].

    Args:
        indices: [..., k] int64/int32 latent ids in [0, n) (repeats in a row add up).
        values: [..., k] activations (fp32 / bf16 / fp16 / fp64); differentiable.
        W_dec: [n, d] decoder rows; differentiable, may differ in dtype from values.
        kernel: "auto" (triton for CUDA tensors when triton imports, else torch), "triton", "torch" or "dense"
            (the readable reference: builds the N x n code matrix).
        check_indices: verify the index range (one device sync on GPUs).

    Returns:
        [..., d] in values' dtype, accumulated in fp32 (fp64 for fp64 inputs). Backward: grad wrt values is a
        sampled dense-dense product, grad wrt W_dec a segmented reduction over latents; both O(N k d).
    """
    _check_decode(indices, values, W_dec, check_indices)
    name = resolve_kernel(kernel, values.device)
    lead, k = indices.shape[:-1], indices.shape[-1]
    idx2, val2 = indices.reshape(-1, k), values.reshape(-1, k)
    if name == "dense":
        out = reference.dense_decode(idx2, val2, W_dec)
    else:
        out = SparseDecode.apply(idx2, val2, W_dec, _ops(name))
    return out.reshape(*lead, W_dec.shape[1])


def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    kernel: str = "auto",
    *,
    sorted: bool = True,
    center: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TopK encoder: pre = relu((x - center) @ W_enc + b_enc); keep the k largest latents of each row.

    Args:
        x: [..., d]; W_enc: [d, n] (any strides: pass `weight.T` of an [n, d] parameter, which is also the
            fastest layout for the backward); b_enc: [n]; center: optional [d] (an SAE's b_dec), differentiable,
            folded into the bias so it costs no [N, d] work. One shared dtype (fp32 / bf16 / fp16 / fp64).
        k: 1 <= k <= n.
        kernel: "auto" | "triton" | "torch" | "dense" (see `sparse_decode`).
        sorted: return each row's latents in descending order of value (False is a little faster).
        workspace: optional [N, n] tensor (x's dtype and device, N = rows of x) to hold the pre-activations; its
            contents are overwritten. Reusing one across training steps saves allocating N x n fresh each call.

    Returns:
        (indices [..., k] int64, values [..., k] in x's dtype); values >= 0 (rows with fewer than k positive
        pre-activations carry zeros). Backward wrt x, W_enc, b_enc, center touches only the k selected latents per
        row: no N x n gradient is formed.
    """
    indices, values, _, _ = _encode(x, W_enc, b_enc, k, kernel, sorted, center, None, 0, workspace)
    return indices, values


def topk_encode_with_aux(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    aux_columns: torch.Tensor,
    k_aux: int,
    kernel: str = "auto",
    *,
    sorted: bool = True,
    center: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`topk_encode` (same arguments), plus AuxK's selection from the same pre-activations: the k_aux largest (after relu) among
    the latents `aux_columns` ([m] int64, e.g. the dead latents). One encoder product serves both.

    Returns (indices, values, aux_indices, aux_values); aux_indices [..., k_aux] are latent ids (not positions in
    aux_columns). Gradients flow through both value tensors.
    """
    if not isinstance(aux_columns, torch.Tensor) or aux_columns.dim() != 1 or aux_columns.dtype != torch.int64:
        raise TypeError("aux_columns must be a 1-D int64 tensor of latent ids")
    n = W_enc.shape[-1]
    if aux_columns.numel() and (int(aux_columns.min()) < 0 or int(aux_columns.max()) >= n):
        raise IndexError(f"aux_columns must lie in [0, {n})")
    if isinstance(k_aux, bool) or not isinstance(k_aux, int) or not 1 <= k_aux <= len(aux_columns):
        raise ValueError(f"k_aux must satisfy 1 <= k_aux <= len(aux_columns)={len(aux_columns)}, got {k_aux!r}")
    return _encode(x, W_enc, b_enc, k, kernel, sorted, center, aux_columns.to(W_enc.device), k_aux, workspace)


def _encode(x, W_enc, b_enc, k, kernel, sorted, center, aux_columns, k_aux, workspace):
    _check_encode(x, W_enc, b_enc, k, center)
    name = resolve_kernel(kernel, x.device)
    lead, d = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, d)
    check_workspace("workspace", workspace, (x2.shape[0], W_enc.shape[1]), x.dtype, x.device)
    if name == "dense":
        outs = reference.dense_topk_encode(x2, W_enc, b_enc, k, sorted=sorted, center=center,
                                           aux_columns=aux_columns, k_aux=k_aux)
    else:
        outs = TopKEncode.apply(x2, W_enc, b_enc, center, k, sorted, aux_columns, k_aux, workspace, _ops(name))
    return tuple(t.reshape(*lead, t.shape[-1]) for t in outs)
