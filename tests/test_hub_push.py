"""push_to_hub: the dry-run tree file by file, the model card, naming, tokens, the real upload path (faked HfApi); what
is staged holds no link, no unknown file, no token and no local path; every network failure and a full disk end in
one clear error."""

import errno
import hashlib
import json
import os
import re
import socket
import warnings
from pathlib import Path

import httpx
import httpx2
import pytest
import requests
import torch
import yaml
from safetensors.torch import save_file

from helpers import SMALL_HOOK, disk_full_in, saved_small_sae, small_sae, write_small_saelens
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
    # a saved folder with eval outputs next to it (saelab.evals.core writes metrics.json + feature_density.png)
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


def test_the_card_shows_all_token_and_typical_token_fvu_side_by_side():
    cfg = SAEConfig(arch="topk", d_in=8, width=16, k=2, model_name="smollm2-135m", hook_name="blocks.1.hook_resid_post")
    metrics = {"reconstruction": {"fvu": 0.0649, "fvu_typical": 0.18, "massive_tokens": 5, "l0": 32}}
    card = build_model_card([CardEntry("a", cfg, metrics=metrics), CardEntry("b", cfg, metrics={"fvu": 0.3})], "me/r")
    lines = card.splitlines()
    header = next(line for line in lines if line.startswith("| Subfolder")).split(" | ")
    column = header.index("FVU (typical)")
    assert header[column - 1] == "FVU (all)"
    assert next(line for line in lines if line.startswith("| <code>a</code>")).split(" | ")[column - 1:column + 1] == \
        ["0.0649", "0.1800"]
    assert next(line for line in lines if line.startswith("| <code>b</code>")).split(" | ")[column - 1:column + 1] == \
        ["0.3000", "–"]  # an older metrics.json without the typical-token FVU
    assert "FVU (typical): the same over the tokens whose activation norm is at most 10x the median" in card


REPO = "me/trust-saes"


def no_token_anywhere(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            assert b"hf_" not in path.read_bytes(), path


# ---------------------------------------------------------------------------------------------------- links
@pytest.mark.usefixtures("no_hub")
@pytest.mark.parametrize("name", ["metrics.json", "cfg.json", "sae_weights.safetensors", "sparsity.safetensors",
                                  "eval/feature_density.png"])
def test_a_linked_file_in_an_sae_folder_is_refused(tmp_path, name):
    secret = tmp_path / "token"
    secret.write_text(TOKEN)
    sae_dir = saved_small_sae(tmp_path / "sae", densities=torch.full((16,), 0.01))
    (sae_dir / "eval").mkdir()
    target = sae_dir / name
    if target.exists():  # the link points at a real copy, so that only the link itself is wrong
        os.replace(target, tmp_path / "real")
        secret = tmp_path / "real"
    target.symlink_to(secret)
    with pytest.raises(HubError, match=rf"{name.split('/')[-1]} is a symbolic link.*Replace the link with the real"):
        push_to_hub(sae_dir, REPO, dry_run=tmp_path / "up")
    assert not (tmp_path / "up").exists() or tree(tmp_path / "up") == []


@pytest.mark.usefixtures("no_hub")
def test_a_linked_eval_folder_and_a_linked_sae_folder_in_a_run_are_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "metrics.json").write_text(json.dumps({"token": TOKEN}))
    sae_dir = saved_small_sae(tmp_path / "sae")
    (sae_dir / "eval").symlink_to(outside)
    with pytest.raises(HubError, match=r"eval is a symbolic link"):
        push_to_hub(sae_dir, REPO, dry_run=tmp_path / "up1")

    run = tmp_path / "run"
    saved_small_sae(run / SMALL_HOOK / "relu-16", arch="relu")
    saved_small_sae(tmp_path / "elsewhere", seed=1)
    (run / SMALL_HOOK / "topk-16-k3").symlink_to(tmp_path / "elsewhere")  # sae_folders() must not follow it
    with pytest.raises(HubError, match=r"topk-16-k3 is a symbolic link"):
        push_to_hub(run, REPO, dry_run=tmp_path / "up2")
    (run / SMALL_HOOK / "topk-16-k3").unlink()
    (run / "linked-hook").symlink_to(run / SMALL_HOOK)  # nor a linked folder higher up
    with pytest.raises(HubError, match=r"linked-hook is a symbolic link"):
        push_to_hub(run, REPO, dry_run=tmp_path / "up3")


