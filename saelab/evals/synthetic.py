"""A synthetic ground-truth benchmark: activations built from a known dictionary of feature directions, so that an
SAE's latents can be scored against the features that really made the data (after SAELens's SynthSAEBench). On real
activations nobody knows the true features; here a perfect dictionary must score 1, and the known parent/child
features show whether an architecture absorbs a child into its parent.

    data = SyntheticData(SyntheticConfig(n_features=4096, d=256, n_parents=128))
    source = data.source(batch_size=4096)                      # an activation source, like a cache folder
    (trained,) = train(source, [SAESpec(arch="topk", width=4096, k=20)], TrainConfig(tokens=2_000_000))
    scores = score_synthetic(trained.sae, data)                # MCC, firing F1, uniqueness, absorption, FVU
    scores.save("runs/synthetic")                              # synthetic.json and synthetic.md

How one token is drawn (every draw seeded, batch by batch, so a stream is the same each time it is read):
    fires_i   feature i fires with probability p_i, a power law over the features from p_max down to p_min. Features
              of one correlation group share a Gaussian factor (a Gaussian copula): each still fires with exactly p_i,
              but they fire together more often than apart. A child fires only where its parent fires, and there
              with probability child_rate: the situation in which an SAE gains sparsity by absorbing the child.
    a_i       the feature's mean magnitude m_i (lognormal over the features) times a per-firing lognormal factor of
              mean 1.
    x         sum_i fires_i a_i f_i + Gaussian noise, with f_i the unit rows of the dictionary F [n_features, d].
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from itertools import count
from typing import Annotated, ClassVar, Iterator

import numpy as np
import torch
from torch import Tensor

from saelab.activations.store import ActivationBatch
from saelab.analysis.study import StudyResult
from saelab.options import (Decay, Fraction, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Range,
                            check_fields)

HOOK = "synthetic"
"""The hook name a synthetic source gives its activations (and the SAEs trained on it)."""


@dataclass
class SyntheticConfig:
    """The generator's settings; the same config (seed included) gives the same dictionary and the same tokens."""

    n_features: PositiveInt = 4096
    """True features; more than d puts them in superposition."""
    d: PositiveInt = 256
    """Width of the activations."""
    p_max: Annotated[float, Range(above=0, at_most=1)] = 0.05
    """Firing probability of the most frequent feature."""
    p_min: Annotated[float, Range(above=0, at_most=1)] = 5e-4
    """Firing probability of the rarest feature."""
    exponent: NonNegativeFloat = 1.0
    """Power-law exponent: p_i falls as (rank + 1)^-exponent between p_max and p_min (0: all at p_max)."""
    max_cosine: Annotated[float, Range(above=0, below=1)] | None = None
    """Push the dictionary's directions apart until no two (other than a child and its parent) have |cosine| above
    this, as far as a few hundred steps get (`SyntheticData.reached_max_cosine` says how far); None: random unit
    vectors as drawn."""
    n_parents: NonNegativeInt = 0
    """Parent features (the most frequent ones), each with `children_per_parent` children drawn from the rest."""
    children_per_parent: PositiveInt = 2
    child_rate: Fraction = 0.3
    """Probability that a child fires on a token where its parent fires (it never fires elsewhere)."""
    child_parent_cosine: Annotated[float, Range(at_least=-1, at_most=1)] | None = None
    """Set each child's direction to this cosine with its parent's; None: as drawn (nearly orthogonal)."""
    correlation_groups: NonNegativeInt = 0
    """Groups of features that tend to fire together (every feature but the children joins one at random); 0: none."""
    group_correlation: Decay = 0.0
    """Correlation of the Gaussian copula within a group (0: independent)."""
    magnitude_mean: PositiveFloat = 1.0
    """Median over the features of the mean magnitude."""
    magnitude_log_std: NonNegativeFloat = 0.3
    """Spread of the mean magnitudes over the features (std of their log)."""
    firing_log_std: NonNegativeFloat = 0.2
    """Spread of one feature's magnitude from one firing to the next (std of the log of a mean-1 factor)."""
    noise: NonNegativeFloat = 0.0
    """Expected norm of the Gaussian noise added to every token (isotropic, std noise / sqrt(d) per coordinate)."""
    seed: NonNegativeInt = 0

    def __post_init__(self):
        check_fields(self)
        if self.p_min > self.p_max:
            raise ValueError(f"SyntheticConfig: p_min={self.p_min} is above p_max={self.p_max}")
        children = self.n_parents * self.children_per_parent
        if self.n_parents + children > self.n_features:
            raise ValueError(f"SyntheticConfig: {self.n_parents} parents with {self.children_per_parent} children "
                             f"each need {self.n_parents + children} features, but n_features={self.n_features}")


