"""circuit-tracer's transcoder files: export per-layer transcoders so attribution graphs can be computed there, and
load such a folder back.

    export_circuit_tracer([tc_0, tc_1, ..., tc_11], "out/smollm2-plt")   # config.yaml + layer_{L}.safetensors
    load_circuit_tracer("out/smollm2-plt")                               # {layer: saelab transcoder}

The layout is the one circuit-tracer's load_transcoder_from_hub reads from a Hub repo (circuit_tracer/utils/
hf_utils.py, circuit_tracer/transcoder/single_layer_transcoder.py):
    config.yaml            model_kind: transcoder_set, feature_input_hook / feature_output_hook (the hook names
                           inside a block, e.g. ln2.hook_normalized and hook_mlp_out), activation (topk with k, or
                           relu; a JumpReLU is told by its threshold tensor), model_name (the Hugging Face model)
    layer_{L}.safetensors  W_enc [d_transcoder, d_model] (applied as F.linear, so saelab's W_enc transposed),
                           W_dec [d_transcoder, d_model], b_enc, b_dec, W_skip [d_model, d_model] applied as
                           x @ W_skip.T, activation_function.threshold (JumpReLU)
circuit-tracer's transcoders read and write d_model (its W_skip is square), and its loader wants one transcoder for
every layer from 0 up: a set with gaps is refused unless partial=True (then each file still loads alone with
load_transcoder). config.yaml is written as JSON, which a YAML reader reads as the same mapping.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from saelab.sae import SAE

from .common import HubError, build_sae, config_from, load_tensors
from .saelens import saelens_model_name

CONFIG_FILE = "config.yaml"
ACTIVATIONS = {"topk": "topk", "relu": "relu", "jumprelu": None}
"""saelab arch -> circuit-tracer's config `activation` (None: JumpReLU, read from the threshold tensor)."""


def layer_file(layer: int) -> str:
    return f"layer_{layer}.safetensors"


def _split(hook: str, what: str) -> tuple[int, str]:
    """blocks.5.ln2.hook_normalized -> (5, "ln2.hook_normalized")."""
    m = re.match(r"^blocks\.(\d+)\.(.+)$", hook or "")
    if not m:
        raise HubError(f"circuit-tracer names hooks inside a block (blocks.L.<hook>); the {what} hook is {hook!r}")
    return int(m.group(1)), m.group(2)