@pytest.mark.usefixtures("no_hub")
def test_the_named_folder_may_be_a_link_and_what_is_staged_holds_no_link(tmp_path):
    """runs/latest -> runs/<date>: the path the user typed is followed (cp -H); nothing below it is."""
    saved_small_sae(tmp_path / "real-sae")
    (tmp_path / "latest").symlink_to(tmp_path / "real-sae")
    out = push_to_hub(tmp_path / "latest", REPO, dry_run=tmp_path / "up")
    assert tree(out) == ["README.md", f"{SMALL_HOOK}/cfg.json", f"{SMALL_HOOK}/sae_weights.safetensors"]
    assert not any(p.is_symlink() for p in out.rglob("*"))


@pytest.mark.usefixtures("no_hub")
def test_copy_regular_refuses_a_link_swapped_in_after_the_check(tmp_path):
    from saelab.hub.common import copy_regular

    (tmp_path / "secret").write_text(TOKEN)
    (tmp_path / "metrics.json").symlink_to(tmp_path / "secret")
    with pytest.raises(HubError, match="symbolic link"):
        copy_regular(tmp_path / "metrics.json", tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


@pytest.mark.usefixtures("no_hub")
def test_unknown_files_are_left_out_and_named(tmp_path):
    sae_dir = saved_small_sae(tmp_path / "sae")
    (sae_dir / "notes.txt").write_text("private")
    (sae_dir / ".env").write_text(f"HF_TOKEN={TOKEN}")
    (sae_dir / "eval").mkdir()
    (sae_dir / "eval" / "samples.jsonl").write_text("{}")
    (sae_dir / "eval" / "sae_weights.safetensors").write_bytes(b"not the SAE's weights")
    (sae_dir / "eval" / "metrics.json").write_text(json.dumps({"l0": 3.0}))
    with pytest.warns(UserWarning, match=r"not uploading \['.env', 'notes.txt', 'eval/sae_weights.safetensors', "
                                         r"'eval/samples.jsonl'\]"):
        out = push_to_hub(sae_dir, REPO, dry_run=tmp_path / "up")
    assert tree(out) == ["README.md", f"{SMALL_HOOK}/cfg.json", f"{SMALL_HOOK}/metrics.json", f"{SMALL_HOOK}/sae_weights.safetensors"]
    no_token_anywhere(out)


@pytest.mark.usefixtures("no_hub")
def test_a_sparsity_file_of_the_wrong_length_is_not_pushed(tmp_path):
    folder = saved_small_sae(tmp_path / "sae")
    save_file({"sparsity": torch.zeros(15)}, str(folder / "sparsity.safetensors"))
    with pytest.raises(HubError, match=r"sparsity.safetensors: 'sparsity' must hold 16 finite log10 densities"):
        push_to_hub(folder, REPO, dry_run=tmp_path / "up")


# ---------------------------------------------------------------------------------------------------- network
class FailingApi:
    raise_in = "create_repo"
    error: BaseException = RuntimeError()

    def __init__(self, token=None, **kwargs):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        if self.raise_in == "create_repo":
            raise self.error

    def upload_folder(self, **kwargs):
        raise self.error


def dns_failure():
    try:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    except socket.gaierror as cause:
        try:
            raise httpx2.ConnectError(str(cause)) from cause
        except httpx2.ConnectError as e:
            return e


NETWORK_ERRORS = {
    "httpx2-connect": httpx2.ConnectError(f"[Errno 111] Connection refused (Bearer {TOKEN})"),
    "httpx2-connect-timeout": httpx2.ConnectTimeout("timed out"),
    "httpx2-read-timeout": httpx2.ReadTimeout(""),
    "httpx2-dns": dns_failure(),
    "httpx-connect": httpx.ConnectError("[Errno 101] Network is unreachable"),
    "httpx-timeout": httpx.ReadTimeout("The read operation timed out"),
    "requests-connection": requests.exceptions.ConnectionError(f"Max retries exceeded; token={TOKEN}"),
    "requests-timeout": requests.exceptions.ReadTimeout("read timed out"),
    "socket-dns": socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
    "builtin-timeout": TimeoutError("timed out"),
}


def assert_unreachable(message: str, reason: str = "") -> None:
    assert message.startswith(f"could not reach the Hugging Face Hub to upload to {REPO}: "), message
    assert "check the connection (or unset HF_HUB_OFFLINE), then rerun the same command" in message
    assert "--dry-run FOLDER" in message and reason in message
    assert TOKEN not in message and "FAKEtoken" not in message


@pytest.mark.usefixtures("no_hub")
@pytest.mark.parametrize("where", ["create_repo", "upload_folder"])
@pytest.mark.parametrize("kind", list(NETWORK_ERRORS))
def test_every_network_failure_is_one_clear_error(monkeypatch, tmp_path, kind, where):
    import saelab.hub.push as push

    monkeypatch.setattr(FailingApi, "error", NETWORK_ERRORS[kind])
    monkeypatch.setattr(FailingApi, "raise_in", where)
    monkeypatch.setattr(push, "HfApi", FailingApi)
    with pytest.raises(HubError) as info:
        push_to_hub(saved_small_sae(tmp_path / "sae"), REPO, token=TOKEN)
    assert_unreachable(str(info.value), type(NETWORK_ERRORS[kind]).__name__)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained traceback to print


@pytest.mark.usefixtures("no_hub")
def test_a_closed_port_through_the_real_client_is_one_clear_error(tmp_path):
    """The real HfApi and HTTP stack, pointed (by the autouse fixture) at a local port where nothing listens."""
    with pytest.raises(HubError) as info:
        push_to_hub(saved_small_sae(tmp_path / "sae"), REPO, token=TOKEN)
    assert_unreachable(str(info.value), "ConnectError")


@pytest.mark.usefixtures("no_hub")
def test_hf_hub_offline_is_one_clear_error_before_staging(monkeypatch, tmp_path):
    from huggingface_hub import HfApi, constants

    import saelab.hub.push as push

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read once at import: set it as the import would have
    with pytest.raises(HubError) as info:
        push_to_hub(saved_small_sae(tmp_path / "sae"), REPO, token=TOKEN)
    assert_unreachable(str(info.value), "HF_HUB_OFFLINE is set")
    # and when the Hub client raises it itself (offline mode switched on between the check and the upload)
    from huggingface_hub.errors import OfflineModeIsEnabled

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "create_repo", lambda *a, **k: (_ for _ in ()).throw(
        OfflineModeIsEnabled("Cannot reach https://huggingface.co/api/repos/create: offline mode is enabled")))
    monkeypatch.setattr(push, "HfApi", HfApi)
    with pytest.raises(HubError) as info:
        push_to_hub(saved_small_sae(tmp_path / "sae2"), REPO, token=TOKEN)
    assert_unreachable(str(info.value), "HF_HUB_OFFLINE is set")
    # a dry run needs no network
    assert (push_to_hub(tmp_path / "sae", REPO, dry_run=tmp_path / "up") / "README.md").is_file()


