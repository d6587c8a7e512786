"""Progress bars without a warning in Jupyter kernels that lack ipywidgets.

tqdm.auto picks tqdm's notebook widget inside Jupyter and its text bar elsewhere. Without ipywidgets it falls back
to the text bar, which is what saelab wants there, but first warns "IProgress not found" on import, and it is
imported by saelab's bars and by transformers' and huggingface_hub's alike, so every notebook opened with it.
Importing this module (saelab's package does, first) silences that one warning instead of making ipywidgets a
dependency; with ipywidgets installed nothing changes and the widget is used.
"""

from __future__ import annotations

import importlib.util
import warnings

from tqdm.std import TqdmWarning

HAS_WIDGETS = importlib.util.find_spec("ipywidgets") is not None

if not HAS_WIDGETS:
    warnings.filterwarnings("ignore", message="IProgress not found", category=TqdmWarning)

from tqdm.auto import tqdm  # noqa: E402  (after the filter, so the import itself is quiet)

__all__ = ["HAS_WIDGETS", "tqdm"]
