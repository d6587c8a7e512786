"""The saelab folder format (SAELens's layout plus a `saelab` block in cfg.json) and loading any known format.

    <folder>/cfg.json                  SAELens keys (architecture, d_in, d_sae, dtype, hook_name, k, ...)
                                       + "saelab": {format_version, saelab_version, arch, config, folded_input_scale}
    <folder>/sae_weights.safetensors   W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec (+ threshold)
                                       a transcoder's: W_dec [d_sae, d_out], b_dec [d_out] (+ W_skip [d_in, d_out])
    <folder>/sparsity.safetensors      {"sparsity": log10 feature densities [d_sae]}   (when given)
    <folder>/metrics.json              evaluation metrics                               (when given)

The weights saved are those of `sae.fold_input_scale()`: they read raw activations, so no normalisation is needed at
load time (cfg.json records the folded scale and `normalize_activations: "none"`). See docs/hub-format.md.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.files import LOCK_FILE
from saelab.sae import SAE, SAEConfig, sae_class
from saelab.sae.config import DTYPES

from .common import (CFG_FILE, DENSITY_PLOTS, FIRING_COUNTS_FILE, GEMMASCOPE_FILES, METRICS_FILE,
                     SPARSIFY_WEIGHTS_FILE, SPARSITY_FILE, WEIGHTS_FILE, HubError, PathLike, build_sae, config_from,
                     load_tensors, pickle_files, read_json, refuse_pickle, saelab_version, weights_file, write_json)
from .saelens import load_saelens, saelens_cfg

FORMAT_VERSION = 1
FORMATS = ("saelab", "saelens", "sparsify", "gemmascope")
SAVED_FILES = (CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE, METRICS_FILE, *DENSITY_PLOTS, FIRING_COUNTS_FILE)
"""What save_sae writes into a folder: a new save replaces or removes all of them (cfg.json first)."""
SAVING = ".saelab-saving"
"""Present while save_sae writes a folder, removed once cfg.json is written: a save cut short leaves it, so the next
save knows the files it finds there are a saelab SAE's to replace."""


# ---------------------------------------------------------------------------------------------------- save
def save_sae(sae: SAE, folder: PathLike, *, densities: Tensor | None = None, metrics: Any = None,
             metadata: dict[str, Any] | None = None) -> Path:
    """Write `sae` (input scale folded in) as a saelab folder that SAELens can also load; returns the folder.

    densities: per-latent firing frequencies in [0, 1] (stored as log10(d + 1e-10), like SAELens), or log10
        densities already (recognised by a negative entry).
    metrics: a dict written to metrics.json, or an object with `save(folder)` (saelab.evals.core's EvalResult, which
        writes metrics.json and the density plot).
    metadata: SAELens run keys to record (dataset_path, context_size, prepend_bos, hook_head_index, ...; training
        gives saelab.hub.saelens.source_metadata of its activations). model_name is written as the Hugging Face
        model a SAELens user loads (saelens_model_name); the saelab block keeps saelab's own name.
    """
    if not isinstance(sae, SAE):
        raise HubError(f"save_sae expects a saelab SAE, got {type(sae).__name__}")
    folder = Path(folder)
    check_sae_folder(folder)
    scale, target_scale = float(sae.cfg.input_scale), float(sae.cfg.output_scale)
    raw = sae.fold_input_scale() if scale != 1.0 or target_scale != 1.0 else sae
    cfg = raw.cfg
    if not type(raw).per_token:
        warnings.warn(f"saving a {cfg.arch} SAE as is: its codes depend on the whole batch, and SAELens has no such "
                      f"inference SAE. For a per-token SAE that SAELens loads, save training.export() (JumpReLU).",
                      stacklevel=2)

    cfg_text = _cfg_text(cfg, scale, metadata, target_scale)  # everything is checked before anything is written
    if densities is None and metrics is not None:
        densities = _densities_from(metrics)
    sparsity = log10_densities(densities, cfg.width) if densities is not None else None
    tensors = {name: getattr(raw, name).detach().to("cpu").contiguous()
               for name in ("W_enc", "b_enc", "W_dec", "b_dec", *(("W_skip",) if cfg.skip else ()))}
    if hasattr(raw, "log_threshold"):
        # float64, so that log(threshold) on load gives back log_threshold exactly in the SAE's dtype
        tensors["threshold"] = raw.log_threshold.detach().to("cpu", torch.float64).exp().contiguous()
    _write_folder(folder, tensors, sparsity, metrics, cfg_text)
    return folder


