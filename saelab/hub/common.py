"""Pieces every format shares: the error type, file names, safe weight reading, and building an SAE from tensors.

Weights are read from safetensors or .npz (numpy, with allow_pickle=False). Pickle-based files (.pt, .pth, .bin,
.ckpt, .pkl) are refused unless the caller passes allow_pickle=True, and even then they are read with
torch.load(..., weights_only=True), which refuses anything but tensors and plain containers.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from saelab.errors import SaelabError
from saelab.sae import SAE, SAEConfig, sae_class
from saelab.sae.config import DTYPES


class HubError(SaelabError):
    """A folder, file or Hub repo that cannot be saved, loaded or pushed; the message says what was expected."""


# -- file names (SAELens's for the saelab format, which is a superset of it)
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
METRICS_FILE = "metrics.json"
DENSITY_PLOTS = ("density.png", "feature_density.png")
SPARSIFY_WEIGHTS_FILE = "sae.safetensors"
GEMMASCOPE_FILES = ("params.npz", "params.safetensors")
FIRING_COUNTS_FILE = "firing_counts.safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")

PathLike = str | Path


def saelab_version() -> str:
    from saelab.version import __version__

    return __version__


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise HubError(f"{what}: {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HubError(f"{what}: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise HubError(f"{what}: {path} must hold a JSON object, got {type(data).__name__}")
    return data


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")


# ---------------------------------------------------------------------------------------------------- links
def link_error(path: Path) -> HubError:
    return HubError(f"{path} is a symbolic link; saelab does not upload anything through links (it could publish "
                    f"a file from elsewhere, such as a token). Replace the link with the real file or folder it "
                    f"points to, then rerun")


def refuse_links(root: Path, path: Path) -> None:
    """HubError if `path`, or any folder between `root` and it, is a symbolic link. `root` itself may be one: it is
    the path the caller named, and is followed like a command-line argument of cp -H or find -H."""
    current = Path(root)
    for part in Path(path).relative_to(root).parts:
        current = current / part
        if current.is_symlink():
            raise link_error(current)


def copy_regular(src: Path, dst: Path) -> None:
    """Copy the regular file `src` to the new file `dst`, never through a link: `src` is opened with O_NOFOLLOW
    (a link swapped in after any earlier check is refused too) and must be a regular file."""
    try:
        handle = os.open(src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise link_error(src) from None
        raise
    with os.fdopen(handle, "rb") as source:
        if not stat.S_ISREG(os.fstat(source.fileno()).st_mode):
            raise HubError(f"{src} is not a regular file; expected a file saelab wrote")
        with open(dst, "xb") as target:
            shutil.copyfileobj(source, target, 1 << 20)


# ---------------------------------------------------------------------------------------------------- cfg.json values
def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def cfg_int(cfg: Mapping[str, Any], key: str, source: str, *, minimum: int = 1) -> int:
    """cfg[key] as an int >= minimum; a string, float, bool or missing value is refused (never converted)."""
    value = cfg.get(key)
    if not is_int(value) or value < minimum:
        raise HubError(f"{source}: '{key}' must be an integer >= {minimum}, got {value!r} "
                       f"({type(value).__name__}); fix cfg.json")
    return value


def cfg_bool(cfg: Mapping[str, Any], key: str, source: str, default: bool) -> bool:
    """cfg[key] as a JSON true/false (missing or null: `default`); "false" as a string is refused, as it would
    otherwise read as true."""
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise HubError(f"{source}: '{key}' must be true or false, got {value!r} ({type(value).__name__}); "
                       f"fix cfg.json")
    return value


def cfg_str(cfg: Mapping[str, Any], key: str, source: str, default: str = "") -> str:
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise HubError(f"{source}: '{key}' must be a string, got {value!r} ({type(value).__name__}); fix cfg.json")
    return value


# ---------------------------------------------------------------------------------------------------- reading tensors
def pickle_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)


def refuse_pickle(path: Path) -> None:
    raise HubError(
        f"{path} is a pickle file, and unpickling can run arbitrary code, so saelab does not load it by default. "
        f"If you trust its source, pass allow_pickle=True (it is then read with torch.load(weights_only=True)); "
        f"better, convert it to safetensors.")


def load_tensors(path: Path, *, allow_pickle: bool = False) -> dict[str, Tensor]:
    """All tensors of a .safetensors, .npz or (with allow_pickle) .pt/.bin/... file, on the CPU; every one floating
    point (see `floating_only`)."""
    return floating_only(_read_tensors(path, allow_pickle), path)


def floating_only(tensors: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Refuse a weights file holding an integer or boolean tensor: cast to float it would load as a plausible SAE
    of truncated weights (mostly zeros) that encodes nothing."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise HubError(f"{path}: tensor {name!r} has dtype {str(tensor.dtype).removeprefix('torch.')}, not a "
                           f"floating-point type; SAE weights are float32, float16, bfloat16 or float64: save them "
                           f"again from the trained SAE")
    return tensors


def _read_tensors(path: Path, allow_pickle: bool) -> dict[str, Tensor]:
    suffix = path.suffix.lower()
    if not path.is_file():
        raise HubError(f"weights file {path} does not exist")
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise HubError(f"{path} is not a readable safetensors file ({e})") from None
    if suffix == ".npz":
        import numpy as np

        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: torch.from_numpy(np.array(data[k])) for k in data.files}
        except (ValueError, OSError) as e:  # object arrays need pickle: refused by allow_pickle=False
            raise HubError(f"{path} is not a plain numpy .npz of arrays ({e})") from None
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            refuse_pickle(path)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses arbitrary objects with an UnpicklingError
            raise HubError(f"{path} could not be read with torch.load(weights_only=True): {e}") from None
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
            raise HubError(f"{path} must hold a dict of tensors (a state dict)")
        return {str(k): v for k, v in obj.items()}
    raise HubError(f"{path}: unknown weights file type {suffix!r}; expected .safetensors or .npz")


def weights_file(folder: Path, preferred: str, *, allow_pickle: bool) -> Path:
    """`folder/preferred` if it exists, else the one pickle file next to it (only with allow_pickle)."""
    path = folder / preferred
    if path.is_file():
        return path
    pickles = pickle_files(folder)
    if pickles and not allow_pickle:
        refuse_pickle(pickles[0])
    if len(pickles) == 1:
        return pickles[0]
    if len(pickles) > 1:
        raise HubError(f"{folder} has no {preferred} and several pickle files {[p.name for p in pickles]}; "
                       f"expected one weights file")
    raise HubError(f"{folder} has no weights file: expected {preferred}")


def require(tensors: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]], source: str,
            why: str) -> None:
    """Every key of `shapes` is in `tensors` with exactly that shape; `why` says where the shapes come from."""
    missing = [k for k in shapes if k not in tensors]
    if missing:
        raise HubError(f"{source} is missing {missing}; expected tensors {sorted(shapes)} ({why}), "
                       f"found {sorted(tensors)}")
    for name, shape in shapes.items():
        got = tuple(tensors[name].shape)
        if got != tuple(shape):
            raise HubError(f"{source}: {name} has shape {list(got)} but {why} gives {list(shape)}; the weights and "
                           f"cfg.json describe different SAEs: save the SAE again, or fix cfg.json")


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise HubError(f"weights have dtype {dtype}; saelab SAEs use one of {sorted(DTYPES)}")


def parse_dtype(value: Any, source: str) -> str:
    """SAELens writes 'float32' or 'torch.float32'; both map to saelab's 'float32'."""
    name = str(value).removeprefix("torch.")
    aliases = {"float": "float32", "half": "float16", "double": "float64", "bf16": "bfloat16", "fp16": "float16",
               "fp32": "float32"}
    name = aliases.get(name, name)
    if name not in DTYPES:
        raise HubError(f"{source}: dtype {value!r} is not one of {sorted(DTYPES)}")
    return name


