"""TopK SAE (Gao et al. 2024): keep each token's k largest pre-activations (after ReLU); no sparsity penalty.

The sparse form (indices, values) [N, k] is first-class: the sparse kernels and AuxK both work on it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import SAE, SAEConfig, Training, TrainOutput, auxk_loss, mse_of
from .registry import register


@register("topk")
class TopKSAE(SAE):
    def __init__(self, cfg: SAEConfig, device=None):
        if cfg.k is None:
            raise ValueError(f"SAEConfig.k is required for arch {cfg.arch!r}")
        super().__init__(cfg, device=device)

    def topk(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return indices, values.relu()

    def encode_topk(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(indices [..., k] long, values [..., k]); values can be 0 when fewer than k pre-activations are > 0."""
        return self.topk(self.pre_acts(x))

    def activation(self, pre: Tensor) -> Tensor:
        indices, values = self.topk(pre)
        return torch.zeros_like(pre).scatter_(-1, indices, values)


class TopKTraining(Training):
    """loss = mse + AuxK(dead); decoding goes through the sparse path."""

    def loss(self, x: Tensor, step: int = 0, dead: Tensor | None = None) -> TrainOutput:
        sae = self.sae
        x = self._flat(x)
        pre = sae.pre_acts(x)
        indices, values = sae.topk(pre)
        x_hat = sae.decode_topk(indices, values)
        mse = mse_of(x, x_hat)
        aux = auxk_loss(sae.W_dec, pre, x - x_hat, dead, self.k_aux, self.cfg.auxk_coefficient)
        active = values.detach() > 0
        fired = torch.zeros(self.cfg.width, dtype=torch.bool, device=x.device)
        fired[indices[active]] = True
        return TrainOutput(loss=mse + aux, mse=mse.detach(), aux_loss=aux.detach(),
                           sparsity_loss=mse.new_zeros(()), l0=active.sum(-1).float().mean(), fired=fired,
                           x_hat=x_hat.detach())


TopKSAE.training_cls = TopKTraining
