"""A run's log: log.jsonl in the run folder (and W&B if asked), and the progress bar's summary of a record."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from saelab.errors import TrainingError, as_os_error
from saelab.files import write_atomic

LOG = "log.jsonl"


class RunLog:
    """log.jsonl (truncated to the resumed step, so a resumed run's log reads as one run) and optional W&B."""

    def __init__(self, out: Path | None, step: int, wandb_project: str | None, config: dict):
        self.file = None
        if out is not None:
            path = out / LOG
            kept = log_lines(path, step) if step > 0 and path.exists() else []
            write_atomic(path, "".join(line + "\n" for line in kept).encode())
            self.file = path.open("a")
        self.wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                print("saelab: wandb is not installed; logging to log.jsonl only")
            else:
                self.wandb = wandb.init(project=wandb_project, config=config)

    def write(self, record: dict) -> None:
        if self.file is not None:
            try:
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()
            except OSError as error:  # a full disk: name the log (a torn last line is dropped when the run resumes)
                raise as_os_error(error, self.file.name) from None
        if self.wandb is not None:
            flat = {f"{k}/{m}": v for k, sub in record.items() if isinstance(sub, dict) for m, v in sub.items()}
            flat = {**{k: v for k, v in flat.items() if not isinstance(v, list)},  # prefix_mse: one series per prefix
                    **{f"{k}/{i}": x for k, v in flat.items() if isinstance(v, list) for i, x in enumerate(v)}}
            self.wandb.log({**{k: v for k, v in record.items() if not isinstance(v, dict)}, **flat}, step=record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def log_lines(path: Path, step: int) -> list[str]:
    """The lines of log.jsonl up to `step`. A torn last line (the run was killed while writing it) is dropped; an
    unreadable line before it was not torn by a crash, so it is an error rather than silently lost."""
    lines = path.read_text(errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    kept = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            line_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError) as error:
            if i == last:
                break
            raise TrainingError(f"{path} line {i + 1} is not a log record ({error}); only a last line can be torn by "
                                "a crash, so the file was altered. Repair or delete that line, or rerun with "
                                "resume=False (--no-resume) to start the run and its log over") from None
        if line_step <= step:
            kept.append(line)
    return kept


def plain(value) -> float | list | None:
    """A loss term for the log: a float (None if not finite, which JSON cannot hold), or a list of them."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.item() if value.dim() == 0 else [plain(v) for v in value.tolist()]
    if isinstance(value, list) or value is None:
        return value
    value = float(value)
    return value if math.isfinite(value) else None


def postfix(record: dict) -> str:
    """The progress bar's summary of a log record: each SAE's FVU, L0 and dead share, named by its hook too when
    the run reads several hooks."""
    def shown(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    saes = {name: values for name, values in record.items() if isinstance(values, dict) and "fvu" in values}
    several_hooks = len({name.rsplit("/", 1)[0] for name in saes}) > 1
    parts = []
    for name, values in saes.items():
        label = short_hook_name(name) if several_hooks else name.split("/")[-1]
        parts.append(f"{label} fvu={shown(values['fvu'], '.3f')} L0={shown(values['l0'], '.1f')} "
                     f"dead={shown(values['dead'], '.0%')}")
    return " | ".join(parts)


def short_hook_name(name: str) -> str:
    """'blocks.9.hook_resid_post/topk-4608-k32' -> 'L9.resid_post/topk-4608-k32': short enough for a progress bar."""
    return re.sub(r"^blocks\.(\d+)\.(hook_)?", r"L\1.", name)
