"""Matplotlib views of features, for notebooks and reports: one latent's histogram and top activations, and how
often the SAE's latents fire."""

from __future__ import annotations

from pathlib import Path

import torch


def plot_feature(feature, path: str | Path | None = None):
    """Left: the activation histogram (log-spaced bins, log x). Right: the top activations, labelled by their
    firing token. Returns the figure, or writes it to `path` and returns the path."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
    if feature.hist_counts:
        edges = feature.hist_edges
        left.bar(edges[:-1], feature.hist_counts, width=[b - a for a, b in zip(edges, edges[1:])], align="edge",
                 color="#e07b39")
        left.set_xscale("log")
    left.set_xlabel("activation")
    left.set_ylabel("tokens")
    left.set_title(f"latent {feature.latent}: fires on {100 * feature.density:.3g}% of tokens", fontsize=10)
    top = feature.top[:12][::-1]
    right.barh(range(len(top)), [e.value for e in top], color="#e07b39")
    right.set_yticks(range(len(top)), [repr(e.firing_text) for e in top], fontsize=8)
    right.set_xlabel("activation")
    right.set_title("top activations (firing token)", fontsize=10)
    if path is None:
        fig.tight_layout()
        plt.close(fig)  # shown once, by the returned figure, not again by Jupyter's inline backend
        return fig
    from saelab.figures import save_figure

    return save_figure(fig, path)


def plot_densities(features, path: str | Path | None = None):
    """Histogram of log10 firing density over all latents, dead latents counted in the title."""
    import matplotlib.pyplot as plt

    density = features.stats.density
    alive = density[density > 0]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    if len(alive):
        ax.hist(torch.log10(alive).numpy(), bins=50, color="#e07b39")
    ax.set_xlabel("log10 firing density")
    ax.set_ylabel("latents")
    ax.set_title(f"{features.name}: {int((density == 0).sum())} of {len(density)} latents never fired", fontsize=10)
    if path is None:
        fig.tight_layout()
        plt.close(fig)  # shown once, by the returned figure, not again by Jupyter's inline backend
        return fig
    from saelab.figures import save_figure

    return save_figure(fig, path)
