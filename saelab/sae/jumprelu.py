"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"; Gemma Scope).

f = z * H(z - theta) with z = relu(pre) and a learned per-latent threshold theta = exp(log_threshold).
The loss penalises L0 directly. H has zero gradient almost everywhere, so the threshold learns through
straight-through pseudo-derivatives with a rectangle kernel K of bandwidth eps:
    d/dtheta [z H(z - theta)] := -(theta / eps) K((z - theta) / eps)
    d/dtheta  H(z - theta)    := -(1 / eps)     K((z - theta) / eps)
and d/dz passes H(z - theta) (jumprelu) or 0 (step), as in the paper.

Recipe (Gemma Scope): unit-normalised activations, bandwidth 1e-3, the L0 coefficient warmed up linearly and
chosen by a sweep. With cfg.target_l0 (default 32 through SAESpec) saelab instead steers the coefficient to that
L0, shifts all thresholds towards it each step (THRESHOLD_SHIFT_RATE) and starts every threshold near the first
batch's cut for it (START_L0_FACTOR): thresholds learn through a
narrow kernel, so a run of a few thousand steps that started them at 1e-3 would still fire hundreds of latents
per token.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saelab.kernels.csr import sparse_decode_csr
from saelab.options import NonNegativeFloat, PositiveFloat

from .base import SAE, SAEConfig, SparsityCoefficient, SteeredOptions, Training, TrainOutput, mse_of, summarise, wide
from .registry import register
from .sparse_codes import ThresholdCodes, sparse_summary


START_L0_FACTOR = 3.0
"""Thresholds start where this multiple of target_l0 latents fire per token of the first batch: in the first hundred
steps reconstruction alone switches off random latents, and L0 falls to about a third of its start (the runs that
chose 3: docs/quality.md)."""


THRESHOLD_SHIFT_RATE = 0.1
"""With a target L0, every step also moves all log-thresholds by this times log(L0 / target) (at most
MAX_THRESHOLD_SHIFT). The threshold gradient only sees activations within bandwidth/2 of a threshold, so it
barely moves the thresholds in a short run, while reconstruction training shrinks the pre-activations and L0
with them. Steering the coefficient alone landed off the target by an amount that depended on where the run
stopped; shifting the thresholds acts on L0 at once (the runs: docs/quality.md, "JumpReLU: the thresholds follow
the target too"). The gradient
still places each threshold relative to the others."""
MAX_THRESHOLD_SHIFT = 0.05


def rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_z = grad * (z > theta).to(grad.dtype)
        grad_theta = -(theta / eps) * rectangle((z - theta) / eps) * grad
        return grad_z, grad_theta.reshape(-1, theta.shape[-1]).sum(0), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_theta = -(1.0 / eps) * rectangle((z - theta) / eps) * grad
        return torch.zeros_like(z), grad_theta.reshape(-1, theta.shape[-1]).sum(0), None


def jumprelu(z: Tensor, theta: Tensor, eps: float) -> Tensor:
    """z * H(z - theta) with the straight-through gradient wrt theta."""
    return _JumpReLU.apply(z, theta, eps)


def heaviside(z: Tensor, theta: Tensor, eps: float) -> Tensor:
    """H(z - theta) with the straight-through gradient wrt theta."""
    return _Step.apply(z, theta, eps)


@dataclass
class JumpReLUOptions(SteeredOptions):
    l0_coefficient: NonNegativeFloat = 1e-3
    """JumpReLU: weight of the L0 penalty."""
    jumprelu_bandwidth: PositiveFloat = 1e-3
    """JumpReLU: width of the rectangle kernel of the straight-through estimator."""
    jumprelu_init_threshold: PositiveFloat = 1e-3
    """JumpReLU: initial threshold of every latent."""


@register("jumprelu", options=JumpReLUOptions)
class JumpReLUSAE(SAE):
    sparsity_coefficient = "l0_coefficient"
    saelens_name = "jumprelu"

    def __init__(self, cfg: SAEConfig, device=None):
        super().__init__(cfg, device=device)
        init = math.log(cfg.options.jumprelu_init_threshold)
        self.log_threshold = nn.Parameter(torch.full((cfg.width,), init, device=device, dtype=cfg.torch_dtype))

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def activation(self, pre: Tensor) -> Tensor:
        z = pre.relu()
        return z * (z > self.threshold)

    def fold_input_scale(self) -> "JumpReLUSAE":
        folded = super().fold_input_scale()
        with torch.no_grad():
            folded.log_threshold.sub_(math.log(self.cfg.output_scale))  # thresholds are in the codes' units
        return folded


