"""ReLU SAE with an L1 penalty weighted by decoder row norms (Anthropic, April 2024 update).

Weighting |f_i| by ||W_dec[i]|| makes the penalty invariant to moving scale between encoder and decoder,
so the loss cannot be gamed by shrinking codes and growing decoder rows. The update's recipe picks the L1
coefficient by a sweep and warms it up linearly (5 % of training); saelab instead steers it to cfg.target_l0
(default 32 through SAESpec), so one run lands at the sparsity asked for.
"""
from __future__ import annotations

from torch import Tensor

from saelab.kernels.csr import sparse_decode_csr

from .base import SAE, SparsityCoefficient, Training, TrainOutput, mse_of, summarise, wide
from .registry import register
from .sparse_codes import ThresholdCodes, sparse_summary


@register("relu")
class ReLUSAE(SAE):
    options = ("l1_coefficient", "sparsity_warmup_steps", "target_l0")
    sparsity_coefficient = "l1_coefficient"

    def activation(self, pre: Tensor) -> Tensor:
        return pre.relu()


class ReLUTraining(ThresholdCodes, Training):
    """loss = mse + l1(step) * mean_tokens sum_i |f_i| * ||W_dec[i]||, l1 warming up linearly (or steered to
    cfg.target_l0)."""

    def __init__(self, sae):
        super().__init__(sae)
        self.coefficient = SparsityCoefficient(self.cfg.l1_coefficient, self.cfg.target_l0,
                                               self.cfg.sparsity_warmup_steps)

    def loss(self, x: Tensor, step: int = 0, dead: Tensor | None = None) -> TrainOutput:
        sae = self.sae
        x = self._flat(x)
        norms = wide(sae.W_dec).norm(dim=1)
        if self._sparse_step():  # codes as CSR: the positive pre-activations
            offsets, indices, values = self._above(x, 0.0)
            x_hat = sparse_decode_csr(offsets, indices, values, sae.W_dec, self.kernel, check_indices=False) + sae.b_dec
            l1 = (wide(values) * norms[indices]).sum() / max(1, len(x))
            l0, fired = sparse_summary(indices, values, len(x), self.cfg.width)
        else:
            codes = sae.encode(x)
            x_hat = sae.decode(codes)
            l1 = (wide(codes).abs() * norms).sum(-1).mean()
            l0, fired = summarise(codes)
        mse = mse_of(x, x_hat)
        coefficient = self.coefficient.at(step)
        sparsity = coefficient * l1
        self._seen(l0)
        self.coefficient.observe(step, l0, mse.detach(), l1.detach(), self.across_ranks)
        return TrainOutput(loss=mse + sparsity, mse=mse.detach(), aux_loss=mse.new_zeros(()),
                           sparsity_loss=sparsity.detach(), l0=l0, fired=fired, x_hat=x_hat.detach(),
                           extras={"l1": l1.detach(), "l1_coefficient": l1.new_tensor(coefficient),
                                   **self.coefficient.logged()})

    def state_dict(self):
        return self.coefficient.state_dict()

    def load_state_dict(self, state):
        self.coefficient.load_state_dict(state)


ReLUSAE.training_cls = ReLUTraining
