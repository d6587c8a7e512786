"""Cross-layer transcoders: what the config records and refuses, the masks (at init and after training steps), a
planted cross-layer dependency only a CLT can write, the replacement forward against a hand-computed one on the tiny
model, and the fold of its scales."""

from __future__ import annotations

import pytest
import torch

import saelab
from saelab.activations.joined import JoinedSource
from saelab.activations.tensors import TensorSource
from saelab.evals.clt import clt_fvu, clt_patches, clt_replacement_metrics
from saelab.interventions import Replace
from saelab.sae import SAEConfig, create_sae
from saelab.training import TrainConfig

INPUTS = [dict(hook=f"in{layer}", model="m", d=4, scale=0.5 + layer) for layer in range(3)]
TARGETS = [dict(hook=f"out{layer}", model="m", d=3, scale=2.0 - layer / 2) for layer in range(3)]


def clt_config(**changes) -> SAEConfig:
    settings = dict(arch="relu", d_in=12, width=6, hook_name="in0+in1+in2", target_hook="out0+out1+out2", d_out=9,
                    parts=INPUTS, target_parts=TARGETS, cross_layer=True)
    return SAEConfig(**{**settings, **changes})


def masked_blocks(sae) -> list[torch.Tensor]:
    """Every block a CLT must hold at zero, found from the layout directly: group g's encoder columns outside input
    part g, its decoder rows on targets before part g (and the skip path's from part g to targets before g)."""
    blocks = []
    for g in range(3):
        latents, rows, columns = slice(2 * g, 2 * g + 2), slice(4 * g, 4 * g + 4), slice(0, 3 * g)
        enc = sae.W_enc.detach()[:, latents].clone()
        enc[rows] = 0
        blocks += [enc, sae.W_dec.detach()[latents, columns]]
        if sae.cfg.skip:
            blocks.append(sae.W_skip.detach()[rows, columns])
    return blocks


# -------------------------------------------------------------------------------------------------- config
def test_config_round_trips_and_refuses_what_a_clt_cannot_be():
    cfg = clt_config()
    assert cfg.cross_layer and cfg.is_transcoder and cfg.is_crosscoder
    assert [(s.start, s.stop) for s in cfg.target_part_slices] == [(0, 3), (3, 6), (6, 9)]
    assert [(s.start, s.stop) for s in cfg.latent_groups] == [(0, 2), (2, 4), (4, 6)]
    back = SAEConfig.from_dict(cfg.to_dict())
    assert back == cfg and back.target_parts == TARGETS
    plain = SAEConfig(arch="relu", d_in=12, width=6, parts=INPUTS).to_dict()
    assert "target_parts" not in plain and "cross_layer" not in plain  # written only when set
    with pytest.raises(ValueError, match="unless target_parts"):
        SAEConfig(arch="relu", d_in=12, width=6, parts=INPUTS, target_hook="out", d_out=9)
    with pytest.raises(ValueError, match="target_parts needs a joined input"):
        SAEConfig(arch="relu", d_in=12, width=6, target_hook="out", d_out=9, target_parts=TARGETS)
    with pytest.raises(ValueError, match="target_parts must add up to d_out=10"):
        clt_config(d_out=10)
    with pytest.raises(ValueError, match="same length"):
        clt_config(d_out=6, target_parts=TARGETS[:2], target_hook="out0+out1")
    with pytest.raises(ValueError, match="3 equal groups"):
        clt_config(width=7)
    with pytest.raises(ValueError, match="cross_layer needs parts and target_parts"):
        SAEConfig(arch="relu", d_in=12, width=6, parts=INPUTS, cross_layer=True)
    with pytest.raises(ValueError, match="cross_layer must be true or false"):
        clt_config(cross_layer=1)


def test_masks_hold_at_init_and_decoder_rows_are_unit_norm_over_what_they_write():
    sae = create_sae(clt_config(skip=True))
    assert all(bool((block == 0).all()) for block in masked_blocks(sae))
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(6)) and torch.allclose(sae.W_enc.norm(dim=0), torch.ones(6))
    assert sae.W_dec.detach()[4:, 6:].abs().min() > 0  # the last group writes its own layer


