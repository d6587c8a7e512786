"""Why a training loss became non-finite, and what to do about it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from saelab.training.member import Member

MASSIVE = 100.0
"""A token whose activation norm is this many times its batch's median (a "massive activation") is named as the
likely cause of a non-finite loss."""


def why_not_finite(member: Member, x: torch.Tensor) -> str:
    """What made the loss of `member` on `x` (its input as the SAE saw it) non-finite, as far as the batch and the
    SAE show, and what to do about it: the learning rate is only the answer when nothing else explains it."""
    dtype = member.sae.W_enc.dtype
    largest, name = torch.finfo(dtype).max, str(dtype).removeprefix("torch.")
    lower_lr = (f"lower the learning rate (SAESpec.lr, --lr; now {member.spec.learning_rate:.3g}) or lengthen the "
                "warm-up (TrainConfig.lr_warmup_steps, --lr-warmup-steps)")
    use_float32 = (f"train in float32 (SAE option dtype, --dtype float32): {name} overflows above {largest:.3g}"
                   if dtype in (torch.float16, torch.bfloat16) else None)
    bad = ~torch.isfinite(x).all(dim=1)
    if bad.any():
        return (f"{int(bad.sum())} of the batch's {len(x)} tokens hold non-finite activations (token {int(bad.nonzero()[0])} "
                "first); find where they come from, or skip such batches with nan_policy='skip' (--nan-policy skip)")
    if not all(bool(torch.isfinite(p).all()) for p in member.sae.parameters()):
        return ("the SAE's weights were already non-finite: an earlier update diverged; "
                + (use_float32 + ", or " + lower_lr if use_float32 else lower_lr))
    norms = x.double().norm(dim=1)
    worst = int(norms.argmax())
    ratio = float(norms[worst] / norms.median().clamp_min(torch.finfo(torch.float64).tiny))
    overflows = float(norms[worst]) ** 2 > largest  # the squared error of that token cannot be held in the SAE's dtype
    if ratio >= MASSIVE or overflows:
        found = (f"token {worst} of the batch has activation norm {float(norms[worst]):.3g}, {ratio:.3g} times the "
                 f"batch's median (a massive activation)")
        leave_out = ("leave such tokens out of the activations (a saelab cache leaves out each context's BOS unless "
                     "asked to keep it), or check where they come from")
        if overflows and use_float32 and float(norms[worst]) ** 2 <= torch.finfo(torch.float32).max:
            return f"{found}; {use_float32}"
        if overflows:
            return f"{found}, whose squared error overflows {name}; {leave_out}"
        return f"{found}; {leave_out}, or {lower_lr}"
    if use_float32:
        return f"the SAE computes in {name}; {use_float32}"
    return lower_lr
