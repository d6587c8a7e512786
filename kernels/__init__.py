"""Sparse TopK-SAE kernels (installed as `saelab.kernels`).

TopK codes are (indices [N, k] int64, values [N, k]); W_enc [d, n], b_enc [n], W_dec [n, d], x [N, d].

    indices, values = topk_encode(x, W_enc, b_enc, k)        # relu(x @ W_enc + b_enc), top-k
    *codes, aux_idx, aux_val = topk_encode_with_aux(x, W_enc, b_enc, k, dead, k_aux)  # + AuxK's pick, same matmul
    x_hat = sparse_decode(indices, values, W_dec)            # sum_j values[:, j] * W_dec[indices[:, j]]

A batch-level top-k (k*N over the whole batch) gives CSR codes, a variable number of latents per row (`csr`):

    offsets, indices, values, cut, aux_idx, aux_val = batch_topk_encode(x, W_enc, b_enc, k)
    x_hat = sparse_decode_csr(offsets, indices, values, W_dec)
    offsets, indices, values = threshold_encode(x, W_enc, b_enc, threshold)   # ReLU / JumpReLU codes, as CSR

Both are autograd functions whose backward passes cost O(N k d): the encoder's dense x @ W_enc is the only
O(N n d) work of a training step. `kernel=` picks the backend:

    "auto"   triton for CUDA tensors when triton imports, else torch
    "triton" Triton kernels (GPU; CPU tensors only under TRITON_INTERPRET=1, for tests); the encoder's top-k is
             fused into its GEMM for wide fp32 SAEs (triton_backend.tile_topk)
    "torch"  stock PyTorch sparse ops (embedding_bag, sampled_addmm): the fast CPU path
    "dense"  the readable reference: dense N x n code matrix + matmul, plain autograd

`reference` holds a readable PyTorch reference for every kernel.
"""

from . import reference
from .api import KERNELS, resolve_kernel, sparse_decode, topk_encode, topk_encode_with_aux, triton_available
from .csr import batch_topk_encode, sparse_decode_csr, threshold_encode

__all__ = [
    "KERNELS", "batch_topk_encode", "reference", "resolve_kernel", "sparse_decode", "sparse_decode_csr", "topk_encode",
    "threshold_encode", "topk_encode_with_aux", "triton_available",
]
