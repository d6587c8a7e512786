"""Cross-layer transcoders (SAEConfig.cross_layer) evaluated: each layer's target FVU, and the replacement model.

    clt_fvu(clt, batches)                            # {target hook: FVU} on held-out activations, every input clean
    clt_replacement_metrics(clt, model, held_out)    # SplicedMetrics, as replacement_metrics's

The replacement model is one forward: at each trained layer L the MLP input is held, group L's codes are computed
from it, and the MLP output at L is replaced by what every group g <= L writes to it (plus b_dec's part L), so a
later layer's codes read an input already computed from the earlier layers' replacements. That needs each group's
codes to depend on its own layer's input alone: an activation applied latent by latent (ReLU, JumpReLU, and so a
trained BatchTopK, exported as JumpReLU). A TopK CLT picks its k latents among every layer's groups at once, so its
codes at layer L depend on later layers' inputs and no forward computes them layer by layer: it is refused here
(its clt_fvu, with every input clean, is well defined).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch
from torch import Tensor

from saelab.activations.store import ActivationBatch
from saelab.errors import HookError
from saelab.evals.core import SplicedMetrics
from saelab.evals.replacement import replaced_losses
from saelab.evals.transcoder import _Hold
from saelab.interventions import Replace

if TYPE_CHECKING:
    from saelab.models import LanguageModel
    from saelab.sae import SAE

LATENT_BY_LATENT = ("relu", "jumprelu")
"""Architectures whose codes of one latent depend on that latent's pre-activation alone."""


def _check_clt(clt: SAE) -> None:
    if not clt.cfg.cross_layer:
        raise ValueError(f"this takes a cross-layer transcoder (SAEConfig.cross_layer); {clt.cfg.arch}-"
                         f"{clt.cfg.width} at {clt.cfg.hook_name or '?'} is not one")


def _raw(clt: SAE) -> SAE:
    """The CLT on its joined input's units (each part times its scale, input_scale folded in), writing its joined
    target's units (each target part times its scale): fold_input_scale removes input_scale and target_scale."""
    return clt.fold_input_scale().eval()


def group_codes(raw: SAE, group: int, x: Tensor) -> Tensor:
    """Codes [n, width / n_groups] of `group`'s latents from its own layer's raw input x [n, d]: only that part of
    the joined input reaches them (the encoder is block-diagonal), so the others' are never computed."""
    part, latents = raw.cfg.part_slices[group], raw.cfg.latent_groups[group]
    pre = torch.zeros(len(x), raw.cfg.width, device=raw.device, dtype=raw.dtype)
    scaled = x.to(raw.device, raw.dtype) * raw.cfg.parts[group]["scale"]
    pre[:, latents] = scaled @ raw.W_enc[part, latents] + raw.b_enc[latents]
    return raw.activation(pre)[:, latents]  # the other latents' zero pre-activations never fire, and are dropped


def group_writes(raw: SAE, group: int, x: Tensor) -> list[Tensor]:
    """What `group` writes [n, d_j] to each target part j >= group (its own layer's and every later one's), in the
    joined target's units, from its own layer's raw input x [n, d]: its codes' decoder rows and its skip path."""
    latents, part = raw.cfg.latent_groups[group], raw.cfg.part_slices[group]
    codes = group_codes(raw, group, x)
    scaled = x.to(raw.device, raw.dtype) * raw.cfg.parts[group]["scale"]
    writes = []
    for target in raw.cfg.target_part_slices[group:]:
        written = codes @ raw.W_dec[latents, target]
        writes.append(written + scaled @ raw.W_skip[part, target] if raw.cfg.skip else written)
    return writes


def _in_raw_units(raw: SAE, j: int, written: Tensor) -> Tensor:
    """Target part j's output in its hook's own units, from what the groups wrote there (b_dec's part added)."""
    return (written + raw.b_dec[raw.cfg.target_part_slices[j]]) / raw.cfg.target_parts[j]["scale"]


def layer_outputs(raw: SAE, inputs: list[Tensor]) -> list[Tensor]:
    """Each target part's raw prediction [n, d_j] from every layer's raw input [n, d_g] (all of the same rows)."""
    written: list[Tensor | float] = [0.0] * len(raw.cfg.target_parts)
    for g, x in enumerate(inputs):
        for j, write in enumerate(group_writes(raw, g, x), start=g):
            written[j] = written[j] + write
    return [_in_raw_units(raw, j, w) for j, w in enumerate(written)]


