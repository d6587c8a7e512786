"""The one way saelab draws and writes a figure: a headless pyplot and `save_figure`, shared by every study's
plots and the feature explorer, so every PNG is laid out and written the same way."""

from __future__ import annotations

from pathlib import Path

DPI = 110
GRID_ALPHA = 0.3
"""Light grid lines: they help read values off a curve without competing with it."""


def pyplot():
    """matplotlib.pyplot on the Agg backend, so plots render on machines without a display (CI, servers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write (making the folder) and close a matplotlib figure; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


__all__ = ["DPI", "GRID_ALPHA", "pyplot", "save_figure"]