def export_circuit_tracer(transcoders: Sequence[SAE], folder: str | Path, *, partial: bool = False) -> Path:
    """Write per-layer transcoders (one per layer, the same hooks in each block) as a circuit-tracer transcoder set."""
    if not transcoders:
        raise HubError("export_circuit_tracer needs at least one transcoder")
    files: dict[int, dict[str, torch.Tensor]] = {}
    hooks, kinds = set(), set()
    for sae in transcoders:
        cfg = sae.cfg
        if not cfg.is_transcoder or cfg.target_hook is None:
            raise HubError(f"circuit-tracer takes transcoders; the {cfg.arch}-{cfg.width} at {cfg.hook_name!r} "
                           "reconstructs its own input")
        if cfg.arch not in ACTIVATIONS:
            raise HubError(f"circuit-tracer has no {cfg.arch} activation; it takes {sorted(ACTIVATIONS)} (export a "
                           "BatchTopK transcoder with training.export(), a JumpReLU, first)")
        if cfg.output_dim != cfg.d_in:
            raise HubError(f"circuit-tracer's transcoders read and write d_model; this one reads {cfg.d_in} and "
                           f"writes {cfg.output_dim}")
        layer, input_hook = _split(cfg.hook_name, "input")
        out_layer, output_hook = _split(cfg.target_hook, "target")
        if out_layer != layer:
            raise HubError(f"circuit-tracer's per-layer transcoders write their own layer; {cfg.hook_name} -> "
                           f"{cfg.target_hook} crosses layers")
        if layer in files:
            raise HubError(f"two transcoders for layer {layer}")
        hooks.add((input_hook, output_hook))
        kinds.add((cfg.arch, cfg.k))
        files[layer] = _tensors(sae)
    if len(hooks) != 1 or len(kinds) != 1:
        raise HubError(f"circuit-tracer's config holds one input hook, one output hook and one activation for every "
                       f"layer; these transcoders have hooks {sorted(hooks)} and activations {sorted(kinds, key=str)}")
    missing = sorted(set(range(max(files) + 1)) - set(files))
    if missing and not partial:
        raise HubError(f"circuit-tracer's loader wants a transcoder for every layer from 0 up; layers {missing} "
                       "have none (partial=True writes the files anyway, each loadable alone)")
    (input_hook, output_hook), (arch, k) = hooks.pop(), kinds.pop()
    config: dict[str, Any] = {"model_kind": "transcoder_set",
                              "model_name": saelens_model_name(transcoders[0].cfg.model_name),
                              "feature_input_hook": input_hook, "feature_output_hook": output_hook}
    if ACTIVATIONS[arch] is not None:
        config["activation"] = ACTIVATIONS[arch]
    if arch == "topk":
        config["k"] = k
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for layer, tensors in sorted(files.items()):
        save_file(tensors, str(folder / layer_file(layer)))
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _tensors(sae: SAE) -> dict[str, torch.Tensor]:
    """One transcoder's circuit-tracer tensors, on raw activations (input scale folded in)."""
    cfg = sae.cfg
    raw = sae.fold_input_scale() if cfg.input_scale != 1 or cfg.output_scale != 1 else sae
    t = {"W_enc": raw.W_enc.detach().T, "W_dec": raw.W_dec.detach(), "b_enc": raw.b_enc.detach(),
         "b_dec": raw.b_dec.detach()}
    if cfg.skip:
        t["W_skip"] = raw.W_skip.detach().T
    if cfg.arch == "jumprelu":  # float64, so that log(threshold) on load gives back log_threshold exactly
        t["activation_function.threshold"] = raw.log_threshold.detach().to(torch.float64).exp()
    return {name: tensor.to("cpu").contiguous() for name, tensor in t.items()}


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise HubError(f"{folder} has no {CONFIG_FILE}; expected a circuit-tracer transcoder folder")
    text = path.read_text()
    try:
        config = json.loads(text)
    except json.JSONDecodeError:
        import yaml

        config = yaml.safe_load(text)
    if not isinstance(config, dict) or config.get("model_kind") != "transcoder_set":
        raise HubError(f"{path}: expected model_kind: transcoder_set (per-layer transcoders)")
    for key in ("feature_input_hook", "feature_output_hook"):
        if not isinstance(config.get(key), str) or not config[key]:
            raise HubError(f"{path}: {key} must name a hook inside a block")
    return config


def load_circuit_tracer(folder: str | Path, *, device=None) -> dict[int, SAE]:
    """The layer_{L}.safetensors files of a circuit-tracer transcoder folder as saelab transcoders, by layer."""
    folder = Path(folder)
    config = _read_config(folder)
    found = sorted(folder.glob("layer_*.safetensors"))
    if not found:
        raise HubError(f"{folder} has no layer_*.safetensors files")
    out = {}
    for path in found:
        layer = int(re.fullmatch(r"layer_(\d+)\.safetensors", path.name).group(1))
        t = dict(load_tensors(path))
        width, d_model = t["W_enc"].shape
        arch = "jumprelu" if "activation_function.threshold" in t else config.get("activation") or "relu"
        if arch not in ("topk", "relu", "jumprelu"):
            raise HubError(f"{folder / CONFIG_FILE}: activation {arch!r} is not one saelab reads (topk, relu)")
        weights = {"W_enc": t["W_enc"].T, "W_dec": t["W_dec"], "b_enc": t["b_enc"], "b_dec": t["b_dec"]}
        if "W_skip" in t:
            weights["W_skip"] = t["W_skip"].T
        if arch == "jumprelu":
            weights["threshold"] = t["activation_function.threshold"]
        cfg = config_from(dict(arch=arch, d_in=d_model, width=width, k=config.get("k") if arch == "topk" else None,
                               dtype="float32", model_name=config.get("model_name") or "",
                               hook_name=f"blocks.{layer}.{config['feature_input_hook']}",
                               target_hook=f"blocks.{layer}.{config['feature_output_hook']}",
                               skip="W_skip" in t), str(path))
        out[layer] = build_sae(cfg, weights, source=str(path), device=device)
    return out


__all__ = ["export_circuit_tracer", "load_circuit_tracer"]
