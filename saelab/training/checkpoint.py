"""Checkpoints without pickle: tensors (weights, Adam moments, firing clocks) in safetensors, the rest in JSON.

A checkpoint is written whole to a temporary folder, fsynced, and only then swapped in with renames; the previous
one stays beside it as `checkpoint.old`. `checksums.json` (written last) holds the size and SHA-256 of both files,
so a truncated or altered checkpoint is caught on load and the previous good one is used instead.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from saelab.errors import SaelabError, as_os_error
from saelab.files import file_sha256, fsync_dir, fsync_file, write_atomic

CHECKPOINT = "checkpoint"
FILES = ("tensors.safetensors", "state.json")
CHECKSUMS = "checksums.json"


class CheckpointError(SaelabError):
    """A checkpoint that is unreadable or belongs to another run."""


def save_checkpoint(out: Path, state: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write a new checkpoint durably, then make it current; the previous one becomes `checkpoint.old`."""
    final, staging, old = out / CHECKPOINT, out / f"{CHECKPOINT}.tmp", out / f"{CHECKPOINT}.old"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, staging / FILES[0])
        fsync_file(staging / FILES[0])
        write_atomic(staging / FILES[1], json.dumps(state, indent=1).encode())
        write_atomic(staging / CHECKSUMS, json.dumps({name: _digest(staging / name) for name in FILES}, indent=1).encode())
        fsync_dir(staging)
    except (OSError, SafetensorError) as error:  # a full disk: the previous checkpoint stays current for the rerun
        shutil.rmtree(staging, ignore_errors=True)  # and the half-written one gives its space back
        raise as_os_error(error, staging / FILES[0]) or error from None
    if final.exists():
        if _complete(final):  # keep the last good checkpoint as the fallback; a damaged one is not worth keeping
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        else:
            shutil.rmtree(final)
        fsync_dir(out)
    staging.rename(final)
    fsync_dir(out)


def load_checkpoint(out: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """The newest intact checkpoint in `out` (warning when a damaged newer one is passed over), or None if none was
    ever written. Raises CheckpointError when checkpoints exist but none is intact."""
    damaged = []
    for folder in (out / CHECKPOINT, out / f"{CHECKPOINT}.old"):
        if not folder.exists():
            continue
        try:
            found = _read(folder)
        except Exception as error:  # a torn file fails in json, safetensors or our checks: all mean "damaged"
            damaged.append(f"{folder} ({error})")
            continue
        if damaged:
            warnings.warn(f"saelab: checkpoint {damaged[0]} is damaged; resuming from the previous checkpoint "
                          f"{folder} (step {found[0].get('step')})", stacklevel=3)
        return found
    if damaged:
        raise CheckpointError(f"no intact checkpoint in {out}: {'; '.join(damaged)}. Rerun with resume=False "
                              "(--no-resume) to start this run over (the damaged checkpoints are replaced), or use "
                              "another output folder")
    return None


def _read(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    sums = folder / CHECKSUMS
    if sums.exists():  # checkpoints written before checksums existed have none: their files are read as they are
        for name, expected in json.loads(sums.read_text()).items():
            actual = _digest(folder / name)
            if actual != expected:
                raise CheckpointError(f"{name} has {actual['bytes']} bytes, SHA-256 {actual['sha256'][:12]}..., but "
                                      f"was written with {expected['bytes']} bytes, SHA-256 {expected['sha256'][:12]}...")
    return json.loads((folder / FILES[1]).read_text()), load_file(folder / FILES[0])


def _complete(folder: Path) -> bool:
    """Cheap check (sizes only) that a checkpoint folder is whole, before it is kept as the fallback."""
    try:
        sums = json.loads((folder / CHECKSUMS).read_text())
        return all((folder / name).stat().st_size == sums[name]["bytes"] for name in FILES)
    except (OSError, ValueError, KeyError, TypeError):
        return (folder / FILES[0]).exists() and (folder / FILES[1]).exists() and not (folder / CHECKSUMS).exists()


def _digest(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], list]:
    """Adam's per-parameter state as named tensors, plus its JSON-safe param groups."""
    state = optimizer.state_dict()
    tensors = {f"{prefix}.{index}.{key}": value for index, slots in state["state"].items()
               for key, value in slots.items()}
    return tensors, state["param_groups"]


def restore_optimizer(optimizer: torch.optim.Optimizer, prefix: str, tensors: dict, param_groups: list) -> None:
    slots: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            index, key = name[len(prefix) + 1 :].split(".", 1)
            slots.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": slots, "param_groups": param_groups})
