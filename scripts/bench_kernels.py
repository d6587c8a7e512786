"""Benchmark the sparse TopK-SAE kernels: dense vs torch vs triton backends.

Times, per backend and width n:
  decode   sparse_decode forward + backward (grad wrt values and W_dec)
  encode   topk_encode forward + backward (grad wrt x, W_enc, b_enc); includes the dense x @ W_enc + top-k
  step     one TopK SAE training step without the optimizer: encode, decode, MSE, backward (-> tokens/s)
plus the floor every backend shares: the encoder's x @ W_enc + top-k alone ("enc fwd floor").

Usage (on a CUDA machine all three backends run; without one it falls back to the CPU, torch and dense only):
    python scripts/bench_kernels.py                       # d=576, n in (16384, 65536), k=32, N=4096
    python scripts/bench_kernels.py --n 16384 --reps 3    # quicker
    python scripts/bench_kernels.py --n 262144 --backends torch triton --tf32   # triton's encoder fuses the top-k
        (widths >= saelab.kernels.triton_backend.FUSED_MIN_LATENTS = 131072, fp32 with TF32 matmuls allowed; the
        torch backend is addmm + topk). Add --fuse never for the same run with the fused encoder off.
Before timing on CUDA it checks the Triton kernels against the fp64 reference at small shapes.
Repetitions are interleaved across backends (fair under load from other processes); the table shows median and
min. Ends with one line `RESULT key=value ...` (times in ms: medians, plus *_min_ms).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from saelab.kernels.api import sparse_decode, topk_encode, triton_available

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cases(cases: dict, device: torch.device, reps: int, warmup: int) -> dict[str, tuple[float, float]]:
    """Wall time of each case in ms as (median, min). Repetitions are interleaved across cases, so that load from
    other processes on a shared machine hits every case alike."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: (statistics.median(ts), min(ts)) for name, ts in times.items()}


