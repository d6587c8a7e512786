"""BatchTopK SAE (Bussmann et al. 2024): keep the k*N largest activations of the whole batch of N tokens.

Tokens get as many latents as they need, k on average. Selection depends on the batch, so for inference
the training keeps a running threshold (EMA of the smallest activation kept) and `export()` returns a
JumpReLU SAE with that threshold: per-token, batch-independent, and identical whenever the batch selection
is exactly "activation > threshold".
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .base import SAE, SAEConfig, Training, TrainOutput, auxk_loss, mse_of, summarise, wide
from .jumprelu import JumpReLUSAE
from .registry import register


def batch_topk(pre: Tensor, k: int) -> Tensor:
    """Dense codes [N, width]: relu(pre) with all but the k*N largest entries of the batch zeroed."""
    acts = pre.relu()
    flat = acts.flatten()
    values, indices = flat.topk(min(k * acts.shape[0], flat.numel()), sorted=False)
    return torch.zeros_like(flat).scatter_(0, indices, values).view_as(acts)


@register("batchtopk")
class BatchTopKSAE(SAE):
    """Encodes with batch-top-k over all tokens of the input (leading dims flattened); for training and
    analysis. Use `training.export()` to get the per-token JumpReLU SAE for inference."""

    takes_k = True
    options = ("auxk_coefficient", "k_aux", "threshold_decay")
    per_token = False

    def __init__(self, cfg: SAEConfig, device=None):
        if cfg.k is None:
            raise ValueError(f"SAEConfig.k is required for arch {cfg.arch!r}")
        super().__init__(cfg, device=device)

    def activation(self, pre: Tensor) -> Tensor:
        return batch_topk(pre.reshape(-1, self.cfg.width), self.cfg.k).view_as(pre)


class BatchTopKTraining(Training):
    """loss = mse + AuxK(dead). Each loss() call under grad mode also updates the running threshold
    theta <- decay * theta + (1 - decay) * min(kept activations) (the first call sets it); calls under
    torch.no_grad() (evaluation) leave it alone."""

    def __init__(self, sae: BatchTopKSAE):
        super().__init__(sae)
        self.threshold = wide(torch.zeros((), dtype=sae.dtype, device=sae.device))
        self.threshold_updates = 0

    def reconstruction(self, x: Tensor, codes: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(loss term, x_hat, per-prefix mse or None); Matryoshka overrides this."""
        x_hat = self.sae.decode(codes)
        mse = mse_of(x, x_hat)
        return mse, x_hat, None

    def loss(self, x: Tensor, step: int = 0, dead: Tensor | None = None) -> TrainOutput:
        sae = self.sae
        x = self._flat(x)
        pre = sae.pre_acts(x)
        codes = batch_topk(pre, self.cfg.k)
        recon, x_hat, prefix_mse = self.reconstruction(x, codes)
        aux = auxk_loss(sae.W_dec, pre, x - x_hat, dead, self.k_aux, self.cfg.auxk_coefficient)
        if torch.is_grad_enabled():
            self._update_threshold(codes)
        l0, fired = summarise(codes)
        return TrainOutput(loss=recon + aux, mse=mse_of(x, x_hat).detach(), aux_loss=aux.detach(),
                           sparsity_loss=recon.new_zeros(()), l0=l0, fired=fired, x_hat=x_hat.detach(),
                           prefix_mse=prefix_mse, extras={"threshold": self.threshold.clone()})

    @torch.no_grad()
    def _update_threshold(self, codes: Tensor):
        kept = codes[codes > 0]
        if kept.numel() == 0:
            return
        smallest = wide(kept.min())
        if self.threshold_updates == 0:
            self.threshold = smallest.clone()
        else:
            d = self.cfg.threshold_decay
            self.threshold = d * self.threshold + (1 - d) * smallest
        self.threshold_updates += 1

    def export(self) -> JumpReLUSAE:
        """The inference SAE: same weights, JumpReLU with the running threshold on every latent."""
        if self.threshold_updates == 0:
            raise RuntimeError("BatchTopK threshold not estimated yet: run at least one training loss() first")
        cfg = dataclasses.replace(self.cfg, arch="jumprelu", k=None, group_sizes=None)
        out = JumpReLUSAE(cfg, device=self.sae.device)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(out, name).copy_(getattr(self.sae, name))
            out.log_threshold.fill_(float(self.threshold.log()))
        return out

    def state_dict(self) -> dict:
        return {"threshold": float(self.threshold), "threshold_updates": self.threshold_updates}

    def load_state_dict(self, state: dict):
        self.threshold = torch.tensor(float(state["threshold"]), dtype=self.threshold.dtype, device=self.sae.device)
        self.threshold_updates = int(state["threshold_updates"])


BatchTopKSAE.training_cls = BatchTopKTraining
