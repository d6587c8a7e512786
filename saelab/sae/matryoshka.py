"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024).

Latents are split into nested prefixes (groups g_1, g_1+g_2, ...). One global batch-top-k picks the
active latents; every prefix must reconstruct x on its own, so early latents learn general features
and later ones refine them instead of absorbing them. Exported as JumpReLU, like BatchTopK.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from saelab.kernels.csr import CSRCodes, sparse_decode_csr
from saelab.kernels.layout import row_offsets
from saelab.options import PositiveInt

from .base import SAEConfig, wide
from .batchtopk import BatchTopKOptions, BatchTopKSAE, BatchTopKTraining, Selection
from .registry import register


def default_group_sizes(width: int) -> list[int]:
    """Prefixes ending at width/16, /8, /4, /2 and width (fewer when width is small)."""
    ends = sorted({width // d for d in (16, 8, 4, 2, 1)} - {0})
    return [b - a for a, b in zip([0] + ends[:-1], ends)]


@dataclass
class MatryoshkaOptions(BatchTopKOptions):
    group_sizes: list[PositiveInt] | None = None
    """Matryoshka: sizes of the nested latent groups (sum = width); None means prefixes at width/16, /8, /4, /2, 1."""

    def check_for(self, cfg: SAEConfig) -> None:
        if self.group_sizes is not None and (not self.group_sizes or sum(self.group_sizes) != cfg.width):
            raise ValueError(f"SAEConfig.group_sizes must be a non-empty list summing to width={cfg.width} "
                             f"(sum is {sum(self.group_sizes)}), got {self.group_sizes!r}")


def prefix_ends(group_sizes: list[int]) -> list[int]:
    """Where each nested prefix ends: the running sums of the group sizes."""
    ends, total = [], 0
    for g in group_sizes:
        total += g
        ends.append(total)
    return ends


@register("matryoshka", options=MatryoshkaOptions)
class MatryoshkaSAE(BatchTopKSAE):
    saelens_name = "matryoshka_batchtopk"

    def __init__(self, cfg: SAEConfig, device=None):
        if cfg.options.group_sizes is None:  # resolve the default, so the saved cfg.json states the groups used
            options = dataclasses.replace(cfg.options, group_sizes=default_group_sizes(cfg.width))
            cfg = dataclasses.replace(cfg, options=options)
        super().__init__(cfg, device=device)

    @classmethod
    def saelens_keys(cls, cfg: SAEConfig) -> dict:
        groups = cfg.options.group_sizes
        return {**super().saelens_keys(cfg), **({"matryoshka_widths": prefix_ends(groups)} if groups else {})}

    @property
    def prefix_ends(self) -> list[int]:
        return prefix_ends(self.cfg.options.group_sizes)


class PrefixResiduals(torch.autograd.Function):
    """Every prefix's residual and mean squared error from each group's decoded part, in place.

    parts [N * G, d] (row n's group g at n * G + g) becomes x_hat_m - x for every prefix m (b_dec + the first m
    groups). This replaces G additions and G mse_loss calls, whose backward also stacks G [N, d] gradients. Here
    forward is one cumulative pass and backward one reverse pass, over the same buffer, and the squared errors
    are summed per row before float64 accumulation."""

    @staticmethod
    def forward(ctx, parts: Tensor, x: Tensor, b_dec: Tensor):
        N = len(x)
        residuals = parts.view(N, -1, x.shape[1])
        for m in range(1, residuals.shape[1]):
            residuals[:, m] += residuals[:, m - 1]
        residuals.sub_((x - b_dec).unsqueeze(1))
        wide_dtype = torch.promote_types(residuals.dtype, torch.float32)  # bf16 rows are summed in float32
        mses = torch.linalg.vector_norm(residuals, dim=2, dtype=wide_dtype).square().sum(0, dtype=torch.float64)
        mses = mses / max(N, 1)
        ctx.mark_dirty(parts)
        ctx.save_for_backward(parts)
        ctx.set_materialize_grads(False)  # the residuals usually get no gradient: no [N * G, d] of zeros
        return parts, mses.to(wide(x).dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_residuals: Tensor | None, grad_mses: Tensor):
        (parts,) = ctx.saved_tensors  # overwritten with the gradient: this backward runs once
        N, G = len(parts) // len(grad_mses), len(grad_mses)
        grad = parts.view(N, G, -1).mul_((grad_mses * (2 / max(N, 1))).to(parts.dtype).view(1, G, 1))
        if grad_residuals is not None:
            grad.add_(grad_residuals.view_as(grad))
        for m in range(G - 2, -1, -1):  # prefix m's residual holds groups 0..m: group g gets the sum over m >= g
            grad[:, m] += grad[:, m + 1]
        grad_x = -grad[:, 0] if ctx.needs_input_grad[1] else None
        return parts, grad_x, grad[:, 0].sum(0) if ctx.needs_input_grad[2] else None


class MatryoshkaTraining(BatchTopKTraining):
    """loss = sum over prefixes m of mse(x, codes[:, :m] @ W_dec[:m] + b_dec) + AuxK(dead), on the sparse kernels:
    one decode gives every group's part of each row (the selection's CSR rows split at the group boundaries, which
    is free: a row's latents are in ascending order), and PrefixResiduals turns them into every prefix's error."""

    def reconstruction(self, x: Tensor, target: Tensor, selection: Selection) -> tuple[Tensor, Tensor, Tensor]:
        ends, codes = self.sae.prefix_ends, selection.codes
        groups, N = len(ends), len(x)
        group = torch.bucketize(codes.indices, codes.indices.new_tensor(ends[:-1]), right=True)
        by_group = CSRCodes(row_offsets(codes.row_ids() * groups + group, N * groups), codes.indices, codes.values,
                            codes.width)  # row n's group g is row n * G + g
        parts = sparse_decode_csr(by_group, self.sae.W_dec, self.kernel, check_indices=False)
        # every prefix reconstructs the target less the skip path (a skip transcoder's; the target itself otherwise)
        goal = target - x @ self.sae.W_skip if self.cfg.skip else target
        residuals, mses = PrefixResiduals.apply(parts, goal, self.sae.b_dec)
        x_hat = residuals.detach().view(N, groups, -1)[:, -1] + target
        return mses.sum(), x_hat, mses.detach()


MatryoshkaSAE.training_cls = MatryoshkaTraining
