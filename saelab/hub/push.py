"""Publish SAEs to the Hugging Face Hub: one subfolder per SAE, a model card at the root.

    push_to_hub([sae_a, sae_b], "me/smollm2-135m-saes")                  # subfolders named after the hooks
    push_to_hub({"l15/topk": "runs/sae-topk"}, "me/repo", dry_run="out")  # explicit names; write the tree, upload nothing

Subfolders: the hook name (`blocks.15.hook_resid_post/`), or `<hook>/<arch>-<width>-k<k>/` when several SAEs share
a hook. SAEs are saved with save_sae (input scale folded); folders in any known format are converted to the saelab
format (a saelab folder is copied as is, with its metrics.json and density plot, also from an eval/ subfolder). A run
folder (saelab.train's out/, holding <hook>/<arch>-<width>[-k<k>]/ SAE folders) pushes every SAE in it.
The token goes to huggingface_hub only: it is never logged, nor written into the card, any cfg.json or any message.

What is uploaded is only what saelab wrote, never through a symbolic link. From an SAE folder only the files of the
saelab format are taken (cfg.json, sae_weights.safetensors, sparsity.safetensors, metrics.json, the density plot);
anything else there is left out, with a warning naming it. A link anywhere below a path you named (a file such as a
metrics.json pointing at ~/.cache/huggingface/token, an eval/ folder, an SAE folder inside a run folder) is refused
with a HubError, not skipped: a skipped link would publish an incomplete SAE behind a warning that scrolls past,
while refusing uploads nothing until the link is replaced by the real file. The paths you name may themselves be
links (runs/latest -> runs/2024-06-01): you chose them, as with cp -H. Files are copied with O_NOFOLLOW, so a link
swapped in after the check is refused too.
"""
from __future__ import annotations

import errno
import re
import shutil
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi

from saelab.evals.saebench import read_outputs
from saelab.files import LOCK_FILE, inside, relative_path_problem, without_local_paths
from saelab.sae import SAE

from .card import CardEntry, build_model_card
from .common import (CFG_FILE, DENSITY_PLOTS, FIRING_COUNTS_FILE, GEMMASCOPE_FILES, METRICS_FILE,
                     SPARSIFY_WEIGHTS_FILE, SPARSITY_FILE, WEIGHTS_FILE, HubError, PathLike, copy_regular, link_error,
                     read_json, refuse_links, write_json)
from .folder import (detect_format, load_sae, log10_densities, read_metrics, read_run_keys, read_saelab_cfg, save_sae,
                     write_reason)
from .saelens import read_log_densities

README = "README.md"
EVAL = "eval"
EVALS = "evals"  # `saelab evals` records (SAEBench layout), uploaded beside the SAE and shown in the card
UPLOADED = (CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE, METRICS_FILE, *DENSITY_PLOTS)  # copied as is (saelab folders)
READ = (FIRING_COUNTS_FILE, SPARSIFY_WEIGHTS_FILE, *GEMMASCOPE_FILES)  # read to convert, never uploaded as is
EVAL_FILES = (METRICS_FILE, *DENSITY_PLOTS, FIRING_COUNTS_FILE)  # what saelab.evals.core writes into <sae>/eval/
QUIET = (LOCK_FILE,)  # written by saelab, neither read nor uploaded nor worth a warning


def _items(saes_or_folders: Any) -> list[tuple[str | None, SAE | Path, Path | None]]:
    """(explicit subfolder or None, SAE or SAE folder, the path the caller named that holds the folder)."""
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
    out: list[tuple[str | None, SAE | Path, Path | None]] = []
    for name, item in named:
        found = sae_folders(item) if isinstance(item, Path) else []
        if len(found) > 1 or (found and found[0] != item):  # a run folder: one entry per SAE folder inside
            for sub in found:
                rel = sub.relative_to(item).as_posix()
                out.append((f"{name}/{rel}" if name else rel, sub, item))
        else:
            out.append((name, item, item if isinstance(item, Path) else None))
    return out


