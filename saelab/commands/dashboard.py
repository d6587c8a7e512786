"""`saelab dashboard`: a static HTML dashboard of an SAE's features, opening from disk."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated

from saelab.commands.common import Positional, SAEModelFlags
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
    """latents to export, e.g. 0,5,17 (default: all)"""
    most_active: PositiveInt | None = None
    """export only the N latents that fire most often"""
    tokens: PositiveInt | None = None
    """read at most this many tokens of the cache (default: all)"""
    top: PositiveInt = TOP_EXAMPLES
    """top activating examples per latent"""
    sample: PositiveInt = SAMPLED_FIRINGS
    """firings sampled per latent for the quantile groups"""


def cmd_dashboard(config: DashboardCommand) -> None:
    """A static HTML dashboard of an SAE's features over an activation cache: index.html + one page per latent."""
    from saelab.explore import explore
    from saelab.explore.dashboard import check_folder
    from saelab.hub import load_sae

    check_folder(config.out)  # a folder the dashboard may not write is refused before the pass, not after it
    sae = load_sae(config.sae)
    model = config.load_for(sae, config.sae)
    started = time.perf_counter()
    features = explore(sae, config.acts, model, hook=config.hook, top=config.top, sample=config.sample,
                       max_tokens=config.tokens, check_model=config.model is None)
    latents = config.latents or (features.most_active(config.most_active) if config.most_active else None)
    index = features.dashboard(config.out, latents)
    print(f"{features!r}: pass {features.stats.seconds:.1f} s, all {time.perf_counter() - started:.1f} s")
    print(f"dashboard  {index.resolve()}  (open it from disk in any browser)")