def _cfg_text(cfg: SAEConfig, scale: float, metadata: dict[str, Any] | None, target_scale: float = 1.0) -> str:
    """cfg.json of a saved SAE: SAELens's keys and the saelab block (the flat SAEConfig), as JSON text."""
    for key in ("model_name", "hook_name"):  # cfg.json must say one thing, or SAELens and saelab read different SAEs
        if metadata and key in metadata and metadata[key] != getattr(cfg, key):
            raise HubError(f"metadata[{key!r}]={metadata[key]!r} disagrees with sae.cfg.{key}={getattr(cfg, key)!r}; "
                           f"set sae.cfg.{key} instead (and leave it out of metadata)")
    out = saelens_cfg(cfg, metadata)
    out["saelab"] = {
        "format_version": FORMAT_VERSION,
        "saelab_version": saelab_version(),
        "arch": cfg.arch,
        "config": cfg.to_dict(),
        "folded_input_scale": scale,
        **({"folded_target_scale": target_scale} if cfg.is_transcoder else {}),
        "weights_read": "raw activations: the input scale is folded into the weights, no normalisation at load",
        "training_tokens": cfg.training_tokens,
    }
    try:
        return json.dumps(out, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise HubError(f"metadata must be JSON-serialisable (plain numbers, strings, lists, dicts): {e}") from None


def _write_folder(folder: Path, tensors: dict[str, Tensor], sparsity: Tensor | None, metrics: Any,
                  cfg_text: str) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SAVING).touch()
        # cfg.json goes last, and an older one first: a save cut short (a full disk) leaves a folder that does not
        # load ("no cfg.json"), never old cfg.json + new weights. What an earlier save wrote about other weights
        # must not survive beside these ones (push would upload it), and no file is written through a link.
        for name in SAVED_FILES:
            (folder / name).unlink(missing_ok=True)
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        if sparsity is not None:
            save_file({"sparsity": sparsity}, str(folder / SPARSITY_FILE))
        if metrics is not None:
            write_metrics(folder, metrics)
        (folder / CFG_FILE).write_text(cfg_text)
        (folder / SAVING).unlink()
    except (OSError, SafetensorError) as e:
        raise HubError(f"could not write the SAE to {folder}: {write_reason(e)}; free some space or choose another "
                       f"folder, then save again (the folder holds no complete SAE until cfg.json is written)"
                       ) from None


def save_metrics(folder: PathLike, metrics: Any, width: int) -> None:
    """Add evaluation metrics to the SAE saved in `folder`: metrics.json (with the density plot saelab.evals.core's
    EvalResult writes) and the sparsity.safetensors its firing counts give."""
    folder = Path(folder)
    densities = _densities_from(metrics)
    if densities is not None:
        from safetensors.torch import save_file

        save_file({"sparsity": log10_densities(densities, width)}, str(folder / SPARSITY_FILE))
    write_metrics(folder, metrics)


