"""saelab folder format: save -> load round trips for every architecture, SAELens keys, densities, bad input, pickle."""
import json
import pickle
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from saelab.errors import SaelabError
from saelab.hub import HubError, detect_format, load_sae, read_log_densities, read_metrics, save_sae
from saelab.sae import (SAE, JumpReLUSAE, SAEConfig, TopKSAE, available_architectures, create_sae, create_training,
                        sae_class)

ARCHS = available_architectures()
K_ARCHS = {a for a in ARCHS if sae_class(a).takes_k}


def make(arch, d_in=8, width=32, input_scale=1.0, dtype="float32", **kw):
    torch.manual_seed(0)
    sae = create_sae(SAEConfig(arch=arch, d_in=d_in, width=width, k=4 if arch in K_ARCHS else None, dtype=dtype,
                               input_scale=input_scale, model_name="smollm2-135m",
                               hook_name="blocks.3.hook_resid_post", training_tokens=12345, **kw))
    with torch.no_grad():  # non-trivial biases and thresholds, so that folding and b_dec handling matter
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 1.0)
        if hasattr(sae, "log_threshold"):
            sae.log_threshold.copy_(torch.empty(width).uniform_(-3, 0))
    return sae


def quiet_save(sae, folder, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return save_sae(sae, folder, **kw)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_round_trip_identical_outputs(tmp_path, arch, scale):
    sae = make(arch, input_scale=scale)
    quiet_save(sae, tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    assert type(loaded) is type(sae)
    assert loaded.cfg.input_scale == 1.0 and loaded.cfg.arch == arch
    assert loaded.cfg.training_tokens == 12345 and loaded.cfg.hook_name == "blocks.3.hook_resid_post"
    x = torch.randn(64, 8) * 3
    ref = sae.fold_input_scale()
    assert torch.equal(loaded.encode(x), ref.encode(x))
    assert torch.equal(loaded(x), ref(x))
    if scale != 1.0:  # folded: the loaded SAE reads raw x as the trained SAE reads scale * x
        torch.testing.assert_close(loaded.encode(x), sae.encode(x * scale) / scale, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(x), sae(x * scale) / scale, rtol=1e-5, atol=1e-5)
    if arch == "matryoshka":
        assert loaded.cfg.options == sae.cfg.options


def test_batchtopk_exported_round_trip_and_as_is_warns(tmp_path):
    sae = make("batchtopk")
    training = create_training(sae)
    training.loss(torch.randn(32, 8))
    exported = training.export()
    save_sae(exported, tmp_path / "exported")  # a JumpReLU: no warning needed
    loaded = load_sae(tmp_path / "exported")
    assert isinstance(loaded, JumpReLUSAE)
    x = torch.randn(16, 8)
    assert torch.equal(loaded.encode(x), exported.encode(x))
    with pytest.warns(UserWarning, match="training.export"):
        save_sae(sae, tmp_path / "as-is")
    cfg = json.loads((tmp_path / "as-is" / "cfg.json").read_text())
    assert cfg["architecture"] == "batchtopk" and cfg["k"] == 4


def test_cfg_json_has_saelens_and_saelab_keys(tmp_path):
    sae = make("topk", input_scale=0.5)
    save_sae(sae, tmp_path, metadata={"dataset_path": "wikitext", "context_size": 256})
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    for key, value in {"architecture": "topk", "d_in": 8, "d_sae": 32, "k": 4, "dtype": "float32",
                       "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
                       "hook_name": "blocks.3.hook_resid_post", "hook_layer": 3, "hook_head_index": None,
                       "model_name": "smollm2-135m", "context_size": 256, "dataset_path": "wikitext",
                       "prepend_bos": True, "activation_fn_kwargs": {"k": 4},
                       "rescale_acts_by_decoder_norm": False}.items():
        assert cfg[key] == value, key
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert cfg["metadata"]["context_size"] == 256
    block = cfg["saelab"]
    assert block["folded_input_scale"] == 0.5 and block["config"]["input_scale"] == 1.0
    assert block["saelab_version"] and block["arch"] == "topk" and block["training_tokens"] == 12345
    weights = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert sorted(weights) == ["W_dec", "W_enc", "b_dec", "b_enc"]
    assert weights["W_enc"].shape == (8, 32) and weights["W_dec"].shape == (32, 8)
    assert detect_format(tmp_path) == "saelab"


def test_jumprelu_stores_threshold_not_log(tmp_path):
    sae = make("jumprelu")
    save_sae(sae, tmp_path)
    weights = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert "log_threshold" not in weights
    torch.testing.assert_close(weights["threshold"].float(), sae.log_threshold.exp().detach())
    assert json.loads((tmp_path / "cfg.json").read_text())["architecture"] == "jumprelu"


def test_bfloat16_round_trip(tmp_path):
    sae = make("jumprelu", dtype="bfloat16")
    save_sae(sae, tmp_path)
    loaded = load_sae(tmp_path)
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.log_threshold, sae.log_threshold)
    x = torch.randn(8, 8)
    assert torch.equal(loaded(x), sae(x))


def test_densities_and_metrics(tmp_path):
    sae = make("relu")
    freqs = torch.rand(32) * 0.1
    freqs[0] = 0
    save_sae(sae, tmp_path, densities=freqs, metrics={"fvu": 0.1, "l0": 12.5, "nested": {"kl": float("nan")}})
    log = read_log_densities(tmp_path)
    torch.testing.assert_close(log, (freqs.double() + 1e-10).log10().float())
    assert load_file(str(tmp_path / "sparsity.safetensors")).keys() == {"sparsity"}
    assert read_metrics(tmp_path) == {"fvu": 0.1, "l0": 12.5, "nested": {"kl": None}}
    save_sae(sae, tmp_path / "log", densities=log)  # log10 input is recognised and kept
    torch.testing.assert_close(read_log_densities(tmp_path / "log"), log)
    with pytest.raises(HubError, match="one entry per latent"):
        save_sae(sae, tmp_path / "bad", densities=torch.rand(5))


def test_sae_methods_delegate(tmp_path):
    sae = make("topk")
    sae.save(tmp_path / "a")
    loaded = SAE.load(tmp_path / "a")
    assert isinstance(loaded, TopKSAE)
    assert isinstance(TopKSAE.load(tmp_path / "a"), TopKSAE)
    with pytest.raises(HubError, match="expected a JumpReLUSAE but found a TopKSAE"):
        JumpReLUSAE.load(tmp_path / "a")


# ---------------------------------------------------------------------------------------------------- bad input
def test_missing_folder_and_not_an_sae(tmp_path):
    with pytest.raises(HubError, match="does not exist"):
        load_sae(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HubError, match="expected cfg.json"):
        load_sae(tmp_path / "empty")
    assert issubclass(HubError, SaelabError)


def test_mismatched_shapes_missing_keys_and_unknown_arch(tmp_path):
    sae = make("relu")
    save_sae(sae, tmp_path)
    weights = load_file(str(tmp_path / "sae_weights.safetensors"))
    save_file({**weights, "W_enc": torch.zeros(8, 31)}, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(HubError, match=r"W_enc has shape \[8, 31\] but d_in=8, width=32 gives \[8, 32\]"):
        load_sae(tmp_path)
    save_file({k: v for k, v in weights.items() if k != "W_dec"}, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(HubError, match=r"missing \['W_dec'\]"):
        load_sae(tmp_path)
    save_file(weights, str(tmp_path / "sae_weights.safetensors"))
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["saelab"]["config"]["arch"] = "gated"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(HubError, match="unknown SAE architecture 'gated'"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(HubError, match="not valid JSON"):
        load_sae(tmp_path)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_refused_unless_opted_in_and_then_weights_only(tmp_path, monkeypatch):
    sae = make("relu")
    save_sae(sae, tmp_path)
    weights = load_file(str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "sae_weights.safetensors").unlink()
    torch.save(weights, tmp_path / "sae_weights.pt")
    with pytest.raises(HubError, match="pickle.*allow_pickle=True"):
        load_sae(tmp_path)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    loaded = load_sae(tmp_path, allow_pickle=True)
    assert calls == [True]
    x = torch.randn(4, 8)
    assert torch.equal(loaded(x), sae(x))
    # an arbitrary object is refused by weights_only even with the opt-in
    (tmp_path / "sae_weights.pt").write_bytes(pickle.dumps({"W_enc": _Evil()}))
    with pytest.raises(HubError, match="weights_only=True"):
        load_sae(tmp_path, allow_pickle=True)


def test_bin_file_in_gemmascope_style_folder_is_refused(tmp_path):
    torch.save({"W_enc": torch.zeros(2, 2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(HubError, match="pickle"):
        load_sae(tmp_path)
