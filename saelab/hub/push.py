"""Publish SAEs to the Hugging Face Hub: one subfolder per SAE, a model card at the root.

    push_to_hub([sae_a, sae_b], "me/smollm2-135m-saes")                  # subfolders named after the hooks
    push_to_hub({"l15/topk": "runs/sae-topk"}, "me/repo", dry_run="out")  # explicit names; write the tree, upload nothing

Subfolders: the hook name (`blocks.15.hook_resid_post/`), or `<hook>/<arch>-<width>-k<k>/` when several SAEs share
a hook. SAEs are saved with save_sae (input scale folded); folders in any known format are converted to the saelab
format (a saelab folder is copied as is, with its metrics.json and density plot, also from an eval/ subfolder). A run
folder (saelab.train's out/, holding <hook>/<arch>-<width>[-k<k>]/ SAE folders) pushes every SAE in it.
The token goes to huggingface_hub only: it is never logged, nor written into the card or any cfg.json.
"""
from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from huggingface_hub import HfApi

from saelab.sae import SAE

from .card import CardEntry, build_model_card
from .common import (CFG_FILE, DENSITY_PLOTS, GEMMASCOPE_FILES, METRICS_FILE, SPARSITY_FILE, WEIGHTS_FILE, HubError,
                     PathLike, config_from, read_json)
from .folder import detect_format, folded_input_scale, load_sae, log10_densities, read_metrics, save_sae

README = "README.md"


def _items(saes_or_folders: Any) -> list[tuple[str | None, SAE | Path]]:
    def one(item) -> SAE | Path:
        if isinstance(getattr(item, "sae", None), SAE):  # saelab.train's TrainedSAE
            item = item.sae
        if isinstance(item, SAE):
            return item
        if isinstance(item, (str, Path)):
            return Path(item)
        raise HubError(f"push_to_hub takes SAEs or SAE folders, got {type(item).__name__}")

    if isinstance(saes_or_folders, dict):
        named = [(str(name), one(item)) for name, item in saes_or_folders.items()]
    elif isinstance(saes_or_folders, (list, tuple)):
        named = [(None, one(item)) for item in saes_or_folders]
    else:
        named = [(None, one(saes_or_folders))]
    out: list[tuple[str | None, SAE | Path]] = []
    for name, item in named:
        found = sae_folders(item) if isinstance(item, Path) else []
        if len(found) > 1 or (found and found[0] != item):  # a run folder: one entry per SAE folder inside
            for sub in found:
                rel = sub.relative_to(item).as_posix()
                out.append((f"{name}/{rel}" if name else rel, sub))
        else:
            out.append((name, item))
    return out


def _is_sae_folder(folder: Path) -> bool:
    return (folder / CFG_FILE).is_file() or any((folder / n).is_file() for n in GEMMASCOPE_FILES)


def sae_folders(root: Path, depth: int = 4) -> list[Path]:
    """SAE folders at or below `root` (saelab.train writes <out>/<hook>/<arch>-<width>[-k<k>]/); [] if none."""
    if not root.is_dir():
        return []
    if _is_sae_folder(root):
        return [root]
    if depth == 0:
        return []
    return [f for child in sorted(p for p in root.iterdir() if p.is_dir()) for f in sae_folders(child, depth - 1)]


def _check_name(name: str) -> str:
    parts = PurePosixPath(name.strip("/")).parts
    if not parts or any(p in (".", "..") or "\\" in p for p in parts) or name.startswith("/"):
        raise HubError(f"subfolder name {name!r} must be a relative path like 'blocks.15.hook_resid_post'")
    return "/".join(parts)


def subfolder_names(cfgs: list, explicit: list[str | None]) -> list[str]:
    """Hook names as subfolders; <hook>/<arch>-<width>[-k<k>] where hooks repeat; -2, -3 ... where still equal."""
    hooks = [c.hook_name or "" for c in cfgs]
    per_hook = Counter(h for h, e in zip(hooks, explicit) if e is None)
    names = []
    for cfg, hook, name in zip(cfgs, hooks, explicit):
        if name is not None:
            names.append(_check_name(name))
            continue
        tail = f"{cfg.arch}-{cfg.width}" + (f"-k{cfg.k}" if cfg.k is not None else "")
        if not hook:
            names.append(tail)
        else:
            names.append(hook if per_hook[hook] == 1 else f"{hook}/{tail}")
    seen: Counter = Counter()
    unique = []
    for name in names:
        seen[name] += 1
        unique.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    if len(set(unique)) != len(unique):
        raise HubError(f"subfolder names collide: {unique}")
    for a in unique:  # one SAE's folder may not hold another's
        for b in unique:
            if a != b and b.startswith(a + "/"):
                raise HubError(f"subfolder {b!r} would sit inside SAE folder {a!r}; name them apart")
    return unique


def _find(folder: Path, names: Iterable[str]) -> Path | None:
    for base in (folder, folder / "eval"):
        for name in names:
            if (base / name).is_file():
                return base / name
    return None


