"""Is a 2-D point cloud one irreducible feature, or two features in disguise? PCA and the two indices of Engels
et al. 2024 ("Not All Language Model Features Are Linear"), in ONE implementation with its settings stated
(the public code has two that disagree on bins, angles, normalisation and temperature).

Normalisation (both indices): points are centred at their mean and divided by their RMS coordinate,
sqrt(mean ||x||^2 / 2): one scalar, so rotating the cloud changes nothing. At most MAX_POINTS points are used
(a seeded subsample), so clusters with many tokens and clusters with few are scored on equal footing.

Separability index S (bits): the mutual information of the two coordinates after a rotation by theta, from a
BINS x BINS histogram over [-RANGE, RANGE]^2 (points outside are clipped into the edge bins), minimised over
ANGLES angles theta in [0, pi/2) (a quarter turn only swaps or negates the coordinates, which leaves the
information unchanged). Two independent features rotate to independent coordinates (S near 0); a circle has
dependent coordinates at every angle (S high). It is the plug-in estimate: its positive bias is about
(BINS - 1)^2 / (2 n ln 2) bits, about 0.13 bits at n = MAX_POINTS.

Epsilon-mixture index M (a fraction): the largest share of points that lie within EPS of one line,
max over (v, c) of P(|z| < EPS), z = (v.x + c) / RMS(v.x + c), |v| = 1. A mixture of features that never fire
together puts every point where the others are zero on a line (M high); a circle or a blob does not (M low).
Search: DIRECTIONS unit directions x OFFSETS offsets (the quantiles of v.x), then the REFINE best are refined by
gradient ascent on a sigmoid relaxation, mean(sigmoid((EPS - |z|) / TEMPERATURE)); the hard fraction of the best
(v, c) found is reported, so the relaxation can only raise M towards its true maximum.

Score of a cluster: the mean over consecutive PCA pairs (1-2, 2-3, ...) of (1 - M) * S; irreducible features
score high.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

BINS = 20
RANGE = 3.0
ANGLES = 90
EPS = 0.1
DIRECTIONS = 90
OFFSETS = 41
REFINE = 4
TEMPERATURE = 0.01
STEPS = 25
MAX_POINTS = 2000


@dataclass
class PCA:
    """Principal components of points [n, d]: mean [d], components [k, d] (orthonormal rows), the variance along
    each, and the fraction of the total variance each holds."""

    mean: Tensor
    components: Tensor
    variance: Tensor
    explained: Tensor

    def project(self, x: Tensor) -> Tensor:
        """[n, d] -> [n, k] coordinates along the components."""
        return (x.float() - self.mean) @ self.components.T


def pca(x: Tensor, k: int) -> PCA:
    """The top-k principal components of x [n, d]; k > min(n - 1, d) is an error (the spare ones would be noise)."""
    x = torch.as_tensor(x).float()
    if x.ndim != 2:
        raise ValueError(f"PCA needs points [n, d], got shape {tuple(x.shape)}")
    n, d = x.shape
    if k < 1 or k > min(n - 1, d):
        raise ValueError(f"PCA to {k} components needs at least {k + 1} points of dimension >= {k}; got {n} points "
                         f"of dimension {d}")
    mean = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    variance = s.square() / max(n - 1, 1)
    total = variance.sum().clamp_min(1e-30)
    signs = torch.where(vh[:k].sum(1) < 0, -1.0, 1.0)  # a fixed sign per component, so reruns draw the same plot
    return PCA(mean, vh[:k] * signs[:, None], variance[:k], variance[:k] / total)


def normalise(points: Tensor, max_points: int = MAX_POINTS, seed: int = 0) -> Tensor:
    """Centre, divide by the RMS coordinate, and subsample (seeded) to at most max_points; float64 [n, 2]."""
    points = torch.as_tensor(points).double()
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"the indices read 2-D points [n, 2], got shape {tuple(points.shape)}")
    if len(points) < 3:
        raise ValueError(f"the indices need at least 3 points, got {len(points)}")
    if len(points) > max_points:
        keep = torch.randperm(len(points), generator=torch.Generator().manual_seed(seed))[:max_points]
        points = points[keep.sort().values]
    points = points - points.mean(0)
    scale = points.square().sum(1).mean().div(2).sqrt()
    return points / scale if scale > 0 else points


def _rotations(count: int, span: float) -> Tensor:
    theta = torch.arange(count, dtype=torch.float64) * (span / count)
    return torch.stack([torch.cos(theta), torch.sin(theta)], 1)  # [count, 2] unit vectors


def mutual_information(a: Tensor, b: Tensor, bins: int = BINS, limit: float = RANGE) -> Tensor:
    """Plug-in mutual information (bits) of coordinate pairs, batched: a, b [m, n] -> [m], from a bins x bins
    histogram over [-limit, limit]^2 with out-of-range values clipped into the edge bins."""
    def cell(v: Tensor) -> Tensor:
        return ((v + limit) / (2 * limit) * bins).floor().clamp(0, bins - 1).long()

    m, n = a.shape
    index = torch.arange(m).unsqueeze(1) * bins * bins + cell(a) * bins + cell(b)
    joint = torch.bincount(index.flatten(), minlength=m * bins * bins).view(m, bins, bins).double() / n
    pa, pb = joint.sum(2, keepdim=True), joint.sum(1, keepdim=True)
    ratio = torch.where(joint > 0, joint / (pa * pb).clamp_min(1e-300), 1.0)
    return (joint * torch.log2(ratio)).sum((1, 2))


def separability_index(points: Tensor, *, bins: int = BINS, angles: int = ANGLES, limit: float = RANGE,
                       max_points: int = MAX_POINTS, seed: int = 0) -> float:
    """S: min over rotations of the mutual information (bits) of the two coordinates (see the module docstring)."""
    x = normalise(points, max_points, seed)
    u = _rotations(angles, math.pi / 2)  # [A, 2]: first rotated axis; the second is its perpendicular
    first = u @ x.T
    second = torch.stack([-u[:, 1], u[:, 0]], 1) @ x.T
    return float(mutual_information(first, second, bins, limit).min())


def _soft_fraction(p: Tensor, c: Tensor, eps: float, temperature: float) -> Tensor:
    z = (p + c) / (p + c).square().mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
    return torch.sigmoid((eps - z.abs()) / temperature).mean(-1)


def _hard_fraction(p: Tensor, c: Tensor, eps: float) -> Tensor:
    """P(|z| < eps) for projections p [..., n] and offsets c [..., 1]."""
    shifted = p + c
    rms = shifted.square().mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
    return (shifted.abs() < eps * rms).double().mean(-1)


def _grid_fraction(p: Tensor, c: Tensor, eps: float) -> Tensor:
    """_hard_fraction for every direction [D, n] x offset [D, O], by counting sorted projections in a window."""
    n = p.shape[1]
    rms = (p.square().mean(1, keepdim=True) + 2 * c * p.mean(1, keepdim=True) + c.square()).clamp_min(0).sqrt()
    ordered = p.sort(1).values.contiguous()
    width = eps * rms.clamp_min(1e-12)
    inside = (torch.searchsorted(ordered, (-c + width).contiguous(), side="left")
              - torch.searchsorted(ordered, (-c - width).contiguous(), side="right"))  # -c - w < p < -c + w
    return inside.clamp_min(0).double() / n


def mixture_index(points: Tensor, *, eps: float = EPS, directions: int = DIRECTIONS, offsets: int = OFFSETS,
                  refine: int = REFINE, temperature: float = TEMPERATURE, steps: int = STEPS,
                  max_points: int = MAX_POINTS, seed: int = 0) -> float:
    """M_eps: the largest share of points within eps (in RMS units) of one line (see the module docstring)."""
    x = normalise(points, max_points, seed)
    v = _rotations(directions, math.pi)  # a line and its reverse are the same line
    p = v @ x.T  # [D, n]
    c = -torch.quantile(p, torch.linspace(0, 1, offsets, dtype=torch.float64), dim=1).T  # [D, O]: through quantiles
    frac = _grid_fraction(p, c, eps)  # [D, O]
    best = float(frac.max())
    top = frac.flatten().topk(min(refine, frac.numel())).indices
    phi = (math.pi / directions * (top // offsets).double()).requires_grad_(True)  # [R]
    off = c.flatten()[top].clone().requires_grad_(True)  # [R]
    optimiser = torch.optim.Adam([phi, off], lr=0.01)
    for _ in range(steps):  # all R starting points at once
        proj = torch.cos(phi)[:, None] * x[:, 0] + torch.sin(phi)[:, None] * x[:, 1]  # [R, n]
        loss = -_soft_fraction(proj, off[:, None], eps, temperature).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            proj = torch.cos(phi)[:, None] * x[:, 0] + torch.sin(phi)[:, None] * x[:, 1]
            best = max(best, float(_hard_fraction(proj, off[:, None], eps).max()))
    return best


@dataclass
class PairIndices:
    """The indices of one PCA pair (components i and i + 1, 0-based)."""

    components: tuple[int, int]
    mixture: float
    separability: float

    @property
    def score(self) -> float:
        return (1 - self.mixture) * self.separability


def pair_indices(coords: Tensor, seed: int = 0) -> list[PairIndices]:
    """M and S of every consecutive pair of columns of PCA coordinates [n, k] (k >= 2)."""
    coords = torch.as_tensor(coords)
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise ValueError(f"need PCA coordinates [n, k >= 2], got shape {tuple(coords.shape)}")
    return [PairIndices((i, i + 1), mixture_index(coords[:, i : i + 2], seed=seed),
                        separability_index(coords[:, i : i + 2], seed=seed)) for i in range(coords.shape[1] - 1)]


def irreducibility_score(pairs: list[PairIndices]) -> float:
    """Mean over PCA pairs of (1 - M) * S: high for an irreducible (multi-dimensional) feature."""
    return sum(p.score for p in pairs) / len(pairs)


__all__ = ["ANGLES", "BINS", "EPS", "MAX_POINTS", "PCA", "PairIndices", "RANGE", "irreducibility_score",
           "mixture_index", "mutual_information", "normalise", "pair_indices", "pca", "separability_index"]
