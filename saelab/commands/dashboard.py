"""`saelab dashboard`: a static HTML dashboard of an SAE's features, opening from disk."""

from __future__ import annotations

import time
from pathlib import Path
from dataclasses import dataclass
from typing import Annotated

from saelab.commands.common import Positional, SAEModelFlags, Switch
from saelab.explore.features import SAMPLED_FIRINGS, TOP_EXAMPLES
from saelab.options import NonNegativeInt, PositiveInt


@dataclass(kw_only=True)
class DashboardCommand(SAEModelFlags):
    """Static HTML dashboard of an SAE's features (opens from disk, offline)."""

    sae: Annotated[str, Positional]
    """SAE folder (saelab, SAELens, sparsify or Gemma Scope format)"""
    acts: str
    """activation cache folder holding the SAE's hook"""
    out: str = "runs/dashboard"
    """folder for index.html and latents/<i>.html"""
    hook: str | None = None
    """the cache hook to read (default: the SAE's own)"""
    latents: list[NonNegativeInt] | None = None
    """latents to export, e.g. 0,5,17 (default: a sample across firing-density bands, see --spread)"""
    spread: PositiveInt = 100
    """when no latents are named: export N latents sampled evenly across log-spaced firing-density bands"""
    most_active: PositiveInt | None = None
    """export the N latents that fire most often instead"""
    all: Switch = False
    """export every latent"""
    labels: str | None = None
    """JSON file of latent labels, {"123": "text"} (default: labels.json in the SAE folder, if there)"""
    tokens: PositiveInt | None = None
    """read at most this many tokens of the cache (default: all)"""
    top: PositiveInt = TOP_EXAMPLES
    """top activating examples per latent"""
    sample: PositiveInt = SAMPLED_FIRINGS
    """firings sampled per latent for the quantile groups"""


def cmd_dashboard(config: DashboardCommand) -> None:
    """A static HTML dashboard of an SAE's features over an activation cache: index.html + one page per latent."""
    from saelab.explore import explore
    from saelab.explore.dashboard import LABELS_FILE, check_folder, read_labels
    from saelab.hub import load_sae

    check_folder(config.out)  # a folder the dashboard may not write is refused before the pass, not after it
    own_labels = Path(config.sae) / LABELS_FILE
    labels = read_labels(config.labels or own_labels) if config.labels or own_labels.is_file() else None
    sae = load_sae(config.sae)
    model = config.load_for(sae, config.sae)
    started = time.perf_counter()
    features = explore(sae, config.acts, model, hook=config.hook, top=config.top, sample=config.sample,
                       max_tokens=config.tokens, check_model=config.model is None)
    latents, about = choose_latents(features, config)
    index = features.dashboard(config.out, latents, labels=labels, about=about)
    print(f"{features!r}: pass {features.stats.seconds:.1f} s, all {time.perf_counter() - started:.1f} s")
    print(f"exported   {about}" + ("" if config.all else ", and the nearest latents of each (marked neighbour)"))
    print(f"dashboard  {index.resolve()}  (open it from disk in any browser)")


def choose_latents(features, config: DashboardCommand) -> tuple[list[int], str]:
    """The latents the flags name, and a line saying how they were chosen."""
    from saelab.explore.selection import describe

    if config.latents:
        return config.latents, f"{len(config.latents)} latents named on the command line"
    if config.all:
        return list(range(features.width)), f"all {features.width} latents"
    if config.most_active:
        return features.most_active(config.most_active), f"the {config.most_active} most active latents"
    latents = features.sample_latents(config.spread)
    return latents, describe(features.stats, latents)
