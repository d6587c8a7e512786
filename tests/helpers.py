"""Shared test helpers: one way to make a small SAE of any architecture, and one way to cache a tiny model's
activations, so that each test file stops growing its own slightly different copy.

The tests import these as `from helpers import make_sae, make_cache` (pytest puts tests/ on sys.path, as it does
for conftest). The session fixture `tiny_cache` in conftest.py is `make_cache` on the tiny model, made once. Below
them: what several test files of one unit share (a run file for `saelab train`; small saved SAEs, a SAELens folder
and a full disk for the hub tests).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

HOOK = "blocks.0.hook_resid_post"
"""The hook the tiny model's tests read by default (the tiny Llama of conftest.py has blocks 0 and 1, d_model 64)."""
CACHE_HOOKS = (HOOK, "blocks.1.hook_resid_post")
DEFAULT_K = 8
"""Active latents of the architectures that take k: few enough that the codes of a 96-wide SAE are sparse."""


def make_sae(arch: str = "topk", *, d_in: int = 64, width: int = 96, k: int | None = DEFAULT_K, seed: int = 0,
             dtype: str = "float32", input_scale: float = 1.0, model_name: str = "tiny", hook_name: str = HOOK,
             bias_std: float = 0.3, b_dec_std: float = 0.0,
             threshold_range: tuple[float, float] | None = (0.05, 1.0), training_tokens: int = 0, **options):
    """A small SAE of any registered architecture, random but shaped like a trained one.

    A freshly initialised SAE has zero encoder biases and equal thresholds, so every latent behaves alike and bugs
    in bias folding, b_dec handling or per-latent thresholds go unseen; here the encoder biases are drawn with
    `bias_std` (the decoder bias with `b_dec_std`) and JumpReLU's thresholds spread log-uniformly over
    `threshold_range`; bias_std=0 and threshold_range=None keep the fresh initialisation. The same seed gives the
    same SAE. `k` is dropped for the architectures that take none; `options` are the architecture's own settings
    (e.g. target_l0=16, group_sizes=[32, 64]).
    """
    from saelab.sae import create_sae, sae_class

    torch.manual_seed(seed)
    k = k if sae_class(arch).takes_k else None
    sae = create_sae(sae_config(arch, d_in=d_in, width=width, k=k, dtype=dtype, input_scale=input_scale,
                                model_name=model_name, hook_name=hook_name, training_tokens=training_tokens,
                                options=options))
    with torch.no_grad():
        if bias_std:
            sae.b_enc.normal_(0, bias_std)
        if b_dec_std:
            sae.b_dec.normal_(0, b_dec_std)
        if threshold_range is not None and hasattr(sae, "log_threshold"):
            low, high = map(math.log, threshold_range)
            sae.log_threshold.copy_(torch.empty(width).uniform_(low, high))
    return sae


def sae_config(arch: str, *, options: dict, **fields):
    """The SAEConfig for `fields` and the architecture's `options`: the one place that knows how SAEConfig takes
    architecture options (a nested `options` mapping where SAEConfig has that field, else flat keywords)."""
    from saelab.sae import SAEConfig

    if "options" in {f.name for f in dataclasses.fields(SAEConfig)}:
        return SAEConfig(arch=arch, options=options, **fields)
    return SAEConfig(arch=arch, **fields, **options)


def make_cache(model, folder: Path, *, hooks=CACHE_HOOKS, tokens: int = 4096, context_len: int = 32,
               shard_tokens: int = 512, batch_size: int = 8) -> Path:
    """Cache `tokens` activations of `model` at `hooks` into `folder`, from the built-in text: several shards (so
    shard edges are crossed) of short contexts (so many contexts), in seconds on a CPU for the tiny model."""
    from saelab.activations import cache_activations
    from saelab.data import TextConfig

    cache_activations(model, list(hooks), folder, text=TextConfig(context_len=context_len), tokens=tokens,
                      batch_size=batch_size, shard_tokens=shard_tokens, progress=False)
    return folder


def run_file(tmp_path, tiny_model_dir, **overrides):
    """A `saelab train --config` run file for the tiny model (one small ReLU SAE), with top-level keys replaced by
    `overrides` (None removes one); returns its path."""
    import yaml

    data = {"model": str(tiny_model_dir), "hooks": "blocks.1.hook_resid_post", "text": {"context_len": 32},
            "out": str(tmp_path / "run"), "eval_tokens": 0, "train": {"tokens": 256, "batch_size": 64},
            "saes": [{"arch": "relu", "width": 32, "options": {"l1_coefficient": 2.0}}]}
    for key, value in overrides.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


SMALL_HOOK = "blocks.1.hook_resid_post"
"""The hook of small_sae's SAEs."""


def small_sae(arch: str = "topk", hook: str = SMALL_HOOK, seed: int = 0):
    """A freshly initialised 8-wide SAE with 16 latents (k=3 where the architecture takes k) of SmolLM2: for tests of
    saving, loading and pushing, where what matters is the folder, not the weights."""
    return make_sae(arch, d_in=8, width=16, k=3, seed=seed, model_name="smollm2-135m", hook_name=hook, bias_std=0,
                    threshold_range=None)


def saved_small_sae(folder: Path, arch: str = "topk", seed: int = 0, **save_options) -> Path:
    """small_sae(arch, seed=seed) saved into `folder` by save_sae (with its `save_options`); returns the folder."""
    from saelab.hub import save_sae

    save_sae(small_sae(arch, seed=seed), folder, **save_options)
    return folder


def write_small_saelens(folder: Path, **cfg) -> Path:
    """A SAELens folder of a small random TopK SAE (d_in 8, d_sae 16, k 3) whose cfg.json keys are replaced by `cfg`."""
    import json

    from safetensors.torch import save_file

    torch.manual_seed(0)
    folder.mkdir(parents=True)
    base = {"architecture": "topk", "d_in": 8, "d_sae": 16, "k": 3, "dtype": "float32", "apply_b_dec_to_input": True,
            "normalize_activations": "none", "hook_name": SMALL_HOOK, "model_name": "gpt2"}
    (folder / "cfg.json").write_text(json.dumps({**base, **cfg}))
    save_file({"W_enc": torch.randn(8, 16), "b_enc": torch.zeros(16), "W_dec": torch.randn(16, 8),
               "b_dec": torch.zeros(8)}, str(folder / "sae_weights.safetensors"))
    return folder


def disk_full_in(monkeypatch, what: str) -> None:
    """Make the disk fill up at the first write of `what`: safetensors (as it reports it) or a copied file."""
    if what == "safetensors":
        import safetensors.torch
        from safetensors import SafetensorError

        def full(*args, **kwargs):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(safetensors.torch, "save_file", full)
    else:
        import errno
        import shutil

        def full(src, dst, *args):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(shutil, "copyfileobj", full)