def check_sae_folder(folder: PathLike) -> None:
    """Refuse a folder save_sae may not write: one holding files but no SAE saelab wrote (a user's metrics.json,
    another library's SAE), since a save replaces and removes the files of its format there. Cheap: call it before
    the work whose result goes there."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise HubError(f"cannot save an SAE into {folder}: it is a file, expected a folder")
    names = sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE) if folder.is_dir() else []
    if not names or SAVING in names or _holds_saelab_sae(folder):
        return
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    raise HubError(f"{folder} holds files but no SAE saelab wrote ({shown}); saving there would replace or delete "
                   "them, so nothing was changed. Choose another folder, or remove them")


def _holds_saelab_sae(folder: Path) -> bool:
    """Whether the folder's cfg.json is a saelab SAE's: a regular file holding a saelab block."""
    if (folder / CFG_FILE).is_symlink():
        return False
    try:
        return isinstance(read_json(folder / CFG_FILE, "SAE config").get("saelab"), dict)
    except HubError:
        return False


def write_reason(error: BaseException) -> str:
    """A short reason for a failed write: 'No space left on device (path)' rather than a traceback."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror + (f" ({error.filename})" if error.filename else "")
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def log10_densities(densities, width: int) -> Tensor:
    d = torch.as_tensor(densities, dtype=torch.float64).detach().cpu().reshape(-1)
    if d.numel() != width:
        raise HubError(f"densities must have one entry per latent (width={width}), got {d.numel()}")
    if torch.isnan(d).any():
        raise HubError("densities hold NaN values")
    if (d < 0).any():  # already log10
        return d.to(torch.float32).contiguous()
    if (d > 1).any():
        raise HubError("densities must be firing frequencies in [0, 1] (or log10 frequencies, all <= 0)")
    return (d + 1e-10).log10().to(torch.float32).contiguous()


def write_metrics(folder: Path, metrics: Any) -> None:
    if hasattr(metrics, "save") and callable(metrics.save):
        metrics.save(folder)
        return
    if hasattr(metrics, "to_dict"):
        metrics = metrics.to_dict()
    if not isinstance(metrics, dict):
        raise HubError(f"metrics must be a dict (or saelab.evals.core's EvalResult), got {type(metrics).__name__}")
    try:
        write_json(folder / METRICS_FILE, _json_safe(metrics))
    except (TypeError, ValueError) as e:
        raise HubError(f"metrics are not JSON-serialisable: {e}") from None


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Tensor) and value.numel() == 1:
        return _json_safe(value.item())
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _densities_from(metrics: Any):
    counts, n = getattr(metrics, "firing_counts", None), getattr(metrics, "n_tokens", 0)
    if counts is not None and n:
        return torch.tensor(counts, dtype=torch.float64) / n
    return None


# ---------------------------------------------------------------------------------------------------- load
def detect_format(path: PathLike, *, allow_pickle: bool = False) -> str:
    """'saelab', 'saelens', 'sparsify' or 'gemmascope' for a folder (or a Gemma Scope params file)."""
    path = Path(path)
    if not path.exists():
        raise HubError(f"{path} does not exist; expected an SAE folder")
    if path.is_file():
        if path.name in GEMMASCOPE_FILES or path.suffix == ".npz":
            return "gemmascope"
        raise HubError(f"{path} is a file; expected an SAE folder (or a Gemma Scope params.npz / params.safetensors)")
    cfg_path = path / CFG_FILE
    if cfg_path.is_file():
        cfg = read_json(cfg_path, "SAE config")
        if isinstance(cfg.get("saelab"), dict):
            return "saelab"
        if "d_sae" in cfg or (path / WEIGHTS_FILE).is_file():
            return "saelens"
        if (path / SPARSIFY_WEIGHTS_FILE).is_file() or "num_latents" in cfg or "expansion_factor" in cfg:
            return "sparsify"
        raise HubError(f"{cfg_path} is neither a saelab/SAELens config (it has no d_sae) nor a sparsify one (no "
                       f"num_latents / expansion_factor)")
    if any((path / name).is_file() for name in GEMMASCOPE_FILES):
        return "gemmascope"
    pickles = pickle_files(path)
    if pickles:
        if not allow_pickle:
            refuse_pickle(pickles[0])
        return "gemmascope"  # a bare state dict: W_enc, W_dec, b_enc, b_dec, threshold
    nested = sorted(p.name for p in path.iterdir() if p.is_dir() and _looks_like_sae(p))
    if nested:
        raise HubError(f"{path} holds several SAEs in subfolders {nested[:10]}; load one of them "
                       f"(from_pretrained: pass subfolder=...)")
    raise HubError(f"{path} is not an SAE folder: expected cfg.json + {WEIGHTS_FILE} (saelab / SAELens), "
                   f"cfg.json + {SPARSIFY_WEIGHTS_FILE} (sparsify) or {' / '.join(GEMMASCOPE_FILES)} (Gemma Scope)")


