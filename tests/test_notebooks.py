"""Every notebook in notebooks/ is stored without outputs and (slow tier) runs top to bottom with nbclient, so none
can rot. Notebooks added later are picked up by the glob; one that a test file of its own already executes (its
file name appears in that test) is left to that test."""

from pathlib import Path

import pytest

from notebook_runner import run_notebook

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def dedicated_test(notebook: Path) -> str | None:
    """The test file (other than this one) that runs `notebook` itself, if any."""
    for test in sorted((ROOT / "tests").glob("test_*.py")):
        if test.name != Path(__file__).name and notebook.name in test.read_text(encoding="utf-8"):
            return test.name
    return None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: clear its outputs before saving"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    if owner := dedicated_test(path):
        pytest.skip(f"{owner} runs {path.name}")
    run_notebook(path.name, tmp_path)
