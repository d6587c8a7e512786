"""Trust in saelab.hub: nothing uploaded through a link, no half-read cfg.json, every network or disk failure a clear
HubError (never a traceback, never the token). No test reaches the Hub: HfApi is faked or pointed at a closed port."""
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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from saelab.hub import HubError, load_sae, push_to_hub, save_sae
from saelab.sae import SAEConfig, create_sae

TOKEN = "hf_FAKEtokenDoNotWrite0123456789"
REPO = "me/trust-saes"
HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """A test that slips past its fakes hits a closed local port, never huggingface.co."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


def make(arch="topk", hook=HOOK, seed=0):
    torch.manual_seed(seed)
    return create_sae(SAEConfig(arch=arch, d_in=8, width=16, k=3 if arch == "topk" else None, hook_name=hook,
                                model_name="smollm2-135m"))


def saved(folder: Path, arch="topk", seed=0, **kw) -> Path:
    save_sae(make(arch, seed=seed), folder, **kw)
    return folder


def tree(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def no_token_anywhere(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            assert b"hf_" not in path.read_bytes(), path


# ---------------------------------------------------------------------------------------------------- links
@pytest.mark.parametrize("name", ["metrics.json", "cfg.json", "sae_weights.safetensors", "sparsity.safetensors",
                                  "eval/feature_density.png"])
def test_a_linked_file_in_an_sae_folder_is_refused(tmp_path, name):
    secret = tmp_path / "token"
    secret.write_text(TOKEN)
    sae_dir = saved(tmp_path / "sae", densities=torch.full((16,), 0.01))
    (sae_dir / "eval").mkdir()
    target = sae_dir / name
    if target.exists():  # the link points at a real copy, so that only the link itself is wrong
        os.replace(target, tmp_path / "real")
        secret = tmp_path / "real"
    target.symlink_to(secret)
    with pytest.raises(HubError, match=rf"{name.split('/')[-1]} is a symbolic link.*Replace the link with the real"):
        push_to_hub(sae_dir, REPO, dry_run=tmp_path / "up")
    assert not (tmp_path / "up").exists() or tree(tmp_path / "up") == []


def test_a_linked_eval_folder_and_a_linked_sae_folder_in_a_run_are_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "metrics.json").write_text(json.dumps({"token": TOKEN}))
    sae_dir = saved(tmp_path / "sae")
    (sae_dir / "eval").symlink_to(outside)
    with pytest.raises(HubError, match=r"eval is a symbolic link"):
        push_to_hub(sae_dir, REPO, dry_run=tmp_path / "up1")

    run = tmp_path / "run"
    saved(run / HOOK / "relu-16", arch="relu")
    saved(tmp_path / "elsewhere", seed=1)
    (run / HOOK / "topk-16-k3").symlink_to(tmp_path / "elsewhere")  # sae_folders() must not follow it
    with pytest.raises(HubError, match=r"topk-16-k3 is a symbolic link"):
        push_to_hub(run, REPO, dry_run=tmp_path / "up2")
    (run / HOOK / "topk-16-k3").unlink()
    (run / "linked-hook").symlink_to(run / HOOK)  # nor a linked folder higher up
    with pytest.raises(HubError, match=r"linked-hook is a symbolic link"):
        push_to_hub(run, REPO, dry_run=tmp_path / "up3")


def test_the_named_folder_may_be_a_link_and_what_is_staged_holds_no_link(tmp_path):
    """runs/latest -> runs/<date>: the path the user typed is followed (cp -H); nothing below it is."""
    saved(tmp_path / "real-sae")
    (tmp_path / "latest").symlink_to(tmp_path / "real-sae")
    out = push_to_hub(tmp_path / "latest", REPO, dry_run=tmp_path / "up")
    assert tree(out) == ["README.md", f"{HOOK}/cfg.json", f"{HOOK}/sae_weights.safetensors"]
    assert not any(p.is_symlink() for p in out.rglob("*"))


def test_copy_regular_refuses_a_link_swapped_in_after_the_check(tmp_path):
    from saelab.hub.common import copy_regular

    (tmp_path / "secret").write_text(TOKEN)
    (tmp_path / "metrics.json").symlink_to(tmp_path / "secret")
    with pytest.raises(HubError, match="symbolic link"):
        copy_regular(tmp_path / "metrics.json", tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def test_unknown_files_are_left_out_and_named(tmp_path):
    sae_dir = saved(tmp_path / "sae")
    (sae_dir / "notes.txt").write_text("private")
    (sae_dir / ".env").write_text(f"HF_TOKEN={TOKEN}")
    (sae_dir / "eval").mkdir()
    (sae_dir / "eval" / "samples.jsonl").write_text("{}")
    (sae_dir / "eval" / "sae_weights.safetensors").write_bytes(b"not the SAE's weights")
    (sae_dir / "eval" / "metrics.json").write_text(json.dumps({"l0": 3.0}))
    with pytest.warns(UserWarning, match=r"not uploading \['.env', 'notes.txt', 'eval/sae_weights.safetensors', "
                                         r"'eval/samples.jsonl'\]"):
        out = push_to_hub(sae_dir, REPO, dry_run=tmp_path / "up")
    assert tree(out) == ["README.md", f"{HOOK}/cfg.json", f"{HOOK}/metrics.json", f"{HOOK}/sae_weights.safetensors"]
    no_token_anywhere(out)


# ---------------------------------------------------------------------------------------------------- cfg.json
@pytest.mark.parametrize("key,value,shown", [
    ("d_sae", 99, "d_sae=99 but the saelab config gives 16"),
    ("d_sae", "16", "d_sae='16' but the saelab config gives 16"),
    ("d_in", 7, "d_in=7 but the saelab config gives 8"),
    ("architecture", "jumprelu", "architecture='jumprelu' but the saelab config gives 'topk'"),
    ("k", 5, "k=5 but the saelab config gives 3"),
    ("dtype", "bfloat16", "dtype='bfloat16' but the saelab config gives 'float32'"),
    ("hook_name", "blocks.2.hook_resid_post", f"hook_name='blocks.2.hook_resid_post' but the saelab config gives "
                                              f"'{HOOK}'"),
    ("model_name", "gpt2", "model_name='gpt2' but the saelab config gives 'smollm2-135m'"),
    ("apply_b_dec_to_input", False, "apply_b_dec_to_input=False but the saelab config gives True"),
    ("normalize_activations", "layer_norm", "normalize_activations='layer_norm' but the saelab config gives 'none'"),
    ("metadata.hook_name", "blocks.9.hook_mlp_out", "metadata.hook_name='blocks.9.hook_mlp_out' but"),
    ("saelab.arch", "relu", "saelab.arch='relu' vs saelab.config.arch='topk'"),
])
def test_saelab_cfg_whose_saelens_keys_disagree_is_refused(tmp_path, key, value, shown):
    folder = saved(tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    *parents, last = key.split(".")
    target = cfg
    for part in parents:
        target = target[part]
    target[last] = value
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(HubError) as info:
        load_sae(folder)
    message = str(info.value)
    assert str(folder / "cfg.json") in message and shown in message and "edit cfg.json so that both agree" in message
    with pytest.raises(HubError, match="disagree"):  # and it is never pushed
        push_to_hub(folder, REPO, dry_run=tmp_path / "up")


@pytest.mark.parametrize("field,value,match", [
    ("config.width", "16", r"SAEConfig.width must be a positive integer, got '16'"),
    ("config.width", -16, r"SAEConfig.width must be a positive integer"),
    ("config.k", 40, r"SAEConfig.k must be an integer with 1 <= k <= width=16"),
    ("folded_input_scale", "abc", r"folded_input_scale must be a finite number > 0, got 'abc'"),
    ("folded_input_scale", -1.0, r"folded_input_scale must be a finite number > 0"),
])
def test_saelab_block_with_ill_typed_values_is_refused(tmp_path, field, value, match):
    folder = saved(tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    *parents, last = field.split(".")
    target = cfg["saelab"]
    for part in parents:
        target = target[part]
    target[last] = value
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(HubError, match=match):
        load_sae(folder)
    with pytest.raises(HubError, match=match):  # the card would otherwise show a made-up scale
        push_to_hub(folder, REPO, dry_run=tmp_path / "up")


def test_weights_that_disagree_with_cfg_say_what_to_do(tmp_path):
    folder = saved(tmp_path / "sae")
    weights = load_file(str(folder / "sae_weights.safetensors"))
    save_file({**weights, "b_enc": torch.zeros(17)}, str(folder / "sae_weights.safetensors"))
    with pytest.raises(HubError, match=r"b_enc has shape \[17\] but d_in=8, width=16 gives \[16\]; the weights and "
                                       r"cfg.json describe different SAEs"):
        load_sae(folder)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_weights_that_are_not_floating_point_are_refused_naming_the_tensor(tmp_path, dtype):
    import numpy as np

    folder = saved(tmp_path / "sae")
    weights = load_file(str(folder / "sae_weights.safetensors"))
    save_file({**weights, "W_dec": (weights["W_dec"] * 3).to(dtype)}, str(folder / "sae_weights.safetensors"))
    shown = str(dtype).removeprefix("torch.")
    with pytest.raises(HubError, match=f"tensor 'W_dec' has dtype {shown}, not a floating-point type"):
        load_sae(folder)
    gemma = tmp_path / "gemmascope"  # a format that casts to float64 on its own reads through the same check
    gemma.mkdir()
    arrays = {"W_enc": np.ones((8, 16), np.float32), "W_dec": np.ones((16, 8), np.int32), "b_enc": np.zeros(16, np.float32),
              "b_dec": np.zeros(8, np.float32), "threshold": np.zeros(16, np.float32)}
    np.savez(gemma / "params.npz", **arrays)
    with pytest.raises(HubError, match="tensor 'W_dec' has dtype int32"):
        load_sae(gemma)


def test_save_refuses_metadata_that_contradicts_the_config(tmp_path):
    with pytest.raises(HubError, match=r"metadata\['hook_name'\]='blocks.2.hook_z' disagrees with sae.cfg.hook_name"):
        save_sae(make(), tmp_path / "sae", metadata={"hook_name": "blocks.2.hook_z"})
    assert not (tmp_path / "sae").exists()


def test_a_sparsity_file_of_the_wrong_length_is_not_pushed(tmp_path):
    folder = saved(tmp_path / "sae")
    save_file({"sparsity": torch.zeros(15)}, str(folder / "sparsity.safetensors"))
    with pytest.raises(HubError, match=r"sparsity.safetensors: 'sparsity' must hold 16 finite log10 densities"):
        push_to_hub(folder, REPO, dry_run=tmp_path / "up")


def write_saelens(folder: Path, **cfg) -> Path:
    torch.manual_seed(0)
    folder.mkdir(parents=True)
    base = {"architecture": "topk", "d_in": 8, "d_sae": 16, "k": 3, "dtype": "float32", "apply_b_dec_to_input": True,
            "normalize_activations": "none", "hook_name": HOOK, "model_name": "gpt2"}
    (folder / "cfg.json").write_text(json.dumps({**base, **cfg}))
    save_file({"W_enc": torch.randn(8, 16), "b_enc": torch.zeros(16), "W_dec": torch.randn(16, 8),
               "b_dec": torch.zeros(8)}, str(folder / "sae_weights.safetensors"))
    return folder


@pytest.mark.parametrize("cfg,match", [
    ({"apply_b_dec_to_input": "false"}, r"'apply_b_dec_to_input' must be true or false, got 'false'"),
    ({"rescale_acts_by_decoder_norm": "false"}, r"'rescale_acts_by_decoder_norm' must be true or false"),
    ({"normalize_activations": "bogus"}, r"unknown normalize_activations 'bogus'"),
    ({"architecture": ["topk"]}, r"'architecture' must be a string, got \['topk'\]"),
    ({"hook_name": 5}, r"'hook_name' must be a string, got 5"),
    ({"k": True}, r"a topk SAE needs an integer k in \[1, d_sae=16\], got True"),
    ({"k": 17}, r"a topk SAE needs an integer k in \[1, d_sae=16\], got 17"),
    ({"k": 3, "activation_fn_kwargs": {"k": 4}}, r"k=3 but activation_fn_kwargs.k=4"),
    ({"d_sae": "16"}, r"'d_sae' must be an integer >= 1, got '16' \(str\)"),
    ({"d_sae": -16}, r"'d_sae' must be an integer >= 1, got -16"),
    ({"d_sae": 32}, r"W_enc has shape \[8, 16\] but cfg.json d_in=8, d_sae=32 gives \[8, 32\]; the weights and"),
])
def test_saelens_cfg_ill_typed_or_inconsistent_is_refused(tmp_path, cfg, match):
    folder = write_saelens(tmp_path / "sl", **cfg)
    with pytest.raises(HubError, match=match) as info:
        load_sae(folder)
    assert "cfg.json" in str(info.value)


def write_sparsify(root: Path, **cfg) -> Path:
    folder = root / "layers.1"
    folder.mkdir(parents=True)
    base = {"activation": "topk", "expansion_factor": 2, "num_latents": 0, "k": 3, "d_in": 8, "transcode": False,
            "skip_connection": False, "normalize_decoder": True, "multi_topk": False}
    (folder / "cfg.json").write_text(json.dumps({**base, **cfg}))
    save_file({"encoder.weight": torch.randn(16, 8), "encoder.bias": torch.zeros(16), "W_dec": torch.randn(16, 8),
               "b_dec": torch.zeros(8)}, str(folder / "sae.safetensors"))
    return folder


@pytest.mark.parametrize("cfg,match", [
    ({"num_latents": "16"}, r"'num_latents' must be an integer >= 0, got '16' \(str\)"),
    ({"num_latents": -4}, r"'num_latents' must be an integer >= 0, got -4"),
    ({"transcode": "false"}, r"'transcode' must be true or false, got 'false'"),
    ({"expansion_factor": 2.5}, r"'expansion_factor' must be an integer >= 1, got 2.5"),
    ({"num_latents": 32}, r"encoder.weight has shape \[16, 8\] but cfg.json d_in=8, num_latents=32 gives"),
    ({"k": 17}, r"expected an integer 'k' in \[1, num_latents=16\], got 17"),
])
def test_sparsify_cfg_ill_typed_or_inconsistent_is_refused(tmp_path, cfg, match):
    folder = write_sparsify(tmp_path, **cfg)
    with pytest.raises(HubError, match=match) as info:
        load_sae(folder)
    assert "cfg.json" in str(info.value)


# ---------------------------------------------------------------------------------------------------- network
class FakeApi:
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


@pytest.mark.parametrize("where", ["create_repo", "upload_folder"])
@pytest.mark.parametrize("kind", list(NETWORK_ERRORS))
def test_every_network_failure_is_one_clear_error(monkeypatch, tmp_path, kind, where):
    import saelab.hub.push as push

    monkeypatch.setattr(FakeApi, "error", NETWORK_ERRORS[kind])
    monkeypatch.setattr(FakeApi, "raise_in", where)
    monkeypatch.setattr(push, "HfApi", FakeApi)
    with pytest.raises(HubError) as info:
        push_to_hub(saved(tmp_path / "sae"), REPO, token=TOKEN)
    assert_unreachable(str(info.value), type(NETWORK_ERRORS[kind]).__name__)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained traceback to print


def test_a_closed_port_through_the_real_client_is_one_clear_error(tmp_path):
    """The real HfApi and HTTP stack, pointed (by the autouse fixture) at a local port where nothing listens."""
    with pytest.raises(HubError) as info:
        push_to_hub(saved(tmp_path / "sae"), REPO, token=TOKEN)
    assert_unreachable(str(info.value), "ConnectError")


def test_hf_hub_offline_is_one_clear_error_before_staging(monkeypatch, tmp_path):
    from huggingface_hub import HfApi, constants

    import saelab.hub.push as push

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read once at import: set it as the import would have
    with pytest.raises(HubError) as info:
        push_to_hub(saved(tmp_path / "sae"), REPO, token=TOKEN)
    assert_unreachable(str(info.value), "HF_HUB_OFFLINE is set")
    # and when the Hub client raises it itself (offline mode switched on between the check and the upload)
    from huggingface_hub.errors import OfflineModeIsEnabled

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "create_repo", lambda *a, **k: (_ for _ in ()).throw(
        OfflineModeIsEnabled("Cannot reach https://huggingface.co/api/repos/create: offline mode is enabled")))
    monkeypatch.setattr(push, "HfApi", HfApi)
    with pytest.raises(HubError) as info:
        push_to_hub(saved(tmp_path / "sae2"), REPO, token=TOKEN)
    assert_unreachable(str(info.value), "HF_HUB_OFFLINE is set")
    # a dry run needs no network
    assert (push_to_hub(tmp_path / "sae", REPO, dry_run=tmp_path / "up") / "README.md").is_file()


def test_token_and_http_refusals_say_what_to_do(monkeypatch, tmp_path):
    from huggingface_hub.utils import HfHubHTTPError, LocalTokenNotFoundError

    import saelab.hub.push as push

    monkeypatch.setattr(push, "HfApi", FakeApi)
    folder = saved(tmp_path / "sae")
    monkeypatch.setattr(FakeApi, "error", LocalTokenNotFoundError("Token is required"))
    with pytest.raises(HubError, match=r"no Hugging Face token to upload to me/trust-saes: log in with `hf auth "
                                       r"login`, set HF_TOKEN"):
        push_to_hub(folder, REPO)
    for status, says in ((401, "the token is missing or invalid"), (403, "the token may not write to me/trust-saes")):
        response = httpx2.Response(status, request=httpx2.Request("POST", "http://127.0.0.1:9/api/repos/create"))
        monkeypatch.setattr(FakeApi, "error", HfHubHTTPError(f"{status} for token {TOKEN}", response=response))
        with pytest.raises(HubError, match=rf"refused the upload to me/trust-saes \(HTTP {status}\): {says}") as info:
            push_to_hub(folder, REPO, token=TOKEN)
        assert TOKEN not in str(info.value)


def test_cli_push_without_network_prints_one_line_not_a_traceback(monkeypatch, tmp_path, capsys):
    import saelab.hub.push as push
    from saelab.cli import main

    monkeypatch.setattr(FakeApi, "error", NETWORK_ERRORS["httpx2-dns"])
    monkeypatch.setattr(push, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["push", str(saved(tmp_path / "sae")), REPO]) == 2
    err = capsys.readouterr().err
    assert err.startswith("saelab: error: could not reach the Hugging Face Hub to upload to me/trust-saes: ")
    assert "Traceback" not in err and TOKEN not in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------------- disk
def test_dry_run_into_an_occupied_or_unwritable_path_names_it(monkeypatch, tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(HubError, match=rf"cannot write the dry run into {tmp_path / 'a-file' / 'up'}: .*choose a "
                                       rf"folder you can write"):
        push_to_hub(make(), REPO, dry_run=tmp_path / "a-file" / "up")
    with pytest.raises(HubError, match=rf"dry_run folder {tmp_path / 'a-file'} must be new or empty"):
        push_to_hub(make(), REPO, dry_run=tmp_path / "a-file")

    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):  # root ignores chmod, so the refusal is simulated as the kernel gives it
        if self.name == "ro-up":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(HubError, match=r"cannot write the dry run into .*ro-up: Permission denied"):
        push_to_hub(make(), REPO, dry_run=tmp_path / "ro-up")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_dry_run_into_a_read_only_folder_names_it(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o500)
    with pytest.raises(HubError, match=r"cannot write the dry run into .*ro/up: Permission denied"):
        push_to_hub(make(), REPO, dry_run=tmp_path / "ro" / "up")


def disk_full_in(monkeypatch, what: str) -> None:
    """Make the disk fill up at the first write of `what`: safetensors (as it reports it) or a copied file."""
    if what == "safetensors":
        import safetensors.torch

        def full(*args, **kwargs):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(safetensors.torch, "save_file", full)
    else:
        import shutil

        def full(src, dst, *args):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(shutil, "copyfileobj", full)


@pytest.mark.parametrize("what", ["safetensors", "copy"])
def test_a_full_disk_during_a_dry_run_names_the_folder_and_leaves_nothing(monkeypatch, tmp_path, what):
    folder = saved(tmp_path / "sae")  # a saelab folder is copied; an SAE object is saved with safetensors
    item = make() if what == "safetensors" else folder
    disk_full_in(monkeypatch, what)
    with pytest.raises(HubError, match=rf"{tmp_path / 'up'}.*No space left on device.*free some space"):
        push_to_hub(item, REPO, dry_run=tmp_path / "up")
    assert not (tmp_path / "up").exists()
    (tmp_path / "empty").mkdir()  # an empty folder given by the user stays, empty
    with pytest.raises(HubError, match="No space left on device"):
        push_to_hub(item, REPO, dry_run=tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []


def test_a_full_disk_while_staging_a_real_push_names_tmpdir(monkeypatch, tmp_path):
    import saelab.hub.push as push

    monkeypatch.setattr(push, "HfApi", FakeApi)
    disk_full_in(monkeypatch, "copy")
    with pytest.raises(HubError, match=r"could not stage the upload in .*No space left on device.*set TMPDIR"):
        push_to_hub(saved(tmp_path / "sae"), REPO, token=TOKEN)


def test_a_full_disk_in_save_sae_names_the_folder_and_leaves_no_loadable_half(monkeypatch, tmp_path):
    folder = saved(tmp_path / "sae")  # an older SAE there: its cfg.json must not survive next to new weights
    disk_full_in(monkeypatch, "safetensors")
    with pytest.raises(HubError, match=rf"could not write the SAE to {folder}: .*No space left on device"):
        save_sae(make(seed=1), folder)
    assert not (folder / "cfg.json").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(HubError, match="not an SAE folder|no weights|does not exist"):
            load_sae(folder)


def test_saving_over_an_older_sae_leaves_nothing_of_it_behind(tmp_path):
    """Metrics, densities and plots describe the weights they were saved with: a new save must not inherit them."""
    from saelab.hub import read_metrics, save_sae
    from saelab.hub.common import SPARSITY_FILE
    from saelab.sae import SAEConfig, create_sae

    sae = create_sae(SAEConfig(arch="topk", d_in=6, width=16, k=2))
    folder = save_sae(sae, tmp_path / "sae", densities=torch.full((16,), 0.1), metrics={"fvu": 0.1})
    (folder / "feature_density.png").write_bytes(b"\x89PNG old plot")
    save_sae(create_sae(SAEConfig(arch="topk", d_in=6, width=16, k=2)), folder)
    assert read_metrics(folder) is None
    assert not (folder / SPARSITY_FILE).exists() and not (folder / "feature_density.png").exists()


def test_save_sae_replaces_only_a_saelab_sae_or_its_own_save_cut_short(monkeypatch, tmp_path):
    """A save removes and replaces the files of its format: only where they are a saelab SAE's, or the leftovers of
    a saelab save that a full disk (or a kill) cut short. Anyone else's files there are refused, untouched."""
    users = tmp_path / "users"
    users.mkdir()
    (users / "metrics.json").write_text('{"my": "numbers"}')
    (users / "feature_density.png").write_bytes(b"\x89PNG my plot")
    saelens = tmp_path / "saelens"
    saelens.mkdir()
    (saelens / "cfg.json").write_text('{"d_in": 8, "d_sae": 16}')
    for folder, named in ((users, "feature_density.png, metrics.json"), (saelens, "cfg.json")):
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        with pytest.raises(HubError, match=rf"{folder} holds files but no SAE saelab wrote \({named}\); .* nothing was "
                                           "changed. Choose another folder, or remove them"):
            save_sae(make(), folder)
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before

    ours = saved(tmp_path / "ours")
    (ours / "notes.txt").write_text("about this SAE")
    (ours / "firing_counts.safetensors").write_bytes(b"counts of the old weights")
    saved(ours, seed=1)  # a saelab SAE's files are replaced; a user's notes beside them are kept
    assert (ours / "notes.txt").read_text() == "about this SAE" and not (ours / "firing_counts.safetensors").exists()
    with monkeypatch.context() as patch:
        disk_full_in(patch, "safetensors")
        with pytest.raises(HubError, match="No space left on device"):
            saved(ours, seed=2)
    assert not (ours / "cfg.json").exists()  # no SAE there now, but the save's leftovers are its own to replace
    saved(ours, seed=2)
    torch.testing.assert_close(load_sae(ours).W_dec, make(seed=2).W_dec)
    assert sorted(p.name for p in ours.iterdir()) == ["cfg.json", "notes.txt", "sae_weights.safetensors"]