@pytest.mark.usefixtures("no_hub")
def test_token_and_http_refusals_say_what_to_do(monkeypatch, tmp_path):
    from huggingface_hub.utils import HfHubHTTPError, LocalTokenNotFoundError

    import saelab.hub.push as push

    monkeypatch.setattr(push, "HfApi", FailingApi)
    folder = saved_small_sae(tmp_path / "sae")
    monkeypatch.setattr(FailingApi, "error", LocalTokenNotFoundError("Token is required"))
    with pytest.raises(HubError, match=r"no Hugging Face token to upload to me/trust-saes: log in with `hf auth "
                                       r"login`, set HF_TOKEN"):
        push_to_hub(folder, REPO)
    for status, says in ((401, "the token is missing or invalid"), (403, "the token may not write to me/trust-saes")):
        response = httpx2.Response(status, request=httpx2.Request("POST", "http://127.0.0.1:9/api/repos/create"))
        monkeypatch.setattr(FailingApi, "error", HfHubHTTPError(f"{status} for token {TOKEN}", response=response))
        with pytest.raises(HubError, match=rf"refused the upload to me/trust-saes \(HTTP {status}\): {says}") as info:
            push_to_hub(folder, REPO, token=TOKEN)
        assert TOKEN not in str(info.value)


@pytest.mark.usefixtures("no_hub")
def test_cli_push_without_network_prints_one_line_not_a_traceback(monkeypatch, tmp_path, capsys):
    import saelab.hub.push as push
    from saelab.cli import main

    monkeypatch.setattr(FailingApi, "error", NETWORK_ERRORS["httpx2-dns"])
    monkeypatch.setattr(push, "HfApi", FailingApi)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["push", str(saved_small_sae(tmp_path / "sae")), REPO]) == 2
    err = capsys.readouterr().err
    assert err.startswith("saelab: error: could not reach the Hugging Face Hub to upload to me/trust-saes: ")
    assert "Traceback" not in err and TOKEN not in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------------- disk
