"""SAELens's on-disk format: cfg.json + sae_weights.safetensors (+ sparsity.safetensors).

Export: `saelens_cfg(cfg)` gives the SAELens keys of a saelab cfg.json, written so that both SAELens 6.x (which
reads `metadata.*` and drops unknown keys) and older releases (which read the same keys at the top level) load it.

Import: `load_saelens(folder)` turns a SAELens folder into a saelab SAE whose encode/forward equal SAELens's:
    SAELens      pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc
                 standard: relu(pre) | topk: top-k of pre, then relu | jumprelu: relu(pre) * (pre > relu(threshold))
                 x_hat = acts @ W_dec + b_dec
    saelab       pre = (x - b_dec) @ W_enc + b_enc, so apply_b_dec_to_input=false becomes b_enc' = b_enc + b_dec @ W_enc.
Also folded in: topk `rescale_acts_by_decoder_norm` (W_enc, b_enc scaled by ||W_dec[i]||, rows of W_dec made unit),
a pre-6.0 `scaling_factor` tensor (multiplies the codes before decoding: folded into W_dec rows), `log_threshold`
(old JumpReLU checkpoints). Refused with HubError: gated and other architectures, run-time normalisation
(constant_norm_rescale, layer_norm), transcoders (W_skip, hook_name_out).
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.data import DEFAULT_TEXT
from saelab.sae import SAE, SAEConfig, available_architectures, sae_class

from .common import (CFG_FILE, SPARSITY_FILE, WEIGHTS_FILE, HubError, build_sae, cfg_bool, cfg_int, cfg_str,
                     config_from, is_int, load_tensors, parse_dtype, read_json, require, weights_file)

# Each SAE class names its SAELens architecture (saelens_name). SAELens has no batch-dependent inference class: its
# BatchTopK and Matryoshka trainers save JumpReLU SAEs, as saelab's `training.export()` does; those classes give
# SAELens's training names, for folders saved as is. Import reads the SAELens architectures below.
IMPORTABLE = {"standard": "relu", "relu": "relu", "topk": "topk", "jumprelu": "jumprelu"}

# SAELens's LLM_METADATA_KEYS (6.x): run facts that live under cfg["metadata"] in 6.x and at the top level before.
RUN_KEYS = ("model_name", "hook_name", "hook_head_index", "model_class_name", "model_from_pretrained_kwargs",
            "prepend_bos", "exclude_special_tokens", "neuronpedia_id", "context_size", "seqpos_slice", "dataset_path",
            "sae_lens_training_version")
KNOWN_TENSORS = {"W_enc", "b_enc", "W_dec", "b_dec", "threshold", "log_threshold", "scaling_factor",
                 "finetuning_scaling_factor"}


def hook_layer(hook_name: str) -> int:
    m = re.match(r"^blocks\.(\d+)\.", hook_name or "")
    return int(m.group(1)) if m else 0


DEFAULT_TEXT_DESCRIPTION = "saelab's built-in text: the Python reference's prose from pydoc_data, shipped with CPython"
MODEL_CLASS_NAME = "TransformerBridge"
"""saelab wraps every model in TransformerLens's TransformerBridge (saelab.models), whose hook names the SAEs read."""


def saelens_model_name(model_name: str) -> str:
    """The model name a SAELens / TransformerLens user can load: the Hugging Face model behind one of saelab's
    offline names (smollm2-135m -> HuggingFaceTB/SmolLM2-135M-Instruct), any other name as it is."""
    from saelab.models import OFFLINE_MODELS

    offline = OFFLINE_MODELS.get(model_name)
    return offline.hub_id if offline is not None and offline.hub_id else model_name