# ---------------------------------------------------------------------------------------------------- hostile names
def with_hook(folder: Path, hook: str) -> Path:
    """A saelab folder whose cfg.json names `hook` everywhere it is written (so the keys agree)."""
    cfg = json.loads((folder / "cfg.json").read_text())
    for place in (cfg, cfg["saelab"]["config"], cfg.get("metadata", {})):
        if "hook_name" in place:
            place["hook_name"] = hook
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("hook", ["../../escaped", "..", "a\\b", "x\ny"])
def test_a_cfg_hook_name_that_is_a_path_is_refused_and_nothing_is_staged(tmp_path, hook):
    """push named the subfolder after the hook: '../../escaped' staged the SAE outside the dry-run folder."""
    folder = with_hook(saved(tmp_path / "in" / "sae"), hook)
    saelens = write_saelens(tmp_path / "in" / "saelens", hook_name=hook)
    for sae_folder in (folder, saelens):
        with pytest.raises(HubError, match=r"cfg.json: invalid SAE config \(SAEConfig.hook_name must be a hook point"):
            load_sae(sae_folder)
        with pytest.raises(HubError, match="hook_name must be a hook point name"):
            push_to_hub(sae_folder, REPO, dry_run=tmp_path / "in" / "up")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"] and not (tmp_path / "in" / "up").exists()


def test_a_subfolder_outside_the_repo_is_refused_before_any_download(tmp_path, monkeypatch):
    import huggingface_hub

    from saelab.hub import from_pretrained

    saved(tmp_path / "hub")  # an SAE where '../../..' leads from the snapshot: it loaded
    snapshot = tmp_path / "hub" / "models--me--saes" / "snapshots" / ("a" * 40)
    (snapshot / HOOK).mkdir(parents=True)
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **kw: calls.append(kw) or str(snapshot))
    for subfolder in ("../../..", f"{HOOK}/../../../..", "a/./b", "a\\..\\b"):
        with pytest.raises(HubError, match=rf"subfolder '.*' has a part .* that .*; give a path inside the repo"):
            from_pretrained("me/saes", subfolder=subfolder)
    assert calls == []


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
    from saelab.eval import EvalResult, _title  # the density plot's title is pixels: check the text drawn

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