def _is_sae_folder(folder: Path) -> bool:
    return (folder / CFG_FILE).is_file() or any((folder / n).is_file() for n in GEMMASCOPE_FILES)


def sae_folders(root: Path, depth: int = 4) -> list[Path]:
    """SAE folders at or below `root` (saelab.train writes <out>/<hook>/<arch>-<width>[-k<k>]/); [] if none.

    Linked folders below `root` are not followed: one is refused (HubError), as it may hold an SAE meant to be
    pushed. `root` itself may be a link (the caller named it).
    """
    if not root.is_dir():
        return []
    if _is_sae_folder(root):
        return [root]
    if depth == 0:
        return []
    found = []
    for child in sorted(root.iterdir()):
        if child.is_symlink() and child.is_dir():
            raise link_error(child)
        if child.is_dir():
            found += sae_folders(child, depth - 1)
    return found


def _check_name(name: str) -> str:
    """An explicit subfolder name ('l15/topk'), checked as every name that becomes a path is."""
    problem = "is absolute" if name.startswith("/") else relative_path_problem(name.strip("/"))
    if problem:
        raise HubError(f"subfolder name {name!r} {problem}; name it as a relative path like "
                       "'blocks.15.hook_resid_post'")
    return name.strip("/")


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


def _source_files(root: Path, src: Path) -> dict[str, Path]:
    """The files of SAE folder `src` that saelab reads or uploads (name -> path; metrics and plots also from eval/,
    `saelab evals` records from evals/ as "evals/<name>"),
    with no link anywhere from `root` down to them; warns about the files that are left out."""
    refuse_links(root, src)
    files: dict[str, Path] = {}
    left_out = []
    for sub in (EVAL, EVALS):
        if (src / sub).is_symlink():
            raise link_error(src / sub)
    records = sorted(p.name for p in (src / EVALS).glob("*.json")) if (src / EVALS).is_dir() else []
    for base, prefix, known in ((src, "", UPLOADED + READ), (src / EVAL, f"{EVAL}/", EVAL_FILES),
                                (src / EVALS, f"{EVALS}/", records)):
        if not base.is_dir():
            continue
        for path in sorted(base.iterdir()):
            name = prefix + path.name if prefix == f"{EVALS}/" else path.name  # eval/'s files stand in for the SAE's
            if base == src and name in (EVAL, EVALS):
                continue
            if path.name in known:
                if path.is_symlink():
                    raise link_error(path)
                if path.is_file():
                    files.setdefault(name, path)  # the folder's own file wins over eval/'s
                    continue
            if name not in QUIET:
                left_out.append(prefix + path.name)
    if left_out:
        warnings.warn(f"{src}: not uploading {left_out[:20]}{' ...' if len(left_out) > 20 else ''}: only the files "
                      f"of the saelab format are uploaded ({', '.join(UPLOADED)})", stacklevel=2)
    return files


def _stage_folder(src: Path, files: dict[str, Path], dst: Path, fmt: str, sae: SAE | None) -> None:
    """Copy (saelab) or convert (other formats: `sae` is the loaded SAE) an SAE folder into dst, with its metrics
    and density plot; only `files` are read, and each is copied without following links."""
    dst.mkdir(parents=True, exist_ok=True)
    if fmt == "saelab":
        for name in (CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE):
            if name in files:
                copy_regular(files[name], dst / name)
        load_sae(dst, format="saelab")  # refuse to publish a folder that does not load: check the copy itself
    else:
        save_sae(sae if sae is not None else load_sae(src, format=fmt), dst)
        if SPARSITY_FILE in files:
            copy_regular(files[SPARSITY_FILE], dst / SPARSITY_FILE)
    if METRICS_FILE in files:
        copy_regular(files[METRICS_FILE], dst / METRICS_FILE)
    plot = next((name for name in DENSITY_PLOTS if name in files), None)
    if plot is not None:
        copy_regular(files[plot], dst / plot)
    if not (dst / SPARSITY_FILE).is_file():
        _sparsity_from_counts(files, dst)
    for name in sorted(n for n in files if n.startswith(EVALS + "/")):
        (dst / EVALS).mkdir(exist_ok=True)
        copy_regular(files[name], dst / name)


