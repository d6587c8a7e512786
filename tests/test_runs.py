"""runs_folder finds the checkout's runs/ from the root and from any folder inside it (Jupyter starts kernels in
notebooks/), honours $SAELAB_RUNS, and falls back to runs/ in the starting folder outside a checkout."""

from pathlib import Path

import saelab
from saelab.runs import RUNS_ENV, runs_folder


def make_checkout(root: Path) -> Path:
    (root / "saelab").mkdir(parents=True)
    (root / "saelab" / "__init__.py").write_text("")
    (root / "pyproject.toml").write_text("")
    (root / "notebooks" / "deeper").mkdir(parents=True)
    return root


def test_the_checkout_root_and_its_subfolders_share_one_runs_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(RUNS_ENV, raising=False)
    root = make_checkout(tmp_path / "project")
    assert runs_folder(root) == root.resolve() / "runs"
    assert runs_folder(root / "notebooks") == root.resolve() / "runs"
    assert runs_folder(root / "notebooks" / "deeper") == root.resolve() / "runs"
    monkeypatch.chdir(root / "notebooks")
    assert saelab.runs_folder() == root.resolve() / "runs"


def test_outside_a_checkout_runs_go_under_the_starting_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(RUNS_ENV, raising=False)
    (tmp_path / "pyproject.toml").write_text("")  # a project that is not saelab's checkout is not taken for one
    monkeypatch.chdir(tmp_path)
    assert runs_folder() == tmp_path.resolve() / "runs"


def test_the_environment_variable_wins(tmp_path, monkeypatch):
    root = make_checkout(tmp_path / "project")
    monkeypatch.setenv(RUNS_ENV, str(tmp_path / "elsewhere"))
    assert runs_folder(root / "notebooks") == (tmp_path / "elsewhere").resolve()
