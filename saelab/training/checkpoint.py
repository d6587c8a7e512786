"""Checkpoints without pickle: tensors (weights, Adam moments, firing clocks) in safetensors, the rest in JSON.

A checkpoint is written to a temporary folder and swapped in with renames, so a run killed while saving still
has the previous checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from saelab.errors import SaelabError

CHECKPOINT = "checkpoint"


class CheckpointError(SaelabError):
    """A checkpoint that is unreadable or belongs to another run."""


def save_checkpoint(out: Path, state: dict, tensors: dict[str, torch.Tensor]) -> None:
    final, staging, old = out / CHECKPOINT, out / f"{CHECKPOINT}.tmp", out / f"{CHECKPOINT}.old"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, staging / "tensors.safetensors")
    (staging / "state.json").write_text(json.dumps(state, indent=1))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """The last complete checkpoint in `out`, or None if there is none."""
    for folder in (out / CHECKPOINT, out / f"{CHECKPOINT}.old"):
        if (folder / "state.json").exists() and (folder / "tensors.safetensors").exists():
            try:
                return json.loads((folder / "state.json").read_text()), load_file(folder / "tensors.safetensors")
            except (json.JSONDecodeError, OSError) as error:
                raise CheckpointError(f"checkpoint {folder} is unreadable ({error}); delete it to start over") from None
    return None


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