# ---------------------------------------------------------------------------------------------- planted data
def planted(n=16_384, seed=0, d=12, features=12):
    """Two layers: each layer's input is made of its own sparse features; layer 0's output writes its features,
    layer 1's output writes its own features and layer 0's (which layer 1's input does not hold)."""
    g = torch.Generator().manual_seed(seed)

    def directions(width):
        return torch.nn.functional.normalize(torch.randn(features, width, generator=g), dim=1)

    f0, f1 = [(torch.rand(n, features, generator=g) < 2 / features) * (0.5 + torch.rand(n, features, generator=g))
              for _ in range(2)]
    return {"in0": f0 @ directions(d), "in1": f1 @ directions(d), "out0": f0 @ directions(d),
            "out1": f1 @ directions(d) + f0 @ directions(d)}


def chained_source(acts: dict, batch_size=256) -> JoinedSource:
    inputs = JoinedSource(TensorSource(acts, batch_size=batch_size, seed=0, model_name="m"), ["in0", "in1"])
    return JoinedSource(inputs, ["out0", "out1"])


def test_chained_joined_source_holds_both_joined_hooks():
    acts = planted(n=1024)
    source = chained_source(acts)
    assert source.hooks[-2:] == ["in0+in1", "out0+out1"] and set(source.parts) == {"in0+in1", "out0+out1"}
    batch = next(source.batches())
    assert batch.acts["in0+in1"].shape == (256, 24) and batch.acts["out0+out1"].shape == (256, 24)
    rows = next(source.in_order(["out0+out1"]))
    assert list(rows.acts) == ["out0+out1"]
    clt = create_sae(SAEConfig(arch="relu", d_in=24, width=4, hook_name="in0+in1", target_hook="out0+out1",
                               parts=source.parts["in0+in1"], target_parts=source.parts["out0+out1"], cross_layer=True))
    again = JoinedSource.for_crosscoder(TensorSource(acts, batch_size=256, seed=1, model_name="m"), clt)
    assert again.parts == source.parts and again.hooks[-2:] == ["in0+in1", "out0+out1"]  # the recorded scales


def test_a_clt_writes_what_per_layer_transcoders_cannot_and_keeps_its_masks():
    acts = planted(n=8192 + 2048)
    held_out = {name: value[8192:] for name, value in acts.items()}  # never trained on: 300 steps of 256 rows
    source = chained_source({name: value[:8192] for name, value in acts.items()})
    specs = [dict(arch="topk", width=48, k=4, hook="in0+in1", target_hook="out0+out1", lr=4e-3,
                  options={"cross_layer": True})]
    specs += [dict(arch="topk", width=24, k=2, hook=f"in{layer}", target_hook=f"out{layer}", lr=4e-3)
              for layer in range(2)]
    config = TrainConfig(tokens=300 * 256, batch_size=256, seed=0, log_every=10_000)
    clt, *transcoders = [t.sae for t in saelab.train(source, specs, config, progress=False)]
    assert clt.cfg.cross_layer and clt.cfg.target_parts == source.parts["out0+out1"]
    for name, rows, columns in clt.cross_layer_blocks():
        assert bool((getattr(clt, name).detach()[rows, columns] == 0).all()), name
    fvu = clt_fvu(clt, [held_out])
    per_layer = {}
    for layer, tc in enumerate(transcoders):
        y, y_hat = held_out[f"out{layer}"], tc(held_out[f"in{layer}"]).detach()
        per_layer[f"out{layer}"] = float((y - y_hat).square().sum() / (y - y.mean(0)).square().sum())
    assert per_layer["out1"] > 0.4  # half of layer 1's output comes from features its input does not hold
    assert fvu["out1"] < 0.5 * per_layer["out1"]  # the CLT writes them from layer 0's input
    assert fvu["out0"] < 0.5 and sum(fvu.values()) < sum(per_layer.values())


# ------------------------------------------------------------------------------------- the replacement forward
LAYERS = 2
IN, OUT = "blocks.{}.mlp.hook_in", "blocks.{}.hook_mlp_out"


