"""EleutherAI sparsify's on-disk format: one folder per hookpoint (e.g. `layers.3/`) holding

    cfg.json           SparseCoderConfig fields + d_in: k, num_latents (0 = use expansion_factor), expansion_factor,
                       activation ('topk' | 'groupmax'), normalize_decoder, multi_topk, skip_connection, transcode
    sae.safetensors    encoder.weight [num_latents, d_in], encoder.bias [num_latents], W_dec [num_latents, d_in],
                       b_dec [d_in] (+ W_skip [d_in, d_in] with a skip connection)

and, at the run root, config.json (the training config: model, dataset, ctx_len). sparsify's SAE:

    pre   = relu((x - b_dec) @ encoder.weight.T + encoder.bias)
    codes = top-k of pre          x_hat = sum_j codes_j * W_dec[index_j] + b_dec

which is saelab's TopK SAE with W_enc = encoder.weight.T (top-k then ReLU keeps the same values as ReLU then
top-k). Refused with HubError: groupmax activation, transcoders, skip connections, signed codes.
"""
from __future__ import annotations

import re
from pathlib import Path

from saelab.sae import SAE, SAEConfig

from .common import (CFG_FILE, SPARSIFY_WEIGHTS_FILE, HubError, build_sae, cfg_bool, cfg_int, cfg_str, dtype_name,
                     is_int, load_tensors, read_json, require, weights_file)


def sparsify_hook_name(hookpoint: str) -> str:
    """sparsify hookpoints are module names of the HF model; map the usual ones to TransformerLens hook names."""
    m = re.fullmatch(r"(?:(?:model|gpt_neox|transformer)\.)?(?:layers|h)[._](\d+)(?:\.(mlp|self_attn|attn|attention))?",
                     hookpoint)
    if m:
        layer, part = m.group(1), m.group(2)
        if part is None:
            return f"blocks.{layer}.hook_resid_post"
        return f"blocks.{layer}.hook_mlp_out" if part == "mlp" else f"blocks.{layer}.hook_attn_out"
    if hookpoint.split(".")[-1] in ("embed_tokens", "embed_in", "wte"):
        return "hook_embed"
    return hookpoint


def load_sparsify(folder: Path, *, allow_pickle: bool = False, device=None) -> SAE:
    folder = Path(folder)
    source = str(folder / CFG_FILE)
    cfg = read_json(folder / CFG_FILE, "sparsify config")
    # types first: "false" as a string must not read as true, "4608" not as 4608
    activation = cfg_str(cfg, "activation", source, "topk")
    flags = {name: cfg_bool(cfg, name, source, False) for name in ("transcode", "skip_connection", "signed")}
    if activation != "topk":
        raise HubError(f"{source}: activation {activation!r} is not supported; saelab imports sparsify SAEs with "
                       f"activation 'topk'")
    if flags["transcode"]:
        raise HubError(f"{source}: this is a sparsify transcoder (transcode=true); saelab imports SAEs only")
    if flags["skip_connection"]:
        raise HubError(f"{source}: skip_connection=true (a W_skip term) is not supported; saelab imports plain SAEs")
    if flags["signed"]:
        raise HubError(f"{source}: signed=true (signed top-k codes) is not supported")

    d_in = cfg_int(cfg, "d_in", source)
    width = cfg_int(cfg, "num_latents", source, minimum=0) if cfg.get("num_latents") is not None else 0
    if not width:  # sparsify: num_latents 0 means d_in * expansion_factor
        width = d_in * cfg_int(cfg, "expansion_factor", source)
    k = cfg.get("k")
    if not is_int(k) or not 1 <= k <= width:
        raise HubError(f"{source}: expected an integer 'k' in [1, num_latents={width}], got {k!r}; fix cfg.json")

    path = weights_file(folder, SPARSIFY_WEIGHTS_FILE, allow_pickle=allow_pickle)
    tensors = load_tensors(path, allow_pickle=allow_pickle)
    if "W_skip" in tensors:
        raise HubError(f"{path}: has W_skip (a skip connection), which saelab does not support")
    require(tensors, {"encoder.weight": (width, d_in), "encoder.bias": (width,), "W_dec": (width, d_in),
                      "b_dec": (d_in,)}, str(path), f"cfg.json d_in={d_in}, num_latents={width}")

    hookpoint = folder.name
    model = ""
    root = folder.parent / "config.json"
    if root.is_file():
        try:
            run = read_json(root, "sparsify run config")
            model = str(run.get("model") or "")
        except HubError:
            pass
    weights = {"W_enc": tensors["encoder.weight"].T, "b_enc": tensors["encoder.bias"], "W_dec": tensors["W_dec"],
               "b_dec": tensors["b_dec"]}
    scfg = SAEConfig(arch="topk", d_in=d_in, width=width, k=k, dtype=dtype_name(tensors["encoder.weight"].dtype),
                     model_name=model, hook_name=sparsify_hook_name(hookpoint))
    return build_sae(scfg, weights, source=str(path), device=device)
