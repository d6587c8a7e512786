"""push_to_hub: the dry-run tree file by file, the model card, naming, tokens, and the real upload path (faked HfApi)."""
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from saelab.hub import HubError, load_sae, push_to_hub, save_sae
from saelab.hub.card import CardEntry, build_model_card, flat_metrics
from saelab.sae import SAEConfig, create_sae

TOKEN = "hf_FAKEtokenDoNotWrite0123456789"


def make(arch, hook, width=16, k=3, scale=1.0, seed=0, model="smollm2-135m"):
    torch.manual_seed(seed)
    sae = create_sae(SAEConfig(arch=arch, d_in=8, width=width, k=k if arch == "topk" else None, hook_name=hook,
                               model_name=model, input_scale=scale))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
    return sae


def tree(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def front_matter(readme: str) -> dict:
    m = re.match(r"^---\n(.*?)\n---\n", readme, re.S)
    assert m, "README.md must start with YAML front matter delimited by ---"
    return yaml.safe_load(m.group(1))


def test_dry_run_tree_file_by_file(tmp_path):
    h15 = "blocks.15.hook_resid_post"
    topk = make("topk", h15, k=3, scale=0.25, seed=1)
    jump = make("jumprelu", h15, seed=2)
    other = make("relu", "blocks.9.hook_resid_post", seed=3)
    # a saved folder with eval outputs next to it (saelab.eval writes metrics.json + feature_density.png)
    save_sae(other, tmp_path / "run-relu")
    eval_dir = tmp_path / "run-relu" / "eval"
    eval_dir.mkdir()
    (eval_dir / "metrics.json").write_text(json.dumps({
        "schema_version": 1, "n_tokens": 1000,
        "reconstruction": {"fvu": 0.123456, "explained_variance": 0.876544, "mse": 1.5, "l0": 21.25,
                           "frac_dead": 0.0625},
        "spliced": {"ce_loss_recovered": 0.91, "kl_sae": 0.05}}))
    (eval_dir / "feature_density.png").write_bytes(b"\x89PNG fake")

    out = push_to_hub([topk, jump, tmp_path / "run-relu"], "me/smollm2-135m-saes", token=TOKEN,
                      dry_run=tmp_path / "upload")
    assert out == tmp_path / "upload"
    assert tree(out) == [
        "README.md",
        "blocks.15.hook_resid_post/jumprelu-16/cfg.json",
        "blocks.15.hook_resid_post/jumprelu-16/sae_weights.safetensors",
        "blocks.15.hook_resid_post/topk-16-k3/cfg.json",
        "blocks.15.hook_resid_post/topk-16-k3/sae_weights.safetensors",
        "blocks.9.hook_resid_post/cfg.json",
        "blocks.9.hook_resid_post/feature_density.png",
        "blocks.9.hook_resid_post/metrics.json",
        "blocks.9.hook_resid_post/sae_weights.safetensors",
    ]
    cfg = json.loads((out / "blocks.15.hook_resid_post/topk-16-k3/cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 3 and cfg["d_sae"] == 16
    assert cfg["hook_name"] == h15 and cfg["saelab"]["folded_input_scale"] == 0.25
    x = torch.randn(6, 8)
    for sub, sae in (("blocks.15.hook_resid_post/topk-16-k3", topk), ("blocks.15.hook_resid_post/jumprelu-16", jump),
                     ("blocks.9.hook_resid_post", other)):
        loaded = load_sae(out / sub)
        assert torch.equal(loaded(x), sae.fold_input_scale()(x)), sub

    readme = (out / "README.md").read_text()
    meta = front_matter(readme)
    assert meta["library_name"] == "saelab"
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"sparse-autoencoder", "saelab", "mechanistic-interpretability"} <= set(meta["tags"])
    assert meta["license"]
    lines = readme.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| Subfolder"))
    assert re.fullmatch(r"\|(\s*-+:?\s*\|)+", lines[header + 1]), "table needs a header separator row"
    ncols = lines[header].count("|")
    rows = [line for line in lines[header + 2:header + 5]]
    assert all(r.count("|") == ncols for r in rows)
    relu_row = next(r for r in rows if "blocks.9.hook_resid_post" in r)
    for value in ("0.1235", "0.8765", "21.2", "6.25%", "0.9100", "0.05"):
        assert value in relu_row, value
    topk_row = next(r for r in rows if "topk-16-k3" in r)
    assert "| topk | 16 | 3 |" in topk_row and "–" in topk_row
    assert "![Feature density of blocks.9.hook_resid_post](blocks.9.hook_resid_post/feature_density.png)" in readme
    assert 'SAE.from_pretrained("me/smollm2-135m-saes", subfolder="blocks.15.hook_resid_post/' in readme
    assert readme.count("```") % 2 == 0

    # the token is nowhere in what would be uploaded
    for path in out.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_single_sae_named_by_hook_and_explicit_names(tmp_path):
    sae = make("topk", "blocks.3.hook_mlp_out")
    out = sae.push_to_hub("me/one", dry_run=tmp_path / "a")
    assert tree(out) == ["README.md", "blocks.3.hook_mlp_out/cfg.json", "blocks.3.hook_mlp_out/sae_weights.safetensors"]
    out = sae.push_to_hub("me/one", subfolder="l3/mlp", dry_run=tmp_path / "b")
    assert "l3/mlp/cfg.json" in tree(out)
    out = push_to_hub({"x": sae, "y": make("topk", "blocks.3.hook_mlp_out", seed=1)}, "me/two", dry_run=tmp_path / "c")
    assert {"x/cfg.json", "y/cfg.json"} <= set(tree(out))
    nohook = make("relu", "")
    out = push_to_hub([nohook, nohook], "me/three", dry_run=tmp_path / "d")
    assert {"relu-16/cfg.json", "relu-16-2/cfg.json"} <= set(tree(out))


def test_run_folder_expands_to_its_saes(tmp_path):
    """saelab.train saves to <out>/<hook>/<arch>-<width>[-k<k>]/ next to checkpoints: push the run folder as is."""
    run = tmp_path / "run"
    save_sae(make("topk", "blocks.1.hook_resid_post"), run / "blocks.1.hook_resid_post" / "topk-16-k3")
    save_sae(make("relu", "blocks.1.hook_resid_post", seed=1), run / "blocks.1.hook_resid_post" / "relu-16")
    (run / "checkpoint").mkdir()
    (run / "checkpoint" / "state.json").write_text("{}")
    (run / "log.jsonl").write_text("")
    out = push_to_hub(run, "me/run", dry_run=tmp_path / "up")
    assert tree(out) == ["README.md",
                         "blocks.1.hook_resid_post/relu-16/cfg.json",
                         "blocks.1.hook_resid_post/relu-16/sae_weights.safetensors",
                         "blocks.1.hook_resid_post/topk-16-k3/cfg.json",
                         "blocks.1.hook_resid_post/topk-16-k3/sae_weights.safetensors"]


def test_dry_run_refuses_non_empty_folder_and_bad_names(tmp_path):
    sae = make("relu", "blocks.1.hook_resid_post")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(HubError, match="new or empty"):
        push_to_hub(sae, "me/repo", dry_run=tmp_path / "full")
    with pytest.raises(HubError, match="relative path"):
        push_to_hub({"../evil": sae}, "me/repo", dry_run=tmp_path / "a")
    with pytest.raises(HubError, match="user/name"):
        push_to_hub(sae, "no-slash", dry_run=tmp_path / "b")
    with pytest.raises(HubError, match="does not exist"):
        push_to_hub(tmp_path / "missing", "me/repo", dry_run=tmp_path / "c")


def test_foreign_folder_is_converted(tmp_path):
    import numpy as np

    g = torch.Generator().manual_seed(0)
    p = {"W_enc": torch.randn(8, 16, generator=g), "W_dec": torch.randn(16, 8, generator=g),
         "b_enc": torch.randn(16, generator=g), "b_dec": torch.randn(8, generator=g),
         "threshold": torch.rand(16, generator=g)}
    (tmp_path / "gs").mkdir()
    np.savez(tmp_path / "gs" / "params.npz", **{k: v.numpy() for k, v in p.items()})
    out = push_to_hub({"gemma": tmp_path / "gs"}, "me/conv", dry_run=tmp_path / "up")
    assert tree(out) == ["README.md", "gemma/cfg.json", "gemma/sae_weights.safetensors"]
    x = torch.randn(3, 8)
    pre = x @ p["W_enc"] + p["b_enc"]
    ref = ((pre > p["threshold"]) * pre.relu()) @ p["W_dec"] + p["b_dec"]
    torch.testing.assert_close(load_sae(out / "gemma")(x), ref, rtol=1e-5, atol=1e-5)


class FakeApi:
    instances = []

    def __init__(self, token=None, **kwargs):
        self.token = token
        self.calls = []
        FakeApi.instances.append(self)

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = {p.relative_to(folder_path).as_posix(): p.read_bytes() for p in Path(folder_path).rglob("*")
                 if p.is_file()}
        self.calls.append(("upload_folder", repo_id, kwargs, files))
        return SimpleCommit(f"https://huggingface.co/{repo_id}/commit/0123")


class SimpleCommit(str):
    @property
    def commit_url(self):
        return str(self)


def test_real_upload_path_with_fake_api(monkeypatch):
    import saelab.hub.push as push

    FakeApi.instances.clear()
    monkeypatch.setattr(push, "HfApi", FakeApi)
    sae = make("topk", "blocks.2.hook_resid_post")
    url = push_to_hub(sae, "me/private-saes", private=True, token=TOKEN)
    assert url == "https://huggingface.co/me/private-saes/commit/0123"
    api, = FakeApi.instances
    assert api.token == TOKEN
    (c_name, c_repo, c_kwargs), (u_name, u_repo, u_kwargs, files) = api.calls
    assert (c_name, c_repo) == ("create_repo", "me/private-saes")
    assert c_kwargs["private"] is True and c_kwargs["exist_ok"] is True
    assert (u_name, u_repo) == ("upload_folder", "me/private-saes")
    assert sorted(files) == ["README.md", "blocks.2.hook_resid_post/cfg.json",
                             "blocks.2.hook_resid_post/sae_weights.safetensors"]
    assert all(TOKEN.encode() not in data for data in files.values())


def test_card_tolerates_missing_and_odd_metrics():
    cfg = SAEConfig(arch="topk", d_in=8, width=16, k=2, model_name="gemma-3-270m", hook_name="blocks.1.hook_z")
    entries = [CardEntry("a", cfg, metrics={"l0": 3, "fvu": "n/a", "nested": {"kl": 0.5, "mse": float("inf")}}),
               CardEntry("b", cfg, metrics={})]
    card = build_model_card(entries, "me/r")
    meta = front_matter(card)
    assert meta["base_model"] == "google/gemma-3-270m" and meta["license"] == "gemma"
    assert flat_metrics(entries[0].metrics) == {"l0": 3.0, "kl": 0.5}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "| <code>a</code> |" in card and "| <code>b</code> |" in card
