"""`saelab evals`: the eval suite (core, absorption, sparse probing, synthetic ground truth) on saved SAEs, with
error bars, each record written beside its SAE in SAEBench's layout."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from saelab.commands.common import Positional, RunsModel, SAEModelFlags, Switch, TextFlags
from saelab.evals.core import EVAL_TOKENS
from saelab.evals.intervals import RESAMPLES
from saelab.evals.suite import DEFAULT_SUITE, EVALS
from saelab.options import PositiveInt


@dataclass(kw_only=True)
class EvalsCommand(SAEModelFlags, RunsModel, TextFlags):
    """Evaluate SAEs with the eval suite, each metric with a confidence interval; SAEs of one recipe (--as-seeds)
    are pooled over their seeds and recipes compared against that spread."""

    saes: Annotated[list[str], Positional]
    """SAE folders (saelab, SAELens, sparsify or Gemma Scope format)"""
    suite: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_SUITE))
    """evals to run: core, absorption, sparse_probing, synthetic (the recipe retrained on planted features)"""
    as_seeds: Switch = False
    """treat SAEs of one recipe (same architecture, width, k, hook, model, options) as seeds: report each metric's
    mean and spread over them, and compare recipes against it"""
    tokens: PositiveInt = EVAL_TOKENS
    """held-out tokens for the core eval"""
    resamples: PositiveInt = RESAMPLES
    """bootstrap resamples per interval"""
    acts: str | None = None
    """the activation cache the SAEs were trained on: the core eval then reads the text that follows it (held out)
    instead of --text"""
    out: str | None = None
    """write the records under this folder (one subfolder per SAE) instead of <sae>/evals/"""
    hook: str | None = None
    """the hook point every SAE reads (default: the one its cfg.json names); for SAEs trained on cached activations
    outside a model run, whose folders name none"""

    def __post_init__(self):
        unknown = [name for name in self.suite if name not in EVALS]
        if unknown:
            raise ValueError(f"--suite: no eval named {unknown[0]!r}; choose from {', '.join(EVALS)}")


def eval_config(module, settings: dict):
    """The eval's config (its module's CONFIG class) with the settings it has fields for."""
    cls = module.CONFIG
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{key: value for key, value in settings.items() if key in known})


def held_out_text(cache: str):
    """The text after an activation cache's contexts: what nothing trained on that cache has seen."""
    from saelab.activations import ActivationStore

    return ActivationStore(cache).held_out_text()


def cmd_evals(config: EvalsCommand) -> None:
    from saelab.evals.suite import eval_module, run_suite, seeds_table, suite_table

    settings = {"text": held_out_text(config.acts) if config.acts else config.text_config(), "tokens": config.tokens,
                "resamples": config.resamples}
    configs = {name: eval_config(eval_module(name), settings) for name in config.suite}
    results = run_suite(config.saes, config.suite, configs=configs, out=config.out, hook=config.hook,
                        load_model=lambda sae, folder: config.load_for(sae, folder,
                                                                       max_batch_tokens=config.max_batch_tokens))
    print(suite_table(results))
    if config.as_seeds:
        print("\n" + seeds_table(results))
    for result in results:
        where = Path(config.out) / result.label.replace("/", "__") if config.out else result.folder
        print(f"wrote {where / 'evals'}/: {', '.join(sorted(result.records))}")
