"""SAELens's transcoder format: export a saelab transcoder that SAELens's Transcoder classes load, and load one back.

    export_saelens_transcoder(transcoder, "out/tc-L5")      # cfg.json + sae_weights.safetensors
    load_sae("out/tc-L5")                                   # back as a saelab transcoder (load_saelens_transcoder)

SAELens (sae_lens/saes/transcoder.py) has three inference transcoders, named by cfg.json's `architecture`:
    transcoder            codes = relu(x @ W_enc + b_enc)                     y = codes @ W_dec + b_dec
    skip_transcoder       the same, plus x @ W_skip.T with W_skip [d_out, d_in]
    jumprelu_transcoder   codes = relu(pre) * (pre > threshold), no skip
Its TranscoderConfig adds `d_out` to the SAE keys and refuses apply_b_dec_to_input (the input is never centred, as
in saelab). saelab's own folder keeps W_skip as [d_in, d_out] and names the saelab architecture, so it is not this
format. TopK (and BatchTopK, Matryoshka) transcoders have no SAELens class: they are refused, not approximated.
The output hook is written as `hook_name_out`, which SAELens releases that know it read and the others drop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from saelab.sae import SAE

from .common import (CFG_FILE, WEIGHTS_FILE, HubError, build_sae, cfg_int, cfg_str, config_from, load_tensors,
                     parse_dtype, read_json, weights_file, write_json)
from .saelens import _flatten, saelens_cfg

ARCHITECTURES = {("relu", False): "transcoder", ("relu", True): "skip_transcoder",
                 ("jumprelu", False): "jumprelu_transcoder"}
"""(saelab arch, skip) -> SAELens transcoder architecture."""
SAELAB_ARCH = {name: arch for (arch, _), name in ARCHITECTURES.items()}
DROPPED_KEYS = ("k", "activation_fn_kwargs", "saelab")
"""Keys of saelab's SAELens cfg that a SAELens transcoder has no use for."""


def is_saelens_transcoder(cfg: dict[str, Any]) -> bool:
    """Whether a SAELens cfg.json names one of SAELens's transcoder architectures."""
    architecture = cfg.get("architecture")
    return isinstance(architecture, str) and architecture in SAELAB_ARCH  # an ill-typed one is refused by the SAE loader


def export_saelens_transcoder(sae: SAE, folder: str | Path, *, metadata: dict[str, Any] | None = None) -> Path:
    """Write `sae` (a ReLU / JumpReLU transcoder, input scale folded in) as a SAELens transcoder folder."""
    cfg = sae.cfg
    if not cfg.is_transcoder:
        raise HubError("export_saelens_transcoder writes transcoders; save an SAE with save_sae")
    name = ARCHITECTURES.get((cfg.arch, cfg.skip))
    if name is None:
        known = ", ".join(f"{a}{' + skip' if s else ''}" for a, s in ARCHITECTURES)
        raise HubError(f"SAELens has no transcoder for a {cfg.arch}{' skip' if cfg.skip else ''} transcoder; it "
                       f"has {known}. circuit-tracer's format takes TopK transcoders "
                       "(saelab.hub.circuit_tracer.export_circuit_tracer)")
    raw = sae.fold_input_scale() if cfg.input_scale != 1 or cfg.output_scale != 1 else sae
    out = {k: v for k, v in saelens_cfg(raw.cfg, metadata).items() if k not in DROPPED_KEYS}
    out.update(architecture=name, apply_b_dec_to_input=False, activation_fn="relu", activation_fn_str="relu")
    tensors = {n: getattr(raw, n).detach().to("cpu").contiguous() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if cfg.skip:
        tensors["W_skip"] = raw.W_skip.detach().to("cpu").T.contiguous()  # SAELens: [d_out, d_in]
    if cfg.arch == "jumprelu":  # float64, so that log(threshold) on load gives back log_threshold exactly
        tensors["threshold"] = raw.log_threshold.detach().to("cpu", torch.float64).exp().contiguous()
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / CFG_FILE, out)
    save_file(tensors, str(folder / WEIGHTS_FILE))
    return folder


def load_saelens_transcoder(folder: str | Path, *, allow_pickle: bool = False, device=None) -> SAE:
    """A SAELens transcoder folder as a saelab transcoder whose forward equals SAELens's."""
    folder = Path(folder)
    source = str(folder / CFG_FILE)
    flat = _flatten(read_json(folder / CFG_FILE, "SAELens config"))
    name = cfg_str(flat, "architecture", source)
    if name not in SAELAB_ARCH:
        raise HubError(f"{source}: architecture {name!r} is not a SAELens transcoder ({sorted(SAELAB_ARCH)})")
    if flat.get("apply_b_dec_to_input"):
        raise HubError(f"{source}: apply_b_dec_to_input is true, which SAELens refuses for transcoders")
    d_in, d_sae, d_out = (cfg_int(flat, key, source) for key in ("d_in", "d_sae", "d_out"))
    path = weights_file(folder, WEIGHTS_FILE, allow_pickle=allow_pickle)
    tensors = dict(load_tensors(path, allow_pickle=allow_pickle))
    skip = "W_skip" in tensors
    if skip != (name == "skip_transcoder"):
        raise HubError(f"{path}: a {name} {'has no' if name == 'skip_transcoder' else 'has a'} W_skip")
    if skip:
        if tuple(tensors["W_skip"].shape) != (d_out, d_in):
            raise HubError(f"{path}: W_skip must be [d_out={d_out}, d_in={d_in}], got {tuple(tensors['W_skip'].shape)}")
        tensors["W_skip"] = tensors["W_skip"].T
    hook_name = cfg_str(flat, "hook_name", source)
    target = cfg_str(flat, "hook_name_out", source) or None
    cfg = config_from(dict(arch=SAELAB_ARCH[name], d_in=d_in, width=d_sae, d_out=d_out, skip=skip,
                           dtype=parse_dtype(flat.get("dtype", "float32"), source),
                           model_name=cfg_str(flat, "model_name", source), hook_name=hook_name,
                           target_hook=target if target != hook_name else None), source)
    if not cfg.is_transcoder:
        raise HubError(f"{source}: d_out equals d_in and no hook_name_out other than hook_name is given, so "
                       "saelab cannot tell this transcoder from an SAE; add hook_name_out")
    return build_sae(cfg, tensors, source=str(path), device=device)


__all__ = ["export_saelens_transcoder", "is_saelens_transcoder", "load_saelens_transcoder"]
