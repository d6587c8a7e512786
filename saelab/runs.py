"""Where a project's runs live: one runs/ folder, found the same way whether a kernel starts in the checkout root
(the CLI's habit) or in notebooks/ (Jupyter's), so a notebook sees what `saelab quickstart` wrote and writes its
own results beside them instead of into whatever folder it happened to start in."""

from __future__ import annotations

import os
from pathlib import Path

RUNS_ENV = "SAELAB_RUNS"
"""The environment variable naming the runs folder, for projects kept outside a saelab checkout."""


def is_checkout(folder: Path) -> bool:
    """A saelab source checkout: pyproject.toml beside the saelab package."""
    return (folder / "pyproject.toml").is_file() and (folder / "saelab" / "__init__.py").is_file()


def runs_folder(start: str | Path | None = None) -> Path:
    """The runs folder (absolute, not created): $SAELAB_RUNS when set; else runs/ of the nearest saelab checkout at
    or above `start` (default: the working folder); else runs/ in `start` itself."""
    if os.environ.get(RUNS_ENV):
        return Path(os.environ[RUNS_ENV]).expanduser().resolve()
    here = Path(start if start is not None else Path.cwd()).expanduser().resolve()
    for folder in (here, *here.parents):
        if is_checkout(folder):
            return folder / "runs"
    return here / "runs"


__all__ = ["RUNS_ENV", "runs_folder"]
