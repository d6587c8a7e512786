"""`saelab train`: train SAEs on an activation cache or a live model stream, described by flags, a run file, or
both (flags win)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Annotated

from saelab.commands.common import RunsModel, Switch, text_flag
from saelab.data import ContextLen
from saelab.options import Flag, NonNegativeInt


@dataclass(kw_only=True)
class TrainCommand(RunsModel):
    """Train SAEs (several at once: comma lists form a product)."""

    config: str | None = None
    """YAML or JSON run file (acts / model+hooks+text, out, train, saes)"""
    acts: str | None = None
    """activation cache folder to train on"""
    model: str | None = None
    """stream live from this model instead of a cache (with --hooks)"""
    hooks: list[str] | None = None
    """hooks to stream, separated by commas or ';' outside braces (with --model)"""
    text: Annotated[str | None, Flag(parse=text_flag)] = None
    """text for --model streaming (default: the run file's, else built-in)"""
    context_len: ContextLen | None = None
    """tokens per context of --text (default: the run file's, else 128)"""
    out: str | None = None
    """run folder: checkpoints, log.jsonl, one folder per SAE (default runs/sae)"""
    no_resume: Switch = False
    """start over even if --out holds a checkpoint"""
    eval_tokens: NonNegativeInt | None = None
    """held-out tokens to evaluate on (0: skip; default 4096)"""
    given: argparse.Namespace = field(default_factory=argparse.Namespace)
    """The SAESpec, architecture-option and TrainConfig flags given (see add_setting_flags): they override the
    run file's `saes` and `train`, so only those given are set."""


def add_setting_flags(parser: argparse.ArgumentParser) -> list[str]:
    """Flags for every SAE and training setting, from SAESpec, SAEConfig and TrainConfig; they default to None, so
    a run file's values stand unless a flag is given. Returns their names (TrainCommand.given)."""
    from saelab.cli import PRODUCT_FIELDS, TRAIN_FLAGS, option_fields, option_owners
    from saelab.options import add_flags
    from saelab.training.config import SAESpec, TrainConfig

    readers = option_fields()
    options = parser.add_argument_group("architecture options (each applies to the SAEs whose architecture reads it)")
    return [*add_flags(parser.add_argument_group("SAEs (SAESpec; comma lists form a product: --arch topk,relu --width "
                                                 "4608,9216 trains 4 SAEs; flags replace the run file's saes)"),
                       SAESpec, [*PRODUCT_FIELDS, "lr"], lists=PRODUCT_FIELDS),
            *[added for name, owner in option_owners().items()  # each option from the class that declares it
              for added in add_flags(options, owner, [name], notes={name: f"Read by: {', '.join(readers[name])}."})],
            *add_flags(parser.add_argument_group("training (TrainConfig; flags override the run file's train)"),
                       TrainConfig, TRAIN_FLAGS)]