def _looks_like_sae(folder: Path, depth: int = 2) -> bool:
    names = {p.name for p in folder.iterdir()}
    if names & {CFG_FILE, *GEMMASCOPE_FILES}:
        return True
    return depth > 0 and any(_looks_like_sae(c, depth - 1) for c in folder.iterdir() if c.is_dir())


def load_sae(path: PathLike, *, allow_pickle: bool = False, device=None, format: str | None = None,
             repo_id: str = "") -> SAE:
    """Load an SAE from a folder in any known format (detected unless `format` is given) as a saelab SAE.

    Pickle weights (.pt, .bin, ...) are refused unless allow_pickle=True, and then read with weights_only=True.
    `repo_id` only helps name Gemma Scope SAEs (their files do not say which model or hook they belong to).
    """
    path = Path(path)
    fmt = format or detect_format(path, allow_pickle=allow_pickle)
    if fmt == "saelab":
        return load_saelab(path, allow_pickle=allow_pickle, device=device)
    if fmt == "saelens":
        from .saelens_transcoder import is_saelens_transcoder, load_saelens_transcoder

        if is_saelens_transcoder(read_json(path / CFG_FILE, "SAELens config")):
            return load_saelens_transcoder(path, allow_pickle=allow_pickle, device=device)
        return load_saelens(path, allow_pickle=allow_pickle, device=device)
    if fmt == "sparsify":
        from .sparsify import load_sparsify

        return load_sparsify(path, allow_pickle=allow_pickle, device=device)
    if fmt == "gemmascope":
        from .gemmascope import load_gemmascope

        if path.is_dir() and not any((path / n).is_file() for n in GEMMASCOPE_FILES):
            pickles = pickle_files(path)
            if len(pickles) != 1:
                raise HubError(f"{path}: expected one weights file, found {[p.name for p in pickles]}")
            path = pickles[0]
        return load_gemmascope(path, repo_id=repo_id, device=device, allow_pickle=allow_pickle)
    raise HubError(f"unknown format {fmt!r}; expected one of {list(FORMATS)}")


def load_saelab(folder: Path, *, allow_pickle: bool = False, device=None) -> SAE:
    folder = Path(folder)
    cfg, _ = read_saelab_cfg(folder)
    path = weights_file(folder, WEIGHTS_FILE, allow_pickle=allow_pickle)
    tensors = load_tensors(path, allow_pickle=allow_pickle)
    sae = build_sae(cfg, tensors, source=str(path), device=device)
    # the architecture's own parameters, under their file names (a JumpReLU's log_threshold is stored as threshold)
    expected = {"threshold" if name == "log_threshold" else name for name in sae.state_dict()}
    extra = sorted(set(tensors) - expected)
    if extra:
        raise HubError(f"{path}: unexpected tensors {extra} for arch {cfg.arch!r}; expected {sorted(expected)}")
    return sae


# SAELens keys of a saelab cfg.json that decide what SAELens computes, checked against the 'saelab' block
CHECKED_KEYS = ("architecture", "d_in", "d_sae", "d_out", "hook_name_out", "dtype", "k", "matryoshka_widths",
                "apply_b_dec_to_input",
                "normalize_activations", "rescale_acts_by_decoder_norm", "activation_fn", "activation_fn_str",
                "activation_fn_kwargs", "model_name", "hook_name")
# an absent key means: SAELens's default (below), or nothing for SAELens 6 (the pre-6.0 activation_fn* keys)
ABSENT_DEFAULTS = {"apply_b_dec_to_input": True, "rescale_acts_by_decoder_norm": False, "normalize_activations": "none"}
PRE6_KEYS = ("activation_fn", "activation_fn_str", "activation_fn_kwargs")
_MISSING = object()


def _same(got: Any, want: Any) -> bool:
    """`got` (from cfg.json) says the same as `want` (from the saelab config), types included: "32" is not 32."""
    if want is None:  # saelab writes no such key for this SAE: absent, null or false say the same
        return got is _MISSING or got is None or got is False
    if isinstance(want, str) and isinstance(got, str) and want in DTYPES:
        return got.removeprefix("torch.") == want
    return type(got) is type(want) and got == want


