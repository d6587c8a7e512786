"""`saelab eval` and `saelab push`: measure a saved SAE, and publish SAEs to the Hugging Face Hub."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from saelab.commands.common import Positional, RunsModel, SAEModelFlags, Switch, TextFlags, print_metrics
from saelab.eval import EVAL_TOKENS
from saelab.options import Flag, PositiveInt


@dataclass(kw_only=True)
class EvalCommand(SAEModelFlags, RunsModel, TextFlags):
    """Evaluate a saved SAE: reconstruction, sparsity, spliced CE / KL."""

    sae: Annotated[str, Positional]
    """SAE folder (saelab, SAELens, sparsify or Gemma Scope format)"""
    tokens: PositiveInt = EVAL_TOKENS
    """held-out tokens to evaluate on"""
    acts: str | None = None
    """also measure reconstruction on this activation cache"""
    out: str | None = None
    """where metrics.json goes (default: the SAE folder)"""


def cmd_eval(config: EvalCommand) -> None:
    from saelab.eval import evaluate
    from saelab.hub import load_sae

    sae = load_sae(config.sae)
    model = config.load_for(sae, config.sae, max_batch_tokens=config.max_batch_tokens)
    out = config.out or config.sae
    print_metrics(out, evaluate(sae, model=model, text=config.text_config(), tokens=config.tokens,
                                activations=config.acts, out=out))


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
