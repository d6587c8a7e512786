"""TopK SAE (Gao et al. 2024): keep each token's k largest pre-activations (after ReLU); no sparsity penalty.

The sparse form (indices, values) [N, k] is first-class: the sparse kernels and AuxK both work on it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from saelab.kernels import sparse_decode, topk_encode

from .base import SAE, SAEConfig, Training, TrainOutput, mse_of, wide
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
    """loss = mse + AuxK(dead), on the sparse kernels: apart from the encoder's x @ W_enc and its top-k, every
    product of a step (decode, its backward, the encoder's weight gradient) costs O(N k d), not O(N width d).

    `kernel` ("auto" | "triton" | "torch" | "dense") picks the backend of saelab.kernels; "dense" is the reference.
    """

    kernel: str = "auto"

    def loss(self, x: Tensor, step: int = 0, dead: Tensor | None = None) -> TrainOutput:
        sae = self.sae
        x = self._flat(x)
        # (x - b_dec) @ W_enc + b_enc, written so that no gradient wrt x is needed: b_dec's share of the encoder
        # gradient comes through this [width] bias instead of an [N, d] product.
        bias = sae.b_enc - sae.b_dec @ sae.W_enc
        indices, values = topk_encode(x, sae.W_enc, bias, self.cfg.k, self.kernel, sorted=False)
        x_hat = sparse_decode(indices, values, sae.W_dec, self.kernel) + sae.b_dec
        mse = mse_of(x, x_hat)
        aux = self._auxk(x, bias, x - x_hat, dead)
        active = values.detach() > 0
        fired = torch.zeros(self.cfg.width, dtype=torch.bool, device=x.device)
        fired[indices[active]] = True
        return TrainOutput(loss=mse + aux, mse=mse.detach(), aux_loss=aux.detach(),
                           sparsity_loss=mse.new_zeros(()), l0=active.sum(-1).float().mean(), fired=fired,
                           x_hat=x_hat.detach())

    def _auxk(self, x: Tensor, bias: Tensor, residual: Tensor, dead: Tensor | None) -> Tensor:
        """AuxK (see base.auxk_loss) on the dead latents' columns only: its cost grows with the number dead."""
        zero = wide(residual.new_zeros(()))
        if dead is None or self.cfg.auxk_coefficient == 0 or residual.shape[0] == 0:
            return zero
        if dead.shape != (self.cfg.width,):
            raise ValueError(f"dead mask must have shape [width]=[{self.cfg.width}], got {list(dead.shape)}")
        dead_ids = dead.to(device=residual.device, dtype=torch.bool).nonzero().squeeze(1)
        if len(dead_ids) == 0:
            return zero
        sae = self.sae
        local, values = topk_encode(x, sae.W_enc[:, dead_ids], bias[dead_ids],
                                    min(self.k_aux, len(dead_ids)), self.kernel, sorted=False)
        e = wide(residual.detach())
        e_hat = wide(sparse_decode(dead_ids[local], values, sae.W_dec, self.kernel))
        scale = min(1.0, len(dead_ids) / self.k_aux)
        return self.cfg.auxk_coefficient * scale * (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum().clamp_min(1e-12)


TopKSAE.training_cls = TopKTraining
