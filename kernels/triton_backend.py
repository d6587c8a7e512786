"""The Triton backend (`kernel="triton"`): two kernels cover the three sparse primitives.

* `_bag_kernel` (segmented gather-sum): out[s] = sum_{p in segment s} w[p] * table[rows[p]].
  - fixed segments of k entries (row b of the codes) -> the decoder forward (table = W_dec) and the encoder's
    input gradient (table = W_enc^T, any strides);
  - CSR segments from sorting the codes by latent -> S^T @ dense (grad wrt W_dec, grad wrt W_enc), each
    program owning whole latents, so no atomics; with HAS_WSUM it also writes the per-latent weight sum (the
    encoder bias gradient).
* `_sddmm_kernel`: out[b, j] = <a[b], table[indices[b, j]]>, the gradient wrt the active values.

Both accumulate in fp32 (fp64 when an input is fp64) and store in the output's dtype. Grid: axis 0 walks
segments / rows (can be large), axis 1 blocks of d or of k (small). Tables are addressed through their strides,
so a transposed view (W_enc.T) is gathered without a copy; index tensors and weights are made contiguous.

Readable references: `reference.gather_sum_reference`, `reference.segment_sum_reference`,
`reference.sddmm_reference`; the tests run these kernels on CPU tensors through the Triton interpreter
(TRITON_INTERPRET=1 set before triton is imported), including fp64.

Fused encoder + top-k (`tile_topk`, used for wide SAEs): the dense x @ W_enc + b stays a tiled GEMM (`tl.dot`),
and each [BLOCK_M, BLOCK_N] tile keeps only its own top-KP (KP = k rounded up to a power of two), packed as
int64 keys (an order-preserving int32 image of the fp32 value, then the latent id), so the N x n pre-activations
never reach memory: N x (n / BLOCK_N) x KP keys do, and one torch.topk over them finishes the selection. By the
roofline in docs/benchmarks.md this pays for wide SAEs (about 1.6x at 1M latents on an H100), not at 16k, where
Adam's traffic is as large; hence `FUSED_MIN_LATENTS`. Below it, and whenever AuxK needs a selection among the
dead latents, the encoder forward is cuBLAS addmm + torch.topk (relu applied to the k winners only: relu is
monotone, so it commutes with top-k).

Status: numerics verified through the interpreter; `compile_check()` compiles every launched variant to an sm_90
cubin without a GPU (a test does). Not yet run or timed on a real GPU: block sizes and FUSED_MIN_LATENTS are
heuristics from the roofline, untuned.
Gathering rows of W_enc^T is coalesced only when the encoder weight is stored [n, d] (pass `weight.T` as W_enc);
with a contiguous [d, n] W_enc each gathered "row" is a strided column.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from . import torch_backend
from .layout import LatentCSR

NAME = "triton"
FUSED_MIN_LATENTS = 1 << 17
"""Widths from which the encoder's top-k is fused into its GEMM (see the module docstring)."""


