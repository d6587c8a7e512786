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

from saelab.kernels import sparse_decode, topk_encode, topk_encode_with_aux

from .base import SAE, SAEConfig, TrainOutput, mse_of, wide
from .jumprelu import JumpReLUSAE
from .registry import register
from .topk import TopKTraining


def batch_topk(pre: Tensor, k: int) -> Tensor:
    """Dense codes [N, width]: relu(pre) with all but the k*N largest entries of the batch zeroed (the reference)."""
    acts = pre.relu()
    flat = acts.flatten()
    values, indices = flat.topk(min(k * acts.shape[0], flat.numel()), sorted=False)
    return torch.zeros_like(flat).scatter_(0, indices, values).view_as(acts)


def keep_batch_top(values: Tensor, budget: int) -> tuple[Tensor, Tensor]:
    """(mask, cut) of the `budget` largest entries of the flat `values` (all of them if fewer). cut lies halfway
    between the smallest kept value and the largest one left out, so a JumpReLU with that threshold makes the same
    choice on this batch (0 when there are no more values than the budget)."""
    if budget >= values.numel():
        return torch.ones_like(values, dtype=torch.bool), values.new_zeros(())
    top = values.topk(budget + 1, sorted=False)
    last = top.values.argmin()  # the largest value left out
    keep = torch.zeros_like(values, dtype=torch.bool)
    keep[top.indices] = True
    keep[top.indices[last]] = False
    smallest_kept = top.values.masked_fill(torch.arange(budget + 1, device=values.device) == last, float("inf")).min()
    return keep, (smallest_kept + top.values[last]) / 2


@dataclass
class Selection:
    """A batch selection in two parts: each row's top candidates as (indices, values) [N, c] with the values left
    out zeroed, and the full code rows [len(rows), width] of the few `rows` that needed more than c latents."""

    indices: Tensor
    values: Tensor
    rows: Tensor
    dense: Tensor
    cut: Tensor
    aux_indices: Tensor | None = None
    aux_values: Tensor | None = None

    def fired(self, width: int) -> Tensor:
        fired = torch.zeros(width, dtype=torch.bool, device=self.values.device)
        fired[self.indices[self.values.detach() > 0]] = True
        return fired | (self.dense.detach() > 0).any(0)

    def l0(self) -> Tensor:
        return ((self.values.detach() > 0).sum() + (self.dense.detach() > 0).sum()).float() / max(1, len(self.values))

    def smallest(self) -> Tensor | None:
        kept = torch.cat([self.values.detach()[self.values.detach() > 0], self.dense.detach()[self.dense.detach() > 0]])
        return kept.min() if kept.numel() else None


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