def _sparsity_from_counts(files: dict[str, Path], dst: Path) -> None:
    """sparsity.safetensors from saelab.evals.core's firing_counts.safetensors and metrics.json n_tokens, if both exist."""
    metrics = read_metrics(dst) or {}
    n = metrics.get("n_tokens")
    if FIRING_COUNTS_FILE not in files or not isinstance(n, int) or n <= 0:
        return
    from safetensors.torch import load_file, save_file

    copy_regular(files[FIRING_COUNTS_FILE], dst / FIRING_COUNTS_FILE)  # read a private copy, not through a link
    try:
        counts = load_file(str(dst / FIRING_COUNTS_FILE)).get("firing_counts")
    finally:
        (dst / FIRING_COUNTS_FILE).unlink()
    if counts is None:
        return
    cfg, _ = read_saelab_cfg(dst)
    try:
        save_file({"sparsity": log10_densities(counts.double() / n, cfg.width)}, str(dst / SPARSITY_FILE))
    except HubError:
        pass


def _remove_local_paths(folder: Path) -> None:
    """Reduce every local path in a staged cfg.json and metrics.json to its last name (`without_local_paths`): a text
    file's or a model folder's absolute path would publish where the user keeps files, and their user name."""
    for path in (folder / CFG_FILE, folder / METRICS_FILE):
        if path.is_file():
            record = read_json(path, "staged file")
            if (public := without_local_paths(record)) != record:
                write_json(path, public)


def _check_sparsity(folder: Path, width: int) -> None:
    """A copied sparsity.safetensors must hold one finite log10 density per latent, or the card and SAELens lie."""
    sparsity = read_log_densities(folder)
    if sparsity is not None and (tuple(sparsity.shape) != (width,) or not sparsity.isfinite().all()):
        raise HubError(f"{folder / SPARSITY_FILE}: 'sparsity' must hold {width} finite log10 densities (one per "
                       f"latent, d_sae={width}), got shape {list(sparsity.shape)}; delete the file or write it again")


def stage(saes_or_folders: Any, out: Path, repo_id: str, *, license: str | None = None) -> list[CardEntry]:
    """Write the repo tree (subfolders + README.md) into `out`; returns the card entries."""
    items = _items(saes_or_folders)
    if not items:
        raise HubError("push_to_hub got no SAEs")
    cfgs, formats, loaded, sources = [], [], [], []
    for _, item, root in items:
        if isinstance(item, SAE):
            cfgs.append(item.cfg)
            formats.append(None)
            loaded.append(item)
            sources.append({})
            continue
        if not item.exists():
            raise HubError(f"{item} does not exist; expected an SAE folder")
        # before anything in it is read (a Gemma Scope params file named by the caller is converted, not copied)
        files = _source_files(root, item) if item.is_dir() else {}
        sources.append(files)
        fmt = detect_format(item)
        formats.append(fmt)
        if fmt == "saelab":  # the config is enough to name it; the weights are checked when staged
            cfgs.append(read_saelab_cfg(item)[0])
            loaded.append(None)
        else:
            sae = load_sae(item, format=fmt)
            cfgs.append(sae.cfg)
            loaded.append(sae)
    names = subfolder_names(cfgs, [name for name, _, _ in items])
    entries = []
    for name, (_, item, _), fmt, sae, files in zip(names, items, formats, loaded, sources):
        dst = inside(out, name, "subfolder")
        if isinstance(item, SAE):
            save_sae(item, dst)
        else:
            _stage_folder(item, files, dst, fmt, sae)
        _remove_local_paths(dst)
        cfg, block = read_saelab_cfg(dst)
        _check_sparsity(dst, cfg.width)
        plot = next((f"{name}/{p}" for p in DENSITY_PLOTS if (dst / p).is_file()), None)
        entries.append(CardEntry(subfolder=name, cfg=cfg, metrics=read_metrics(dst) or {}, density_plot=plot,
                                 folded_input_scale=float(block.get("folded_input_scale", 1.0)),
                                 run=read_run_keys(dst), evals=read_outputs(dst)))
    (out / README).write_text(build_model_card(entries, repo_id, license=license))
    return entries


