"""Look at features: cards in Jupyter, a static dashboard, search, plots; all from one pass over an SAE's codes.

    from saelab.explore import explore, fires_on, most_active_on
    features = explore(sae, "runs/acts", model)        # cache folder, ActivationStore or ModelStream
    features[123]                                      # a feature card (Jupyter shows it)
    features.browse(features.most_active(20))          # a small browser over latents
    features.search("Monday")                          # latents firing on a token or phrase in the pass
    fires_on(model, sae, "Monday"); most_active_on(model, sae, "See you on Monday.")
    features.dashboard("runs/dash", features.sample_latents(50))  # index.html + latents/<i>.html, from disk

Modules, one job each, each importing only those before it: examples (per-latent example tables), stats (the pass),
directions (logit effects, neighbours), texts (what tokens read as), html and plots (rendering), records (a card's
data), search, selection (which latents a dashboard shows), ranking (the index's search), dashboard (the static
folder), features (FeatureSet and explore, on top).
"""

from saelab.explore.dashboard import write_dashboard
from saelab.explore.features import FeatureSet, explore
from saelab.explore.plots import plot_densities, plot_feature
from saelab.explore.records import Example, Feature, QuantileGroup
from saelab.explore.search import LatentTable, encode_texts, fires_on, most_active_on
from saelab.explore.stats import LatentStats, collect

__all__ = ["Example", "Feature", "FeatureSet", "LatentStats", "LatentTable", "QuantileGroup", "collect",
           "encode_texts", "explore", "fires_on", "most_active_on", "plot_densities", "plot_feature",
           "write_dashboard"]
