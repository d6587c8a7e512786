"""saelab folder format: save -> load round trips for every architecture, SAELens keys, densities, bad input, pickle."""

import json
import pickle
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import SMALL_HOOK, disk_full_in, make_sae, saved_small_sae, small_sae
from saelab.errors import SaelabError
from saelab.hub import HubError, detect_format, load_sae, push_to_hub, read_log_densities, read_metrics, save_sae
from saelab.sae import SAE, JumpReLUSAE, TopKSAE, available_architectures, create_training

ARCHS = available_architectures()


SMALL = dict(d_in=8, width=32, k=4, b_dec_std=1.0, model_name="smollm2-135m", hook_name="blocks.3.hook_resid_post",
             training_tokens=12345)
"""make_sae's settings for the SAEs of these tests: non-trivial biases and thresholds, so that folding and b_dec
handling matter."""


def quiet_save(sae, folder, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return save_sae(sae, folder, **kw)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_round_trip_identical_outputs(tmp_path, arch, scale):
    sae = make_sae(arch, **SMALL, input_scale=scale)
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
    sae = make_sae("batchtopk", **SMALL)
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
    sae = make_sae("topk", **SMALL, input_scale=0.5)
    save_sae(sae, tmp_path, metadata={"dataset_path": "wikitext", "context_size": 256})
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    for key, value in {"architecture": "topk", "d_in": 8, "d_sae": 32, "k": 4, "dtype": "float32",
                       "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
                       "hook_name": "blocks.3.hook_resid_post", "hook_layer": 3, "hook_head_index": None,
                       "model_name": "HuggingFaceTB/SmolLM2-135M-Instruct", "context_size": 256, "dataset_path": "wikitext",
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
    sae = make_sae("jumprelu", **SMALL)
    save_sae(sae, tmp_path)
    weights = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert "log_threshold" not in weights
    torch.testing.assert_close(weights["threshold"].float(), sae.log_threshold.exp().detach())
    assert json.loads((tmp_path / "cfg.json").read_text())["architecture"] == "jumprelu"


def test_bfloat16_round_trip(tmp_path):
    sae = make_sae("jumprelu", **SMALL, dtype="bfloat16")
    save_sae(sae, tmp_path)
    loaded = load_sae(tmp_path)
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.log_threshold, sae.log_threshold)
    x = torch.randn(8, 8)
    assert torch.equal(loaded(x), sae(x))


def test_densities_and_metrics(tmp_path):
    sae = make_sae("relu", **SMALL)
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
    sae = make_sae("topk", **SMALL)
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
    sae = make_sae("relu", **SMALL)
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
    sae = make_sae("relu", **SMALL)
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


REPO = "me/trust-saes"


# ---------------------------------------------------------------------------------------------------- cfg.json
@pytest.mark.usefixtures("no_hub")
@pytest.mark.parametrize("key,value,shown", [
    ("d_sae", 99, "d_sae=99 but the saelab config gives 16"),
    ("d_sae", "16", "d_sae='16' but the saelab config gives 16"),
    ("d_in", 7, "d_in=7 but the saelab config gives 8"),
    ("architecture", "jumprelu", "architecture='jumprelu' but the saelab config gives 'topk'"),
    ("k", 5, "k=5 but the saelab config gives 3"),
    ("dtype", "bfloat16", "dtype='bfloat16' but the saelab config gives 'float32'"),
    ("hook_name", "blocks.2.hook_resid_post", f"hook_name='blocks.2.hook_resid_post' but the saelab config gives "
                                              f"'{SMALL_HOOK}'"),
    ("model_name", "gpt2", "model_name='gpt2' but the saelab config gives 'HuggingFaceTB/SmolLM2-135M-Instruct'"),
    ("apply_b_dec_to_input", False, "apply_b_dec_to_input=False but the saelab config gives True"),
    ("normalize_activations", "layer_norm", "normalize_activations='layer_norm' but the saelab config gives 'none'"),
    ("metadata.hook_name", "blocks.9.hook_mlp_out", "metadata.hook_name='blocks.9.hook_mlp_out' but"),
    ("saelab.arch", "relu", "saelab.arch='relu' vs saelab.config.arch='topk'"),
])
def test_saelab_cfg_whose_saelens_keys_disagree_is_refused(tmp_path, key, value, shown):
    folder = saved_small_sae(tmp_path / "sae")
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


@pytest.mark.usefixtures("no_hub")
@pytest.mark.parametrize("field,value,match", [
    ("config.width", "16", r"SAEConfig.width must be a positive integer, got '16'"),
    ("config.width", -16, r"SAEConfig.width must be a positive integer"),
    ("config.k", 40, r"SAEConfig.k must be an integer with 1 <= k <= width=16"),
    ("folded_input_scale", "abc", r"folded_input_scale must be a finite number > 0, got 'abc'"),
    ("folded_input_scale", -1.0, r"folded_input_scale must be a finite number > 0"),
])
def test_saelab_block_with_ill_typed_values_is_refused(tmp_path, field, value, match):
    folder = saved_small_sae(tmp_path / "sae")
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


@pytest.mark.usefixtures("no_hub")
def test_weights_that_disagree_with_cfg_say_what_to_do(tmp_path):
    folder = saved_small_sae(tmp_path / "sae")
    weights = load_file(str(folder / "sae_weights.safetensors"))
    save_file({**weights, "b_enc": torch.zeros(17)}, str(folder / "sae_weights.safetensors"))
    with pytest.raises(HubError, match=r"b_enc has shape \[17\] but d_in=8, width=16 gives \[16\]; the weights and "
                                       r"cfg.json describe different SAEs"):
        load_sae(folder)


@pytest.mark.usefixtures("no_hub")
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_weights_that_are_not_floating_point_are_refused_naming_the_tensor(tmp_path, dtype):
    import numpy as np

    folder = saved_small_sae(tmp_path / "sae")
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


@pytest.mark.usefixtures("no_hub")
def test_save_refuses_metadata_that_contradicts_the_config(tmp_path):
    with pytest.raises(HubError, match=r"metadata\['hook_name'\]='blocks.2.hook_z' disagrees with sae.cfg.hook_name"):
        save_sae(small_sae(), tmp_path / "sae", metadata={"hook_name": "blocks.2.hook_z"})
    assert not (tmp_path / "sae").exists()


@pytest.mark.usefixtures("no_hub")
def test_a_full_disk_in_save_sae_names_the_folder_and_leaves_no_loadable_half(monkeypatch, tmp_path):
    folder = saved_small_sae(tmp_path / "sae")  # an older SAE there: its cfg.json must not survive next to new weights
    disk_full_in(monkeypatch, "safetensors")
    with pytest.raises(HubError, match=rf"could not write the SAE to {folder}: .*No space left on device"):
        save_sae(small_sae(seed=1), folder)
    assert not (folder / "cfg.json").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(HubError, match="not an SAE folder|no weights|does not exist"):
            load_sae(folder)


@pytest.mark.usefixtures("no_hub")
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


@pytest.mark.usefixtures("no_hub")
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
            save_sae(small_sae(), folder)
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before

    ours = saved_small_sae(tmp_path / "ours")
    (ours / "notes.txt").write_text("about this SAE")
    (ours / "firing_counts.safetensors").write_bytes(b"counts of the old weights")
    saved_small_sae(ours, seed=1)  # a saelab SAE's files are replaced; a user's notes beside them are kept
    assert (ours / "notes.txt").read_text() == "about this SAE" and not (ours / "firing_counts.safetensors").exists()
    with monkeypatch.context() as patch:
        disk_full_in(patch, "safetensors")
        with pytest.raises(HubError, match="No space left on device"):
            saved_small_sae(ours, seed=2)
    assert not (ours / "cfg.json").exists()  # no SAE there now, but the save's leftovers are its own to replace
    saved_small_sae(ours, seed=2)
    torch.testing.assert_close(load_sae(ours).W_dec, small_sae(seed=2).W_dec)
    assert sorted(p.name for p in ours.iterdir()) == ["cfg.json", "notes.txt", "sae_weights.safetensors"]


# ---------------------------------------------------------------------------------------------------- model and data
def test_cfg_json_names_the_loadable_model_and_its_quantisation(tmp_path):
    folder = saved_small_sae(tmp_path / "sae")  # model_name="smollm2-135m", one of saelab's offline models
    cfg = json.loads((folder / "cfg.json").read_text())
    for place in (cfg, cfg["metadata"]):
        assert place["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert place["model_class_name"] == "TransformerBridge"
        assert place["saelab_model_name"] == "smollm2-135m"
        assert place["model_weights"] == "Q4_1 GGUF (SmolLM2-135M-Instruct.Q4_1.gguf) de-quantised to float32"
    assert cfg["saelab"]["config"]["model_name"] == "smollm2-135m"  # what saelab loads the model by
    assert load_sae(folder).cfg.model_name == "smollm2-135m"


def test_a_folder_saved_with_saelabs_model_name_still_loads(tmp_path):
    folder = saved_small_sae(tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["model_name"] = cfg["metadata"]["model_name"] = "smollm2-135m"  # as saelab wrote it before
    (folder / "cfg.json").write_text(json.dumps(cfg))
    assert load_sae(folder).cfg.model_name == "smollm2-135m"


def test_source_metadata_from_a_cache_and_a_stream_fingerprint():
    from saelab.hub.saelens import source_metadata

    text = {"source": "/data/tinyshakespeare.txt", "context_len": 128, "prepend_bos": True, "pack": True,
            "field": "text", "split": "train", "config": None, "seed": None, "shuffle_window": 1024, "start": 0,
            "sha256": "ab" * 32}
    cache = {"cache": {"model": "smollm2-135m", "hooks": ["blocks.9.hook_resid_post"], "drop_bos": True,
                       "text": text}, "tokens": 20_000, "hooks": ["blocks.9.hook_resid_post"], "seed": 0}
    assert source_metadata(cache) == {
        "dataset_path": "/data/tinyshakespeare.txt", "context_size": 128, "prepend_bos": True,
        "seqpos_slice": [1, None], "dataset_sha256": "ab" * 32, "dataset_split": "train",
        "activation_cache_tokens": 20_000}
    stream = {"model": "smollm2-135m", "hooks": ["blocks.9.hook_resid_post"], "seed": 0, "buffer_tokens": 65_536,
              "text": {**text, "source": "default", "prepend_bos": False, "sha256": None, "context_len": 64}}
    said = source_metadata(stream)
    assert said["dataset_path"] == "default" and "Python reference" in said["dataset_description"]
    assert said["context_size"] == 64 and said["prepend_bos"] is False and "seqpos_slice" not in said
    assert source_metadata({"source": "Tensors", "hooks": ["h"]}) == {}  # batches that say nothing of their text


def test_a_trained_sae_records_its_training_text(tiny_cache, tmp_path):
    from saelab.training import TrainConfig, train

    result = train(tiny_cache, [dict(arch="topk", width=32, k=4)], TrainConfig(tokens=512, batch_size=128),
                   out=tmp_path / "run", progress=False)[0]
    cfg = json.loads((result.folder / "cfg.json").read_text())
    manifest = json.loads((tiny_cache / "manifest.json").read_text())
    text = manifest["run"]["text"]
    for place in (cfg, cfg["metadata"]):
        assert place["context_size"] == text["context_len"] and place["prepend_bos"] is text["prepend_bos"]
        assert place["dataset_path"] == text["source"] and place["activation_cache_tokens"] == manifest["tokens"]
    assert cfg["saelab"]["training_tokens"] == 512
