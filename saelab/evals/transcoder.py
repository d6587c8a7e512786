"""Transcoders in the core evaluation: read the input hook and write the target hook within one forward.

    evaluate(transcoder, model=model, text=held_out)        # core's evaluate: target FVU, L0, CE / KL, as for an SAE

These are the pieces core's evaluation splices with; saelab.evals.replacement replaces several targets at once.

A transcoder reads cfg.hook_name (e.g. blocks.5.ln2.hook_normalized) and reconstructs cfg.target_hook
(blocks.5.hook_mlp_out). Splicing it in means replacing the target by the transcoder's output computed from the
input of the same forward, so the residual stream downstream gets the transcoder's output where the MLP's was. The
input hook fires earlier in the forward: one patch holds the input there (unchanged), a second writes tc(input) at
the target. Its reconstruction metrics are of the target (FVU, typical FVU with massive tokens judged by the target's
norm), and the ablations that CE loss recovered compares with are ablations of the target, not of the input.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import torch
from torch import Tensor

from saelab.activations.store import ActivationBatch
from saelab.errors import HookError
from saelab.interventions import Replace, _one_hook

if TYPE_CHECKING:
    from saelab.sae import SAE

Record = Callable[[Tensor, Tensor, Tensor, Tensor], None]
"""record(y, y_hat, codes, where): the target, the transcoder's output and codes at the replaced positions."""


def resolve_target(model, sae: SAE) -> str:
    """The one hook point the transcoder writes, checked against the model: it exists, has width d_out."""
    found = model.resolve_hooks(sae.cfg.target_hook)
    if len(found) != 1:
        raise HookError(f"target hook {sae.cfg.target_hook!r} matches {len(found)} hook points "
                        f"({', '.join(found[:5])}); name exactly one")
    if model.hook_dim(found[0]) != sae.cfg.output_dim:
        raise ValueError(f"the transcoder writes d_out={sae.cfg.output_dim} but hook {found[0]} has width "
                         f"{model.hook_dim(found[0])}")
    return found[0]


def splice_patches(raw: SAE, input_hook: str, target_hook: str, where: Tensor,
                   record: Record | None = None) -> list:
    """The two patches that splice a transcoder (on raw activations, input scale folded) into one forward: hold
    the input at `input_hook`, replace the target at `target_hook` by raw(input) at the positions `where` [b, L]."""
    held: list[Tensor] = []

    def write_target(y: Tensor) -> Tensor:
        if not held:
            raise HookError(f"the target hook {target_hook} runs before the input hook {input_hook} in the forward: "
                            "a transcoder must read a hook that comes earlier than the one it writes")
        x = held.pop()
        mask = where.to(y.device)
        rows = x[mask.to(x.device)].to(raw.device)
        codes = raw.encode(rows)
        y_hat = raw.add_skip(raw.decode(codes), rows)
        if record is not None:
            record(y[mask].to(raw.device), y_hat, codes, mask)
        new = y.clone()
        new[mask] = y_hat.to(y.device, y.dtype)
        return new

    return [_Hold(input_hook, held), Replace(target_hook, write_target, positions=where)]


class _Hold:
    """A patch that only holds the activation at `hook` (unchanged, the same tensor) for a later hook of the same
    forward: the model's own path stays untouched there, where a Replace by itself would reroute a norm's output."""

    def __init__(self, hook: str, held: list[Tensor]):
        self.hook, self.held = hook, held

    def _bind(self, model):
        def apply(x: Tensor, tokens) -> None:
            self.held.append(x)

        return _one_hook(model, self.hook), apply


def paired_tensors(activations: Iterable, input_hook: str, target_hook: str) -> Iterator[tuple[Tensor, Tensor]]:
    """(input [N, d_in], target [N, d_out]) per batch of ActivationBatches that hold both hooks."""
    for batch in activations:
        if not isinstance(batch, ActivationBatch) or any(h not in batch.acts for h in (input_hook, target_hook)):
            held = ", ".join(batch.acts) if isinstance(batch, ActivationBatch) else type(batch).__name__
            raise HookError(f"a transcoder's reconstruction needs activations of both {input_hook} and "
                            f"{target_hook} (ActivationBatches or a cache holding both); got {held}")
        x, y = batch.acts[input_hook], batch.acts[target_hook]
        yield x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])


__all__ = ["paired_tensors", "resolve_target", "splice_patches"]
