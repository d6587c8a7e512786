"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024).

Latents are split into nested prefixes (groups g_1, g_1+g_2, ...). One global batch-top-k picks the
active latents; every prefix must reconstruct x on its own, so early latents learn general features
and later ones refine them instead of absorbing them. Exported as JumpReLU, like BatchTopK.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from saelab.kernels import sparse_decode_csr
from saelab.kernels.layout import entry_rows, row_offsets

from .base import SAEConfig, mse_of
from .batchtopk import BatchTopKSAE, BatchTopKTraining, Selection
from .registry import register


def default_group_sizes(width: int) -> list[int]:
    """Prefixes ending at width/16, /8, /4, /2 and width (fewer when width is small)."""
    ends = sorted({width // d for d in (16, 8, 4, 2, 1)} - {0})
    return [b - a for a, b in zip([0] + ends[:-1], ends)]


@register("matryoshka")
class MatryoshkaSAE(BatchTopKSAE):
    options = BatchTopKSAE.options + ("group_sizes",)

    def __init__(self, cfg: SAEConfig, device=None):
        if cfg.group_sizes is None:  # resolve the default, so the saved cfg.json states the groups used
            cfg = dataclasses.replace(cfg, group_sizes=default_group_sizes(cfg.width))
        super().__init__(cfg, device=device)

    @property
    def prefix_ends(self) -> list[int]:
        ends, total = [], 0
        for g in self.cfg.group_sizes:
            total += g
            ends.append(total)
        return ends


class MatryoshkaTraining(BatchTopKTraining):
    """loss = sum over prefixes m of mse(x, codes[:, :m] @ W_dec[:m] + b_dec) + AuxK(dead), on the sparse kernels:
    one decode gives every group's part of each row (the selection's CSR rows split at the group boundaries, which
    is free: a row's latents are in ascending order), and prefix reconstructions are their cumulative sums."""

    def reconstruction(self, x: Tensor, selection: Selection) -> tuple[Tensor, Tensor, Tensor]:
        ends = self.sae.prefix_ends
        groups, N = len(ends), len(x)
        rows = entry_rows(selection.offsets, selection.indices.numel())
        group = torch.bucketize(selection.indices, selection.indices.new_tensor(ends[:-1]), right=True)
        parts = sparse_decode_csr(row_offsets(rows * groups + group, N * groups), selection.indices,
                                  selection.values, self.sae.W_dec, self.kernel, check_indices=False)
        x_hat, mses = self.sae.b_dec, []
        for part in parts.view(N, groups, -1).unbind(1):  # one [N, d] sum per prefix (unbind: one backward buffer)
            x_hat = x_hat + part
            mses.append(mse_of(x, x_hat))
        mses = torch.stack(mses)
        return mses.sum(), x_hat, mses.detach()


MatryoshkaSAE.training_cls = MatryoshkaTraining