class SyntheticData:
    """The known dictionary and how its features fire: `features` [n_features, d] (unit rows), `probabilities`
    (each feature's marginal firing probability), `parent_of` (each feature's parent, -1 for none), `group_of`
    (its correlation group, -1 for none) and `magnitudes` (mean magnitude per feature)."""

    def __init__(self, config: SyntheticConfig):
        self.config = c = config
        g = torch.Generator().manual_seed(c.seed)
        rank = torch.arange(c.n_features, dtype=torch.float64)
        shape = (rank + 1) ** -c.exponent
        low = shape[-1]
        scaled = (shape - low) / (1 - low) if c.exponent > 0 and c.n_features > 1 else torch.ones_like(shape)
        self.base_probabilities = (c.p_min + (c.p_max - c.p_min) * scaled).float()
        self.parent_of = draw_hierarchy(c, g)
        self.children = (self.parent_of >= 0).nonzero().squeeze(1)
        self.probabilities = self.base_probabilities.clone()
        self.probabilities[self.children] = self.base_probabilities[self.parent_of[self.children]] * c.child_rate
        free = (self.parent_of < 0).nonzero().squeeze(1)
        self.group_of = torch.full((c.n_features,), -1, dtype=torch.long)
        if c.correlation_groups:
            self.group_of[free] = torch.randint(c.correlation_groups, (len(free),), generator=g)
        self.magnitudes = c.magnitude_mean * torch.exp(c.magnitude_log_std * torch.randn(c.n_features, generator=g))
        features = unit(torch.randn(c.n_features, c.d, generator=g))
        self.reached_max_cosine = None
        if c.max_cosine is not None:
            features, self.reached_max_cosine = spread(features, c.max_cosine)
        self.features = tie_children(features, self.parent_of, c.child_parent_cosine, g)
        normal = torch.distributions.Normal(0.0, 1.0)
        self.thresholds = normal.icdf(self.base_probabilities.double().clamp(max=1 - 1e-12)).float()
        """The copula's cut: a feature fires where its Gaussian is below this (probability p_i)."""

    @property
    def pairs(self) -> tuple[Tensor, Tensor]:
        """(parents, children): the parent of each child feature, and the child."""
        return self.parent_of[self.children], self.children

    def generator(self, stream_seed: int, batch: int) -> torch.Generator:
        """The random stream of one batch: fixed by the config's seed, the stream's seed and the batch number."""
        mixed = ((self.config.seed * 1_000_003 + stream_seed) * 1_000_003 + batch) % (2**63 - 1)
        return torch.Generator().manual_seed(mixed)

    def fires(self, n: int, g: torch.Generator) -> Tensor:
        """[n, n_features] bool: which features fire on each of n tokens."""
        c = self.config
        if c.correlation_groups and c.group_correlation > 0:
            rho = c.group_correlation
            shared = torch.randn(n, c.correlation_groups + 1, generator=g).mul_(math.sqrt(rho))
            shared[:, -1] = 0  # group -1 (children, and nobody else) shares nothing
            z = torch.randn(n, c.n_features, generator=g).mul_(math.sqrt(1 - rho))
            fired = z.add_(shared[:, self.group_of]) < self.thresholds
        else:
            fired = torch.rand(n, c.n_features, generator=g) < self.base_probabilities
        parents, children = self.pairs
        if len(children):
            fired[:, children] = fired[:, parents] & (torch.rand(n, len(children), generator=g) < c.child_rate)
        return fired

    def sample(self, n: int, g: torch.Generator, codes: bool = False) -> tuple[Tensor, Tensor | None]:
        """n tokens: activations [n, d], and with codes=True the true codes [n, n_features] (the a_i, 0 where a
        feature is silent)."""
        c = self.config
        rows, cols = self.fires(n, g).nonzero(as_tuple=True)
        s = c.firing_log_std
        values = self.magnitudes[cols] * torch.exp(s * torch.randn(len(cols), generator=g) - s * s / 2)
        true = torch.zeros(n, c.n_features)
        true[rows, cols] = values
        x = true @ self.features  # a dense product: far faster on a CPU than adding the firings up one by one
        if c.noise:
            x += torch.randn(n, c.d, generator=g) * (c.noise / math.sqrt(c.d))
        return x, (true if codes else None)

    def source(self, batch_size: int = 4096, tokens: int | None = None, seed: int = 0) -> "SyntheticSource":
        """An activation source of these features for saelab.train (see SyntheticSource)."""
        return SyntheticSource(self, batch_size=batch_size, tokens=tokens, seed=seed)