@triton.jit
def _bag_kernel(
    out_ptr,
    wsum_ptr,
    table_ptr,
    rows_ptr,
    w_ptr,
    offsets_ptr,
    k,
    d,
    stride_t0,
    stride_t1,
    stride_o0,
    FIXED_K: tl.constexpr,
    HAS_WSUM: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seg = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    if FIXED_K:  # segment = one row of the [N, k] codes
        start = seg * k
        end = start + k
    else:  # CSR segment = all entries of one latent
        start = tl.load(offsets_ptr + seg)
        end = tl.load(offsets_ptr + seg + 1)
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    wacc = tl.zeros([BLOCK_P], dtype=ACC)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_ok = p < end
        r = tl.load(rows_ptr + p, mask=p_ok, other=0).to(tl.int64)
        w = tl.load(w_ptr + p, mask=p_ok, other=0.0).to(ACC)
        t = tl.load(
            table_ptr + r[:, None] * stride_t0 + cols[None, :] * stride_t1,
            mask=p_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(ACC)
        acc += tl.sum(t * w[:, None], axis=0)
        wacc += w
    tl.store(out_ptr + seg * stride_o0 + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)
    if HAS_WSUM:
        if pid_d == 0:
            tl.store(wsum_ptr + seg, tl.sum(wacc, axis=0).to(wsum_ptr.dtype.element_ty))


@triton.jit
def _sddmm_kernel(
    out_ptr,
    a_ptr,
    table_ptr,
    idx_ptr,
    k,
    d,
    stride_a0,
    stride_a1,
    stride_t0,
    stride_t1,
    ACC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    js = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    j_ok = js < k
    lat = tl.load(idx_ptr + row * k + js, mask=j_ok, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_K], dtype=ACC)
    for c0 in range(0, d, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        c_ok = cols < d
        a = tl.load(a_ptr + row * stride_a0 + cols * stride_a1, mask=c_ok, other=0.0).to(ACC)
        t = tl.load(
            table_ptr + lat[:, None] * stride_t0 + cols[None, :] * stride_t1,
            mask=j_ok[:, None] & c_ok[None, :],
            other=0.0,
        ).to(ACC)
        acc += tl.sum(t * a[None, :], axis=1)
    tl.store(out_ptr + row * k + js, acc.to(out_ptr.dtype.element_ty), mask=j_ok)


# ---------------------------------------------------------------------------------------------------------------
# Launchers (same signatures as torch_backend)


@triton.jit
def _tile_topk_kernel(
    keys_ptr,
    x_ptr,
    w_ptr,
    b_ptr,
    N,
    n,
    d,
    stride_x0,
    stride_x1,
    stride_w0,
    stride_w1,
    stride_k0,
    KP: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    col_ok = cols < n
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < d
        xt = tl.load(x_ptr + rows[:, None] * stride_x0 + dd[None, :] * stride_x1,
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + dd[:, None] * stride_w0 + cols[None, :] * stride_w1,
                     mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.dot(xt, wt, input_precision=PRECISION, out_dtype=tl.float32)
    acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc = tl.where(col_ok[None, :], acc, float("-inf"))
    # int64 keys that sort like the values: an order-preserving int32 image of the fp32 bits, then the latent id
    bits = acc.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    keys = (ordered.to(tl.int64) << 32) | cols[None, :].to(tl.int64)
    top = tl.topk(keys, KP)
    out_cols = pid_n * KP + tl.arange(0, KP)
    tl.store(keys_ptr + rows[:, None] * stride_k0 + out_cols[None, :], top, mask=row_ok[:, None])

# ---------------------------------------------------------------------------------------------------------------


def interpreted() -> bool:
    """True when these kernels run through the Triton interpreter (TRITON_INTERPRET=1 at import time)."""
    return type(_bag_kernel).__name__ == "InterpretedFunction"


def _on(device: torch.device):
    """Launch on the tensors' GPU (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _acc(*dtypes: torch.dtype):
    return tl.float64 if torch.float64 in dtypes else tl.float32


def _block_d(d: int) -> int:
    if d <= 128:
        return triton.next_power_of_2(max(d, 16))
    return 128 if d % 128 == 0 else 64  # d=576 -> 9 full blocks of 64


def _block_p(k: int) -> int:
    return min(32, triton.next_power_of_2(max(k, 16)))


def gather_sum(
    indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """out[b] = sum_j weights[b, j] * table[indices[b, j]]   ([N, k], [N, k], [n, d] -> [N, d])."""
    N, k = indices.shape
    d = table.shape[1]
    out = torch.empty(N, d, dtype=out_dtype, device=table.device)
    if N == 0 or k == 0 or d == 0:
        return out.zero_()
    idx = indices.contiguous()
    w = weights.contiguous()
    BLOCK_D = _block_d(d)
    grid = (N, triton.cdiv(d, BLOCK_D))
    with _on(out.device):
        _bag_kernel[grid](
            out, out, table, idx, w, idx,  # wsum_ptr / offsets_ptr unused with FIXED_K and no WSUM
            k, d, table.stride(0), table.stride(1), out.stride(0),
            FIXED_K=True, HAS_WSUM=False, ACC=_acc(weights.dtype, table.dtype),
            BLOCK_P=_block_p(k), BLOCK_D=BLOCK_D,
        )  # fmt: skip
    return out


def gather_sum_csr(
    offsets: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """out[b] = sum_{e in offsets[b]:offsets[b+1]} weights[e] * table[indices[e]]: `_bag_kernel` with one CSR
    segment per row (-> [N, d])."""
    N, d = len(offsets) - 1, table.shape[1]
    out = torch.empty(N, d, dtype=out_dtype, device=table.device)
    if N == 0 or d == 0 or indices.numel() == 0:
        return out.zero_()
    BLOCK_D = _block_d(d)
    with _on(out.device):
        _bag_kernel[(N, triton.cdiv(d, BLOCK_D))](
            out, out, table, indices.contiguous(), weights.contiguous(), offsets.contiguous(),
            0, d, table.stride(0), table.stride(1), out.stride(0),
            FIXED_K=False, HAS_WSUM=False, ACC=_acc(weights.dtype, table.dtype), BLOCK_P=32, BLOCK_D=BLOCK_D,
        )  # fmt: skip
    return out


sddmm_csr = torch_backend.sddmm_csr  # a chunked gather + dot on the GPU (no Triton kernel of its own yet)


def segment_sum(
    csr: LatentCSR,
    weights: torch.Tensor,
    table: torch.Tensor,
    n: int,
    out_dtype: torch.dtype,
    weight_sum: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """out[l] = sum over entries (b, j) of latent l of weights[b, j] * table[b]   (-> [n, d]); optionally the
    per-latent weight sums (-> [n], fp32/fp64). `csr` = layout.by_latent(indices, n)."""
    d = table.shape[1]
    acc_t = torch.float64 if torch.float64 in (weights.dtype, table.dtype) else torch.float32
    out = torch.empty(n, d, dtype=out_dtype, device=table.device)
    wsum = torch.empty(n, dtype=acc_t, device=table.device) if weight_sum else None
    if n == 0:
        return out, wsum
    w_sorted = weights.reshape(-1)[csr.order].contiguous()
    BLOCK_D = _block_d(max(d, 1))
    grid = (n, max(1, triton.cdiv(d, BLOCK_D)))
    with _on(out.device):
        _bag_kernel[grid](
            out, wsum if weight_sum else out, table, csr.rows, w_sorted, csr.offsets,
            0, d, table.stride(0), table.stride(1), out.stride(0),
            FIXED_K=False, HAS_WSUM=weight_sum, ACC=_acc(weights.dtype, table.dtype),
            BLOCK_P=32, BLOCK_D=BLOCK_D,
        )  # fmt: skip
    return out, wsum


def sddmm(indices: torch.Tensor, a: torch.Tensor, table: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """out[b, j] = <a[b], table[indices[b, j]]>   ([N, k], [N, d], [n, d] -> [N, k])."""
    N, k = indices.shape
    d = table.shape[1]
    out = torch.empty(N, k, dtype=out_dtype, device=a.device)
    if N == 0 or k == 0:
        return out
    if d == 0:
        return out.zero_()
    idx = indices.contiguous()
    BLOCK_K = _block_p(k)
    grid = (N, triton.cdiv(k, BLOCK_K))
    with _on(out.device):
        _sddmm_kernel[grid](
            out, a, table, idx,
            k, d, a.stride(0), a.stride(1), table.stride(0), table.stride(1),
            ACC=_acc(a.dtype, table.dtype), BLOCK_K=BLOCK_K, BLOCK_D=_block_d(d),
        )  # fmt: skip
    return out


def tile_topk(x: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor, k: int,
              block_m: int = 64, block_n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [N, k] fp32, indices [N, k] int64): the top-k of x @ W_enc + bias per row (before relu), without
    writing the N x n pre-activations. fp32 inputs (TF32 only when torch allows it for fp32 matmuls; bf16 is not
    fused yet: the Triton interpreter, which the tests use, mis-evaluates bf16 tl.dot), k <= block_n."""
    N, d = x.shape
    n = W_enc.shape[1]
    kp = triton.next_power_of_2(k)
    if kp > block_n or x.dtype != torch.float32:
        raise ValueError(f"tile_topk handles k <= {block_n} and fp32 inputs")
    tiles = triton.cdiv(n, block_n)
    keys = torch.empty(N, tiles * kp, dtype=torch.int64, device=x.device)
    if N:
        tf32 = x.is_cuda and torch.backends.cuda.matmul.allow_tf32
        grid = (triton.cdiv(N, block_m), tiles)
        with _on(x.device):
            _tile_topk_kernel[grid](
                keys, x, W_enc, bias, N, n, d, x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1),
                keys.stride(0), KP=kp, PRECISION="tf32" if tf32 else "ieee",
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=32,
            )  # fmt: skip
    top = keys.topk(k, dim=1).values
    ordered = (top >> 32).to(torch.int32)
    values = (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).view(torch.float32)
    return values, top & 0xFFFFFFFF


def compile_check(capability: int = 90) -> list[str]:
    """Compile every kernel variant the launchers use down to a cubin for an NVIDIA GPU of the given compute
    capability (90 = H100), without needing a GPU. Catches what the interpreter lets through. Returns the names
    of the compiled variants; raises on a compile error. Must run in a process without TRITON_INTERPRET."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if interpreted():
        raise RuntimeError("compile_check needs a process without TRITON_INTERPRET=1")
    target = GPUTarget("cuda", capability, 32)
    done = []
    for dt, acc in (("fp32", tl.float32), ("bf16", tl.float32), ("fp64", tl.float64)):
        wsum_t = "fp64" if dt == "fp64" else "fp32"
        for fixed, has_wsum, rows_t in ((True, False, "i64"), (True, False, "i32"), (False, True, "i64"), (False, False, "i64")):
            sig = {
                "out_ptr": f"*{dt}", "wsum_ptr": f"*{wsum_t}" if has_wsum else f"*{dt}", "table_ptr": f"*{dt}",
                "rows_ptr": f"*{rows_t}", "w_ptr": f"*{dt}", "offsets_ptr": "*i64", "k": "i32", "d": "i32",
                "stride_t0": "i64", "stride_t1": "i64", "stride_o0": "i32",
                "FIXED_K": "constexpr", "HAS_WSUM": "constexpr", "ACC": "constexpr",
                "BLOCK_P": "constexpr", "BLOCK_D": "constexpr",
            }  # fmt: skip
            consts = {"FIXED_K": fixed, "HAS_WSUM": has_wsum, "ACC": acc, "BLOCK_P": 32, "BLOCK_D": 64}
            triton.compile(ASTSource(fn=_bag_kernel, signature=sig, constexprs=consts), target=target)
            done.append(f"bag[{dt}, {'rows ' + rows_t if fixed else 'latents'}{', wsum' if has_wsum else ''}]")
        for idx_t in ("i64", "i32"):
            sig = {
                "out_ptr": f"*{dt}", "a_ptr": f"*{dt}", "table_ptr": f"*{dt}", "idx_ptr": f"*{idx_t}", "k": "i32",
                "d": "i32", "stride_a0": "i64", "stride_a1": "i64", "stride_t0": "i64", "stride_t1": "i64",
                "ACC": "constexpr", "BLOCK_K": "constexpr", "BLOCK_D": "constexpr",
            }  # fmt: skip
            consts = {"ACC": acc, "BLOCK_K": 32, "BLOCK_D": 64}
            triton.compile(ASTSource(fn=_sddmm_kernel, signature=sig, constexprs=consts), target=target)
            done.append(f"sddmm[{dt}, {idx_t}]")
    for dt, precision in (("fp32", "tf32"), ("fp32", "ieee")):
        sig = {
            "keys_ptr": "*i64", "x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "N": "i32", "n": "i32",
            "d": "i32", "stride_x0": "i64", "stride_x1": "i64", "stride_w0": "i64", "stride_w1": "i64",
            "stride_k0": "i64", "KP": "constexpr", "PRECISION": "constexpr", "BLOCK_M": "constexpr",
            "BLOCK_N": "constexpr", "BLOCK_D": "constexpr",
        }  # fmt: skip
        consts = {"KP": 32, "PRECISION": precision, "BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_D": 32}
        triton.compile(ASTSource(fn=_tile_topk_kernel, signature=sig, constexprs=consts), target=target)
        done.append(f"tile_topk[{dt}, {precision}]")
    return done