@pytest.mark.usefixtures("no_hub")
def test_dry_run_into_an_occupied_or_unwritable_path_names_it(monkeypatch, tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(HubError, match=rf"cannot write the dry run into {tmp_path / 'a-file' / 'up'}: .*choose a "
                                       rf"folder you can write"):
        push_to_hub(small_sae(), REPO, dry_run=tmp_path / "a-file" / "up")
    with pytest.raises(HubError, match=rf"dry_run folder {tmp_path / 'a-file'} must be new or empty"):
        push_to_hub(small_sae(), REPO, dry_run=tmp_path / "a-file")

    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):  # root ignores chmod, so the refusal is simulated as the kernel gives it
        if self.name == "ro-up":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(HubError, match=r"cannot write the dry run into .*ro-up: Permission denied"):
        push_to_hub(small_sae(), REPO, dry_run=tmp_path / "ro-up")


@pytest.mark.usefixtures("no_hub")
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_dry_run_into_a_read_only_folder_names_it(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o500)
    with pytest.raises(HubError, match=r"cannot write the dry run into .*ro/up: Permission denied"):
        push_to_hub(small_sae(), REPO, dry_run=tmp_path / "ro" / "up")


@pytest.mark.usefixtures("no_hub")
@pytest.mark.parametrize("what", ["safetensors", "copy"])
def test_a_full_disk_during_a_dry_run_names_the_folder_and_leaves_nothing(monkeypatch, tmp_path, what):
    folder = saved_small_sae(tmp_path / "sae")  # a saelab folder is copied; an SAE object is saved with safetensors
    item = small_sae() if what == "safetensors" else folder
    disk_full_in(monkeypatch, what)
    with pytest.raises(HubError, match=rf"{tmp_path / 'up'}.*No space left on device.*free some space"):
        push_to_hub(item, REPO, dry_run=tmp_path / "up")
    assert not (tmp_path / "up").exists()
    (tmp_path / "empty").mkdir()  # an empty folder given by the user stays, empty
    with pytest.raises(HubError, match="No space left on device"):
        push_to_hub(item, REPO, dry_run=tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []


@pytest.mark.usefixtures("no_hub")
def test_a_full_disk_while_staging_a_real_push_names_tmpdir(monkeypatch, tmp_path):
    import saelab.hub.push as push

    monkeypatch.setattr(push, "HfApi", FailingApi)
    disk_full_in(monkeypatch, "copy")
    with pytest.raises(HubError, match=r"could not stage the upload in .*No space left on device.*set TMPDIR"):
        push_to_hub(saved_small_sae(tmp_path / "sae"), REPO, token=TOKEN)


# ---------------------------------------------------------------------------------------------------- hostile names
def with_hook(folder: Path, hook: str) -> Path:
    """A saelab folder whose cfg.json names `hook` everywhere it is written (so the keys agree)."""
    cfg = json.loads((folder / "cfg.json").read_text())
    for place in (cfg, cfg["saelab"]["config"], cfg.get("metadata", {})):
        if "hook_name" in place:
            place["hook_name"] = hook
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.usefixtures("no_hub")
@pytest.mark.parametrize("hook", ["../../escaped", "..", "a\\b", "x\ny"])
def test_a_cfg_hook_name_that_is_a_path_is_refused_and_nothing_is_staged(tmp_path, hook):
    """push named the subfolder after the hook: '../../escaped' staged the SAE outside the dry-run folder."""
    folder = with_hook(saved_small_sae(tmp_path / "in" / "sae"), hook)
    saelens = write_small_saelens(tmp_path / "in" / "saelens", hook_name=hook)
    for sae_folder in (folder, saelens):
        with pytest.raises(HubError, match=r"cfg.json: invalid SAE config \(SAEConfig.hook_name must be a hook point"):
            load_sae(sae_folder)
        with pytest.raises(HubError, match="hook_name must be a hook point name"):
            push_to_hub(sae_folder, REPO, dry_run=tmp_path / "in" / "up")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"] and not (tmp_path / "in" / "up").exists()


@pytest.mark.usefixtures("no_hub")
def test_the_model_card_shows_hostile_names_as_text():
    """A hook name '<script>...' (as an older saelab let through) was put into the card as HTML."""
    from saelab.hub.card import CardEntry, build_model_card

    cfg = SAEConfig(arch="topk", d_in=8, width=16, k=3, model_name="evil/<img src=x onerror=alert(1)>")
    cfg.hook_name = "<script>alert(1)</script>\n# heading | cell `code` [link](javascript:alert(1)) &amp;"
    entry = CardEntry("<b>sub</b>`\n```", cfg, metrics={"fvu": 0.5}, density_plot="<b>sub</b>/feature_density.png")
    card = build_model_card([entry], "me/<i>repo</i>")
    body = card.split("\n---\n", 1)[1]  # after the YAML front matter (safe_dump quotes what it must)
    assert set(re.findall(r"<\s*/?\s*([a-zA-Z]+)", body)) == {"code"}  # no tag but the card's own
    assert "&lt;script&gt;alert(1)&lt;" in body and "&amp;amp;" in body
    assert "\n# heading" not in body and "[link](" not in body
    lines = body.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| Subfolder"))
    assert lines[header + 2].replace("\\|", "").count("|") == lines[header].count("|")  # one row, its own cells
    assert sum(line.startswith("```") for line in lines) == 4  # the two snippets' fences, none from a name


# ---------------------------------------------------------------------------------------------------- privacy
@pytest.mark.usefixtures("no_hub")
def test_push_publishes_no_local_path(tiny_model_dir, tmp_path):
    """`train --eval-tokens` then `push --dry-run` staged metrics.json with the text's absolute path (and cfg.json
    with the model folder's): nothing uploaded may say where the user keeps files, nor their user name."""
    from saelab.cli import main

    text = tmp_path / "ana" / "private" / "diary.txt"
    text.parent.mkdir(parents=True)
    text.write_text(" ".join(f"day {i} the weather was {['fine', 'grey', 'wet'][i % 3]}." for i in range(3000)))
    acts, run, dry = tmp_path / "acts", tmp_path / "run", tmp_path / "dry"
    assert main(["cache", "--model", str(tiny_model_dir), "--hooks", "blocks.0.hook_resid_post", "--out", str(acts),
                 "--tokens", "2k", "--context-len", "32", "--batch-size", "4", "--text", str(text)]) == 0
    assert main(["train", "--acts", str(acts), "--arch", "topk", "--width", "64", "--k", "4", "--tokens", "1024",
                 "--batch-size", "128", "--out", str(run), "--eval-tokens", "256"]) == 0
    (local,) = run.rglob("metrics.json")
    assert json.loads(local.read_text())["settings"]["text"]["source"] == str(text)  # kept as given, locally
    from saelab.evals.core import EvalResult, _title  # the density plot's title is pixels: check the text drawn

    assert _title(EvalResult.load(local.parent).sae).endswith(f"· {tiny_model_dir.name} blocks.0.hook_resid_post")
    assert main(["push", str(run), REPO, "--dry-run", str(dry)]) == 0

    private = [str(tmp_path), str(tiny_model_dir), str(Path.home())]
    staged = [path for path in dry.rglob("*") if path.is_file()]
    assert {p.name for p in staged} >= {"README.md", "cfg.json", "metrics.json"}
    for path in staged:
        data = path.read_bytes()
        assert not [p for p in private if p.encode() in data], path
    (metrics,) = dry.rglob("metrics.json")
    published = json.loads(metrics.read_text())["settings"]["text"]
    assert published["source"] == "diary.txt" and published["sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()
    assert load_sae(metrics.parent).cfg.model_name == tiny_model_dir.name  # cfg.json still agrees with itself


def test_the_card_names_the_model_its_quantisation_the_training_text_and_the_evaluation(tmp_path):
    from saelab.hub.saelens import source_metadata

    text = {"source": "/home/ana/texts/diary.txt", "context_len": 128, "prepend_bos": True, "start": 0,
            "sha256": "ab" * 32}
    run = source_metadata({"cache": {"model": "smollm2-135m", "drop_bos": True, "text": text}, "tokens": 20_320})
    sae = create_sae(SAEConfig(arch="topk", d_in=8, width=512, k=3, model_name="smollm2-135m",
                               hook_name="blocks.15.hook_resid_post", training_tokens=16_384))
    metrics = {"n_tokens": 4_064, "reconstruction": {"fvu": 0.06, "frac_dead": 0.5, "l0": 3.0},
               "settings": {"text": {**text, "start": 160}}}
    save_sae(sae, tmp_path / "sae", metadata=run, metrics=metrics)
    push_to_hub(tmp_path / "sae", "me/r", dry_run=tmp_path / "dry")
    card = (tmp_path / "dry" / "README.md").read_text()
    assert ("- **Model**: <code>smollm2-135m</code>: [HuggingFaceTB/SmolLM2-135M-Instruct]"
            "(https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct), weights Q4_1 GGUF "
            "(SmolLM2-135M-Instruct.Q4_1.gguf) de-quantised to float32, run as a TransformerLens TransformerBridge"
            ) in card
    assert ("- **Training**: 16,384 tokens of <code>diary.txt</code>, contexts of 128 tokens, BOS prepended (its "
            "position left out), read from an activation cache of 20,320 tokens") in card
    assert ("- **Evaluation**: 4,064 tokens of <code>diary.txt</code> from context 160 on (held out: after the "
            "contexts training read), contexts of 128 tokens") in card
    assert "/home/ana" not in card
    row = next(line for line in card.splitlines() if line.startswith("| <code>"))
    assert "50.00%" not in row  # 4,064 tokens cannot tell a dead latent of 512 from a rare one (5,120 needed)
    assert "Dead is not measured (–) on an evaluation of fewer than 10 x width tokens" in card


def test_eval_records_are_published_beside_the_sae_and_shown_in_the_card(tmp_path):
    from saelab.evals.intervals import Interval
    from saelab.evals.saebench import saebench_output, write_output

    sae_dir = saved_small_sae(tmp_path / "sae")
    interval = Interval(0.26, 0.21, 0.31, 26, "bootstrap")
    write_output(saebench_output("absorption_first_letter", {}, {"mean": {"mean_absorption_fraction_score": 0.26}},
                                 load_sae(sae_dir), intervals={"mean.mean_absorption_fraction_score": interval}),
                 sae_dir)
    (sae_dir / "evals" / "notes.txt").write_text("mine")
    with pytest.warns(UserWarning, match=r"evals/notes.txt"):
        push_to_hub(sae_dir, REPO, dry_run=tmp_path / "up")
    staged = next(p for p in (tmp_path / "up").iterdir() if p.is_dir())
    record = json.loads((staged / "evals" / "absorption_first_letter.json").read_text())
    assert record["eval_result_metrics"]["mean"]["mean_absorption_fraction_score"] == 0.26
    assert not (staged / "evals" / "notes.txt").exists()
    card = (tmp_path / "up" / "README.md").read_text()
    assert "## Evals" in card and "absorption_first_letter: mean.mean_absorption_fraction_score | 0.260 [0.210, 0.310]" in card

    (sae_dir / "evals" / "notes.txt").unlink()
    (sae_dir / "evals" / "core.json").symlink_to(sae_dir / "cfg.json")
    with pytest.raises(HubError, match=r"core.json is a symbolic link"):
        push_to_hub(sae_dir, REPO, dry_run=tmp_path / "up2")
