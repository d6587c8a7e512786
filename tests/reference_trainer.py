"""An independent reference for saelab's SAE trainer: one plain-PyTorch loop that imports nothing from saelab.

It is written from the method as documented (README "The trainer", docs/methods.md "SAE training", the docstrings
of TrainConfig.lr_factor and saelab.sae.base.auxk_loss), with dense autograd where saelab uses sparse kernels and
the stock unfused torch.optim.Adam where saelab uses the fused one. Tests start it from the same initial weights as
saelab's SAE and require saelab's trainer to follow it step by step.

Per step, on x scaled to unit mean squared norm (the scale and b_dec come from the first batch):
    pre   = (x - b_dec) @ W_enc + b_enc
    topk:  codes = relu of each token's k largest pre;  loss = mse + AuxK
    relu:  codes = relu(pre);  loss = mse + l1 * mean_tokens sum_i |codes_i| ||W_dec[i]||, l1 warming up from 0
    x_hat = codes @ W_dec + b_dec,  mse = sum ||x - x_hat||^2 / tokens
    AuxK  = coef * min(1, n_dead / k_aux) * ||e - e_hat||^2 / ||e - mean(e)||^2, e = (x - x_hat) detached,
            e_hat = the relu'd top-k_aux pre-activations among dead latents decoded without b_dec;
            dead = not fired for dead_window tokens (counted before this step)
    then: remove from W_dec's gradient its component along each row, Adam step (lr * warm-up * decay),
    renormalise W_dec rows to unit norm.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch


def geometric_median(points: torch.Tensor, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm from the mean."""
    median = points.mean(0)
    for _ in range(iters):
        weights = 1 / (points - median).norm(dim=1).clamp_min(1e-8)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        converged = (new - median).norm() <= tol * median.norm().clamp_min(1e-8)
        median = new
        if converged:
            break
    return median


def lr_factor(step: int, steps: int, warmup_steps: int, decay_fraction: float) -> float:
    """Linear warm-up over the first warmup_steps steps (step s trains at (s + 1) / warmup_steps), then flat, then a
    linear decay to 0 over the last decay_fraction of the steps."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    decay_steps = int(steps * decay_fraction)
    decay = min(1.0, (steps - step) / decay_steps) if decay_steps else 1.0
    return warm * decay


def train(arch: str, init: dict[str, torch.Tensor], batches: list[torch.Tensor], *, steps: int, lr: float,
          warmup_steps: int, decay_fraction: float = 0.2, betas=(0.9, 0.999), k: int | None = None,
          dead_window: int = 10_000_000, k_aux: int | None = None, auxk_coefficient: float = 1 / 32,
          l1_coefficient: float = 1.0, sparsity_warmup_steps: int = 0,
          b_dec_init: str = "geometric_median", dtype=torch.float32) -> Iterator[tuple[dict, dict]]:
    """Yield, after each step, ({"loss", "mse", "aux", "sparsity"} as floats, {W_enc, b_enc, W_dec, b_dec} as
    tensors, plus "input_scale"). `init` holds the SAE's initial weights (W_enc as [d_in, width]); the activations
    are scaled in float32 (as they are stored), the SAE trains in `dtype`."""
    W_enc, b_enc, W_dec, b_dec = (init[n].detach().to(dtype).contiguous().clone().requires_grad_()
                                  for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    width, d_in = W_dec.shape
    k_aux = k_aux or d_in // 2
    with torch.no_grad():
        first = batches[0].float()
        scale = first.square().sum(1).mean().rsqrt().item()  # in float32, as the activations are stored
        sample = (first * scale).to(dtype)
        b_dec.copy_(geometric_median(sample) if b_dec_init == "geometric_median" else sample.mean(0))
    adam = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=lr, betas=betas, foreach=False)
    since_fired = torch.zeros(width, dtype=torch.long)
    zero = torch.zeros((), dtype=dtype)
    for step, x in enumerate(batches[:steps]):
        x = (x.float() * scale).to(dtype)
        n = len(x)
        for group in adam.param_groups:
            group["lr"] = lr * lr_factor(step, steps, warmup_steps, decay_fraction)
        pre = (x - b_dec) @ W_enc + b_enc
        aux = sparsity = zero
        if arch == "topk":
            values, indices = pre.topk(k, dim=1)
            codes = torch.zeros_like(pre).scatter(1, indices, values.relu())
            x_hat = codes @ W_dec + b_dec
            dead = since_fired >= dead_window
            n_dead = int(dead.sum())
            if n_dead and auxk_coefficient:
                e = (x - x_hat).detach()
                aux_values, aux_indices = pre.masked_fill(~dead, -math.inf).topk(min(k_aux, n_dead), dim=1)
                e_hat = torch.zeros_like(pre).scatter(1, aux_indices, aux_values.relu()) @ W_dec
                aux = (auxk_coefficient * min(1.0, n_dead / k_aux) * (e_hat - e).square().sum()
                       / (e - e.mean(0)).square().sum())
        elif arch == "relu":
            codes = pre.relu()
            x_hat = codes @ W_dec + b_dec
            coefficient = l1_coefficient * min(1.0, step / sparsity_warmup_steps) if sparsity_warmup_steps else l1_coefficient
            sparsity = coefficient * (codes.abs() * W_dec.norm(dim=1)).sum(1).mean()
        else:
            raise ValueError(f"the reference trains topk and relu, not {arch}")
        mse = (x - x_hat).square().sum() / n
        loss = mse + aux + sparsity
        adam.zero_grad()
        loss.backward()
        with torch.no_grad():
            g, w = W_dec.grad, W_dec
            g -= (g * w).sum(1, keepdim=True) / w.square().sum(1, keepdim=True) * w
            adam.step()
            W_dec /= W_dec.norm(dim=1, keepdim=True)
        since_fired += n
        since_fired[(codes > 0).any(0)] = 0
        losses = {"loss": loss.detach().item(), "mse": mse.detach().item(), "aux": float(aux.detach()), "sparsity": float(sparsity.detach())}
        yield losses, {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "input_scale": scale}
