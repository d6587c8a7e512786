"""`saelab eval` and `saelab push`: measure a saved SAE, and publish SAEs to the Hugging Face Hub."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from saelab.commands.common import Positional, RunsModel, SAEModelFlags, Switch, TextFlags, print_metrics
from saelab.evals.core import EVAL_TOKENS, METRICS_FILE
from saelab.options import Flag, PositiveInt

EVAL_FOLDER = "eval"
"""The subfolder of an SAE folder holding `saelab eval`'s evaluations, one folder each."""


@dataclass(kw_only=True)
class EvalCommand(SAEModelFlags, RunsModel, TextFlags):
    """Evaluate a saved SAE: reconstruction, sparsity, spliced CE / KL. The results go to their own folder,
    <sae>/eval/<text>-<tokens>/, and leave the SAE's metrics.json (its training run's evaluation, which `push`
    publishes) as it is, unless --replace-metrics."""

    sae: Annotated[str, Positional]
    """SAE folder (saelab, SAELens, sparsify or Gemma Scope format)"""
    tokens: PositiveInt = EVAL_TOKENS
    """held-out tokens to evaluate on"""
    acts: str | None = None
    """also measure reconstruction on this activation cache"""
    out: str | None = None
    """folder for this evaluation's metrics.json and plots (default: <sae>/eval/<text>-<tokens>/)"""
    replace_metrics: Switch = False
    """write the SAE's own metrics.json and sparsity.safetensors instead: what `push` publishes as its evaluation"""


def cmd_eval(config: EvalCommand) -> None:
    from saelab.evals.core import evaluate
    from saelab.hub import load_sae
    from saelab.hub.folder import save_metrics

    if config.out is not None and config.replace_metrics:
        raise ValueError("--out and --replace-metrics name two places for the metrics; give one")
    sae = load_sae(config.sae)
    model = config.load_for(sae, config.sae, max_batch_tokens=config.max_batch_tokens)
    result = evaluate(sae, model=model, text=config.text_config(), tokens=config.tokens, activations=config.acts)
    first = config.out is None and not config.replace_metrics and _has_no_evaluation(config.sae)
    if config.replace_metrics or first:
        save_metrics(config.sae, result, sae.cfg.width)
        where = Path(config.sae) / METRICS_FILE
    else:
        folder = Path(config.out) if config.out else evaluation_folder(config.sae, config.text, result.n_tokens
                                                                       or config.tokens)
        where = result.save(folder)
    print_metrics(config.sae, result)
    if first:
        print(f"wrote {where}: the SAE had no evaluation of its own, this one is now the one push publishes")
    elif config.replace_metrics:
        print(f"wrote {where}, replacing the SAE's evaluation (what push publishes)")
    else:
        print(f"wrote {where} (the SAE's own {METRICS_FILE}, which push publishes, is unchanged)")


def _has_no_evaluation(folder: str) -> bool:
    """A saelab SAE folder without metrics.json (its training could not evaluate it): the first evaluation fills
    that place. Another library's folder is never written into unasked."""
    from saelab.hub import detect_format

    return Path(folder).is_dir() and not (Path(folder) / METRICS_FILE).exists() and detect_format(folder) == "saelab"


def evaluation_folder(sae_folder: str | Path, text: str, tokens: int) -> Path:
    """Where an evaluation of the SAE in `sae_folder` on `text` over `tokens` tokens goes: <sae>/eval/<text>-<tokens>,
    with <text> the text's file, folder or dataset name (so two texts, or two sizes, never overwrite each other)."""
    base = Path(sae_folder)
    base = base.parent if base.is_file() else base  # a Gemma Scope params file: beside it
    return base / EVAL_FOLDER / f"{text_name(text)}-{tokens}"


def text_name(text: str) -> str:
    """A short file-name-safe name for a text source: 'default', a file's name without its suffix, a folder's or
    a Hub dataset's name."""
    from saelab.data import DATA_SUFFIXES

    name = re.split(r"[/\\]", str(text).rstrip("/\\"))[-1]
    if Path(name).suffix.lower() in DATA_SUFFIXES:
        name = Path(name).stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "text"


@dataclass
class PushCommand:
    """Publish SAE folders (or a whole training run) to a Hugging Face Hub repo."""

    folders: Annotated[list[str], Positional]
    """SAE folders or a run folder (one repo subfolder per SAE)"""
    repo_id: Annotated[str, Positional]
    """e.g. me/smollm2-135m-saes (the token comes from HF_TOKEN or `hf auth login`)"""
    private: Switch = False
    """make the repo private"""
    dry_run: Annotated[bool | str, Flag(parse=str, bare=True, metavar="FOLDER")] = False
    """write exactly what would be uploaded (into FOLDER, or a temporary folder); upload nothing"""
    message: str | None = None
    """commit message"""
    license: str | None = None
    """license for the model card, e.g. apache-2.0"""


def cmd_push(config: PushCommand) -> None:
    from saelab.hub import push_to_hub

    folders = config.folders if len(config.folders) > 1 else config.folders[0]
    where = push_to_hub(folders, config.repo_id, private=config.private, dry_run=config.dry_run,
                        commit_message=config.message, license=config.license)
    print(f"{'wrote what would be uploaded to' if config.dry_run else 'pushed to'} {where}")