class BatchTopKTraining(TopKTraining):
    """loss = mse + AuxK(dead), on the sparse kernels like TopK: no [N, width] code matrix is formed.

    The batch selection is exact and made in one pass. The encoder's top-k kernel gives each row its `candidates`
    largest latents and the k*N largest of all candidates are picked. A row whose candidates were all picked might
    have more above the cut (real activations have rare tokens that take thousands of latents), so those few rows
    are encoded in full and the pick is made again over the union. `candidates` doubles while more than 1 row in 64
    needs that. Each loss() under grad mode also updates the running threshold (torch.no_grad() calls do not).
    """

    def __init__(self, sae: BatchTopKSAE):
        super().__init__(sae)
        self.threshold = wide(torch.zeros((), dtype=sae.dtype, device=sae.device))
        self.threshold_updates = 0
        self.candidates = min(sae.cfg.width, 4 * sae.cfg.k)

    def select(self, x: Tensor, dead_ids: Tensor) -> Selection:
        sae, width, c = self.sae, self.cfg.width, self.candidates
        options = dict(sorted=False, center=sae.b_dec, workspace=self._workspace(x))
        aux_indices = aux_values = None
        if len(dead_ids):
            indices, values, aux_indices, aux_values = topk_encode_with_aux(
                x, sae.W_enc, sae.b_enc, c, dead_ids, min(self.k_aux, len(dead_ids)), self.kernel, **options)
        else:
            indices, values = topk_encode(x, sae.W_enc, sae.b_enc, c, self.kernel, **options)
        budget = self.cfg.k * len(x)
        keep, cut = keep_batch_top(values.detach().flatten(), budget)
        keep = keep.view_as(values)
        # the cut among candidates is at most the true one, so a row with a candidate below it is complete
        saturated = keep.all(1) & (values.detach().amin(1) > 0) if c < width else keep.new_zeros(len(x))
        rows = saturated.nonzero().squeeze(1)
        dense = values.new_zeros(0, width)
        if len(rows):
            dense = sae.pre_acts(x[rows]).relu()
            pool = torch.cat([values.detach().masked_fill(saturated[:, None], float("-inf")).flatten(),
                              dense.detach().flatten()])
            keep_all, cut = keep_batch_top(pool, budget)
            keep = keep_all[: values.numel()].view_as(values)
            dense = dense * keep_all[values.numel():].view_as(dense)
            if len(rows) * 64 > len(x):
                self.candidates = min(width, 2 * c)
        # keep only as many columns as the busiest row needs: decode and its backward then cost what was picked
        used = int(keep.sum(1).max()) if len(x) else 0
        if used < c:
            columns = keep.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :max(1, used)]
            indices, values, keep = indices.gather(1, columns), values.gather(1, columns), keep.gather(1, columns)
        return Selection(indices, values * keep, rows, dense, cut, aux_indices, aux_values)

    def decode(self, selection: Selection, start: int = 0, end: int | None = None) -> Tensor:
        """What the selected latents in [start, end) add to x_hat (no b_dec): sparse rows plus the full ones."""
        W_dec, end = self.sae.W_dec, self.cfg.width if end is None else end
        values = selection.values
        if (start, end) != (0, self.cfg.width):
            values = values * ((selection.indices >= start) & (selection.indices < end))
        out = sparse_decode(selection.indices, values, W_dec, self.kernel)
        if len(selection.rows):
            out = out.index_add(0, selection.rows, selection.dense[:, start:end] @ W_dec[start:end])
        return out

    def reconstruction(self, x: Tensor, selection: Selection) -> tuple[Tensor, Tensor, Tensor | None]:
        """(loss term, x_hat, per-prefix mse or None); Matryoshka overrides this."""
        x_hat = self.decode(selection) + self.sae.b_dec
        return mse_of(x, x_hat), x_hat, None

    def loss(self, x: Tensor, step: int = 0, dead: Tensor | None = None) -> TrainOutput:
        x = self._flat(x)
        dead_ids = self._dead_ids(dead, x)
        selection = self.select(x, dead_ids)
        recon, x_hat, prefix_mse = self.reconstruction(x, selection)
        aux = (self._auxk(x - x_hat, selection.aux_indices, selection.aux_values, len(dead_ids)) if len(dead_ids)
               else wide(recon.new_zeros(())))
        if torch.is_grad_enabled():
            self._update_threshold(selection)
        return TrainOutput(loss=recon + aux, mse=mse_of(x, x_hat).detach(), aux_loss=aux.detach(),
                           sparsity_loss=recon.new_zeros(()), l0=selection.l0(), fired=selection.fired(self.cfg.width),
                           x_hat=x_hat.detach(), prefix_mse=prefix_mse,
                           extras={"threshold": self.threshold.clone(), "batch_cut": wide(selection.cut.detach()),
                                   "full_rows": torch.tensor(float(len(selection.rows)))})

    @torch.no_grad()
    def _update_threshold(self, selection: Selection):
        """threshold <- d * threshold + (1 - d) * this batch's cut (see keep_batch_top), in the units the trained SAE
        sees (export and fold_input_scale carry it to raw units). d = min(threshold_decay, 1 - 1 / (1 + n / 10))
        after n updates: the mean covers about the last tenth of the run so far, so a short run's threshold follows
        the final weights rather than the first batches (the cut drifts by half while an SAE trains)."""
        cut = selection.cut
        if cut <= 0:  # no more positive activations than k*N: all are kept, and any threshold below them agrees
            smallest = selection.smallest()
            if smallest is None:
                return
            cut = smallest / 2
        d = min(self.cfg.threshold_decay, 1 - 1 / (1 + self.threshold_updates / 10))
        self.threshold = d * self.threshold + (1 - d) * wide(cut)
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
