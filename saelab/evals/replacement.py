"""The replacement model: every transcoder's target replaced by its output in one forward.

    replacement_metrics([tc_layer3, tc_layer5, tc_layer7], model, held_out)   # SplicedMetrics, as core's

A later layer's transcoder reads an input already computed from the earlier transcoders' outputs, as in circuit
tracing's replacement model; the ablation it is compared with zeroes every target at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch

from saelab.errors import DataError
from saelab.evals.core import (SplicedMetrics, _BatchView, _context_batches, _Loss, _progress, _raw_sae, _resolve_hook,
                               _spliced_result)
from saelab.evals.transcoder import resolve_target, splice_patches
from saelab.interventions import Replace

if TYPE_CHECKING:
    from saelab.models import LanguageModel
    from saelab.sae import SAE


@torch.no_grad()
def replacement_metrics(transcoders: Sequence[SAE], model: LanguageModel, text, *, tokens: int | None = 20_000,
                        batch_size: int = 8, splice_bos: bool = False, progress: bool = True) -> SplicedMetrics:
    """CE / KL of the replacement model: every transcoder's target replaced by its output in one forward, against
    the clean model and the model with all those targets zero-ablated (ce_zero, kl_zero). Arguments as core's
    spliced_metrics; the transcoders must write distinct hooks."""
    if not transcoders:
        raise ValueError("replacement_metrics needs at least one transcoder")
    hooks = []
    for sae in transcoders:
        if not sae.cfg.is_transcoder or sae.cfg.target_hook is None:
            raise ValueError(f"replacement_metrics takes transcoders (a target hook); {sae.cfg.arch}-{sae.cfg.width} "
                             f"at {sae.cfg.hook_name or '?'} has none")
        hooks.append((_resolve_hook(model, sae, None), resolve_target(model, sae)))
    targets = [target for _, target in hooks]
    if len(set(targets)) != len(targets):
        raise ValueError(f"two transcoders write the same hook ({', '.join(targets)}): each target is replaced once")
    raws = [_raw_sae(sae) for sae in transcoders]
    return replaced_losses(model, text, targets, lambda where: [p for raw, (i, t) in zip(raws, hooks)
                                                                for p in splice_patches(raw, i, t, where)],
                           tokens=tokens, batch_size=batch_size, splice_bos=splice_bos, progress=progress,
                           desc=f"replacement model ({len(transcoders)} transcoders)")


@torch.no_grad()
def replaced_losses(model: LanguageModel, text, targets: Sequence[str], patches: Callable[[torch.Tensor], list], *,
                    tokens: int | None, batch_size: int, splice_bos: bool, progress: bool, desc: str) -> SplicedMetrics:
    """CE / KL of one forward with patches(where) applied (where: [b, L] the replaced positions), against the clean
    model and the model with every hook of `targets` zero-ablated at those positions."""
    batches = _context_batches(model, text, tokens, batch_size)
    clean, replaced, zero = _Loss(), _Loss(), _Loss()
    n_predictions = n_contexts = 0
    for ids, mask in _progress(progress, batches, desc):
        view = _BatchView(model, ids, mask, splice_bos)
        clean_logp = view.logp()
        clean.add(clean_logp, clean_logp, view.targets, view.valid)
        replaced.add(view.logp(*patches(view.where)), clean_logp, view.targets, view.valid)
        ablations = [Replace(t, torch.zeros_like, positions=view.where) for t in targets]
        zero.add(view.logp(*ablations), clean_logp, view.targets, view.valid)
        n_predictions += int(view.valid.sum())
        n_contexts += len(ids)
    if n_predictions == 0:
        raise DataError("no next-token predictions to evaluate: every context is shorter than 2 tokens")
    return _spliced_result(clean, replaced, zero, None, n_contexts, n_predictions, splice_bos)


__all__ = ["replaced_losses", "replacement_metrics"]