class JumpReLUTraining(ThresholdCodes, Training):
    """loss = mse + l0(step) * mean_tokens sum_i H(z_i - theta_i); the coefficient warms up linearly (or is steered
    to target_l0)."""

    def __init__(self, sae):
        super().__init__(sae)
        options = self.cfg.options
        self.coefficient = SparsityCoefficient(options.l0_coefficient, options.target_l0, options.sparsity_warmup_steps)

    @torch.no_grad()
    def start(self, x: Tensor) -> None:
        """With a target L0: every threshold at the value that keeps START_L0_FACTOR x target_l0 latents per token
        of this batch."""
        target = self.cfg.options.target_l0
        if target is None:
            return
        z = self.sae.pre_acts(x).relu().flatten()
        keep = min(z.numel() - 1, max(1, round(START_L0_FACTOR * target * len(x))))
        cut = z.topk(keep + 1, sorted=True).values[-2:].mean()  # between the last kept and the first left out
        if cut > 0:
            self.sae.log_threshold.fill_(float(cut.log()))

    def loss(self, x: Tensor, step: int = 0, dead: Tensor | None = None, target: Tensor | None = None) -> TrainOutput:
        sae, cfg = self.sae, self.cfg
        x, target = self._flat_pair(x, target)
        theta, eps = sae.threshold, cfg.options.jumprelu_bandwidth
        # Sparse: only entries with z > theta - eps/2 carry a value or a gradient (the rectangle kernel is zero
        # below); with a threshold under eps/2, every z = 0 would, so that step is dense.
        lower = theta.detach() - eps / 2
        sparse = self._sparse_step() and bool((lower > 0).all())
        if sparse:
            csr = self._above(x, lower)  # z above theta - eps/2
            z, theta = csr.values, theta[csr.indices]
            sparse = csr.nnz > 0
        if sparse:
            codes = jumprelu(z, theta, eps)
            x_hat = sparse_decode_csr(dataclasses.replace(csr, values=codes), sae.W_dec, self.kernel,
                                      check_indices=False) + sae.b_dec
            x_hat = sae.add_skip(x_hat, x)
            l0_smooth = wide(heaviside(z, theta, eps)).sum() / len(x)
            l0, fired = sparse_summary(csr.indices, codes, len(x), cfg.width)
        else:
            z = sae.pre_acts(x).relu()
            codes = jumprelu(z, sae.threshold, eps)
            x_hat = sae.add_skip(sae.decode(codes), x)
            l0_smooth = wide(heaviside(z, sae.threshold, eps)).sum(-1).mean()
            l0, fired = summarise(codes)
        mse = mse_of(target, x_hat)
        coefficient = self.coefficient.at(step)
        sparsity = coefficient * l0_smooth
        self._seen(l0)
        error = self.coefficient.observe(step, l0, mse.detach(), l0_smooth.detach(), self.across_ranks)
        if error is not None:
            with torch.no_grad():  # see THRESHOLD_SHIFT_RATE
                shift = THRESHOLD_SHIFT_RATE * error
                sae.log_threshold.add_(max(-MAX_THRESHOLD_SHIFT, min(MAX_THRESHOLD_SHIFT, shift)))
        return TrainOutput(loss=mse + sparsity, mse=mse.detach(), aux_loss=mse.new_zeros(()),
                           sparsity_loss=sparsity.detach(), l0=l0, fired=fired, x_hat=x_hat.detach(),
                           extras={"l0_coefficient": l0_smooth.new_tensor(coefficient),
                                   "threshold": sae.threshold.detach().mean(),  # what the steering moves
                                   **self.coefficient.logged()})

    def state_dict(self):
        return self.coefficient.state_dict()

    def load_state_dict(self, state):
        self.coefficient.load_state_dict(state)


JumpReLUSAE.training_cls = JumpReLUTraining
