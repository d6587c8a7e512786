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


def test_the_runner_flags_what_a_reader_would_trip_over():
    import nbformat
    from notebook_runner import display_faults

    png = {"image/png": "iVBOR", "text/plain": "<Figure size 600x320 with 1 Axes>"}
    cells = [nbformat.v4.new_code_cell("fig"), nbformat.v4.new_code_cell("result.plot(path)"),
             nbformat.v4.new_code_cell("import saelab"), nbformat.v4.new_code_cell("display(Image(path))")]
    cells[0].outputs = [nbformat.v4.new_output("execute_result", png), nbformat.v4.new_output("display_data", png)]
    cells[1].outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "PosixPath('runs/x.png')"})]
    cells[2].outputs = [nbformat.v4.new_output("stream", name="stderr", text="TqdmWarning: IProgress not found")]
    cells[3].outputs = [nbformat.v4.new_output("display_data", png)]
    notebook = nbformat.v4.new_notebook(cells=cells)
    assert [fault.split()[1] for fault in display_faults(notebook)] == ["0", "1", "2"]


def test_notebooks_write_under_the_runs_folder_whatever_the_working_folder():
    """A path literal such as "runs/..." or "acts" is read against the kernel's working folder (notebooks/ under
    Jupyter); the notebooks take their folders from saelab.runs_folder() instead."""
    import nbformat

    for path in NOTEBOOKS:
        code = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        assert '"runs/' not in code and "'runs/" not in code, f"{path.name}: use saelab.runs_folder()"
        if "cache_activations" in code or ".plot(" in code or "dashboard(" in code:
            assert "runs_folder()" in code, f"{path.name} writes files: put them under saelab.runs_folder()"
