"""Gemma Scope's on-disk format (Google DeepMind): one folder per SAE holding

    params.npz           (Gemma Scope, Gemma 2)   W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae],
                                                  b_dec [d_in], threshold [d_sae]
    params.safetensors   (Gemma Scope 2, Gemma 3) the same tensors, named w_enc, w_dec, b_enc, b_dec, threshold

Their JumpReLU does not subtract b_dec before encoding:

    pre = x @ W_enc + b_enc        codes = relu(pre) * (pre > threshold)        x_hat = codes @ W_dec + b_dec

so the saelab SAE gets b_enc' = b_enc + b_dec @ W_enc. A threshold <= 0 gates nothing beyond the ReLU.
Refused with HubError: transcoders (an affine_skip_connection tensor). The folder names carry no model or hook; they
are guessed from the path and the Hub repo id (e.g. google/gemma-scope-2b-pt-res, layer_20/width_16k/...).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from saelab.sae import SAE, SAEConfig

from .common import GEMMASCOPE_FILES, HubError, build_sae, dtype_name, load_tensors, require

CANONICAL = {"w_enc": "W_enc", "w_dec": "W_dec", "b_enc": "b_enc", "b_dec": "b_dec", "threshold": "threshold"}


def guess_names(path: str, repo_id: str = "") -> tuple[str, str]:
    """(model_name, hook_name) from a Gemma Scope path and repo id; '' where it cannot tell."""
    text = f"{repo_id}/{path}".lower()
    layer = re.search(r"layer_(\d+)", text)
    hook = ""
    if layer:
        n = layer.group(1)
        if "resid_post" in text or "-res" in text:
            hook = f"blocks.{n}.hook_resid_post"
        elif "mlp_out" in text or "-mlp" in text:
            hook = f"blocks.{n}.hook_mlp_out"
        elif "attn_out" in text:
            hook = f"blocks.{n}.hook_attn_out"
        elif "-att" in text:
            hook = f"blocks.{n}.attn.hook_z"
    elif "embedding" in text:
        hook = "hook_embed"
    model = ""
    m = re.search(r"gemma-scope-(2-)?(\d+(?:\.\d+)?[bm])-(pt|it)", repo_id.lower())
    if m:
        v2, size, kind = m.groups()
        if v2:
            model = f"gemma-3-{size}" + ("-it" if kind == "it" else ("" if size == "270m" else "-pt"))
        else:
            model = f"gemma-2-{size}" + ("-it" if kind == "it" else "")
    return model, hook


def params_file(path: Path) -> Path:
    path = Path(path)
    if path.is_file():
        return path
    for name in GEMMASCOPE_FILES:
        if (path / name).is_file():
            return path / name
    raise HubError(f"{path} has no Gemma Scope weights: expected one of {list(GEMMASCOPE_FILES)}")


def load_gemmascope(path: Path, *, repo_id: str = "", device=None, allow_pickle: bool = False) -> SAE:
    """A Gemma Scope params.npz / params.safetensors (or the folder holding it) as a saelab JumpReLU SAE."""
    file = params_file(path)
    raw = load_tensors(file, allow_pickle=allow_pickle)
    if "affine_skip_connection" in raw or "W_skip" in raw:
        raise HubError(f"{file}: has a skip connection (a Gemma Scope transcoder); saelab imports SAEs only")
    tensors = {CANONICAL.get(k.lower(), k): v for k, v in raw.items()}
    missing = [k for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold") if k not in tensors]
    if missing:
        raise HubError(f"{file} is missing {missing}; expected Gemma Scope's tensors W_enc, W_dec, b_enc, b_dec, "
                       f"threshold (w_enc/w_dec in Gemma Scope 2), found {sorted(raw)}")
    if tensors["W_enc"].ndim != 2 or 0 in tensors["W_enc"].shape:
        raise HubError(f"{file}: W_enc must be a non-empty [d_in, d_sae] matrix, got {list(tensors['W_enc'].shape)}")
    d_in, d_sae = tensors["W_enc"].shape
    require(tensors, {"W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)},
            str(file), f"W_enc's shape [d_in={d_in}, d_sae={d_sae}]")
    dtype = tensors["W_enc"].dtype
    w = {k: tensors[k].to(torch.float64) for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")}
    w["b_enc"] = w["b_enc"] + w["b_dec"] @ w["W_enc"]
    model, hook = guess_names(str(file.parent), repo_id)
    cfg = SAEConfig(arch="jumprelu", d_in=int(d_in), width=int(d_sae), dtype=dtype_name(dtype), model_name=model,
                    hook_name=hook)
    return build_sae(cfg, w, source=str(file), device=device)