def read_saelab_cfg(folder: PathLike) -> tuple[SAEConfig, dict[str, Any]]:
    """(SAEConfig, 'saelab' block) of a saelab folder: the one place its cfg.json is interpreted.

    The config must be valid (types and ranges, a known architecture) and the SAELens keys next to it (which SAELens
    reads) must say the same: a folder that SAELens and saelab would read as different SAEs is refused, naming each
    disagreeing key and both values.
    """
    path = Path(folder) / CFG_FILE
    cfg_json = read_json(path, "saelab config")
    block = cfg_json.get("saelab")
    if not isinstance(block, dict) or not isinstance(block.get("config"), dict):
        raise HubError(f"{path}: expected a 'saelab' block with the SAE 'config'")
    version = block.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise HubError(f"{path}: saelab format_version {version!r} is newer than this saelab reads "
                       f"({FORMAT_VERSION}); upgrade saelab")
    cfg = config_from(block["config"], str(path))
    try:
        sae_class(cfg.arch)
    except ValueError as e:
        raise HubError(f"{path}: {e}") from None
    scale = block.get("folded_input_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise HubError(f"{path}: saelab.folded_input_scale must be a finite number > 0, got {scale!r}; fix cfg.json")
    if cfg.input_scale != 1.0 or cfg.target_scale is not None:  # written by hand or by another tool: the weights
        # are assumed folded, as saved
        warnings.warn(f"{path}: config input_scale={cfg.input_scale} (target_scale={cfg.target_scale}) but saelab "
                      f"folders hold folded weights; setting it to 1", stacklevel=3)
        cfg = dataclasses.replace(cfg, input_scale=1.0, target_scale=None)

    wrong = []
    if block.get("arch", cfg.arch) != cfg.arch:
        wrong.append(f"saelab.arch={block['arch']!r} vs saelab.config.arch={cfg.arch!r}")
    expected = saelens_cfg(cfg)
    meta = cfg_json.get("metadata") if isinstance(cfg_json.get("metadata"), dict) else {}
    for key in CHECKED_KEYS:
        want = expected.get(key)
        places = [("", cfg_json.get(key, _MISSING))]
        if key in meta:
            places.append(("metadata.", meta[key]))
        for where, got in places:
            absent_ok = key in PRE6_KEYS or (key in ABSENT_DEFAULTS and ABSENT_DEFAULTS[key] == want)
            legacy_ok = key == "model_name" and _same(got, cfg.model_name)  # saved before the Hub id was written
            if not _same(got, want) and not (got is _MISSING and absent_ok) and not legacy_ok:
                shown = "missing" if got is _MISSING else repr(got)
                wrong.append(f"{where}{key}={shown} but the saelab config gives {want!r}")
    if wrong:
        raise HubError(f"{path}: the SAELens keys disagree with the 'saelab' block, so SAELens and saelab would read "
                       f"different SAEs: {'; '.join(wrong)}. Save the SAE again with saelab, or edit cfg.json so that "
                       f"both agree")
    return cfg, block


def read_metrics(folder: PathLike) -> dict[str, Any] | None:
    """metrics.json of an SAE folder (or of its eval/ subfolder), or None."""
    folder = Path(folder)
    for path in (folder / METRICS_FILE, folder / "eval" / METRICS_FILE):
        if path.is_file():
            return read_json(path, "metrics")
    return None


def read_run_keys(folder: PathLike) -> dict[str, Any]:
    """The SAELens run keys of a saelab folder's cfg.json (model_name, dataset_path, context_size, ...): its
    `metadata` block, as SAELens 6 reads them."""
    meta = read_json(Path(folder) / CFG_FILE, "SAE config").get("metadata")
    return dict(meta) if isinstance(meta, dict) else {}


def folded_input_scale(folder: PathLike) -> float:
    """The input scale that was folded into a saelab folder's weights (1.0 when none was)."""
    return float(read_saelab_cfg(folder)[1].get("folded_input_scale", 1.0))


__all__ = ["save_sae", "load_sae", "detect_format", "read_metrics", "read_run_keys", "load_saelab",
           "read_saelab_cfg", "log10_densities", "folded_input_scale", "FORMATS"]
