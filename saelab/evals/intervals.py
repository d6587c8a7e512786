"""Error bars: a bootstrap interval for one SAE, the spread over seeds for several SAEs of one recipe, and a verdict
on whether two recipes differ by more than their seeds do.

    bootstrap_interval(per_context_losses, statistic=lambda v: v.mean(0))   # resample contexts, not tokens
    over_seeds([0.151, 0.149, 0.156])                                      # mean, std, min, max of three seeds
    compare(over_seeds(topk), over_seeds(batchtopk))                       # "differs" only beyond the spread

Tokens of one context are not independent (a document's topic sets every token's activation), so the bootstrap
resamples whole units (contexts, prompts, words) that the caller chooses; resampling tokens would give intervals
that are too narrow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

LEVEL = 0.95
RESAMPLES = 1000


@dataclass
class Interval:
    """An estimate with its interval. method says how it was made: 'bootstrap' (percentile interval over `n` units,
    `resamples` resamples) or 'seeds' (mean over `n` seeds; low/high are mean -/+ t * standard error, `std`, `min`
    and `max` the raw spread)."""

    estimate: float
    low: float
    high: float
    n: int
    method: str
    level: float = LEVEL
    std: float | None = None
    min: float | None = None
    max: float | None = None
    resamples: int | None = None

    def __str__(self) -> str:
        if not math.isfinite(self.estimate):
            return "n/a"
        width = max(abs(self.high - self.estimate), abs(self.estimate - self.low))
        digits = max(2, 1 - math.floor(math.log10(width))) if width > 0 else 3
        return f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def bootstrap_interval(units: Tensor, statistic: Callable[[Tensor], Tensor | float], *,
                       resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> Interval:
    """Percentile bootstrap of `statistic` over the first dimension of `units` (one row per independent unit, e.g.
    per-context sums [n_contexts, ...]); the estimate is the statistic on all units. Ratios of sums (FVU, CE loss
    recovered) should be computed from resampled sums, not averaged per unit, so pass the sums and let `statistic`
    divide."""
    if units.shape[0] < 2:
        raise ValueError(f"a bootstrap needs at least 2 units, got {units.shape[0]}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    estimate = float(statistic(units))
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(units.shape[0], (resamples, units.shape[0]), generator=generator)
    values = torch.tensor([float(statistic(units[pick])) for pick in picks], dtype=torch.float64)
    values = values[torch.isfinite(values)]
    if not len(values):
        return Interval(estimate, math.nan, math.nan, units.shape[0], "bootstrap", level, resamples=resamples)
    tail = (1 - level) / 2
    low, high = torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return Interval(estimate, low, high, units.shape[0], "bootstrap", level, std=float(values.std()),
                    resamples=resamples)


def mean_interval(values: Tensor | Sequence[float], **kwargs) -> Interval:
    """Bootstrap interval of a plain mean over independent values (per-prompt accuracies, per-letter scores)."""
    values = torch.as_tensor(values, dtype=torch.float64)
    return bootstrap_interval(values, lambda v: v.mean(), **kwargs)


def t_quantile(level: float, dof: int) -> float:
    """Two-sided Student t quantile (scipy when present; the normal quantile is too narrow for 3 seeds)."""
    try:
        from scipy.stats import t
    except ImportError:  # scipy is an analysis extra; a small table covers the common seed counts
        table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
        if level == 0.95 and dof in table:
            return table[dof]
        return float(torch.distributions.Normal(0, 1).icdf(torch.tensor(0.5 + level / 2)))
    return float(t.ppf(0.5 + level / 2, dof))


def over_seeds(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean and spread of one metric over SAEs that differ only in their seed; the interval is the t interval of the
    mean (what a fourth seed's recipe mean would likely fall in), std/min/max the raw spread."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("over_seeds needs at least one value")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return Interval(mean, math.nan, math.nan, 1, "seeds", level, std=math.nan, min=mean, max=mean)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    half = t_quantile(level, len(values) - 1) * std / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half, len(values), "seeds", level, std=std, min=min(values),
                    max=max(values))


@dataclass
class Comparison:
    """Two recipes' seed intervals side by side: `differs` is True when the difference of the means is larger than
    the seeds' own spread allows (Welch's t interval of the difference excludes 0)."""

    a: Interval
    b: Interval
    difference: float
    low: float
    high: float
    differs: bool | None

    def __str__(self) -> str:
        if self.differs is None:
            return f"difference {self.difference:+.4g} (one seed each: no spread to compare it with)"
        verdict = "beyond the seed spread" if self.differs else "within the seed spread"
        return f"difference {self.difference:+.4g} [{self.low:+.4g}, {self.high:+.4g}]: {verdict}"


def compare(a: Interval, b: Interval) -> Comparison:
    """Does recipe b differ from recipe a by more than their seeds vary? (b - a, Welch interval.)"""
    difference = b.estimate - a.estimate
    if a.n < 2 or b.n < 2 or a.method != "seeds" or b.method != "seeds":
        return Comparison(a, b, difference, math.nan, math.nan, None)
    va, vb = a.std ** 2 / a.n, b.std ** 2 / b.n
    se = math.sqrt(va + vb)
    if se == 0:
        return Comparison(a, b, difference, difference, difference, difference != 0)
    dof = (va + vb) ** 2 / ((va ** 2 / (a.n - 1) if va else 0) + (vb ** 2 / (b.n - 1) if vb else 0))
    half = t_quantile(a.level, max(1, round(dof))) * se
    low, high = difference - half, difference + half
    return Comparison(a, b, difference, low, high, not low <= 0 <= high)
