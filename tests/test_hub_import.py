"""Foreign formats, written here to each format's published layout with random weights, and compared with a direct
re-implementation of that format's own forward pass; a cfg.json of the wrong types, or at odds with its weights, is
refused naming the key."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from helpers import write_small_saelens
from saelab.hub import HubError, detect_format, load_sae
from saelab.sae import JumpReLUSAE, ReLUSAE, TopKSAE

D, W, K = 8, 32, 4


def rand_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(D, W, generator=g) * 0.5, "b_enc": torch.randn(W, generator=g) * 0.3,
            "W_dec": torch.randn(W, D, generator=g) * 0.7, "b_dec": torch.randn(D, generator=g)}


def x_batch(seed=1):
    return torch.randn(64, D, generator=torch.Generator().manual_seed(seed)) * 2


# ---------------------------------------------------------------------------------------------------- SAELens
def saelens_forward(cfg, w, x):
    """SAELens 6.x inference SAEs (standard / topk / jumprelu), from its published definitions."""
    sae_in = x - w["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    arch = cfg["architecture"]
    if arch == "standard":
        acts = pre.relu()
    elif arch == "topk":
        if cfg.get("rescale_acts_by_decoder_norm"):
            pre = pre * w["W_dec"].norm(dim=-1)
        vals, idx = pre.topk(cfg["k"], dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    elif arch == "jumprelu":
        acts = pre.relu() * (pre > w["threshold"].relu())
    dec_acts = acts / w["W_dec"].norm(dim=-1) if cfg.get("rescale_acts_by_decoder_norm") else acts
    return acts, dec_acts @ w["W_dec"] + w["b_dec"]


def write_saelens(folder, cfg, weights, v6=True):
    folder.mkdir(parents=True, exist_ok=True)
    run = {"model_name": "gpt2-small", "hook_name": "blocks.5.hook_resid_pre", "hook_head_index": None,
           "context_size": 128, "prepend_bos": True, "dataset_path": "Skylion007/openwebtext"}
    full = {"d_in": D, "d_sae": W, "dtype": "float32", "device": "cpu", "normalize_activations": "none", **cfg}
    if v6:  # SAELens 6: run facts under metadata
        full["metadata"] = {**run, "sae_lens_version": "6.5.1", "sae_lens_training_version": "6.5.1"}
        full["reshape_activations"] = "none"
    else:  # SAELens 5: everything at the top level, hook_point-era names partly
        full.update(run, hook_layer=5, activation_fn_str=full.pop("activation_fn", "relu"),
                    finetuning_scaling_factor=False)
    (folder / "cfg.json").write_text(json.dumps(full))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "sae_weights.safetensors"))


SAELENS_CASES = [
    ("standard", {"architecture": "standard", "apply_b_dec_to_input": True}, ReLUSAE),
    ("standard-no-bdec", {"architecture": "standard", "apply_b_dec_to_input": False}, ReLUSAE),
    ("topk", {"architecture": "topk", "k": K, "apply_b_dec_to_input": True}, TopKSAE),
    ("topk-rescaled", {"architecture": "topk", "k": K, "rescale_acts_by_decoder_norm": True,
                       "apply_b_dec_to_input": False}, TopKSAE),
    ("jumprelu", {"architecture": "jumprelu", "apply_b_dec_to_input": False}, JumpReLUSAE),
    ("jumprelu-bdec", {"architecture": "jumprelu", "apply_b_dec_to_input": True}, JumpReLUSAE),
]


@pytest.mark.parametrize("name,cfg,cls", SAELENS_CASES, ids=[c[0] for c in SAELENS_CASES])
@pytest.mark.parametrize("v6", [True, False], ids=["v6", "v5"])
def test_saelens_import_matches_saelens_forward(tmp_path, name, cfg, cls, v6):
    w = rand_weights()
    if cfg["architecture"] == "jumprelu":
        w["threshold"] = torch.rand(W) * 0.5
        w["threshold"][:3] = torch.tensor([0.0, -0.2, 1e-6])  # <= 0: the gate is just the ReLU
    write_saelens(tmp_path, cfg, w, v6=v6)
    assert detect_format(tmp_path) == "saelens"
    sae = load_sae(tmp_path)
    assert type(sae) is cls
    assert sae.cfg.hook_name == "blocks.5.hook_resid_pre" and sae.cfg.model_name == "gpt2-small"
    x = x_batch()
    acts, x_hat = saelens_forward(cfg, w, x)
    codes = sae.encode(x)
    torch.testing.assert_close(codes, acts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x), x_hat, rtol=1e-5, atol=1e-5)
    assert (codes != 0).any()


def test_saelens_pre6_topk_as_standard_with_topk_activation(tmp_path):
    w = rand_weights()
    write_saelens(tmp_path, {"architecture": "standard", "activation_fn": "topk",
                             "activation_fn_kwargs": {"k": K}}, w, v6=False)
    sae = load_sae(tmp_path)
    assert isinstance(sae, TopKSAE) and sae.cfg.k == K
    x = x_batch()
    torch.testing.assert_close(sae(x), saelens_forward({"architecture": "topk", "k": K}, w, x)[1])


def test_saelens_old_log_threshold_and_scaling_factor(tmp_path):
    w = rand_weights()
    threshold = torch.rand(W) * 0.5 + 0.01
    scale = torch.rand(W) + 0.5
    write_saelens(tmp_path, {"architecture": "jumprelu"},
                  {**w, "log_threshold": threshold.log(), "scaling_factor": scale}, v6=False)
    sae = load_sae(tmp_path)
    x = x_batch()
    acts, _ = saelens_forward({"architecture": "jumprelu"}, {**w, "threshold": threshold}, x)
    torch.testing.assert_close(sae.encode(x), acts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x), (acts * scale) @ w["W_dec"] + w["b_dec"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg,match", [
    ({"architecture": "gated"}, "architecture 'gated' is not supported"),
    ({"architecture": "standard", "normalize_activations": "layer_norm"}, "layer_norm"),
    ({"architecture": "transcoder", "d_out": D}, "cannot tell this transcoder from an SAE; add hook_name_out"),
    ({"architecture": "topk"}, "integer k"),
])
def test_saelens_unsupported(tmp_path, cfg, match):
    write_saelens(tmp_path, cfg, rand_weights())
    with pytest.raises(HubError, match=match):
        load_sae(tmp_path)


def test_saelens_shape_mismatch_and_extra_tensors(tmp_path):
    w = rand_weights()
    write_saelens(tmp_path, {"architecture": "standard"}, {**w, "W_dec": torch.zeros(W, D + 1)})
    with pytest.raises(HubError, match=r"W_dec has shape \[32, 9\] but cfg.json d_in=8, d_sae=32 gives \[32, 8\]"):
        load_sae(tmp_path)
    write_saelens(tmp_path, {"architecture": "standard"}, {**w, "b_gate": torch.zeros(W)})
    with pytest.raises(HubError, match="unexpected tensors"):
        load_sae(tmp_path)


# ---------------------------------------------------------------------------------------------------- sparsify
def sparsify_forward(enc_w, enc_b, W_dec, b_dec, k, x):
    """sparsify's SparseCoder: relu((x - b_dec) @ encoder.weight.T + encoder.bias), top-k, sparse decode."""
    pre = torch.relu((x - b_dec) @ enc_w.T + enc_b)
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    out = (vals[..., None] * W_dec[idx]).sum(-2) + b_dec
    return vals, idx, out


