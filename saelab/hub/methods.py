"""SAE.save / SAE.load / SAE.from_pretrained / sae.push_to_hub: the hub's functions as methods of every SAE.

They are attached to saelab.sae.SAE here, when saelab.hub is imported (saelab's __init__ imports it), so the hub
imports the SAE package and the SAE package knows nothing of files or the Hub.
"""
from __future__ import annotations

from saelab.sae import SAE

from . import folder as folders, pretrained as hub_repos, push as pushing
from .common import expect_class


def save(self, folder, *, densities=None, metrics=None, metadata=None):
    """Write cfg.json + sae_weights.safetensors (SAELens layout, input scale folded); see saelab.hub.save_sae."""
    return folders.save_sae(self, folder, densities=densities, metrics=metrics, metadata=metadata)


def push_to_hub(self, repo_id: str, *, subfolder: str | None = None, private: bool = False,
                token: str | None = None, dry_run=None, **kwargs):
    """Upload this SAE (to `subfolder`, default: its hook name) with a model card; see saelab.hub.push_to_hub."""
    return pushing.push_to_hub({subfolder: self} if subfolder else self, repo_id, private=private, token=token,
                               dry_run=dry_run, **kwargs)


def load(cls, folder, *, allow_pickle: bool = False, device=None) -> SAE:
    """An SAE from a folder in saelab, SAELens, sparsify or Gemma Scope format; see saelab.hub.load_sae.
    TopKSAE.load and the like refuse a folder holding another architecture."""
    return expect_class(folders.load_sae(folder, allow_pickle=allow_pickle, device=device), cls)


def from_pretrained(cls, repo_id: str, subfolder: str | None = None, revision: str | None = None,
                    token: str | None = None, cache_dir=None, *, allow_pickle: bool = False, device=None) -> SAE:
    """An SAE from a Hugging Face Hub repo (through the HF cache); see saelab.hub.from_pretrained."""
    sae = hub_repos.from_pretrained(repo_id, subfolder, revision, token, cache_dir, allow_pickle=allow_pickle,
                                    device=device)
    return expect_class(sae, cls)


SAE.save = save
SAE.push_to_hub = push_to_hub
SAE.load = classmethod(load)
SAE.from_pretrained = classmethod(from_pretrained)
