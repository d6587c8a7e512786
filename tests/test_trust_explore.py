"""Issue 21, exploring and the dashboard: a dashboard replaces only what a dashboard wrote, one writer at a time, and
non-Latin text reads as text."""

import json

import pytest
import torch

from saelab.activations import cache_activations
from saelab.data import TextConfig
from saelab.errors import SaelabError
from saelab.explore import explore
from saelab.explore.features import FeatureSet
from saelab.files import FolderBusyError, FolderLock
from saelab.sae import SAEConfig, create_sae

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def cache(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("trust-explore-cache")
    cache_activations(tiny_model, HOOK, out, text=TextConfig(context_len=32), tokens=640, batch_size=4,
                      shard_tokens=256, progress=False)
    return out


@pytest.fixture(scope="module")
def sae(tiny_model):
    torch.manual_seed(1)
    return create_sae(SAEConfig(arch="topk", d_in=64, width=24, k=4, model_name=tiny_model.name, hook_name=HOOK))


@pytest.fixture(scope="module")
def features(sae, cache, tiny_model):
    return explore(sae, cache, tiny_model, top=3, sample=6)


def files_under(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_dashboard_replaces_only_what_a_dashboard_wrote(features, sae, cache, tiny_model_dir, tmp_path, capsys):
    from saelab.cli import main

    users = tmp_path / "site"
    (users / "latents").mkdir(parents=True)
    (users / "index.html").write_text("<h1>my own index</h1>")
    (users / "latents" / "7.html").write_text("<p>my notes on latent 7</p>")
    before = files_under(users)
    with pytest.raises(SaelabError, match=r"site holds index.html \(and 1 more\), which no saelab dashboard wrote"):
        features.dashboard(users, [1, 2])
    sae_dir = tmp_path / "sae"
    sae.save(sae_dir)
    assert main(["dashboard", str(sae_dir), "--acts", str(cache), "--model", str(tiny_model_dir), "--out",
                 str(users)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "index.html" in err and "--out" in err and "remove it" in err
    assert files_under(users) == before  # nothing overwritten, nothing deleted

    ours = tmp_path / "dash"
    features.dashboard(ours, [1, 2, 3])
    features.dashboard(ours, [2])  # a dashboard's own pages are replaced, the stale ones removed
    assert sorted(p.name for p in (ours / "latents").iterdir()) == ["2.html"]
    for intruder, named in (("latents/notes.txt", "latents/notes.txt"), ("extra/page.html", "extra")):
        (ours / intruder).parent.mkdir(exist_ok=True)  # a user's file in a dashboard's folder is kept
        (ours / intruder).write_text("mine")
        before = files_under(ours)
        with pytest.raises(SaelabError, match=f"holds {named},"):
            features.dashboard(ours, [1])
        assert files_under(ours) == before
        (ours / intruder).unlink()
    (ours / "extra").rmdir()
    (ours / "latents" / "2.html").unlink()
    (ours / "latents" / "2.html").symlink_to(users / "index.html")  # a page swapped for a link is not written through
    with pytest.raises(SaelabError, match="holds latents/2.html"):
        features.dashboard(ours, [2])
    assert (users / "index.html").read_text() == "<h1>my own index</h1>"


def test_an_interrupted_dashboard_is_finished_by_the_next_one(features, tmp_path, monkeypatch):
    """The record lists every page before it is written, so pages left by a crash are the next dashboard's to
    replace."""
    out = tmp_path / "dash"
    real, calls = FeatureSet.__getitem__, []

    def crash_on_the_third_page(self, latent):
        calls.append(latent)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, latent)

    monkeypatch.setattr(FeatureSet, "__getitem__", crash_on_the_third_page)
    with pytest.raises(KeyboardInterrupt):
        features.dashboard(out, [0, 1, 2, 3, 4])
    monkeypatch.setattr(FeatureSet, "__getitem__", real)
    assert len(list((out / "latents").iterdir())) == 2
    features.dashboard(out, [5, 6])
    assert sorted(p.name for p in (out / "latents").iterdir()) == ["5.html", "6.html"]
    assert json.loads((out / ".saelab-dashboard.json").read_text())["files"] == ["index.html", "latents/5.html",
                                                                                   "latents/6.html"]


def test_a_second_dashboard_writer_is_refused_naming_the_first(features, tmp_path):
    out = tmp_path / "dash"
    with FolderLock(out, "dashboard"):  # flock: a second lock in this same process conflicts too
        with pytest.raises(FolderBusyError, match=r"another saelab process \(pid \d+\) is writing the dashboard"):
            features.dashboard(out, [1, 2])
        assert not (out / "latents").exists()
    features.dashboard(out, [1, 2])
    assert len(list((out / "latents").iterdir())) == 2
