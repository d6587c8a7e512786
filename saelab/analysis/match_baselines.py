"""Chance levels for feature matching that condition on activation.

Picking each feature's best partner by activation correlation already finds something in any two SAEs that read
the same tokens: a trained SAE matched against an untrained one scores about as high a mean best correlation as two
trained SAEs of different models. Two baselines say what matching gives without shared features:

- the token-shuffle null: B's rows paired with other tokens' rows (the previous chunk's, in random order; the first
  chunk's A rows with the last chunk's B rows), so both sides keep their own statistics but share no position;
- the untrained twin: an SAE of B's architecture, width and k at B's hook, initialised as saelab's trainer
  initialises one (input scale, decoder bias at the geometric median, the architecture's start) on the first rows
  it reads, and never trained. What A's SAE finds in it is what activation alone gives.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from saelab.analysis.alignment import Side
from saelab.analysis.correlation import Correlation, Features, RunningCorrelation, as_scipy, rows_of, take_rows


class TokenShuffle:
    """Running correlations of A's features with B's features at other tokens, for the given (A label, B label)
    pairs; fed every aligned chunk in order (`update`), read once at the end (`correlations`)."""

    def __init__(self, pairs: Sequence[tuple[str, str]], widths: dict[str, int], seed: int = 0):
        self.running = {(a, b): RunningCorrelation(widths[a], widths[b]) for a, b in pairs}
        self.labels_a = sorted({a for a, _ in pairs})
        self.labels_b = sorted({b for _, b in pairs})
        self.rng = np.random.default_rng(seed)
        self.first_a: dict | None = None
        self.previous_b: dict | None = None

    def update(self, features: dict[str, Features]) -> None:
        """One aligned chunk: every side's features by label."""
        if not self.running:
            return
        a = {label: as_scipy(features[label]) for label in self.labels_a}
        b = {label: as_scipy(features[label]) for label in self.labels_b}
        if self.previous_b is None:
            self.first_a = a  # waits for the last chunk's B rows
        else:
            self._add(a, self.previous_b)
        self.previous_b = b

    def _add(self, a: dict, b: dict) -> None:
        n_a, n_b = rows_of(next(iter(a.values()))), rows_of(next(iter(b.values())))
        if not n_a or not n_b:
            return
        repeats = -(-n_a // n_b)
        rows = np.concatenate([self.rng.permutation(n_b) for _ in range(repeats)])[:n_a]
        taken = {label: take_rows(features, rows) for label, features in b.items()}
        for (la, lb), acc in self.running.items():
            acc.update(a[la], taken[lb])

    def correlations(self) -> dict[tuple[str, str], Correlation]:
        """The correlations, once every chunk is in (a single chunk is paired with itself, in random order)."""
        if self.first_a is not None:
            self._add(self.first_a, self.previous_b)
            self.first_a = None
        return {key: acc.correlation(in_place=True) for key, acc in self.running.items() if acc.n >= 2}


def untrained_twin(sae, seed: int = 0):
    """A freshly initialised SAE of `sae`'s architecture, shape and settings (untouched by data until
    `initialise_on`); seeded without disturbing the global random state."""
    from saelab.sae import create_sae

    cfg = dataclasses.replace(sae.cfg, input_scale=1.0, training_tokens=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_sae(cfg, device=sae.device)


@torch.no_grad()
def initialise_on(sae, x: Tensor):
    """What saelab's trainer does with its first batch (default settings): input scale for unit mean squared norm,
    b_dec at the geometric median, the architecture's own start; returned with the scale folded in (raw units)."""
    from saelab.sae import create_training, estimate_input_scale

    x = x.to(sae.device, torch.float32)
    scale = estimate_input_scale(x)
    sae.cfg = dataclasses.replace(sae.cfg, input_scale=scale)
    sae.init_b_dec_(x * scale)
    create_training(sae).start(x * scale)
    return sae.fold_input_scale().eval()


@dataclass
class UntrainedSide(Side):
    """The untrained twin of a trained SAE side, at its hook; initialised on the first rows it encodes."""

    twin_of: str = ""
    """Label of the trained side it stands in for."""
    started: bool = False

    def features(self, acts: Tensor) -> Features:
        if not self.started:
            self.sae = initialise_on(self.sae, acts)
            self.started = True
        return super().features(acts)


def untrained_side(trained: Side, seed: int = 0) -> UntrainedSide:
    if trained.sae is None:
        raise ValueError(f"side {trained.label} has no SAE, so it has no untrained twin")
    return UntrainedSide(trained.model, trained.hook, untrained_twin(trained.sae, seed),
                         label=f"{trained.label}:untrained", twin_of=trained.label)


def with_untrained_twins(sides_a: Sequence[Side], sides_b: Sequence[Side], pairs: Sequence[tuple[Side, Side]],
                         seed: int = 0) -> tuple[list[Side], list[Side], list[tuple[Side, Side]]]:
    """Sides and pairs where, for every pair of two SAEs, A's SAE is also paired with an untrained twin of B's
    (added to the group that holds B's side, so it reads B's model at B's hook)."""
    groups = [list(sides_a), list(sides_b)]
    twins: dict[str, UntrainedSide] = {}
    extra = []
    for side_a, side_b in pairs:
        if side_a.sae is None or side_b.sae is None:
            continue
        if side_b.label not in twins:
            twins[side_b.label] = untrained_side(side_b, seed + len(twins))
            groups[0 if any(s is side_b for s in sides_a) else 1].append(twins[side_b.label])
        extra.append((side_a, twins[side_b.label]))
    return groups[0], groups[1], [*pairs, *extra]


__all__ = ["TokenShuffle", "UntrainedSide", "initialise_on", "untrained_side", "untrained_twin",
           "with_untrained_twins"]
