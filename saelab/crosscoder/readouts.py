"""What a crosscoder says about its sources: which latents each source uses, and whether an "exclusive" latent is.

Model diffing reads each latent's decoder norm per part (Lindsey et al. 2024): a latent that writes only to B's
activations is B-only, one that writes to both is shared. Norms are taken in the crosscoder's own units, where every
part has unit variance, so a model with larger activations does not look like it owns more latents.

An "exclusive" latent can be an artefact of the sparsity loss: the information is in A too, but another latent (or
several) carries it there (Minder et al. 2025). Latent scaling checks it from data: fit, for each part, the best
direction b_p (least squares, with an intercept, of the part's rows on the latent's activation over all rows) and
compare ||b_p|| between parts. With the part's residual plus the latent's own contribution as the target, b_p is
what the latent should write to p given everything else; a B-only latent whose fitted A-norm is as large as its
B-norm is not exclusive to B.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable

import torch
from torch import Tensor

from saelab.activations.store import ActivationBatch

from saelab.activations.joined import split

EXCLUSIVE = 0.1
"""A latent whose relative norm is below this (A-only) or above 1 - this (B-only) is called exclusive."""
SHARED = (0.4, 0.6)
"""A latent whose relative norm lies in this band is called shared."""


def part_norms(sae) -> Tensor:
    """[width, n_parts]: each latent's decoder norm in each part (the crosscoder's units)."""
    w = sae.W_dec.detach().float()
    return torch.stack([w[:, s].norm(dim=1) for s in sae.cfg.part_slices], dim=1)


def relative_norm(sae, a: int = 0, b: int = 1) -> Tensor:
    """[width]: ||d_b|| / (||d_a|| + ||d_b||): 0 writes only to part a, 1 only to part b, 0.5 to both alike."""
    norms = part_norms(sae)
    return norms[:, b] / (norms[:, a] + norms[:, b]).clamp_min(1e-12)


def decoder_cosine(sae, a: int = 0, b: int = 1) -> Tensor:
    """[width]: cosine of each latent's decoders in parts a and b (parts of one width: layers of one model)."""
    w = sae.W_dec.detach().float()
    sa, sb = sae.cfg.part_slices[a], sae.cfg.part_slices[b]
    if sa.stop - sa.start != sb.stop - sb.start:
        raise ValueError("decoder cosines need parts of one width; these live in different spaces (two models)")
    return torch.nn.functional.cosine_similarity(w[:, sa], w[:, sb], dim=1)


def classify(relative: Tensor, exclusive: float = EXCLUSIVE, shared: tuple[float, float] = SHARED) -> list[str]:
    """'a-only', 'b-only', 'shared' or 'between' for each latent's relative norm."""
    def label(r: float) -> str:
        if r < exclusive:
            return "a-only"
        if r > 1 - exclusive:
            return "b-only"
        return "shared" if shared[0] <= r <= shared[1] else "between"
    return [label(r) for r in relative.tolist()]


@dataclass
class Scaling:
    """Latent scaling over some rows: for each latent and part, the norm of the best-fitting direction."""

    fitted_norm: Tensor
    """[width, n_parts]: ||b_p|| (see the module), in the crosscoder's units; nan where the latent never fired."""
    fires: Tensor
    """[width]: rows where each latent fired."""

    def relative(self, a: int = 0, b: int = 1) -> Tensor:
        """relative_norm from the fitted directions instead of the decoder."""
        return self.fitted_norm[:, b] / (self.fitted_norm[:, a] + self.fitted_norm[:, b]).clamp_min(1e-12)


