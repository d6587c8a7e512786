"""TopK SAE (Gao et al. 2024): keep each token's k largest pre-activations (after ReLU); no sparsity penalty.

The sparse form (indices, values) [N, k] is first-class: the sparse kernels and AuxK both work on it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saelab.kernels.api import sparse_decode, topk_encode, topk_encode_with_aux

from .base import SAE, AuxKOptions, SAEConfig, Training, TrainOutput, auxk_ratio, mse_of, wide
from .registry import register
from .sparse_codes import sparse_summary, reused


@dataclass
class TopKOptions(AuxKOptions):
    """TopK's settings: AuxK's, nothing of its own (k is common to every SAE config)."""


@register("topk", options=TopKOptions)
class TopKSAE(SAE):
    takes_k = True
    saelens_name = "topk"
    saelens_activation = "topk"

    @classmethod
    def saelens_keys(cls, cfg: SAEConfig) -> dict:
        return {**super().saelens_keys(cfg), "rescale_acts_by_decoder_norm": False}

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

    @property
    def k_aux(self) -> int:
        k_aux = self.cfg.options.k_aux
        return k_aux if k_aux is not None else max(1, self.cfg.output_dim // 2)

    def loss(self, x: Tensor, step: int = 0, dead: Tensor | None = None, target: Tensor | None = None) -> TrainOutput:
        sae = self.sae
        x, target = self._flat_pair(x, target)
        # One encoder product gives both the TopK codes and AuxK's pick among the dead latents; an SAE's b_dec
        # enters as the encoder's centre, so no gradient wrt x (an [N, d] product) is ever needed.
        dead_ids = self._dead_ids(dead, x)
        options = dict(sorted=False, center=sae.encoder_center, workspace=self._workspace(x))
        if len(dead_ids):
            k_aux = min(self.k_aux, len(dead_ids))
            indices, values, aux_indices, aux_values = topk_encode_with_aux(
                x, sae.W_enc, sae.b_enc, self.cfg.k, dead_ids, k_aux, self.kernel, **options)
        else:
            indices, values = topk_encode(x, sae.W_enc, sae.b_enc, self.cfg.k, self.kernel, **options)
        x_hat = sae.add_skip(sparse_decode(indices, values, sae.W_dec, self.kernel) + sae.b_dec, x)
        mse = mse_of(target, x_hat)
        aux = self._auxk(target - x_hat, aux_indices, aux_values, len(dead_ids)) if len(dead_ids) else wide(mse.new_zeros(()))
        l0, fired = sparse_summary(indices, values, len(x), self.cfg.width)
        return TrainOutput(loss=mse + aux, mse=mse.detach(), aux_loss=aux.detach(),
                           sparsity_loss=mse.new_zeros(()), l0=l0, fired=fired, x_hat=x_hat.detach())

    def _workspace(self, x: Tensor) -> Tensor | None:
        """A pre-activation buffer kept across steps (allocating [N, width] afresh every step costs ~20 % on a CPU)."""
        if self.kernel == "dense":
            return None
        return reused(self._buffers, "pre", (x.shape[0], self.cfg.width), x.dtype, x.device)

    def _dead_ids(self, dead: Tensor | None, x: Tensor) -> Tensor:
        """The latents AuxK trains (none when it is off or nothing is dead)."""
        none = torch.zeros(0, dtype=torch.long, device=x.device)
        if dead is None or self.cfg.options.auxk_coefficient == 0 or x.shape[0] == 0:
            return none
        if dead.shape != (self.cfg.width,):
            raise ValueError(f"dead mask must have shape [width]=[{self.cfg.width}], got {list(dead.shape)}")
        return dead.to(device=x.device, dtype=torch.bool).nonzero().squeeze(1)

    def _auxk(self, residual: Tensor, aux_indices: Tensor, aux_values: Tensor, n_dead: int) -> Tensor:
        """AuxK (see base.auxk_loss): the dead latents' top-k_aux reconstruct the main residual."""
        e_hat = sparse_decode(aux_indices, aux_values, self.sae.W_dec, self.kernel)
        return auxk_ratio(e_hat, residual, n_dead, self.k_aux, self.cfg.options.auxk_coefficient, self.across_ranks)


TopKSAE.training_cls = TopKTraining
