"""from_pretrained against a Hugging Face cache built by hand (models--org--name/{blobs,refs,snapshots}), offline; a
subfolder that leads outside the repo is refused before any download."""

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import SMALL_HOOK, saved_small_sae
from saelab.hub import HubError, from_pretrained, save_sae
from saelab.sae import SAE, SAEConfig, create_sae

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def make(arch="topk", seed=0, hook="blocks.2.hook_resid_post"):
    torch.manual_seed(seed)
    sae = create_sae(SAEConfig(arch=arch, d_in=8, width=16, k=3 if arch == "topk" else None, hook_name=hook,
                               model_name="smollm2-135m"))
    with torch.no_grad():
        sae.b_dec.normal_()
    return sae


def add_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, bytes], refs: tuple[str, ...] = ("main",)):
    """Lay files out the way huggingface_hub's cache does: content-addressed blobs, symlinks in snapshots/, refs."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for rel, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)


def folder_files(folder: Path, prefix: str = "") -> dict[str, bytes]:
    return {f"{prefix}{p.relative_to(folder).as_posix()}": p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty HF cache at HF_HUB_CACHE, with offline mode on (env and huggingface_hub's already-read constants)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_offline_subfolder_and_revision(tmp_path, offline_cache):
    a, b, c = make(seed=1), make("relu", seed=2, hook="blocks.4.hook_resid_post"), make("jumprelu", seed=3)
    save_sae(a, tmp_path / "a")
    save_sae(b, tmp_path / "b")
    save_sae(c, tmp_path / "c")
    files = {**folder_files(tmp_path / "a", "blocks.2.hook_resid_post/"),
             **folder_files(tmp_path / "b", "blocks.4.hook_resid_post/"), "README.md": b"card"}
    add_snapshot(offline_cache, "me/saes", COMMIT_A, files)
    add_snapshot(offline_cache, "me/saes", COMMIT_B, folder_files(tmp_path / "c", "blocks.2.hook_resid_post/"),
                 refs=("v2",))
    x = torch.randn(5, 8)

    got = from_pretrained("me/saes", subfolder="blocks.2.hook_resid_post")
    assert torch.equal(got(x), a(x))
    got = SAE.from_pretrained("me/saes", subfolder="blocks.4.hook_resid_post/")
    assert torch.equal(got(x), b(x))
    for revision in ("v2", COMMIT_B):
        got = from_pretrained("me/saes", subfolder="blocks.2.hook_resid_post", revision=revision)
        assert got.cfg.arch == "jumprelu" and torch.equal(got(x), c(x))
    with pytest.raises(HubError, match="no files under subfolder 'blocks.9.hook_resid_post'"):
        from_pretrained("me/saes", subfolder="blocks.9.hook_resid_post")
    with pytest.raises(HubError, match="several SAEs in subfolders"):
        from_pretrained("me/saes")


def test_offline_root_sae_and_explicit_cache_dir(tmp_path, offline_cache):
    other = tmp_path / "elsewhere"
    save_sae(make(), tmp_path / "a")
    add_snapshot(other, "me/one", COMMIT_A, folder_files(tmp_path / "a"))
    got = from_pretrained("me/one", cache_dir=other)
    assert got.cfg.hook_name == "blocks.2.hook_resid_post"


def test_offline_foreign_formats_from_cache(tmp_path, offline_cache):
    g = torch.Generator().manual_seed(0)
    params = {"W_enc": torch.randn(8, 16, generator=g), "W_dec": torch.randn(16, 8, generator=g),
              "b_enc": torch.randn(16, generator=g), "b_dec": torch.randn(8, generator=g),
              "threshold": torch.rand(16, generator=g)}
    npz = tmp_path / "params.npz"
    np.savez(npz, **{k: v.numpy() for k, v in params.items()})
    add_snapshot(offline_cache, "google/gemma-scope-2b-pt-res", COMMIT_A,
                 {"layer_3/width_16k/average_l0_10/params.npz": npz.read_bytes()})
    sae = from_pretrained("google/gemma-scope-2b-pt-res", subfolder="layer_3/width_16k/average_l0_10")
    assert sae.cfg.arch == "jumprelu" and sae.cfg.hook_name == "blocks.3.hook_resid_post"
    x = torch.randn(4, 8)
    pre = x @ params["W_enc"] + params["b_enc"]
    ref = ((pre > params["threshold"]) * pre.relu()) @ params["W_dec"] + params["b_dec"]
    torch.testing.assert_close(sae(x), ref, rtol=1e-5, atol=1e-5)


def test_missing_repo_offline_is_a_clear_error(offline_cache):
    with pytest.raises(HubError, match=r"'me/not-there' is not in the local Hub cache .*HF_HUB_OFFLINE=1"):
        from_pretrained("me/not-there", subfolder="x")
    with pytest.raises(HubError, match="not a valid Hub repo id"):
        from_pretrained("not a/valid//id")


def test_token_is_passed_to_huggingface_hub_and_not_echoed(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.utils import RepositoryNotFoundError

    seen = {}

    def fake_snapshot_download(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        response = SimpleNamespace(headers={}, status_code=404, request=None)
        raise RepositoryNotFoundError("404 Client Error: Repository Not Found", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    token = "hf_FAKEtoken0123456789"
    with pytest.raises(HubError) as info:
        from_pretrained("me/private", subfolder="blocks.1.hook_resid_post", token=token)
    assert seen["token"] == token and seen["allow_patterns"][0] == "blocks.1.hook_resid_post/*"
    assert "does not exist, or it is private" in str(info.value) and token not in str(info.value)


def test_real_env_vars_in_a_fresh_process(tmp_path):
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE set before huggingface_hub is imported, as users set them."""
    cache = tmp_path / "cache"
    save_sae(make(), tmp_path / "a")
    add_snapshot(cache, "me/saes", COMMIT_A, folder_files(tmp_path / "a", "blocks.2.hook_resid_post/"))
    code = textwrap.dedent("""
        import saelab.hub as hub
        sae = hub.from_pretrained("me/saes", subfolder="blocks.2.hook_resid_post")
        print(sae.cfg.arch, sae.cfg.width)
        try:
            hub.from_pretrained("me/absent")
        except hub.HubError as e:
            print("HubError", "local Hub cache" in str(e))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["topk 16", "HubError True"]


@pytest.mark.usefixtures("no_hub")
def test_a_subfolder_outside_the_repo_is_refused_before_any_download(tmp_path, monkeypatch):
    import huggingface_hub

    from saelab.hub import from_pretrained

    saved_small_sae(tmp_path / "hub")  # an SAE where '../../..' leads from the snapshot: it loaded
    snapshot = tmp_path / "hub" / "models--me--saes" / "snapshots" / ("a" * 40)
    (snapshot / SMALL_HOOK).mkdir(parents=True)
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **kw: calls.append(kw) or str(snapshot))
    for subfolder in ("../../..", f"{SMALL_HOOK}/../../../..", "a/./b", "a\\..\\b"):
        with pytest.raises(HubError, match=rf"subfolder '.*' has a part .* that .*; give a path inside the repo"):
            from_pretrained("me/saes", subfolder=subfolder)
    assert calls == []