@torch.no_grad()
def clt_fvu(clt: SAE, batches: Iterable[ActivationBatch | dict[str, Tensor]]) -> dict[str, float]:
    """{target hook: FVU} of each layer's MLP output over the rows of `batches` (ActivationBatches, or dicts of
    [n, d] raw activations, holding every part's input and target hook), each layer's input the clean one."""
    _check_clt(clt)
    raw = _raw(clt)
    hooks_in = [p["hook"] for p in raw.cfg.parts]
    hooks_out = [p["hook"] for p in raw.cfg.target_parts]
    error = [0.0] * len(hooks_out)
    total: list[Tensor | float] = [0.0] * len(hooks_out)  # sum of y, for the variance around the mean
    square, n = [0.0] * len(hooks_out), 0
    for batch in batches:
        acts = batch.acts if isinstance(batch, ActivationBatch) else batch
        missing = [h for h in (*hooks_in, *hooks_out) if h not in acts]
        if missing:
            raise HookError(f"the CLT's FVU needs activations of {', '.join(missing)} (they hold {', '.join(acts)})")
        preds = layer_outputs(raw, [acts[h].reshape(-1, acts[h].shape[-1]) for h in hooks_in])
        for j, (hook, y_hat) in enumerate(zip(hooks_out, preds)):
            y = acts[hook].reshape(-1, acts[hook].shape[-1]).double().cpu()
            error[j] += float((y - y_hat.double().cpu()).square().sum())
            square[j] += float(y.square().sum())
            total[j] = total[j] + y.sum(0)
        n += len(y)
    if not n:
        raise ValueError("no rows to evaluate the CLT on")
    variance = [square[j] - float(torch.as_tensor(total[j]).square().sum()) / n for j in range(len(hooks_out))]
    return {hook: error[j] / variance[j] if variance[j] > 0 else float("nan") for j, hook in enumerate(hooks_out)}


def clt_patches(raw: SAE, inputs: list[str], targets: list[str], where: Tensor) -> list:
    """The patches that splice a raw CLT into one forward: hold each layer's input, and replace each layer's target
    by what the groups of it and of every earlier layer write there, at the positions `where` [b, L]."""
    written: list[Tensor | float] = [0.0] * len(targets)  # what the groups so far wrote to each layer's target
    patches = []
    for g, (input_hook, target_hook) in enumerate(zip(inputs, targets)):
        held: list[Tensor] = []

        def write_target(y: Tensor, g=g, held=held, target_hook=target_hook, input_hook=input_hook) -> Tensor:
            if not held:
                raise HookError(f"the target hook {target_hook} runs before the input hook {input_hook} in the "
                                "forward: a CLT reads each layer's input before it writes that layer's output")
            x = held.pop()
            for j, write in enumerate(group_writes(raw, g, x[where.to(x.device)]), start=g):
                written[j] = written[j] + write
            mask = where.to(y.device)
            new = y.clone()
            new[mask] = _in_raw_units(raw, g, written[g]).to(y.device, y.dtype)
            written[g] = 0.0
            return new

        patches += [_Hold(input_hook, held), Replace(target_hook, write_target, positions=where)]
    return patches


def _resolved(model, parts: list[dict]) -> list[str]:
    """Each part's hook on the model, checked: it names exactly one hook point of width d."""
    hooks = []
    for part in parts:
        found = model.resolve_hooks(part["hook"])
        if len(found) != 1 or model.hook_dim(found[0]) != part["d"]:
            raise HookError(f"the CLT's part {part['hook']} (width {part['d']}) is not one hook point of that width "
                            f"on this model (matches {', '.join(found[:5]) or 'none'})")
        hooks.append(found[0])
    return hooks


@torch.no_grad()
def clt_replacement_metrics(clt: SAE, model: LanguageModel, text, *, tokens: int | None = 20_000,
                            batch_size: int = 8, splice_bos: bool = False, progress: bool = True) -> SplicedMetrics:
    """CE / KL of the CLT's replacement model (see the module) against the clean model and against the model with
    every layer's MLP output (every target part) zero-ablated. Arguments as replacement_metrics's."""
    _check_clt(clt)
    if clt.cfg.arch not in LATENT_BY_LATENT:
        raise ValueError(f"a {clt.cfg.arch} CLT's codes at one layer depend on every layer's input, so no forward "
                         f"computes them layer by layer; the replacement model takes an activation applied latent "
                         f"by latent ({', '.join(LATENT_BY_LATENT)}; a trained batchtopk CLT is exported as jumprelu)")
    raw = _raw(clt)
    inputs, targets = _resolved(model, raw.cfg.parts), _resolved(model, raw.cfg.target_parts)
    return replaced_losses(model, text, targets, lambda where: clt_patches(raw, inputs, targets, where),
                           tokens=tokens, batch_size=batch_size, splice_bos=splice_bos, progress=progress,
                           desc=f"CLT replacement model ({len(targets)} layers)")


__all__ = ["clt_fvu", "clt_patches", "clt_replacement_metrics", "group_codes", "group_writes", "layer_outputs"]
