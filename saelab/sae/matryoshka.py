"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024).

Latents are split into nested prefixes (groups g_1, g_1+g_2, ...). One global batch-top-k picks the
active latents; every prefix must reconstruct x on its own, so early latents learn general features
and later ones refine them instead of absorbing them. Exported as JumpReLU, like BatchTopK.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

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
    each group's share of the batch selection is decoded on its own and added to the previous prefix's x_hat."""

    def reconstruction(self, x: Tensor, selection: Selection) -> tuple[Tensor, Tensor, Tensor]:
        x_hat = self.sae.b_dec.expand_as(x)
        start, mses = 0, []
        for end in self.sae.prefix_ends:
            x_hat = x_hat + self.decode(selection, start, end)
            mses.append(mse_of(x, x_hat))
            start = end
        mses = torch.stack(mses)
        return mses.sum(), x_hat, mses.detach()


MatryoshkaSAE.training_cls = MatryoshkaTraining