def make_problem(N: int, n: int, d: int, k: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(N, d, generator=g).to(device, dtype)
    enc_weight = (torch.randn(n, d, generator=g) / d**0.5).to(device, dtype)  # stored [n, d]; W_enc = .T
    b_enc = torch.zeros(n, device=device, dtype=dtype)
    W_dec = enc_weight.clone()
    indices = torch.randint(0, n, (N, k), generator=g).to(device)
    values = torch.rand(N, k, generator=g).to(device, dtype)
    grad_out = torch.randn(N, d, generator=g).to(device, dtype)
    grad_vals = torch.randn(N, k, generator=g).to(device, dtype)
    for t in (x, enc_weight, b_enc, W_dec, values):
        t.requires_grad_(True)
    return dict(x=x, enc_weight=enc_weight, b_enc=b_enc, W_dec=W_dec, indices=indices, values=values,
                grad_out=grad_out, grad_vals=grad_vals)  # fmt: skip


def _zero(*tensors):
    for t in tensors:
        t.grad = None


def backend_cases(kernel: str, p: dict, k: int) -> dict:
    def decode():
        _zero(p["values"], p["W_dec"])
        out = sparse_decode(p["indices"], p["values"], p["W_dec"], kernel=kernel, check_indices=False)
        out.backward(p["grad_out"])

    def encode():
        _zero(p["x"], p["enc_weight"], p["b_enc"])
        _, vals = topk_encode(p["x"], p["enc_weight"].T, p["b_enc"], k, kernel=kernel)
        vals.backward(p["grad_vals"])

    def step():
        _zero(p["enc_weight"], p["b_enc"], p["W_dec"])
        x = p["x"].detach()
        idx, vals = topk_encode(x, p["enc_weight"].T, p["b_enc"], k, kernel=kernel)
        x_hat = sparse_decode(idx, vals, p["W_dec"], kernel=kernel, check_indices=False)
        loss = (x_hat - x).float().pow(2).sum(-1).mean()
        loss.backward()

    return {f"decode_{kernel}": decode, f"encode_{kernel}": encode, f"step_{kernel}": step}


def encoder_floor(p: dict, k: int):
    def fwd():
        with torch.no_grad():
            torch.addmm(p["b_enc"], p["x"], p["enc_weight"].T).topk(k, dim=1)

    return {"floor": fwd}


def check_triton(device: torch.device) -> None:
    from saelab.kernels.testing import check_decode, check_encode, make_decode_inputs, make_encode_inputs

    for dtype in (torch.float32, torch.bfloat16):
        for N, n, d, k in [(64, 1000, 576, 32), (3, 100, 24, 1), (5, 100, 40, 100), (0, 50, 8, 3)]:
            check_decode(*make_decode_inputs(N, n, d, k, dtype=dtype, device=device), kernel="triton")
            check_encode(*make_encode_inputs(N, n, d, dtype=dtype, device=device, transposed=True), k=k, kernel="triton")
    print("triton kernels match the fp64 reference (fp32 and bf16, k=1, k=n, n=100, N=0)")


def check_fused_selection(n: int, d: int, k: int, device: torch.device, N: int = 512) -> None:
    """The fused encoder under TF32 against the exact fp64 top-k: TF32 rounds the GEMM, so near-ties may swap;
    report how many picks agree and how far the values are off, and fail if the selection is clearly wrong."""
    from saelab.kernels import triton_backend

    p = make_problem(N, n, d, k, torch.float32, device, seed=1)
    values, indices = triton_backend.tile_topk(p["x"].detach(), p["enc_weight"].detach().T, p["b_enc"].detach(), k)
    pre = p["x"].detach().double() @ p["enc_weight"].detach().double().T
    exact = pre.topk(k, dim=1)
    agree = (indices.unsqueeze(2) == exact.indices.unsqueeze(1)).any(2).float().mean().item()
    error = (values.double() - pre.gather(1, indices)).abs().max().item()
    print(f"fused encoder (TF32) at n={n}: {agree:.4f} of picks match the exact top-k; max |value error| {error:.2e}")
    if agree < 0.95:
        raise SystemExit(f"the fused encoder's selection disagrees with the exact top-k ({agree:.3f} < 0.95)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--N", type=int, default=4096, help="tokens per batch")
    ap.add_argument("--d", type=int, default=576, help="input width")
    ap.add_argument("--n", type=int, nargs="+", default=[16384, 65536], help="SAE widths")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--backends", nargs="+", default=["dense", "torch", "triton"], choices=["dense", "torch", "triton"])
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20 on CUDA, 3 on CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--no-check", action="store_true", help="skip the Triton correctness check on CUDA")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 matmuls (cuBLAS and the fused encoder)")
    ap.add_argument("--fuse", choices=["auto", "never"], default="auto",
                    help="auto: the triton encoder fuses its top-k from FUSED_MIN_LATENTS latents; never: always addmm + topk")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    reps = args.reps or (20 if device.type == "cuda" else 3)
    warmup = 3 if device.type == "cuda" else 1
    backends = list(args.backends)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} cores"
        print("note: no CUDA device -> CPU fallback; the triton backend is skipped (it needs a GPU)")
    if "triton" in backends and (device.type != "cuda" or not triton_available()):
        if device.type == "cuda":
            print("note: triton does not import here; skipping the triton backend")
        backends.remove("triton")
    print(f"device: {name} | torch {torch.__version__} | dtype {args.dtype} | N={args.N} d={args.d} k={args.k}")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    if "triton" in backends:
        from saelab.kernels import triton_backend

        if args.fuse == "never":
            triton_backend.FUSED_MIN_LATENTS = 1 << 62
    if "triton" in backends and not args.no_check:
        check_triton(device)
        fused = [n for n in args.n if n >= triton_backend.FUSED_MIN_LATENTS]
        if fused and args.tf32 and args.dtype == "fp32":
            check_fused_selection(fused[-1], args.d, args.k, device)

    result = {"device": device.type, "dtype": args.dtype, "N": args.N, "d": args.d, "k": args.k, "reps": reps,
              "tf32": int(args.tf32), "fuse": args.fuse}
    rows = []

    def cell(t):
        return f"{t[0]:>8.1f} ({t[1]:.1f})"

    for n in args.n:
        p = make_problem(args.N, n, args.d, args.k, dtype, device)
        cases = encoder_floor(p, args.k)
        for kernel in backends:
            cases.update(backend_cases(kernel, p, args.k))
        t = time_cases(cases, device, reps, warmup)
        rows.append(f"{n:>6} {'floor':>8} {'':>18} {cell(t['floor']):>18} {'':>18} {args.N / t['floor'][0] * 1e3:>9.0f}"
                    "   <- x @ W_enc + top-k alone")  # fmt: skip
        result[f"n{n}_enc_fwd_floor_ms"] = round(t["floor"][0], 2)
        for kernel in backends:
            tok_s = args.N / t[f"step_{kernel}"][0] * 1e3
            rows.append(
                f"{n:>6} {kernel:>8} {cell(t[f'decode_{kernel}']):>18} {cell(t[f'encode_{kernel}']):>18} "
                f"{cell(t[f'step_{kernel}']):>18} {tok_s:>9.0f}"
            )
            for key in ("decode", "encode", "step"):
                result[f"n{n}_{key}_{kernel}_ms"] = round(t[f"{key}_{kernel}"][0], 2)
                result[f"n{n}_{key}_{kernel}_min_ms"] = round(t[f"{key}_{kernel}"][1], 2)
            result[f"n{n}_step_{kernel}_tok_s"] = round(tok_s)
        for kernel in ("torch", "triton"):
            if "dense" in backends and kernel in backends:
                for key in ("decode", "encode", "step"):
                    ratio = result[f"n{n}_{key}_dense_ms"] / result[f"n{n}_{key}_{kernel}_ms"]
                    result[f"n{n}_{key}_speedup_{kernel}_vs_dense"] = round(ratio, 2)
        print("\n".join(rows[-1 - len(backends) :]), flush=True)
        del p, cases
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    print(f"{name}; ms, median (min) of {reps} interleaved runs; 'step' = encode + decode + MSE + backward, no optimizer")
    print(f"{'n':>6} {'backend':>8} {'decode fwd+bwd':>18} {'encode fwd+bwd':>18} {'step':>18} {'tokens/s':>9}")
    for r in rows:
        print(r)
    print("RESULT " + " ".join(f"{key}={val}" for key, val in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
