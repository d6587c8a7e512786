"""Transcoder exports: SAELens's transcoder format and circuit-tracer's transcoder files, bit-exact round trips
through saelab's loaders, and the field names and layouts those libraries read.

The layouts are checked against the published code: SAELens's sae_lens/saes/transcoder.py (jbloomAus/SAELens:
architecture names transcoder / skip_transcoder / jumprelu_transcoder, `d_out`, W_skip [d_out, d_in] applied as
x @ W_skip.T, apply_b_dec_to_input refused) and circuit-tracer's circuit_tracer/transcoder/single_layer_transcoder.py
and circuit_tracer/utils/hf_utils.py (safety-research/circuit-tracer: layer_{i}.safetensors with W_enc
[d_transcoder, d_model] applied by F.linear, W_dec, b_enc, b_dec, W_skip applied as x @ W_skip.T,
activation_function.threshold; config.yaml with model_kind, feature_input_hook, feature_output_hook, activation, k).
Their forwards are written out here from those files, so the check needs neither library installed.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from saelab.hub import HubError, load_sae
from saelab.hub.circuit_tracer import export_circuit_tracer, load_circuit_tracer
from saelab.hub.saelens_transcoder import export_saelens_transcoder
from saelab.sae import SAEConfig, create_sae

IN, OUT = "blocks.{}.ln2.hook_normalized", "blocks.{}.hook_mlp_out"


def transcoder(arch, layer=0, skip=False, d_out=None, seed=0, **cfg):
    torch.manual_seed(seed)
    sae = create_sae(SAEConfig(arch=arch, d_in=16, width=32, hook_name=IN.format(layer), target_hook=OUT.format(layer),
                               d_out=d_out, skip=skip, model_name="tiny", **cfg))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return sae


def assert_same_weights(a, b):
    assert a.cfg == b.cfg
    assert a.state_dict().keys() == b.state_dict().keys()
    for name, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[name], value), name


@pytest.mark.parametrize("arch,skip,name", [("relu", False, "transcoder"), ("relu", True, "skip_transcoder"),
                                            ("jumprelu", False, "jumprelu_transcoder")])
def test_saelens_transcoder_round_trip_and_layout(tmp_path, arch, skip, name):
    sae = transcoder(arch, skip=skip, d_out=12)
    folder = export_saelens_transcoder(sae, tmp_path / "tc")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == name and cfg["d_out"] == 12 and cfg["d_in"] == 16 and cfg["d_sae"] == 32
    assert cfg["apply_b_dec_to_input"] is False and cfg["hook_name_out"] == OUT.format(0)
    assert cfg["metadata"]["hook_name"] == IN.format(0)
    w = load_file(folder / "sae_weights.safetensors")
    assert w["W_enc"].shape == (16, 32) and w["W_dec"].shape == (32, 12) and w["b_dec"].shape == (12,)
    x = torch.randn(64, 16)
    pre = x @ w["W_enc"] + w["b_enc"]  # SAELens's Transcoder.encode: no centring
    codes = F.relu(pre) * (pre > w["threshold"]) if arch == "jumprelu" else F.relu(pre)
    y = codes @ w["W_dec"] + w["b_dec"]
    if skip:
        assert w["W_skip"].shape == (12, 16)
        y = y + x @ w["W_skip"].T
    with torch.no_grad():
        torch.testing.assert_close(y, sae(x), rtol=1e-5, atol=1e-6)
    assert_same_weights(sae, load_sae(folder))


def test_saelens_has_no_topk_transcoder_and_says_where_to_go(tmp_path):
    with pytest.raises(HubError, match="circuit-tracer"):
        export_saelens_transcoder(transcoder("topk", k=4), tmp_path / "tc")
    with pytest.raises(HubError, match="transcoders"):
        export_saelens_transcoder(create_sae(SAEConfig(arch="relu", d_in=16, width=32)), tmp_path / "sae")


@pytest.mark.parametrize("arch,skip", [("topk", True), ("jumprelu", False), ("relu", True)])
def test_circuit_tracer_round_trip_and_layout(tmp_path, arch, skip):
    extra = {"k": 4} if arch == "topk" else {}
    saes = [transcoder(arch, layer=layer, skip=skip, seed=layer, **extra) for layer in (0, 1)]
    folder = export_circuit_tracer(saes, tmp_path / "ct")
    config = json.loads((folder / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set"
    assert config["feature_input_hook"] == "ln2.hook_normalized" and config["feature_output_hook"] == "hook_mlp_out"
    assert config.get("activation") == {"topk": "topk", "relu": "relu", "jumprelu": None}[arch]
    assert config.get("k") == extra.get("k")
    x = torch.randn(64, 16)
    for layer, sae in enumerate(saes):
        t = load_file(folder / f"layer_{layer}.safetensors")
        assert t["W_enc"].shape == (32, 16) and t["W_dec"].shape == (32, 16)
        pre = F.linear(x, t["W_enc"], t["b_enc"])  # SingleLayerTranscoder.encode
        if arch == "topk":
            top = pre.topk(4, dim=-1)
            codes = torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))
        elif arch == "jumprelu":
            codes = pre * (pre > t["activation_function.threshold"])
        else:
            codes = F.relu(pre)
        y = codes @ t["W_dec"] + t["b_dec"] + (x @ t["W_skip"].T if skip else 0)
        with torch.no_grad():
            torch.testing.assert_close(y, sae(x), rtol=1e-5, atol=1e-6)
    loaded = load_circuit_tracer(folder)
    assert sorted(loaded) == [0, 1]
    for layer, sae in enumerate(saes):
        assert_same_weights(sae, loaded[layer])


def test_circuit_tracer_refuses_what_it_cannot_load(tmp_path):
    with pytest.raises(HubError, match="every layer"):
        export_circuit_tracer([transcoder("relu", layer=1)], tmp_path / "gap")
    assert (export_circuit_tracer([transcoder("relu", layer=1)], tmp_path / "part", partial=True)
            / "layer_1.safetensors").is_file()
    with pytest.raises(HubError, match="d_model"):
        export_circuit_tracer([transcoder("relu", d_out=12)], tmp_path / "wide")
    with pytest.raises(HubError, match="one input hook"):
        export_circuit_tracer([transcoder("relu", layer=0), transcoder("jumprelu", layer=1)], tmp_path / "mixed")
