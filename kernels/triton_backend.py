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

Not fused: the encoder's x @ W_enc + top-k. The matmul is a dense GEMM that cuBLAS runs at tensor-core speed;
a top-k epilogue would need every program to see a whole row of n = 16k-65k latents (or a second merge pass),
which forfeits the GEMM tiling. The encoder forward therefore stays addmm + torch.topk (on pre, with relu
applied to the k selected values only: relu is monotone, so it commutes with top-k and the N x n relu pass is
skipped), and only its backward uses these kernels.

Status: numerics verified through the interpreter; `compile_check()` compiles every launched variant to an sm_90
cubin without a GPU (a test does). Not yet run or timed on a real GPU: block sizes are heuristics, untuned.
Gathering rows of W_enc^T is coalesced only when the encoder weight is stored [n, d] (pass `weight.T` as W_enc);
with a contiguous [d, n] W_enc each gathered "row" is a strided column.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .layout import LatentCSR

NAME = "triton"


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
    return done
