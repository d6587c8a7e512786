"""Training on CSR codes: step buffers kept across steps, and what a step reports about its codes.

Shared by the architectures whose codes are not k per row: BatchTopK/Matryoshka (the batch's k*N largest) and
ReLU/JumpReLU (everything above a threshold; see `ThresholdCodes`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from saelab.kernels.csr import CSRCodes, threshold_encode

SPARSE_MAX_DENSITY = 1 / 32
"""ReLU/JumpReLU decode sparsely while the last step fired at most this share of the latents; denser codes take
the dense step (its matmuls cost the same at any density). Below it the sparse step is the faster one (measured:
docs/benchmarks.md)."""


def reused(holder: dict, name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """holder[name], an uninitialised tensor of that shape, kept across steps (allocating [N, width] afresh every
    step costs ~20 % of a step on a CPU: the pages are faulted in on every call)."""
    held = holder.get(name)
    if held is None or tuple(held.shape) != tuple(shape) or held.dtype != dtype or held.device != device:
        holder[name] = held = torch.empty(shape, dtype=dtype, device=device)
    return held


def sparse_summary(indices: Tensor, values: Tensor, n_rows: int, width: int) -> tuple[Tensor, Tensor]:
    """(l0, fired) of sparse codes (TopK's [N, k] or CSR's [nnz] indices and values): mean active latents per row,
    and which latents fired at all."""
    active = values.detach() > 0
    fired = torch.zeros(width, dtype=torch.bool, device=values.device)
    fired[indices[active]] = True
    return active.sum().float() / max(1, n_rows), fired


class ThresholdCodes:
    """Mixin for a Training whose codes are the pre-activations above a threshold (ReLU: 0; JumpReLU: theta): once
    the codes are sparse it encodes them as CSR (saelab.kernels.threshold_encode, no [N, width] gradient) and
    decodes sparsely; while they are dense (early training, or a dense SAE), the plain dense step is faster."""

    _density = 1.0  # share of latents the last step fired: the first step is dense

    def _sparse_step(self) -> bool:
        return self.kernel != "dense" and self._density <= SPARSE_MAX_DENSITY

    def _seen(self, l0: Tensor) -> None:
        self._density = float(l0) / self.cfg.width

    def _above(self, x: Tensor, threshold: Tensor | float) -> CSRCodes:
        """CSR codes of the pre-activations of x above `threshold`."""
        sae, holder, shape = self.sae, self._buffers, (x.shape[0], self.cfg.width)
        return threshold_encode(x, sae.W_enc, sae.b_enc, threshold, self.kernel, center=sae.encoder_center,
                                workspace=reused(holder, "pre", shape, x.dtype, x.device),
                                mask_workspace=reused(holder, "mask", shape, torch.bool, x.device))