def write_sparsify(root, hookpoint="layers.3", cfg_extra=None, tensors_extra=None):
    g = torch.Generator().manual_seed(3)
    folder = root / hookpoint
    folder.mkdir(parents=True)
    cfg = {"activation": "topk", "expansion_factor": W // D, "normalize_decoder": True, "num_latents": 0, "k": K,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D, **(cfg_extra or {})}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    t = {"encoder.weight": torch.randn(W, D, generator=g), "encoder.bias": torch.randn(W, generator=g) * 0.2,
         "W_dec": torch.randn(W, D, generator=g), "b_dec": torch.randn(D, generator=g), **(tensors_extra or {})}
    save_file(t, str(folder / "sae.safetensors"))
    (root / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m", "ctx_len": 2048}))
    return folder, t


def test_sparsify_import_matches_sparsify_forward(tmp_path):
    folder, t = write_sparsify(tmp_path)
    assert detect_format(folder) == "sparsify"
    sae = load_sae(folder)
    assert isinstance(sae, TopKSAE) and sae.cfg.k == K and sae.cfg.width == W
    assert sae.cfg.hook_name == "blocks.3.hook_resid_post" and sae.cfg.model_name == "EleutherAI/pythia-70m"
    x = x_batch()
    vals, idx, out = sparsify_forward(t["encoder.weight"], t["encoder.bias"], t["W_dec"], t["b_dec"], K, x)
    dense = torch.zeros(64, W).scatter(-1, idx, vals)
    torch.testing.assert_close(sae.encode(x), dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg_extra,tensors_extra,match", [
    ({"transcode": True}, None, "transcoder"),
    ({"activation": "groupmax"}, None, "groupmax"),
    (None, {"W_skip": torch.zeros(D, D)}, "W_skip"),
    ({"num_latents": W + 1}, None, r"encoder.weight has shape \[32, 8\]"),
])
def test_sparsify_unsupported(tmp_path, cfg_extra, tensors_extra, match):
    folder, _ = write_sparsify(tmp_path, cfg_extra=cfg_extra, tensors_extra=tensors_extra)
    with pytest.raises(HubError, match=match):
        load_sae(folder)