def _stage_folder(src: Path, dst: Path, fmt: str, sae: SAE | None) -> None:
    """Copy (saelab) or convert (other formats: `sae` is the loaded SAE) an SAE folder into dst, with its metrics
    and density plot."""
    if fmt == "saelab":
        load_sae(src, format="saelab")  # refuse to publish a folder that does not load
        dst.mkdir(parents=True, exist_ok=True)
        for name in (CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE):
            if (src / name).is_file():
                shutil.copy2(src / name, dst / name)
    else:
        save_sae(sae if sae is not None else load_sae(src, format=fmt), dst)
        if (src / SPARSITY_FILE).is_file():
            shutil.copy2(src / SPARSITY_FILE, dst / SPARSITY_FILE)
    metrics = _find(src, [METRICS_FILE])
    if metrics is not None:
        shutil.copy2(metrics, dst / METRICS_FILE)
    plot = _find(src, DENSITY_PLOTS)
    if plot is not None:
        shutil.copy2(plot, dst / plot.name)
    if not (dst / SPARSITY_FILE).is_file():
        _sparsity_from_counts(src, dst)


def _sparsity_from_counts(src: Path, dst: Path) -> None:
    """sparsity.safetensors from saelab.eval's firing_counts.safetensors and metrics.json n_tokens, if both exist."""
    counts_file = _find(src, ["firing_counts.safetensors"])
    metrics = read_metrics(src) or {}
    n = metrics.get("n_tokens")
    if counts_file is None or not isinstance(n, int) or n <= 0:
        return
    from safetensors.torch import load_file, save_file

    counts = load_file(str(counts_file)).get("firing_counts")
    if counts is None:
        return
    cfg = read_json(dst / CFG_FILE, "SAE config")
    try:
        save_file({"sparsity": log10_densities(counts.double() / n, int(cfg["d_sae"]))}, str(dst / SPARSITY_FILE))
    except HubError:
        pass


def stage(saes_or_folders: Any, out: Path, repo_id: str, *, license: str | None = None) -> list[CardEntry]:
    """Write the repo tree (subfolders + README.md) into `out`; returns the card entries."""
    items = _items(saes_or_folders)
    if not items:
        raise HubError("push_to_hub got no SAEs")
    cfgs, formats, loaded = [], [], []
    for _, item in items:
        if isinstance(item, SAE):
            cfgs.append(item.cfg)
            formats.append(None)
            loaded.append(item)
            continue
        fmt = detect_format(item)
        formats.append(fmt)
        if fmt == "saelab":  # the config is enough to name it; the weights are checked when staged
            block = read_json(item / CFG_FILE, "SAE config")["saelab"]
            cfgs.append(config_from(block.get("config") or {}, str(item / CFG_FILE)))
            loaded.append(None)
        else:
            sae = load_sae(item, format=fmt)
            cfgs.append(sae.cfg)
            loaded.append(sae)
    names = subfolder_names(cfgs, [name for name, _ in items])
    entries = []
    for name, (_, item), fmt, sae in zip(names, items, formats, loaded):
        dst = out / name
        if isinstance(item, SAE):
            save_sae(item, dst)
        else:
            _stage_folder(item, dst, fmt, sae)
        block = read_json(dst / CFG_FILE, "SAE config").get("saelab") or {}
        cfg = config_from(block.get("config") or {}, str(dst / CFG_FILE))
        plot = next((f"{name}/{p}" for p in DENSITY_PLOTS if (dst / p).is_file()), None)
        entries.append(CardEntry(subfolder=name, cfg=cfg, metrics=read_metrics(dst) or {}, density_plot=plot,
                                 folded_input_scale=folded_input_scale(dst)))
    (out / README).write_text(build_model_card(entries, repo_id, license=license))
    return entries


def push_to_hub(saes_or_folders: Any, repo_id: str, *, private: bool = False, token: str | None = None,
                dry_run: PathLike | bool | None = None, commit_message: str | None = None,
                license: str | None = None) -> Path | str:
    """Upload SAEs (saelab SAE objects, SAE folders, a list of them, or {subfolder: SAE or folder}) to `repo_id`.

    dry_run=<folder>: write exactly the tree that would be uploaded into that (new or empty) folder, upload nothing,
    return the folder (dry_run=True: a new temporary folder). Otherwise create the repo if needed
    (HfApi.create_repo(exist_ok=True)) and upload the tree in one commit; returns the commit URL.
    """
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise HubError(f"repo_id must look like 'user/name', got {repo_id!r}")
    if dry_run is not None and dry_run is not False:  # "" is not "no dry run": it names the current folder
        out = Path(tempfile.mkdtemp(prefix="saelab-push-")) if dry_run is True else Path(dry_run)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise HubError(f"dry_run folder {out} must be new or empty, so that it holds exactly the upload")
        out.mkdir(parents=True, exist_ok=True)
        stage(saes_or_folders, out, repo_id, license=license)
        return out

    from huggingface_hub.utils import HfHubHTTPError

    with tempfile.TemporaryDirectory(prefix="saelab-push-") as tmp:
        out = Path(tmp)
        entries = stage(saes_or_folders, out, repo_id, license=license)
        message = commit_message or f"Upload {len(entries)} SAE{'s' if len(entries) != 1 else ''} with saelab"
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            info = api.upload_folder(repo_id=repo_id, folder_path=str(out), commit_message=message,
                                     repo_type="model")
        except HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            raise HubError(f"the Hub refused the upload to {repo_id!r} (HTTP {status}): check that the token has "
                           f"write access to it") from None
        except OSError as e:
            raise HubError(f"could not reach the Hub to upload {repo_id!r}: {type(e).__name__}") from None
    return str(getattr(info, "commit_url", None) or info)
