"""Load an SAE from a Hugging Face Hub repo through huggingface_hub's cache (works offline from a populated cache).

    sae = from_pretrained("me/smollm2-135m-saes", subfolder="blocks.15.hook_resid_post")
    sae = from_pretrained("google/gemma-scope-2b-pt-res", subfolder="layer_20/width_16k/average_l0_71")
    sae = from_pretrained("EleutherAI/sae-llama-3-8b-32x", subfolder="layers.24")

Only the subfolder's files are fetched (snapshot_download with allow_patterns); the format of what arrives (saelab,
SAELens, sparsify, Gemma Scope) is detected and imported. HF_HUB_OFFLINE=1 reads the cache only; HF_HUB_CACHE or
cache_dir choose the cache. The token is passed to huggingface_hub and never logged or written anywhere.
"""
from __future__ import annotations

from pathlib import Path

from saelab.files import inside, relative_path_problem
from saelab.sae import SAE

from .common import (CFG_FILE, GEMMASCOPE_FILES, METRICS_FILE, PICKLE_SUFFIXES, SPARSIFY_WEIGHTS_FILE,
                     SPARSITY_FILE, WEIGHTS_FILE, HubError, PathLike)
from .folder import load_sae

try:  # huggingface_hub >= 1.x: a cached snapshot that is known to be partial
    from huggingface_hub.errors import IncompleteSnapshotError

    _INCOMPLETE: tuple[type[Exception], ...] = (IncompleteSnapshotError,)
except ImportError:  # pragma: no cover - older huggingface_hub
    _INCOMPLETE = ()

ROOT_FILES = [CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE, SPARSIFY_WEIGHTS_FILE, METRICS_FILE, *GEMMASCOPE_FILES]


def download(repo_id: str, subfolder: str | None = None, revision: str | None = None, token: str | bool | None = None,
             cache_dir: PathLike | None = None, *, allow_pickle: bool = False) -> Path:
    """The local folder (inside the HF cache) holding `repo_id`'s SAE files at `subfolder`."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (GatedRepoError, HFValidationError, HfHubHTTPError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError, RevisionNotFoundError)

    if not isinstance(repo_id, str) or not repo_id:
        raise HubError(f"repo_id must be a Hub repo id like 'user/name', got {repo_id!r}")
    sub = (subfolder or "").strip("/")
    if sub and (problem := relative_path_problem(sub)):  # before any download: '../../..' led out of the snapshot
        raise HubError(f"subfolder {subfolder!r} {problem}; give a path inside the repo like "
                       "'blocks.15.hook_resid_post'")
    if sub:
        patterns = [f"{sub}/*", "config.json"]  # config.json: a sparsify run's model and dataset
    else:
        patterns = list(ROOT_FILES) + ["config.json"]
        if allow_pickle:
            patterns += [f"*{suffix}" for suffix in PICKLE_SUFFIXES]
    where = f"{repo_id!r}" + (f" (revision {revision!r})" if revision else "")
    try:
        snapshot = snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                     allow_patterns=patterns, repo_type="model")
    except HFValidationError as e:
        raise HubError(f"{repo_id!r} is not a valid Hub repo id ({e})") from None
    except RevisionNotFoundError:
        raise HubError(f"Hub repo {repo_id!r} has no revision {revision!r}; expected a branch, tag or commit") from None
    except GatedRepoError:
        raise HubError(f"Hub repo {repo_id!r} is gated: accept its terms on the Hub and pass token=...") from None
    except RepositoryNotFoundError:
        raise HubError(f"Hub repo {repo_id!r} does not exist, or it is private and no valid token was given "
                       f"(pass token=... or log in with `hf auth login`)") from None
    except LocalEntryNotFoundError:
        raise HubError(f"Hub repo {where} is not in the local Hub cache and the Hub cannot be reached (no network, "
                       f"or HF_HUB_OFFLINE=1); expected it under {_cache_dir(cache_dir)}. Download it once online, "
                       f"or check the repo id and revision") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        raise HubError(f"the Hub refused {where} (HTTP {status}); check the repo id, revision and token") from None
    except (OSError, *_INCOMPLETE) as e:  # a partial cached snapshot offline, disk errors
        raise HubError(f"could not fetch Hub repo {where}: {type(e).__name__}: {e}") from None
    folder = inside(snapshot, sub, "subfolder") if sub else Path(snapshot)
    if not folder.is_dir() or not any(folder.iterdir()):
        available = _top_folders(repo_id, revision, token, Path(snapshot))
        hint = f"; folders in the repo: {available[:20]}" if available else ""
        raise HubError(f"Hub repo {where} has no files under subfolder {sub!r}{hint}")
    return folder


def _top_folders(repo_id: str, revision: str | None, token, snapshot: Path) -> list[str]:
    """Top-level folders of the repo: from the Hub when it can be reached, else from what the cache holds."""
    from huggingface_hub import HfApi, constants

    paths: list[str] = []
    if not constants.HF_HUB_OFFLINE:
        try:
            paths = HfApi(token=token).list_repo_files(repo_id, revision=revision)
        except Exception:  # best effort: this only improves an error message
            paths = []
    if not paths and snapshot.is_dir():
        paths = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
    return sorted({p.split("/")[0] for p in paths if "/" in p})


def _cache_dir(cache_dir: PathLike | None) -> str:
    if cache_dir is not None:
        return str(cache_dir)
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def from_pretrained(repo_id: str, subfolder: str | None = None, revision: str | None = None,
                    token: str | bool | None = None, cache_dir: PathLike | None = None, *,
                    allow_pickle: bool = False, device=None) -> SAE:
    """A saelab SAE from a Hub repo (or a subfolder of it) in saelab, SAELens, sparsify or Gemma Scope format."""
    folder = download(repo_id, subfolder, revision, token, cache_dir, allow_pickle=allow_pickle)
    return load_sae(folder, allow_pickle=allow_pickle, device=device, repo_id=repo_id)
