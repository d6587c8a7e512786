"""Flag groups several verbs share, each one dataclass written once (loading a model, the text to read), and what
the verbs print. A verb's config inherits the groups it takes: `class CacheCommand(ModelFlags, CacheTextFlags)`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Annotated

from saelab.data import ContextLen, TextConfig
from saelab.interventions import MAX_BATCH_TOKENS
from saelab.options import Flag, NonNegativeInt, PositiveInt


def text_flag(value: str) -> str:
    """The argparse type of every flag naming text: its source must resolve (saelab.data.text_source), so a
    mistyped path stops the command before any model loads, instead of being read as a dataset name or as text."""
    from saelab.data import text_source
    from saelab.errors import DataError

    try:
        text_source(value)
    except DataError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def token_position(text: str) -> str | int:
    """'mean', 'last' or a token index (negative: from the end of each text)."""
    if text in ("mean", "last"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'mean', 'last' or a token index, got {text!r}") from None


TextSource = Annotated[str, Flag(parse=text_flag)]
"""A text file, folder, JSONL file, Hub dataset name, or 'default', resolved where the flag is parsed."""
Switch = Annotated[bool, Flag(switch=True)]
"""An on/off flag taking no value."""
Positional = Flag(positional=True)


@dataclass(kw_only=True)
class LoadsModel:
    """Loading a model."""

    trust_remote_code: Switch = False
    """allow a Hub model's own code to run"""


@dataclass(kw_only=True)
class RunsModel(LoadsModel):
    """Running a model."""

    max_batch_tokens: PositiveInt = MAX_BATCH_TOKENS
    """padded tokens per model forward, e.g. 8k: bounds memory; a longer text or context is refused by name. Raise it
    for longer texts if memory allows"""


@dataclass(kw_only=True)
class ModelFlags(RunsModel):
    """The model to run."""

    model: str
    """smollm2-135m, gemma-3-270m, a Hub id or a local folder"""

    def load(self, **options):
        from saelab.models import load_model

        return load_model(self.model, trust_remote_code=self.trust_remote_code,
                          max_batch_tokens=self.max_batch_tokens, **options)


@dataclass(kw_only=True)
class SAEModelFlags(LoadsModel):
    """The model an SAE reads."""

    model: str | None = None
    """default: the model named in the SAE's cfg.json (gives tokens and unembedding)"""

    def load_for(self, sae, folder, **options):
        """--model, else the model the SAE's cfg.json names (load_model's `options`)."""
        from saelab.models import load_model

        name = self.model or sae.cfg.model_name
        if not name:
            raise ValueError(f"{folder} does not say which model it belongs to (its cfg.json names none); pass --model")
        return load_model(name, trust_remote_code=self.trust_remote_code, **options)


@dataclass(kw_only=True)
class TextFlags:
    """The text to read."""

    text: TextSource = TextConfig.source
    """text file, folder, JSONL file, Hub dataset name, or 'default' (built-in prose)"""
    context_len: ContextLen = TextConfig.context_len
    """tokens per context"""

    def text_config(self, **settings):
        from saelab.data import TextConfig

        return TextConfig(source=self.text, context_len=self.context_len, **settings)


@dataclass(kw_only=True)
class CacheTextFlags(TextFlags):
    """The text to cache, in order."""

    field: str = TextConfig.field
    """JSONL / dataset field holding the text"""
    no_bos: Switch = False
    """do not start each context with BOS"""
    seed: NonNegativeInt | None = None
    """shuffle contexts in windows with this seed"""

    def text_config(self):
        return super().text_config(field=self.field, prepend_bos=not self.no_bos, seed=self.seed)


def report_study(result, out: str, written: str) -> None:
    """Save a study's result to `out`, then print its table and what was written there, with the study's time."""
    folder = result.save(out)
    print(result.table())
    print(f"wrote {folder}/{written} ({result.seconds:.0f} s)")


def print_metrics(folder, metrics) -> None:
    print(f"\nSAE        {folder}")
    if metrics is None:
        return
    flat = metrics.metrics()
    names = [("fvu", "FVU, all tokens"), ("fvu_typical", "FVU, typical tokens"),
             ("explained_variance", "explained variance (all tokens)"),
             ("mse", "MSE (raw units)"), ("l0", "L0 (active latents per token)"), ("frac_dead", "dead latents"),
             ("frac_dense", "dense latents (>1% of tokens)"), ("ce_clean", "CE loss, clean model"),
             ("ce_sae", "CE loss, SAE spliced in"), ("ce_zero", "CE loss, hook zero-ablated"),
             ("ce_loss_recovered", "CE loss recovered"), ("kl_sae", "KL(clean || spliced), nats")]
    print(f"held-out   {metrics.n_tokens:,} tokens")
    notes = metrics.notes()  # metrics too few tokens cannot measure: said instead of a number
    for key, label in names:
        if key in notes:
            print(f"  {label:<34}{notes[key]}")
        elif flat.get(key) is not None:
            print(f"  {label:<34}{flat[key]:>10.4f}" + _typical_note(key, metrics.reconstruction))
    if flat.get("fvu") is not None:
        print("  (these are held-out; the training bar's fvu is the last training batch's, massive tokens in only if it "
              "held one)")


def _typical_note(key: str, reconstruction) -> str:
    """What 'typical' leaves out, after the typical-token FVU's value."""
    if key != "fvu_typical" or reconstruction is None or reconstruction.massive_tokens is None:
        return ""
    from saelab.evals.core import MASSIVE

    count = reconstruction.massive_tokens
    return f"   ({count:,} massive token{'s' if count != 1 else ''} left out: norm > {MASSIVE:g}x the median)"