def test_sparsify_run_root_lists_layers(tmp_path):
    write_sparsify(tmp_path, "layers.3")
    with pytest.raises(HubError, match=r"subfolders \['layers.3'\]"):
        load_sae(tmp_path)


# ---------------------------------------------------------------------------------------------------- Gemma Scope
def gemmascope_forward(p, x):
    """Gemma Scope's JumpReLU SAE (no b_dec subtraction before the encoder)."""
    pre = x @ p["W_enc"] + p["b_enc"]
    acts = (pre > p["threshold"]) * torch.relu(pre)
    return acts, acts @ p["W_dec"] + p["b_dec"]


def gemmascope_params():
    w = rand_weights(5)
    return {**w, "threshold": torch.rand(W) * 0.6}


def test_gemmascope_npz_matches_reference(tmp_path):
    p = gemmascope_params()
    folder = tmp_path / "layer_20" / "width_16k" / "average_l0_71"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in p.items()})
    assert detect_format(folder) == "gemmascope"
    sae = load_sae(folder, repo_id="google/gemma-scope-2b-pt-res")
    assert isinstance(sae, JumpReLUSAE)
    assert sae.cfg.hook_name == "blocks.20.hook_resid_post" and sae.cfg.model_name == "gemma-2-2b"
    x = x_batch()
    acts, out = gemmascope_forward(p, x)
    torch.testing.assert_close(sae.encode(x), acts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x), out, rtol=1e-5, atol=1e-5)
    assert isinstance(load_sae(folder / "params.npz"), JumpReLUSAE)  # the file itself works too


def test_gemmascope2_safetensors_matches_reference(tmp_path):
    p = gemmascope_params()
    folder = tmp_path / "resid_post" / "layer_9_width_16k_l0_medium"
    folder.mkdir(parents=True)
    save_file({"w_enc": p["W_enc"], "w_dec": p["W_dec"], "b_enc": p["b_enc"], "b_dec": p["b_dec"],
               "threshold": p["threshold"]}, str(folder / "params.safetensors"))
    sae = load_sae(folder, repo_id="google/gemma-scope-2-270m-pt")
    assert sae.cfg.hook_name == "blocks.9.hook_resid_post" and sae.cfg.model_name == "gemma-3-270m"
    x = x_batch()
    torch.testing.assert_close(sae(x), gemmascope_forward(p, x)[1], rtol=1e-5, atol=1e-5)