def tiny_clt(arch="relu", skip=True):
    """A random CLT over both layers of the tiny model, with scales everywhere (parts, input, target) and a skip
    path, its biases set so that about half its latents fire."""
    torch.manual_seed(0)
    parts = [dict(hook=IN.format(layer), model="tiny", d=64, scale=0.7 + layer) for layer in range(LAYERS)]
    targets = [dict(hook=OUT.format(layer), model="tiny", d=64, scale=1.5 - layer / 2) for layer in range(LAYERS)]
    sae = create_sae(SAEConfig(arch=arch, d_in=128, width=32, hook_name="+".join(p["hook"] for p in parts),
                               target_hook="+".join(p["hook"] for p in targets), parts=parts, target_parts=targets,
                               cross_layer=True, skip=skip, input_scale=1.7, target_scale=0.6,
                               k=4 if arch == "topk" else None))
    with torch.no_grad():
        sae.b_dec.normal_()
        if skip:
            sae.W_skip.normal_(std=0.05)
        sae.mask_cross_layer_()
    return sae


def hand_replaced_logits(model, sae, ids, where):
    """The replacement model computed layer by layer with the unfolded CLT's own forward on the joined input, in its
    training units: layer 0's output from the clean input, layer 1's input read with layer 0 replaced."""
    cfg = sae.cfg

    def predicted(xs):  # raw targets of every layer, from each layer's raw input [b, L, 64]
        joined = torch.cat([x * p["scale"] for x, p in zip(xs, cfg.parts)], -1) * cfg.input_scale
        out = sae(joined) / cfg.target_scale
        return [out[..., s] / p["scale"] for s, p in zip(cfg.target_part_slices, cfg.target_parts)]

    clean = model.activations(ids, [IN.format(0), IN.format(1)], flatten=True)
    y0 = predicted([clean[IN.format(0)], clean[IN.format(1)]])[0]  # layer 0's output reads layer 0 alone
    with model.patched(Replace(OUT.format(0), lambda y: y0.to(y.dtype), positions=where)):
        x1 = model.activations(ids, [IN.format(1)], flatten=True)[IN.format(1)]
    y1 = predicted([clean[IN.format(0)], x1])[1]
    patches = [Replace(OUT.format(0), lambda y: y0.to(y.dtype), positions=where),
               Replace(OUT.format(1), lambda y: y1.to(y.dtype), positions=where)]
    return model.logits(ids, patches=patches)


def test_the_replacement_forward_equals_a_hand_computed_one(tiny_model):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, tiny_model.vocab_size, (3, 16), generator=g)
    ids[:, 0] = tiny_model.bos_token_id
    where = torch.ones_like(ids, dtype=torch.bool)
    where[:, 0] = False
    sae = tiny_clt()
    with torch.no_grad():
        expected = hand_replaced_logits(tiny_model, sae, ids, where)
        raw = sae.fold_input_scale()
        got = tiny_model.logits(ids, patches=clt_patches(raw, [IN.format(0), IN.format(1)],
                                                         [OUT.format(0), OUT.format(1)], where))
        clean = tiny_model.logits(ids)
    assert not torch.allclose(got, clean, atol=1e-3)  # the splice changes the forward
    assert torch.allclose(got, expected, atol=1e-4)
    metrics = clt_replacement_metrics(sae, tiny_model, ids, tokens=None, progress=False)
    assert metrics.kl_sae > 0 and metrics.ce_zero != pytest.approx(metrics.ce_clean, abs=1e-3)
    with pytest.raises(ValueError, match="layer by layer"):
        clt_replacement_metrics(tiny_clt("topk"), tiny_model, ids, tokens=None, progress=False)


def test_fold_input_scale_keeps_a_clts_outputs_and_masks():
    sae = tiny_clt()
    x = torch.randn(5, 128)
    folded = sae.fold_input_scale()
    assert folded.cfg.input_scale == 1.0 and folded.cfg.target_scale is None
    with torch.no_grad():
        assert torch.allclose(folded(x), sae(x * 1.7) / 0.6, atol=1e-5)
    for name, rows, columns in folded.cross_layer_blocks():
        assert bool((getattr(folded, name).detach()[rows, columns] == 0).all())