@torch.no_grad()
def latent_scaling(sae, batches: Iterable[ActivationBatch], hook: str | None = None,
                   max_rows: int | None = None) -> Scaling:
    """Fit every latent's direction in every part (see the module) from `batches` at the crosscoder's joined hook
    (a JoinedSource's in_order()). Accumulates sums per latent, so memory is [width, d] whatever the rows."""
    hook = hook or sae.cfg.hook_name
    parts, width = sae.cfg.parts, sae.cfg.width
    cross = [torch.zeros(width, p["d"], dtype=torch.float64) for p in parts]  # Σ_t f_j y_p
    target_sum = [torch.zeros(width, p["d"], dtype=torch.float64) for p in parts]  # Σ_t y_p, per latent j
    power, total = torch.zeros(width, dtype=torch.float64), torch.zeros(width, dtype=torch.float64)
    fires = torch.zeros(width, dtype=torch.long)
    seen = 0
    for batch in batches:
        x = batch.acts[hook].to(sae.device, sae.dtype)
        if max_rows is not None:
            x = x[: max_rows - seen]
        codes = sae.encode(x)
        residual = x - sae.decode(codes)
        for r, w, acc, sums in zip(split(parts, residual), split(parts, sae.W_dec.detach()), cross, target_sum):
            # y_p = r_p + f_j d_j^p for latent j, so Σ_t f_j y_p = codes^T r_p + (Σ_t f_j²) d_j^p, Σ_t y_p likewise
            acc += (codes.T @ r).double() + (codes.square().sum(0)[:, None] * w).double()
            sums += r.sum(0).double() + (codes.sum(0)[:, None] * w).double()
        power += codes.square().sum(0).double()
        total += codes.sum(0).double()
        fires += (codes > 0).sum(0)
        seen += len(x)
        if max_rows is not None and seen >= max_rows:
            break
    # least squares with an intercept: b_p = cov(f_j, y_p) / var(f_j), so a part's mean is not read as signal
    variance = (power - total.square() / max(seen, 1)).clamp_min(1e-12)
    norms = torch.stack([((acc - total[:, None] * sums / max(seen, 1)) / variance[:, None]).norm(dim=1)
                         for acc, sums in zip(cross, target_sum)], dim=1).float()
    norms[fires == 0] = float("nan")
    return Scaling(norms, fires)


@dataclass
class DiffingReport:
    """The model-diffing readout of one crosscoder over two parts (JSON: asdict)."""

    parts: list[str]
    live: int
    """Latents that fired on the rows read (the others are left out of every count)."""
    counts: dict[str, int]
    """a-only / b-only / shared / between, by decoder norm, live latents only."""
    histogram: list[int]
    """Live latents per relative-norm bin of width 1 / len(histogram), from 0 (part a only) to 1 (part b only)."""
    confirmed: dict[str, int] = field(default_factory=dict)
    """Exclusive latents that latent scaling confirms (their fitted relative norm is exclusive too)."""
    shared_cosine: float | None = None
    """Median decoder cosine of the shared latents (parts of one width only)."""

    def to_dict(self) -> dict:
        return asdict(self)


def diffing_report(sae, batches: Iterable[ActivationBatch], a: int = 0, b: int = 1, bins: int = 20,
                   max_rows: int | None = None) -> DiffingReport:
    """Relative decoder norms of the latents that fire on `batches`, their classes, the histogram, and latent
    scaling's verdict on the exclusive ones."""
    scaling = latent_scaling(sae, batches, max_rows=max_rows)
    live = scaling.fires > 0
    relative = relative_norm(sae, a, b)[live]
    labels = classify(relative)
    fitted = classify(scaling.relative(a, b)[live])
    counts = {name: labels.count(name) for name in ("a-only", "b-only", "shared", "between")}
    confirmed = {name: sum(1 for by_norm, by_fit in zip(labels, fitted) if by_norm == by_fit == name)
                 for name in ("a-only", "b-only")}
    histogram = torch.histc(relative, bins=bins, min=0.0, max=1.0).long().tolist()
    cosine = None
    slices = sae.cfg.part_slices
    if slices[a].stop - slices[a].start == slices[b].stop - slices[b].start:
        shared = torch.tensor([name == "shared" for name in labels])
        if shared.any():
            cosine = float(decoder_cosine(sae, a, b)[live][shared].median())
    names = [f"{p['model']}:{p['hook']}" if p["model"] else p["hook"] for p in sae.cfg.parts]
    return DiffingReport([names[a], names[b]], int(live.sum()), counts, histogram, confirmed, cosine)