def test_gemmascope_errors(tmp_path):
    p = gemmascope_params()
    (tmp_path / "a").mkdir()
    np.savez(tmp_path / "a" / "params.npz", **{k: v.numpy() for k, v in p.items() if k != "threshold"})
    with pytest.raises(HubError, match=r"missing \['threshold'\]"):
        load_sae(tmp_path / "a")
    (tmp_path / "b").mkdir()
    save_file({"w_enc": p["W_enc"], "w_dec": p["W_dec"], "b_enc": p["b_enc"], "b_dec": p["b_dec"],
               "threshold": p["threshold"], "affine_skip_connection": torch.zeros(D, D)},
              str(tmp_path / "b" / "params.safetensors"))
    with pytest.raises(HubError, match="transcoder"):
        load_sae(tmp_path / "b")
    (tmp_path / "c").mkdir()
    np.savez(tmp_path / "c" / "params.npz", **{**{k: v.numpy() for k, v in p.items()}, "b_dec": np.zeros(D + 2)})
    with pytest.raises(HubError, match=r"b_dec has shape \[10\]"):
        load_sae(tmp_path / "c")
    (tmp_path / "d").mkdir()
    np.savez(tmp_path / "d" / "params.npz", W_enc=np.array([object()], dtype=object))
    with pytest.raises(HubError, match="plain numpy"):
        load_sae(tmp_path / "d")


def test_imported_then_saved_is_saelens_compatible_saelab_folder(tmp_path):
    p = gemmascope_params()
    (tmp_path / "g").mkdir()
    np.savez(tmp_path / "g" / "params.npz", **{k: v.numpy() for k, v in p.items()})
    sae = load_sae(tmp_path / "g")
    sae.save(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["apply_b_dec_to_input"] is True
    # the saved folder, read as plain SAELens (ignoring the saelab block), gives Gemma Scope's outputs
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "out" / "sae_weights.safetensors"))
    w = {k: v.float() for k, v in w.items()}
    x = x_batch()
    torch.testing.assert_close(saelens_forward(cfg, w, x)[1], gemmascope_forward(p, x)[1], rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("no_hub")
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
    folder = write_small_saelens(tmp_path / "sl", **cfg)
    with pytest.raises(HubError, match=match) as info:
        load_sae(folder)
    assert "cfg.json" in str(info.value)


def write_small_sparsify(root: Path, **cfg) -> Path:
    folder = root / "layers.1"
    folder.mkdir(parents=True)
    base = {"activation": "topk", "expansion_factor": 2, "num_latents": 0, "k": 3, "d_in": 8, "transcode": False,
            "skip_connection": False, "normalize_decoder": True, "multi_topk": False}
    (folder / "cfg.json").write_text(json.dumps({**base, **cfg}))
    save_file({"encoder.weight": torch.randn(16, 8), "encoder.bias": torch.zeros(16), "W_dec": torch.randn(16, 8),
               "b_dec": torch.zeros(8)}, str(folder / "sae.safetensors"))
    return folder


@pytest.mark.usefixtures("no_hub")
@pytest.mark.parametrize("cfg,match", [
    ({"num_latents": "16"}, r"'num_latents' must be an integer >= 0, got '16' \(str\)"),
    ({"num_latents": -4}, r"'num_latents' must be an integer >= 0, got -4"),
    ({"transcode": "false"}, r"'transcode' must be true or false, got 'false'"),
    ({"expansion_factor": 2.5}, r"'expansion_factor' must be an integer >= 1, got 2.5"),
    ({"num_latents": 32}, r"encoder.weight has shape \[16, 8\] but cfg.json d_in=8, num_latents=32 gives"),
    ({"k": 17}, r"expected an integer 'k' in \[1, num_latents=16\], got 17"),
])
def test_sparsify_cfg_ill_typed_or_inconsistent_is_refused(tmp_path, cfg, match):
    folder = write_small_sparsify(tmp_path, **cfg)
    with pytest.raises(HubError, match=match) as info:
        load_sae(folder)
    assert "cfg.json" in str(info.value)
