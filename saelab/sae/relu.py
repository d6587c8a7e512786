"""ReLU SAE with an L1 penalty weighted by decoder row norms (Anthropic, April 2024 update).

Weighting |f_i| by ||W_dec[i]|| makes the penalty invariant to moving scale between encoder and decoder,
so the loss cannot be gamed by shrinking codes and growing decoder rows. The update's recipe picks the L1
coefficient by a sweep and warms it up linearly (5 % of training); saelab instead steers it to cfg.target_l0
(default 32 through SAESpec) and shifts all encoder biases towards that L0 each step (BIAS_SHIFT_RATE), so one run
lands at the sparsity asked for.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from saelab.kernels.csr import sparse_decode_csr
from saelab.options import NonNegativeFloat

from .base import SAE, SparsityCoefficient, SteeredOptions, Training, TrainOutput, mse_of, summarise, wide
from .registry import register
from .sparse_codes import ThresholdCodes, sparse_summary


BIAS_SHIFT_RATE = 0.5
"""With a target L0, every step also lowers all encoder biases by this times log(L0 / target) (at most
MAX_BIAS_SHIFT) typical active codes (their geometric mean): for exponentially distributed codes, a shift of s such
codes multiplies L0 by about exp(-s / 2). The coefficient alone cannot land ReLU: Adam moves every bias at its
learning rate whatever the coefficient, so L0 follows the coefficient late, the coefficient overshoots, and the L1
penalty switches latents off. A ReLU latent that never fires gets no gradient at all, so a lower coefficient does not
bring it back (the collapse it caused: docs/quality.md, "ReLU: the encoder biases follow the target too"). The
shift acts on L0 at once, and also on the latents no gradient reaches."""
MAX_BIAS_SHIFT = 0.5

COEFFICIENT_RATE = 0.2
"""ReLU steers its coefficient ten times as fast as base.ADAPT_RATE. The bias shift holds L0 near the target, so the
coefficient sees only a small error, yet it must still reach the value at which L1 and reconstruction balance
there: held up by the shift against too strong a penalty, the codes would shrink towards zero."""


@dataclass
class ReLUOptions(SteeredOptions):
    l1_coefficient: NonNegativeFloat = 0.1
    """ReLU: weight of sum_i |f_i| * ||W_dec[i]|| (the start when steered to target_l0; where steering takes it,
    and why the default start is low: docs/quality.md)."""


@register("relu", options=ReLUOptions)
class ReLUSAE(SAE):
    sparsity_coefficient = "l1_coefficient"
    saelens_name = "standard"

    def activation(self, pre: Tensor) -> Tensor:
        return pre.relu()


class ReLUTraining(ThresholdCodes, Training):
    """loss = mse + l1(step) * mean_tokens sum_i |f_i| * ||W_dec[i]||, l1 warming up linearly (or steered to
    target_l0, the encoder biases shifted towards it)."""

    def __init__(self, sae):
        super().__init__(sae)
        options = self.cfg.options
        self.coefficient = SparsityCoefficient(options.l1_coefficient, options.target_l0,
                                               options.sparsity_warmup_steps, rate=COEFFICIENT_RATE)
        self.code_scale = 0.0
        """The typical active code (training units) of the last step with any: the bias shift's unit."""

    @torch.no_grad()
    def start(self, x: Tensor) -> None:
        """With a target L0: the bias shift's unit from this batch's codes."""
        if self.cfg.options.target_l0 is not None:
            self._measure_code_scale(self.sae.encode(x))

    def loss(self, x: Tensor, step: int = 0, dead: Tensor | None = None, target: Tensor | None = None) -> TrainOutput:
        sae = self.sae
        x, target = self._flat_pair(x, target)
        norms = sae.penalty_norms()
        sparse = self._sparse_step()
        if sparse:  # codes as CSR: the positive pre-activations
            csr = self._above(x, 0.0)
            values = csr.values
            x_hat = sae.add_skip(sparse_decode_csr(csr, sae.W_dec, self.kernel, check_indices=False) + sae.b_dec, x)
            l1 = (wide(values) * norms[csr.indices]).sum() / max(1, len(x))
            l0, fired = sparse_summary(csr.indices, values, len(x), self.cfg.width)
        else:
            codes = sae.encode(x)
            x_hat = sae.add_skip(sae.decode(codes), x)
            l1 = (wide(codes).abs() * norms).sum(-1).mean()
            l0, fired = summarise(codes)
        mse = mse_of(target, x_hat)
        coefficient = self.coefficient.at(step)
        sparsity = coefficient * l1
        self._seen(l0)
        error = self.coefficient.observe(step, l0, mse.detach(), l1.detach(), self.across_ranks)
        if error is not None:
            self._shift_biases(error, values if sparse else codes)
        return TrainOutput(loss=mse + sparsity, mse=mse.detach(), aux_loss=mse.new_zeros(()),
                           sparsity_loss=sparsity.detach(), l0=l0, fired=fired, x_hat=x_hat.detach(),
                           extras={"l1": l1.detach(), "l1_coefficient": l1.new_tensor(coefficient),
                                   **self.coefficient.logged()})

    @torch.no_grad()
    def _shift_biases(self, error: float, codes: Tensor) -> None:
        """Lower every encoder bias by BIAS_SHIFT_RATE * log(L0 / target) typical active codes (raise it when L0 is
        below the target)."""
        self._measure_code_scale(codes)
        shift = max(-MAX_BIAS_SHIFT, min(MAX_BIAS_SHIFT, BIAS_SHIFT_RATE * error))
        self.sae.b_enc.sub_(shift * self.code_scale)

    def _measure_code_scale(self, codes: Tensor) -> None:
        """code_scale := the geometric mean of the batch's active codes (dense or CSR values; kept as it was if none
        fired). Unlike their mean, a massive-activation token's huge codes barely move it; unlike their median, it is a
        mean (of logs), so data-parallel ranks add up their shares to the whole batch's value."""
        codes = codes.detach()
        active = wide(codes[codes > 0])
        sums = torch.stack([active.log().sum(), active.new_tensor(active.numel())]).double()
        if self.across_ranks is not None:  # every rank shifts its biases by the whole batch's amount
            sums = self.across_ranks(sums)
        log_sum, count = sums.tolist()
        if count > 0:
            self.code_scale = math.exp(log_sum / count)

    def state_dict(self):
        state = self.coefficient.state_dict()
        return {**state, "code_scale": self.code_scale} if state else state

    def load_state_dict(self, state):
        self.coefficient.load_state_dict(state)
        self.code_scale = float(state.get("code_scale", self.code_scale))


ReLUSAE.training_cls = ReLUTraining