def push_to_hub(saes_or_folders: Any, repo_id: str, *, private: bool = False, token: str | None = None,
                dry_run: PathLike | bool | None = None, commit_message: str | None = None,
                license: str | None = None) -> Path | str:
    """Upload SAEs (saelab SAE objects, SAE folders, a list of them, or {subfolder: SAE or folder}) to `repo_id`.

    dry_run=<folder>: write exactly the tree that would be uploaded into that (new or empty) folder, upload nothing,
    return the folder (dry_run=True: a new temporary folder); a failed dry run leaves no partial tree behind.
    Otherwise create the repo if needed (HfApi.create_repo(exist_ok=True)) and upload the tree in one commit; returns
    the commit URL. Every failure is a HubError saying what to do: no network (or HF_HUB_OFFLINE=1), a refused or
    missing token, a full disk while staging. The token never appears in a message.
    """
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise HubError(f"repo_id must look like 'user/name', got {repo_id!r}")
    if dry_run is not None and dry_run is not False:  # "" is not "no dry run": it names the current folder
        return _dry_run(saes_or_folders, repo_id, dry_run, license)

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:  # before minutes of staging: this push cannot succeed
        raise _unreachable(repo_id, "HF_HUB_OFFLINE is set (offline mode)", token)
    try:
        with tempfile.TemporaryDirectory(prefix="saelab-push-") as tmp:
            out = Path(tmp)
            try:
                entries = stage(saes_or_folders, out, repo_id, license=license)
            except _WRITE_ERRORS as e:
                raise _staging_error(e, f"stage the upload in {out}", "free some space there (or set TMPDIR to a "
                                     "folder on a disk with room)") from None
            message = commit_message or f"Upload {len(entries)} SAE{'s' if len(entries) != 1 else ''} with saelab"
            info = _upload(out, repo_id, private=private, token=token, message=message)
    except OSError as e:  # the temporary folder itself could not be made or removed
        raise HubError(f"could not use a temporary folder to stage the upload: {write_reason(e)}; set TMPDIR to a "
                       f"writable folder with room, then rerun the same command") from None
    return str(getattr(info, "commit_url", None) or info)


def _dry_run(saes_or_folders: Any, repo_id: str, dry_run: PathLike | bool, license: str | None) -> Path:
    """Stage into the new or empty folder `dry_run`; on any failure remove what was written there."""
    try:
        out = Path(tempfile.mkdtemp(prefix="saelab-push-")) if dry_run is True else Path(dry_run)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise HubError(f"dry_run folder {out} must be new or empty, so that it holds exactly the upload; choose "
                           f"another folder (--dry-run FOLDER) or empty this one")
        existed = out.exists()
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HubError(f"cannot write the dry run into {dry_run}: {write_reason(e)}; choose a folder you can write "
                       f"(--dry-run FOLDER)") from None
    try:
        stage(saes_or_folders, out, repo_id, license=license)
    except BaseException as e:
        # the folder was new or empty: everything in it is this dry run's, and a partial tree must not pass for one
        for child in list(out.iterdir()) if existed else [out]:
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        if isinstance(e, _WRITE_ERRORS):
            raise _staging_error(e, f"write the dry run into {out} (nothing was left there)",
                                 "free some space or choose another folder (--dry-run FOLDER)") from None
        raise
    return out