class SyntheticSource:
    """Batches of synthetic activations, drawn as they are read (never the whole set in memory), at the hook
    "synthetic": what saelab.train takes like any iterable of ActivationBatches. `tokens` bounds the stream (None:
    endless; training reads as many as TrainConfig.tokens). Batch b is the same on every read, so a resumed run
    sees the batches it would have seen. `with_codes()` gives the true codes beside each batch."""

    hooks = [HOOK]
    model_name = "synthetic"

    def __init__(self, data: SyntheticData, *, batch_size: int = 4096, tokens: int | None = None, seed: int = 0):
        if batch_size < 1 or (tokens is not None and tokens < batch_size):
            raise ValueError(f"a synthetic source needs batch_size >= 1 and tokens >= batch_size (or None), got "
                             f"batch_size={batch_size}, tokens={tokens}")
        self.data, self.batch_size, self.tokens, self.seed = data, batch_size, tokens, seed

    @property
    def d(self) -> dict[str, int]:
        return {HOOK: self.data.config.d}

    def batch_numbers(self) -> Iterator[int]:
        return count() if self.tokens is None else iter(range(self.tokens // self.batch_size))

    def batch(self, b: int, codes: bool = False) -> tuple[ActivationBatch, Tensor | None]:
        x, true = self.data.sample(self.batch_size, self.data.generator(self.seed, b), codes=codes)
        rows = torch.arange(b * self.batch_size, (b + 1) * self.batch_size)
        return ActivationBatch(acts={HOOK: x}, token_ids=torch.zeros(len(rows), dtype=torch.long), rows=rows), true

    def __iter__(self) -> Iterator[ActivationBatch]:
        return (self.batch(b)[0] for b in self.batch_numbers())

    def with_codes(self) -> Iterator[tuple[ActivationBatch, Tensor]]:
        """(batch, true codes [batch_size, n_features]) for every batch of the stream."""
        return (self.batch(b, codes=True) for b in self.batch_numbers())


def unit(rows: Tensor) -> Tensor:
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)


def draw_hierarchy(c: SyntheticConfig, g: torch.Generator) -> Tensor:
    """parent_of [n_features]: the n_parents most frequent features are parents (a parent is at least as common as
    its children, and a common parent is where absorption pays); their children are drawn from the other features."""
    parent_of = torch.full((c.n_features,), -1, dtype=torch.long)
    if not c.n_parents:
        return parent_of
    others = c.n_parents + torch.randperm(c.n_features - c.n_parents, generator=g)
    children = others[:c.n_parents * c.children_per_parent]
    parent_of[children] = torch.arange(c.n_parents).repeat_interleave(c.children_per_parent)
    return parent_of


def spread(features: Tensor, max_cosine: float, steps: int = 300, lr: float = 0.5) -> tuple[Tensor, float]:
    """Push unit rows apart where a pair's |cosine| exceeds max_cosine (gradient steps on the excess, renormalised
    after each); returns the rows and the largest |cosine| reached (the bound cannot go below what n rows in d
    dimensions allow)."""
    for _ in range(steps):
        gram = features @ features.T
        gram.fill_diagonal_(0)
        excess = gram.sign() * (gram.abs() - max_cosine).clamp_min(0)
        if float(excess.abs().max()) <= 1e-4:
            break
        features = unit(features - lr * excess @ features / max(1.0, float((excess != 0).sum(1).max())))
    gram = features @ features.T
    gram.fill_diagonal_(0)
    return features, float(gram.abs().max())


def tie_children(features: Tensor, parent_of: Tensor, cosine: float | None, g: torch.Generator) -> Tensor:
    """With a cosine: each child's direction is `cosine` times its parent's plus the rest of a unit vector
    orthogonal to it (from the child's own drawn direction)."""
    if cosine is None:
        return features
    features = features.clone()
    children = (parent_of >= 0).nonzero().squeeze(1)
    parent = features[parent_of[children]]
    own = features[children]
    away = unit(own - (own * parent).sum(1, keepdim=True) * parent)
    features[children] = cosine * parent + math.sqrt(max(0.0, 1 - cosine**2)) * away
    return unit(features)


# ---------------------------------------------------------------------------------------------------- scores
@dataclass(kw_only=True)
class SyntheticScores(StudyResult):
    """How well one SAE recovers the features that made the synthetic data; saved as synthetic.json and .md.

    recovery: mean over true features of the largest cosine with any decoder row.
    mcc: mean cosine of the one-to-one (Hungarian) matching of true features to decoder rows (SAELens's MCC; over
        the matched pairs, min(n_features, width) of them). Cosines are signed, not absolute as in SAELens: codes are
        never negative, so a latent pointing at -f_i cannot write feature i.
    f1: mean over the matched true features (that fire or whose latent fires on the scored tokens) of the firing
        F1 of the matched latent against the feature: 2 TP / (2 TP + FP + FN), counted token by token.
    uniqueness: SynthSAEBench's: each latent's best-matching true feature (largest cosine), the number of distinct
        such features divided by the number of latents (dead ones included, as there). 1: no two latents track the
        same feature.
    absorption: per parent, over the (token, child) pairs where the parent and that child fire, the share where the
        child absorbed the parent; averaged over the parents with such tokens. As in Chanin et al. (2024), the
        parent's main latent (here its matched latent, where they find it by k-sparse probing) fails to fire on a
        token where the parent feature is present (the ground truth stands in for their probe), and another latent
        (here the child's matched latent) fires and carries the parent's direction: its code times the cosine of
        its decoder row with f_parent is at least `absorption_share` of the parent's true magnitude (their
        "projection" condition). 0: no absorption. Only pairs whose parent and child both have a matched latent
        within `absorption_min_cosine` of their direction count (absorption is about features the SAE found; an
        unfound parent's latent is silent for another reason), so read it beside mcc, and beside
        absorption_parents.
    fvu: unexplained share of the activations' variance on the scored tokens; l0 and true_l0: mean latents and
        true features firing per token; dead_latents: latents that never fired on them.
    """

    NAME: ClassVar[str] = "synthetic"
    WHAT: ClassVar[str] = "synthetic ground-truth scores"

    sae: str
    """Which SAE (architecture, width, k)."""
    data: dict
    """The SyntheticConfig the data came from."""
    tokens: int
    recovery: float
    mcc: float
    f1: float
    uniqueness: float
    absorption: float
    absorption_parents: int
    """Parents the absorption averages over (found, with a found child, and firing with it on the scored
    tokens)."""
    fvu: float
    l0: float
    true_l0: float
    dead_latents: int

    METRICS: ClassVar[tuple[str, ...]] = ("recovery", "mcc", "f1", "uniqueness", "absorption", "absorption_parents",
                                          "fvu", "l0", "true_l0", "dead_latents")

    def table(self) -> str:
        lines = ["| metric | value |", "|---|---|"]
        lines += [f"| {name} | {getattr(self, name):.4g} |" for name in self.METRICS]
        return (f"{self.sae} on synthetic data ({self.data.get('n_features')} features in d={self.data.get('d')}), "
                f"{self.tokens:,} fresh tokens\n\n" + "\n".join(lines) + "\n")


@dataclass
class Matching:
    """True features against decoder rows: their cosines, the Hungarian pairs and each latent's best feature."""

    cosines: Tensor
    """[n_features, width]"""
    true: Tensor
    latent: Tensor
    """Matched pairs: true feature true[j] with latent latent[j]."""
    latent_of: Tensor
    """[n_features]: each true feature's matched latent (-1: unmatched)."""
    best_feature: Tensor
    """[width]: each latent's best-matching true feature."""


def match(sae, features: Tensor) -> Matching:
    """The one-to-one matching of true features to decoder rows that maximises the summed cosine."""
    from scipy.optimize import linear_sum_assignment

    decoder = unit(sae.W_dec.detach().float().cpu())
    cosines = features @ decoder.T
    true, latent = linear_sum_assignment(cosines.numpy().astype(np.float64), maximize=True)
    true, latent = torch.as_tensor(true, dtype=torch.long), torch.as_tensor(latent, dtype=torch.long)
    latent_of = torch.full((len(features),), -1, dtype=torch.long)
    latent_of[true] = latent
    return Matching(cosines, true, latent, latent_of, cosines.argmax(0))


@dataclass
class Counts:
    """What the scored tokens add up to."""

    tp: Tensor
    fp: Tensor
    fn: Tensor
    together: Tensor
    """[n_parents]: (token, child) pairs where a parent and one of its children fire."""
    absorbed: Tensor
    squared_error: float = 0.0
    sum_x: Tensor | None = None
    sum_squares: float = 0.0
    latents_fired: float = 0.0
    true_fired: float = 0.0
    ever_fired: Tensor | None = None
    tokens: int = 0


@dataclass
class Absorption:
    """How absorption is read: the parent/child pairs scored, their matched latents, and the share of the parent's
    magnitude the child's latent must carry."""

    parents: Tensor
    children: Tensor
    parent_latents: Tensor
    child_latents: Tensor
    share: float

    @classmethod
    def pairs(cls, data: SyntheticData, m: Matching, share: float, min_cosine: float) -> "Absorption":
        """The pairs whose parent and child both have a matched latent at least min_cosine from their direction."""
        parents, children = data.pairs
        lp, lc = m.latent_of[parents], m.latent_of[children]
        ok = (lp >= 0) & (lc >= 0)
        ok[ok.clone()] = ((m.cosines[parents[ok], lp[ok]] >= min_cosine)
                          & (m.cosines[children[ok], lc[ok]] >= min_cosine))
        return cls(parents[ok], children[ok], lp[ok], lc[ok], share)


@torch.no_grad()
def count_batch(counts: Counts, sae, data: SyntheticData, m: Matching, x: Tensor, true: Tensor,
                how: Absorption) -> None:
    """Add one batch of tokens to `counts`."""
    codes = sae.encode(x.to(sae.device)).float().cpu()
    x_hat = sae.decode(codes.to(sae.device)).float().cpu()
    fired, real = codes > 0, true > 0
    on, truly = fired[:, m.latent], real[:, m.true]
    counts.tp += (on & truly).sum(0)
    counts.fp += (on & ~truly).sum(0)
    counts.fn += (~on & truly).sum(0)
    parents, children, lp, lc = how.parents, how.children, how.parent_latents, how.child_latents
    together = real[:, parents] & real[:, children]
    carried = codes[:, lc] * (sae.W_dec.detach().float().cpu()[lc] * data.features[parents]).sum(1)
    absorbed = together & ~fired[:, lp] & fired[:, lc] & (carried >= how.share * true[:, parents])
    counts.together.index_add_(0, parents, together.sum(0).float())
    counts.absorbed.index_add_(0, parents, absorbed.sum(0).float())
    counts.squared_error += float((x - x_hat).pow(2).sum())
    counts.sum_x = x.sum(0) if counts.sum_x is None else counts.sum_x + x.sum(0)
    counts.sum_squares += float(x.pow(2).sum())
    counts.latents_fired += float(fired.sum())
    counts.true_fired += float(real.sum())
    counts.ever_fired = fired.any(0) if counts.ever_fired is None else counts.ever_fired | fired.any(0)
    counts.tokens += len(x)


def score_synthetic(sae, data: SyntheticData, *, tokens: int = 65_536, batch_size: int = 4096, seed: int = 1 << 20,
                    absorption_share: float = 0.5, absorption_min_cosine: float = 0.5,
                    name: str | None = None) -> SyntheticScores:
    """Score `sae` against the features of `data` on `tokens` fresh tokens (stream `seed`, which no training
    stream of the default seeds reads); see SyntheticScores for each number. The SAE reads raw activations (a
    TrainedSAE's .sae has its input scale folded in)."""
    import time

    started = time.perf_counter()
    if sae.cfg.d_in != data.config.d:
        raise ValueError(f"the SAE reads d_in={sae.cfg.d_in} but the synthetic data has d={data.config.d}")
    m = match(sae, data.features)
    n_parents = data.config.n_parents
    counts = Counts(*(torch.zeros(len(m.true)) for _ in range(3)), torch.zeros(n_parents), torch.zeros(n_parents))
    how = Absorption.pairs(data, m, absorption_share, absorption_min_cosine)
    source = SyntheticSource(data, batch_size=min(batch_size, tokens), tokens=tokens, seed=seed)
    for batch, true in source.with_codes():
        count_batch(counts, sae, data, m, batch.acts[HOOK], true, how)
    return SyntheticScores(sae=name or describe(sae), data=dataclasses.asdict(data.config), tokens=counts.tokens,
                           seconds=time.perf_counter() - started, **summarise(counts, m))


def summarise(counts: Counts, m: Matching) -> dict:
    """The scores from the counts."""
    scored = (2 * counts.tp + counts.fp + counts.fn) > 0
    f1 = (2 * counts.tp / (2 * counts.tp + counts.fp + counts.fn).clamp_min(1))[scored]
    has = counts.together > 0
    n = counts.tokens
    variance = counts.sum_squares - float(counts.sum_x.pow(2).sum()) / n
    width = m.cosines.shape[1]
    return dict(recovery=float(m.cosines.max(1).values.mean()),
                mcc=float(m.cosines[m.true, m.latent].mean()),
                f1=float(f1.mean()) if len(f1) else 0.0,
                uniqueness=len(m.best_feature.unique()) / width,
                absorption=float((counts.absorbed[has] / counts.together[has]).mean()) if has.any() else 0.0,
                absorption_parents=int(has.sum()),
                fvu=counts.squared_error / variance if variance > 0 else 0.0,
                l0=counts.latents_fired / n, true_l0=counts.true_fired / n,
                dead_latents=int((~counts.ever_fired).sum()))


def describe(sae) -> str:
    cfg = sae.cfg
    return f"{cfg.arch}-{cfg.width}" + (f"-k{cfg.k}" if cfg.k is not None else "")


__all__ = ["HOOK", "SyntheticConfig", "SyntheticData", "SyntheticScores", "SyntheticSource", "match",
           "score_synthetic"]