# ---------------------------------------------------------------------------------------------------- building an SAE
def log_threshold_of(threshold: Tensor) -> Tensor:
    """log of a JumpReLU threshold. A threshold <= 0 gates nothing beyond the ReLU; the smallest positive float
    stands in for it (it differs only for pre-activations in (0, 1e-38])."""
    t = threshold.to(torch.float64)
    tiny = torch.finfo(torch.float32).tiny
    return t.clamp_min(tiny).log()


def build_sae(cfg: SAEConfig, weights: Mapping[str, Tensor], *, source: str, device=None) -> SAE:
    """An SAE of `cfg` holding exactly `weights` (W_enc, b_enc, W_dec, b_dec [+ threshold for jumprelu]).

    Shapes are checked against cfg; tensors are cast to cfg.dtype. The SAE is built on the meta device and the
    tensors assigned, so no random initialisation of a large dictionary is paid for.
    """
    d, w, d_out = cfg.d_in, cfg.width, cfg.output_dim
    shapes = {"W_enc": (d, w), "b_enc": (w,), "W_dec": (w, d_out), "b_dec": (d_out,)}
    if cfg.skip:  # a skip transcoder's linear path
        shapes["W_skip"] = (d, d_out)
    try:
        with torch.device("meta"):
            sae = sae_class(cfg.arch)(cfg)
    except ValueError as e:  # unknown architecture, or one that refuses this config
        raise HubError(f"{source}: {e}") from None
    jump = hasattr(sae, "log_threshold")
    if jump:
        shapes["threshold"] = (w,)
    require(weights, shapes, source, f"d_in={d}, width={w}")
    dtype = cfg.torch_dtype
    state = {k: weights[k].detach().to(dtype=dtype).contiguous() for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if cfg.skip:
        state["W_skip"] = weights["W_skip"].detach().to(dtype=dtype).contiguous()
    for name, t in state.items():
        if not torch.isfinite(t.float()).all():
            raise HubError(f"{source}: {name} holds NaN or infinite values")
    if jump:
        thr = weights["threshold"].detach()
        if torch.isnan(thr.float()).any():
            raise HubError(f"{source}: threshold holds NaN values")
        state["log_threshold"] = log_threshold_of(thr).to(dtype)
    sae.load_state_dict(state, assign=True, strict=True)
    for p in sae.parameters():
        p.requires_grad_(True)
    return sae.to(device or "cpu")


def expect_class(sae: SAE, cls: type) -> SAE:
    """`sae` if it is a `cls` (for TopKSAE.load and the like), else a HubError naming what the folder holds."""
    if not isinstance(sae, cls):
        raise HubError(f"expected a {cls.__name__} but found a {type(sae).__name__} (arch {sae.cfg.arch!r}); "
                       f"use SAE.load / SAE.from_pretrained to accept any architecture")
    return sae


def config_from(values: dict[str, Any], source: str) -> SAEConfig:
    """SAEConfig.from_dict, but keys this saelab does not know (a newer writer) are dropped with a warning."""
    known = set(SAEConfig.accepted_keys())
    unknown = sorted(set(values) - known)
    if unknown:
        warnings.warn(f"{source}: ignoring config keys this saelab version does not know: {unknown}", stacklevel=3)
    try:
        return SAEConfig.from_dict({k: v for k, v in values.items() if k in known})
    except (TypeError, ValueError) as e:
        raise HubError(f"{source}: invalid SAE config ({e})") from None

