"""`saelab quickstart` (also `saelab` alone): the main job on an embedded default."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from saelab.commands.common import Switch, print_metrics
from saelab.options import PositiveInt, Range
from saelab.training.config import DEFAULT_K, SAESpec

QUICKSTART_MODEL = "smollm2-135m"
QUICKSTART_HOOK = "blocks.15.hook_resid_post"
QUICKSTART_BATCH = 4096
"""Tokens per training step of the quickstart."""


@dataclass
class QuickstartCommand:
    """The main job on built-in defaults (what `saelab` alone runs)."""

    out: str = "runs/quickstart"
    """folder for the cache, the SAE and the dashboard"""
    cache_tokens: Annotated[int, Range(at_least=2 * QUICKSTART_BATCH)] = 800 * 128
    """tokens of built-in text to cache (at least two training batches)"""
    tokens: PositiveInt = 400_000
    """training tokens (passes over the cache)"""
    width: PositiveInt = SAESpec.width
    """latents of the TopK SAE"""
    k: PositiveInt = DEFAULT_K
    """active latents per token"""
    eval_tokens: PositiveInt = 4096
    """held-out tokens for the spliced-model eval"""
    dashboard_latents: PositiveInt = 50
    """latents in the closing dashboard (sampled across firing-density bands; their nearest latents get pages too)"""
    no_resume: Switch = False
    """start the training over even if --out holds a checkpoint of another run"""
    overwrite: Switch = False
    """replace a different cache found in --out (deletes only files saelab wrote)"""


def cmd_quickstart(config: QuickstartCommand) -> None:
    """The main job: cache a mid-depth residual stream of the offline SmolLM2-135M-Instruct on built-in text, train a
    TopK SAE on it, evaluate it on held-out text with the SAE spliced into the model, and save it."""
    from saelab.activations import cache_activations
    from saelab.commands.cache import print_cache_summary
    from saelab.data import TextConfig
    from saelab.explore import explore
    from saelab.explore.dashboard import check_folder
    from saelab.explore.selection import describe
    from saelab.models import load_model
    from saelab.training import TrainConfig, train

    out = Path(config.out)
    check_folder(out / "dashboard")  # before minutes of work, not after them
    spec = SAESpec(arch="topk", width=config.width, k=config.k)
    settings = TrainConfig(tokens=config.tokens, batch_size=QUICKSTART_BATCH)
    print(f"loading {QUICKSTART_MODEL} (offline; the first load de-quantises and caches the weights)")
    model = load_model(QUICKSTART_MODEL)
    text = TextConfig(context_len=128)
    started = time.perf_counter()
    manifest = cache_activations(model, QUICKSTART_HOOK, out / "acts", text=text, tokens=config.cache_tokens,
                                 overwrite=config.overwrite)
    print_cache_summary(out / "acts", manifest, time.perf_counter() - started)
    print(f"training {spec.name()} on {QUICKSTART_HOOK} for {settings.tokens:,} tokens "
          f"({settings.steps} steps, {settings.tokens / manifest.tokens:.1f} passes over the cache)")
    (result,) = train(out / "acts", [spec], settings, out=out / "sae", resume=not config.no_resume, model=model,
                      eval_text=text.after(manifest.n_contexts), eval_tokens=config.eval_tokens)
    print_metrics(result.folder, result.metrics)
    started = time.perf_counter()
    features = explore(result.sae, out / "acts", model)
    latents = features.sample_latents(config.dashboard_latents)
    about = describe(features.stats, latents)
    index = features.dashboard(out / "dashboard", latents, about=about)
    print(f"\ndashboard  {index}  ({about}, and their nearest latents; "
          f"{time.perf_counter() - started:.0f} s; opens from disk in any browser)")
