"""BatchTopK SAE (Bussmann et al. 2024): keep the k*N largest activations of the whole batch of N tokens.

Tokens get as many latents as they need, k on average. Selection depends on the batch, so for inference the
training keeps a running threshold (a recency-weighted mean of the smallest activation each batch keeps) and
`export()` returns a JumpReLU SAE with that threshold: per-token, batch-independent, and identical to the batch
selection on a batch whose cut equals the threshold.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from saelab.kernels.csr import CSRCodes, batch_topk_encode, sparse_decode_csr
from saelab.options import Decay

from .base import SAE, AuxKOptions, SAEConfig, TrainOutput, mse_of, wide
from .jumprelu import JumpReLUSAE
from .registry import register
from .sparse_codes import sparse_summary, reused
from .topk import TopKTraining


def batch_topk(pre: Tensor, k: int) -> Tensor:
    """Dense codes [N, width]: relu(pre) with all but the k*N largest entries of the batch zeroed (the reference)."""
    acts = pre.relu()
    flat = acts.flatten()
    values, indices = flat.topk(min(k * acts.shape[0], flat.numel()), sorted=False)
    return torch.zeros_like(flat).scatter_(0, indices, values).view_as(acts)


@dataclass
class Selection:
    """A batch selection: its CSR codes, the cut (as in saelab.kernels.csr.keep_batch_top), and AuxK's [N, k_aux]
    pick among the dead latents when any are dead."""

    codes: CSRCodes
    cut: Tensor
    aux_indices: Tensor | None = None
    aux_values: Tensor | None = None

    def smallest(self) -> Tensor | None:
        values = self.codes.values.detach()
        kept = values[values > 0]
        return kept.min() if kept.numel() else None


@dataclass
class BatchTopKOptions(AuxKOptions):
    threshold_decay: Decay = 0.999
    """BatchTopK/Matryoshka: EMA decay of the running threshold exported for inference."""


@register("batchtopk", options=BatchTopKOptions)
class BatchTopKSAE(SAE):
    """Encodes with batch-top-k over all tokens of the input (leading dims flattened); for training and
    analysis. Use `training.export()` to get the per-token JumpReLU SAE for inference."""

    takes_k = True
    per_token = False
    saelens_name = "batchtopk"  # SAELens's training name: it has no batch-dependent inference class

    def __init__(self, cfg: SAEConfig, device=None):
        if cfg.k is None:
            raise ValueError(f"SAEConfig.k is required for arch {cfg.arch!r}")
        super().__init__(cfg, device=device)

    def activation(self, pre: Tensor) -> Tensor:
        return batch_topk(pre.reshape(-1, self.cfg.width), self.cfg.k).view_as(pre)


class BatchTopKTraining(TopKTraining):
    """loss = mse + AuxK(dead), on the sparse kernels like TopK: no [N, width] code matrix is formed.

    The batch selection is exact and gives each token as many latents as it takes (CSR codes, see
    saelab.kernels.csr): a threshold from a sample of rows, then a top-k among the entries above it. Each loss()
    under grad mode also updates the running threshold (torch.no_grad() calls do not).
    """

    def __init__(self, sae: BatchTopKSAE):
        super().__init__(sae)
        self.threshold = wide(torch.zeros((), dtype=sae.dtype, device=sae.device))
        self.threshold_updates = 0

    def select(self, x: Tensor, dead_ids: Tensor) -> Selection:
        sae, workspace = self.sae, self._workspace(x)
        mask = None if workspace is None else reused(self._buffers, "mask", workspace.shape, torch.bool, x.device)
        aux = dict(aux_columns=dead_ids, k_aux=min(self.k_aux, len(dead_ids))) if len(dead_ids) else {}
        return Selection(*batch_topk_encode(x, sae.W_enc, sae.b_enc, self.cfg.k, self.kernel, center=sae.encoder_center,
                                            workspace=workspace, mask_workspace=mask, **aux))

    def decode(self, selection: Selection) -> Tensor:
        """What the selected latents add to x_hat (no b_dec)."""
        return sparse_decode_csr(selection.codes, self.sae.W_dec, self.kernel, check_indices=False)

    def reconstruction(self, x: Tensor, target: Tensor, selection: Selection) -> tuple[Tensor, Tensor, Tensor | None]:
        """(loss term, reconstruction of the target, per-prefix mse or None); Matryoshka overrides this."""
        x_hat = self.sae.add_skip(self.decode(selection) + self.sae.b_dec, x)
        return mse_of(target, x_hat), x_hat, None

    def loss(self, x: Tensor, step: int = 0, dead: Tensor | None = None, target: Tensor | None = None) -> TrainOutput:
        x, target = self._flat_pair(x, target)
        dead_ids = self._dead_ids(dead, x)
        selection = self.select(x, dead_ids)
        recon, x_hat, prefix_mse = self.reconstruction(x, target, selection)
        aux = (self._auxk(target - x_hat, selection.aux_indices, selection.aux_values, len(dead_ids)) if len(dead_ids)
               else wide(recon.new_zeros(())))
        if torch.is_grad_enabled():
            self._update_threshold(selection)
        l0, fired = sparse_summary(selection.codes.indices, selection.codes.values, len(x), self.cfg.width)
        mse = recon.detach() if prefix_mse is None else prefix_mse[-1]  # the full reconstruction's, not recomputed
        return TrainOutput(loss=recon + aux, mse=mse, aux_loss=aux.detach(),
                           sparsity_loss=recon.new_zeros(()), l0=l0, fired=fired,
                           x_hat=x_hat.detach(), prefix_mse=prefix_mse,
                           extras={"threshold": self.threshold.clone(), "batch_cut": wide(selection.cut.detach())})

    @torch.no_grad()
    def _update_threshold(self, selection: Selection):
        """threshold <- d * threshold + (1 - d) * this batch's cut (see kernels.csr.keep_batch_top), in the units the trained SAE
        sees (export and fold_input_scale carry it to raw units). d = min(threshold_decay, 1 - 1 / (1 + n / 10))
        after n updates: the mean covers about the last tenth of the run so far, so a short run's threshold follows
        the final weights rather than the first batches (the cut drifts by half while an SAE trains)."""
        cut = selection.cut
        if cut <= 0:  # no more positive activations than k*N: all are kept, and any threshold below them agrees
            smallest = selection.smallest()
            if smallest is None:
                return
            cut = smallest / 2
        d = min(self.cfg.options.threshold_decay, 1 - 1 / (1 + self.threshold_updates / 10))
        self.threshold = d * self.threshold + (1 - d) * wide(cut)
        self.threshold_updates += 1

    def export(self) -> JumpReLUSAE:
        """The inference SAE: same weights, JumpReLU with the running threshold on every latent."""
        if self.threshold_updates == 0:
            raise RuntimeError("BatchTopK threshold not estimated yet: run at least one training loss() first")
        cfg = dataclasses.replace(self.cfg, arch="jumprelu", k=None, options={})
        out = JumpReLUSAE(cfg, device=self.sae.device)
        with torch.no_grad():
            for name, param in self.sae.named_parameters():  # W_enc, b_enc, W_dec, b_dec (+ a transcoder's W_skip)
                getattr(out, name).copy_(param)
            out.log_threshold.fill_(float(self.threshold.log()))
        return out

    def state_dict(self) -> dict:
        return {"threshold": float(self.threshold), "threshold_updates": self.threshold_updates}

    def load_state_dict(self, state: dict):
        self.threshold = torch.tensor(float(state["threshold"]), dtype=self.threshold.dtype, device=self.sae.device)
        self.threshold_updates = int(state["threshold_updates"])


BatchTopKSAE.training_cls = BatchTopKTraining
