"""The suite's synthetic eval: an SAE's architecture retrained on planted features and scored against them.

A saved SAE cannot be scored against ground truth (nobody knows its model's true features), but its recipe can:
the same architecture, trained by saelab's defaults at an L0 the data calls for, on synthetic activations whose
dictionary is known (saelab.evals.synthetic), once per seed. So this eval scores the *architecture and recipe*
(how well it recovers features, how much it absorbs), not the weights in the folder; its record says so.

    result = run(load_sae("runs/sae/..."), None, SyntheticEvalConfig(seeds=3))
    result.intervals["mcc"]                     # mean over seeds with its t interval
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from saelab.analysis.study import StudyResult
from saelab.evals.intervals import Interval, over_seeds
from saelab.evals.saebench import saebench_output
from saelab.evals.synthetic import SyntheticConfig, SyntheticData, score_synthetic

EVAL_TYPE_ID = "saelab_synthetic"
"""SAEBench has no synthetic eval; the id says whose it is."""
BENCH_DATA = SyntheticConfig(n_features=512, d=64, p_max=0.15, p_min=0.01, exponent=0.6, n_parents=32,
                             children_per_parent=2, child_rate=0.3, correlation_groups=32, group_correlation=0.3,
                             magnitude_mean=1.0, magnitude_log_std=0.3, firing_log_std=0.2, noise=0.05, seed=0)
"""The generator of docs/evals.md's architecture table: 512 features in d = 64, true L0 about 7.5, 32 parents."""
METRICS = ("mcc", "recovery", "f1", "uniqueness", "absorption", "fvu", "l0")


@dataclass
class SyntheticEvalConfig:
    data: SyntheticConfig = field(default_factory=lambda: BENCH_DATA)
    """the planted dictionary and how tokens are drawn from it"""
    l0: int = 8
    """k (or the steered target L0) of the retrained SAEs: about the data's true L0"""
    width: int = 512
    """latents of the retrained SAEs"""
    tokens: int = 1_200_000
    """training tokens per seed"""
    batch_size: int = 2048
    seeds: int = 3
    score_tokens: int = 65_536
    """fresh tokens each SAE is scored on"""


CONFIG = SyntheticEvalConfig
"""The config class the suite builds for this eval."""


@dataclass(kw_only=True)
class SyntheticRecipeResult(StudyResult):
    NAME: ClassVar[str] = EVAL_TYPE_ID
    WHAT: ClassVar[str] = "synthetic recipe scores"

    arch: str
    config: dict
    per_seed: list[dict]
    """Each seed's scores (SyntheticScores fields)."""

    @property
    def intervals(self) -> dict[str, Interval]:
        return {name: over_seeds([s[name] for s in self.per_seed]) for name in METRICS}

    def table(self) -> str:
        lines = [f"{self.arch} retrained on planted features ({len(self.per_seed)} seeds)", "",
                 "| metric | mean [95% t interval] | min | max |", "|---|---|---|---|"]
        for name, i in self.intervals.items():
            lines.append(f"| {name} | {i} | {i.min:.4g} | {i.max:.4g} |")
        return "\n".join(lines) + "\n"

    def saebench(self, sae) -> dict:
        intervals = self.intervals
        metrics = {"synthetic": {name: interval.estimate for name, interval in intervals.items()}}
        return saebench_output(EVAL_TYPE_ID, self.config, metrics, sae, details=self.per_seed,
                               intervals={f"synthetic.{name}": i for name, i in intervals.items()},
                               extra={"seconds": self.seconds, "scores": "the architecture retrained on planted "
                                      "features, not this SAE's weights"})


def recipe(arch: str, config: SyntheticEvalConfig):
    """saelab's default recipe for `arch` at the config's L0: k where the architecture takes one, else a steered
    target L0."""
    from saelab import SAESpec
    from saelab.sae import sae_class

    if sae_class(arch).takes_k:
        return SAESpec(arch=arch, width=config.width, k=config.l0)
    return SAESpec(arch=arch, width=config.width, options={"target_l0": config.l0})


def run(sae, model=None, config: SyntheticEvalConfig | None = None, *, progress: bool = True) -> SyntheticRecipeResult:
    """Retrain `sae`'s architecture on the planted data once per seed and score each (the model is not used)."""
    import time

    from saelab import TrainConfig, train

    config = config or SyntheticEvalConfig()
    started = time.perf_counter()
    data = SyntheticData(config.data)
    per_seed = []
    for seed in range(config.seeds):
        (trained,) = train(data.source(batch_size=config.batch_size, seed=seed), [recipe(sae.cfg.arch, config)],
                           TrainConfig(tokens=config.tokens, batch_size=config.batch_size, seed=seed,
                                       allow_diverged=True), progress=progress)
        scores = score_synthetic(trained.sae, data, tokens=config.score_tokens)
        per_seed.append({"seed": seed, **{name: float(getattr(scores, name)) for name in METRICS},
                         "absorption_parents": scores.absorption_parents, "dead_latents": scores.dead_latents})
    return SyntheticRecipeResult(arch=sae.cfg.arch, config=dataclasses.asdict(config), per_seed=per_seed,
                                 seconds=time.perf_counter() - started)