def model_metadata(model_name: str) -> dict[str, Any]:
    """What cfg.json adds about an offline model: saelab's own name for it and how its weights were quantised (the
    activations of a de-quantised model are close to, not equal to, the Hugging Face model's)."""
    from saelab.models import OFFLINE_MODELS

    offline = OFFLINE_MODELS.get(model_name)
    if offline is None or not offline.hub_id:
        return {}
    return {"saelab_model_name": model_name, "model_weights": offline.weights}


def run_metadata(cfg: SAEConfig, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The SAELens run keys for this SAE: saelab's model/hook, SAELens's defaults, then the caller's overrides."""
    run: dict[str, Any] = {
        "model_name": saelens_model_name(cfg.model_name),
        "hook_name": cfg.hook_name,
        "hook_head_index": None,
        "model_class_name": MODEL_CLASS_NAME,
        "model_from_pretrained_kwargs": {},
        "prepend_bos": True,
        "exclude_special_tokens": False,
        "neuronpedia_id": None,
        "context_size": None,
        "seqpos_slice": [None],
        "dataset_path": "",
        "sae_lens_training_version": None,
        **model_metadata(cfg.model_name),
    }
    for key, value in (overrides or {}).items():
        run[str(key)] = saelens_model_name(value) if key == "model_name" else value
    return run


def source_metadata(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The SAELens run keys an activation source's fingerprint() gives (a cache's or a live stream's): the text
    (dataset_path), its context length, whether contexts start with BOS and whether BOS positions were left out
    (seqpos_slice), the cache's token count; {} for activations that say nothing of their text."""
    run = fingerprint.get("cache") if isinstance(fingerprint.get("cache"), dict) else fingerprint
    text = run.get("text")
    if not isinstance(text, dict):
        return {}
    out: dict[str, Any] = {"dataset_path": str(text.get("source", "")), "context_size": text.get("context_len"),
                           "prepend_bos": bool(text.get("prepend_bos", True))}
    if out["dataset_path"] == DEFAULT_TEXT:
        out["dataset_description"] = DEFAULT_TEXT_DESCRIPTION
    if out["prepend_bos"] and run.get("drop_bos", True):
        out["seqpos_slice"] = [1, None]  # saelab drops each context's BOS position from the activations
    for key, name in (("sha256", "dataset_sha256"), ("split", "dataset_split"), ("config", "dataset_config"),
                      ("start", "dataset_start_context")):
        if text.get(key) not in (None, "", 0):
            out[name] = text[key]
    if "cache" in fingerprint and fingerprint.get("tokens"):
        out["activation_cache_tokens"] = int(fingerprint["tokens"])
    return out


def saelens_cfg(cfg: SAEConfig, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """SAELens cfg.json keys for a saelab SAE whose weights read raw activations (input scale folded)."""
    architecture = sae_class(cfg.arch)
    if architecture.saelens_name is None:
        exported = [a for a in available_architectures() if sae_class(a).saelens_name is not None]
        raise HubError(f"saelab arch {cfg.arch!r} has no SAELens equivalent; known: {exported}")
    run = run_metadata(cfg, overrides)
    topk = architecture.saelens_activation == "topk"
    out: dict[str, Any] = {
        "architecture": architecture.saelens_name,
        "d_in": cfg.d_in,
        "d_sae": cfg.width,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": not cfg.is_transcoder,  # a transcoder's b_dec is in its target's space
        "normalize_activations": "none",
        "reshape_activations": "hook_z" if cfg.hook_name.endswith("hook_z") else "none",
    }
    if cfg.is_transcoder:  # SAELens's transcoder keys (its transcoder classes' own format: saelens_transcoder)
        out.update({"d_out": cfg.output_dim, "hook_name_out": cfg.output_hook})
    out.update(architecture.saelens_keys(cfg))
    # pre-6.0 keys, at the top level (SAELens 6 drops what its config classes do not know)
    out.update({
        "activation_fn": architecture.saelens_activation,
        "activation_fn_str": architecture.saelens_activation,
        "activation_fn_kwargs": {"k": cfg.k} if topk else {},
        "finetuning_scaling_factor": False,
        "hook_layer": hook_layer(cfg.hook_name),
        "dataset_trust_remote_code": False,
        **run,
    })
    out["metadata"] = dict(run)
    return out


# ---------------------------------------------------------------------------------------------------- import
def _flatten(cfg: dict[str, Any]) -> dict[str, Any]:
    """One view of a SAELens cfg of any version: pre-6.0 names renamed, 6.x metadata merged in."""
    renames = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
               "activation_fn_str": "activation_fn"}
    flat = {renames.get(k, k): v for k, v in cfg.items() if k != "metadata"}
    meta = cfg.get("metadata")
    if isinstance(meta, dict):
        flat.update({k: v for k, v in meta.items() if v is not None or k not in flat})
    return flat


NORMALIZATIONS = (None, False, "none", True, "expected_average_only_in", "constant_norm_rescale", "layer_norm")


def load_saelens(folder: Path, *, allow_pickle: bool = False, device=None) -> SAE:
    folder = Path(folder)
    source = str(folder / CFG_FILE)
    flat = _flatten(read_json(folder / CFG_FILE, "SAELens config"))
    # every value is checked for its type first: "false" as a string must not read as true, "4608" not as 4608
    model_name, hook_name = cfg_str(flat, "model_name", source), cfg_str(flat, "hook_name", source)
    arch, kwargs = _architecture(flat, source)
    _check_normalization(flat.get("normalize_activations"), source)
    d_in, d_sae = cfg_int(flat, "d_in", source), cfg_int(flat, "d_sae", source)
    dtype = parse_dtype(flat.get("dtype", "float32"), source)
    path = weights_file(folder, WEIGHTS_FILE, allow_pickle=allow_pickle)
    w = _weights(load_tensors(path, allow_pickle=allow_pickle), flat, arch, source, path, d_in, d_sae)
    k = _topk_k(flat, kwargs, d_sae, source) if arch == "topk" else None
    cfg = config_from(dict(arch=IMPORTABLE[arch], d_in=d_in, width=d_sae, k=k, dtype=dtype, model_name=model_name,
                           hook_name=hook_name), source)  # a refused value (a hook name that is a path) names the file
    return build_sae(cfg, w, source=str(path), device=device)


def _architecture(flat: dict[str, Any], source: str) -> tuple[str, dict[str, Any]]:
    """(SAELens architecture, activation_fn_kwargs) of a folder saelab can import; anything else is refused."""
    arch = cfg_str(flat, "architecture", source, "standard") or "standard"
    activation = cfg_str(flat, "activation_fn", source, "relu") or "relu"
    kwargs = flat.get("activation_fn_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise HubError(f"{source}: 'activation_fn_kwargs' must be an object, got {kwargs!r}; fix cfg.json")
    for key, default in (("apply_b_dec_to_input", True), ("rescale_acts_by_decoder_norm", False)):
        cfg_bool(flat, key, source, default)  # refused before anything else, as every value
    if arch == "standard" and activation == "topk" and kwargs.get("k") is not None:
        arch = "topk"  # pre-6.0 TopK SAEs were 'standard' with a topk activation
    if arch not in IMPORTABLE:
        raise HubError(f"{source}: SAELens architecture {arch!r} is not supported; saelab imports "
                       f"{sorted(set(IMPORTABLE) - {'relu'})} (gated, transcoders and others are out of scope)")
    if arch == "standard" and activation != "relu":
        raise HubError(f"{source}: activation_fn {activation!r} is not supported for a standard SAE; expected relu")
    if flat.get("hook_name_out") or flat.get("d_out"):
        raise HubError(f"{source}: this is a transcoder (it has hook_name_out / d_out); saelab imports SAEs only")
    return arch, kwargs


def _check_normalization(norm: Any, source: str) -> None:
    """Refuse run-time normalisation (a saelab SAE cannot represent it); warn about a scale the folder lacks."""
    if not any(norm is n or (isinstance(n, str) and norm == n) for n in NORMALIZATIONS):
        raise HubError(f"{source}: unknown normalize_activations {norm!r}; expected one of "
                       f"{[n for n in NORMALIZATIONS if isinstance(n, str)]}")
    if norm in ("constant_norm_rescale", "layer_norm"):
        raise HubError(f"{source}: normalize_activations={norm!r} normalises each input at run time, which a saelab "
                       f"SAE cannot represent; expected 'none' or 'expected_average_only_in'")
    if norm is True or norm == "expected_average_only_in":
        warnings.warn(f"{source}: normalize_activations='expected_average_only_in' means the SAE was trained on "
                      f"scaled activations and the folder does not hold the factor; the imported SAE reads inputs "
                      f"exactly as SAELens's load_from_disk does (unscaled)", stacklevel=4)


def _weights(tensors: dict[str, Tensor], flat: dict[str, Any], arch: str, source: str, path: Path, d_in: int,
             d_sae: int) -> dict[str, Tensor]:
    """The SAELens tensors (float64) with every SAELens-only convention folded in, as saelab computes them."""
    extra = sorted(set(tensors) - KNOWN_TENSORS)
    if extra:
        raise HubError(f"{path}: unexpected tensors {extra} for SAELens architecture {arch!r}; expected "
                       f"W_enc, b_enc, W_dec, b_dec (+ threshold for jumprelu)")
    w = {k: v.to(torch.float64) for k, v in tensors.items()}
    if arch == "jumprelu" and "threshold" not in w and "log_threshold" in w:
        w["threshold"] = w.pop("log_threshold").exp()
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    require(w, shapes, str(path), f"cfg.json d_in={d_in}, d_sae={d_sae}")
    for name in ("scaling_factor", "finetuning_scaling_factor"):
        if name in w:  # codes are multiplied by it before decoding
            scale = w.pop(name)
            require({name: scale}, {name: (d_sae,)}, str(path), f"d_sae={d_sae}")
            w["W_dec"] = w["W_dec"] * scale[:, None]
    if arch == "topk" and cfg_bool(flat, "rescale_acts_by_decoder_norm", source, False):
        norms = w["W_dec"].norm(dim=-1).clamp_min(1e-12)
        w["W_enc"] = w["W_enc"] * norms
        w["b_enc"] = w["b_enc"] * norms
        w["W_dec"] = w["W_dec"] / norms[:, None]
    if not cfg_bool(flat, "apply_b_dec_to_input", source, True):
        w["b_enc"] = w["b_enc"] + w["b_dec"] @ w["W_enc"]
    return w


def _topk_k(flat: dict[str, Any], kwargs: dict[str, Any], d_sae: int, source: str) -> int:
    k = flat.get("k", kwargs.get("k"))
    if "k" in flat and "k" in kwargs and kwargs["k"] != k:  # SAELens 6 reads k, older releases the kwargs
        raise HubError(f"{source}: k={k!r} but activation_fn_kwargs.k={kwargs['k']!r}; SAELens versions would "
                       f"read different SAEs. Fix cfg.json so that both agree")
    if isinstance(k, float) and k.is_integer():
        k = int(k)
    if not is_int(k) or not 1 <= k <= d_sae:
        raise HubError(f"{source}: a topk SAE needs an integer k in [1, d_sae={d_sae}], got {k!r}; fix cfg.json")
    return k


def read_log_densities(folder: Path) -> Tensor | None:
    """sparsity.safetensors['sparsity'] (log10 feature densities) when the folder has one."""
    path = Path(folder) / SPARSITY_FILE
    if not path.is_file():
        return None
    tensors = load_tensors(path)
    if "sparsity" not in tensors:
        raise HubError(f"{path} has no 'sparsity' tensor; found {sorted(tensors)}")
    return tensors["sparsity"]