def _staging_error(error: BaseException, doing: str, if_full: str) -> HubError:
    """'could not <doing>: <reason>; <what to do>' for a disk error while staging (a full disk, or a file that
    cannot be read or written)."""
    code = getattr(error, "errno", None)
    if code is None:  # safetensors reports '... (os error 28)'
        found = re.search(r"os error (\d+)", str(error))
        code = int(found.group(1)) if found else None
    full = code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    advice = if_full if full else "check that the SAE folders can be read and the destination written"
    return HubError(f"could not {doing}: {write_reason(error)}; {advice}, then rerun the same command")


def _write_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return OSError, SafetensorError


_WRITE_ERRORS = _write_errors()


def _upload(out: Path, repo_id: str, *, private: bool, token: str | None, message: str):
    """create_repo + one upload_folder commit, every failure turned into a HubError that says what to do."""
    from huggingface_hub.utils import HfHubHTTPError, HFValidationError, LocalTokenNotFoundError

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(repo_id=repo_id, folder_path=str(out), commit_message=message, repo_type="model")
    except LocalTokenNotFoundError:
        raise HubError(f"no Hugging Face token to upload to {repo_id}: log in with `hf auth login`, set HF_TOKEN, or "
                       f"pass token=..., then rerun the same command") from None
    except HFValidationError as e:
        raise HubError(f"{repo_id!r} is not a valid Hub repo id: {_scrub(str(e), token)}") from None
    except Exception as e:
        reason = _network_reason(e)
        if reason is not None:
            raise _unreachable(repo_id, reason, token) from None
        if isinstance(e, HfHubHTTPError):
            status = getattr(getattr(e, "response", None), "status_code", None)
            what = {401: "the token is missing or invalid (log in with `hf auth login`, set HF_TOKEN, or pass "
                         "token=...)",
                    403: f"the token may not write to {repo_id} (it needs write access to that user or organisation)"}
            raise HubError(f"the Hub refused the upload to {repo_id} (HTTP {status}): "
                           f"{what.get(status, 'check the repo id and that the token has write access to it')}; "
                           f"then rerun the same command") from None
        raise HubError(f"the upload to {repo_id} failed: {type(e).__name__}: {_scrub(_first_line(e), token)}; "
                       f"rerun the same command, or use --dry-run FOLDER to write the upload locally") from e


# connection and timeout errors of the HTTP clients huggingface_hub has used (httpx2, httpx, requests, urllib3),
# by class name so that none of them need be installed; OSError's own ConnectionError, TimeoutError, socket.gaierror
_NETWORK_CLASSES = {"TransportError", "TimeoutException", "ConnectTimeout", "ReadTimeout", "ConnectionError",
                    "Timeout", "NewConnectionError", "MaxRetryError", "NameResolutionError", "ProtocolError"}


def _network_reason(error: BaseException) -> str | None:
    """A short reason when `error` (or what caused it) means the Hub could not be reached; None otherwise."""
    import socket

    seen = 0
    while error is not None and seen < 10:
        if type(error).__name__ == "OfflineModeIsEnabled":
            return "HF_HUB_OFFLINE is set (offline mode)"
        network = isinstance(error, (ConnectionError, TimeoutError, socket.gaierror)) or any(
            cls.__name__ in _NETWORK_CLASSES and cls.__module__.split(".")[0] in ("httpx", "httpx2", "requests",
                                                                                  "urllib3")
            for cls in type(error).__mro__)
        if network:
            return f"{type(error).__name__}: {_first_line(error)}" if str(error) else type(error).__name__
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def _unreachable(repo_id: str, reason: str, token: str | None) -> HubError:
    return HubError(f"could not reach the Hugging Face Hub to upload to {repo_id}: {_scrub(reason, token)}; check the "
                    f"connection (or unset HF_HUB_OFFLINE), then rerun the same command — or use --dry-run FOLDER "
                    f"(dry_run=FOLDER) to write the upload locally")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else ""


def _scrub(text: str, token: str | None) -> str:
    """`text` without the token: the one passed, HF_TOKEN's, or anything shaped like a Hugging Face token."""
    import os

    for secret in (token, os.environ.get("HF_TOKEN")):
        if isinstance(secret, str) and secret:
            text = text.replace(secret, "***")
    return re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text)
