"""Crosscoders: the joined input, what the config records, training on planted sources with known shared and
exclusive features, the readouts (relative decoder norm, latent scaling), the two-model source and its null."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import saelab
from saelab.activations.tensors import TensorSource
from saelab.crosscoder import (JoinedSource, classify, decoder_cosine, diffing_report, joined, latent_scaling,
                               paired_activations, paired_hook, part_norms, relative_norm, split, unpaired)
from saelab.errors import CacheError, HookError
from saelab.sae import SAEConfig, create_sae
from saelab.training import TrainConfig

PARTS = [dict(hook="a", model="m", d=4, scale=1.0), dict(hook="b", model="m", d=6, scale=0.5)]


# -------------------------------------------------------------------------------------------------- config
def test_config_records_parts_and_refuses_what_cannot_be_read():
    cfg = SAEConfig(arch="topk", d_in=10, width=8, k=2, parts=PARTS)
    assert cfg.is_crosscoder and [(s.start, s.stop) for s in cfg.part_slices] == [(0, 4), (4, 10)]
    assert SAEConfig.from_dict(cfg.to_dict()).parts == PARTS
    assert "parts" not in SAEConfig(arch="topk", d_in=10, width=8, k=2).to_dict()  # an SAE's cfg.json is unchanged
    with pytest.raises(ValueError, match="add up to d_in=11"):
        SAEConfig(arch="topk", d_in=11, width=8, k=2, parts=PARTS)
    with pytest.raises(ValueError, match="at least two"):
        SAEConfig(arch="topk", d_in=4, width=8, k=2, parts=PARTS[:1])
    with pytest.raises(ValueError, match="scale > 0"):
        SAEConfig(arch="topk", d_in=10, width=8, k=2, parts=[PARTS[0], {**PARTS[1], "scale": float("nan")}])
    with pytest.raises(ValueError, match="exactly the keys"):
        SAEConfig(arch="topk", d_in=10, width=8, k=2, parts=[PARTS[0], {"hook": "b", "d": 6}])
    with pytest.raises(ValueError, match="transcoder"):
        SAEConfig(arch="topk", d_in=10, width=8, k=2, parts=PARTS, target_hook="c", d_out=3)


def test_l1_penalty_weighs_each_latent_by_the_sum_of_its_parts_norms():
    sae = create_sae(SAEConfig(arch="relu", d_in=10, width=8, parts=PARTS))
    w = sae.W_dec.detach()
    expected = w[:, :4].norm(dim=1) + w[:, 4:].norm(dim=1)  # independent: the two blocks by hand
    assert torch.allclose(sae.penalty_norms(), expected)
    plain = create_sae(SAEConfig(arch="relu", d_in=10, width=8))
    assert torch.allclose(plain.penalty_norms(), plain.W_dec.norm(dim=1))


def test_a_crosscoder_folder_round_trips(tmp_path):
    sae = create_sae(SAEConfig(arch="topk", d_in=10, width=8, k=2, hook_name="m:a+m:b", parts=PARTS))
    sae.save(tmp_path / "xc")
    back = saelab.SAE.load(tmp_path / "xc")
    assert back.cfg.parts == PARTS and back.cfg.hook_name == "m:a+m:b"
    x = torch.randn(5, 10)
    assert torch.equal(back.W_dec, sae.fold_input_scale().W_dec) and back(x).shape == (5, 10)


# ------------------------------------------------------------------------------------------- the joined input
def source_of(n=512, seed=0, batch_size=64) -> TensorSource:
    g = torch.Generator().manual_seed(seed)
    return TensorSource({"a": torch.randn(n, 4, generator=g) * 3, "b": torch.randn(n, 6, generator=g) * 0.2},
                        batch_size=batch_size, seed=seed, model_name="m")


def test_joined_source_scales_each_part_to_unit_variance():
    source = JoinedSource(source_of(), ["a", "b"])
    assert source.name == "a+b" and source.hooks == ["a", "b", "a+b"] and source.d["a+b"] == 10
    parts = source.parts["a+b"]
    first = source.source.acts  # the scales come from the first batch in text order: rows 0..63
    for part, hook in zip(parts, "ab"):
        assert part["hook"] == hook and part["model"] == "m"
        rows = first[hook][:64]
        variance = sum(((rows[:, j] - rows[:, j].mean()) ** 2).mean().item() for j in range(rows.shape[1]))  # by hand
        assert math.isclose(part["scale"], variance ** -0.5, rel_tol=1e-5)
    batch = next(source.batches(3))
    raw = next(source.source.batches(3))
    assert torch.equal(batch.acts["a+b"], torch.cat([raw.acts["a"] * parts[0]["scale"],
                                                      raw.acts["b"] * parts[1]["scale"]], 1))
    a, b = split(parts, batch.acts["a+b"], raw=True)
    assert torch.allclose(a, raw.acts["a"]) and torch.allclose(b, raw.acts["b"])
    rows = torch.cat([x.acts["a+b"] for x in source.in_order(["a+b"])])
    assert len(rows) == 512 and (rows[:, :4] - rows[:, :4].mean(0)).square().sum(1).mean() == pytest.approx(1, rel=0.2)
    offset = TensorSource({"a": torch.randn(512, 4) + 100, "b": torch.randn(512, 6)}, batch_size=64)
    parts = JoinedSource(offset, ["a", "b"]).parts["a+b"]  # a large constant offset does not shrink a part
    assert parts[0]["scale"] == pytest.approx(parts[1]["scale"] * 1.5 ** 0.5, rel=0.3)
    with pytest.raises(ValueError, match="zero variance"):
        JoinedSource(TensorSource({"a": torch.ones(64, 4), "b": torch.randn(64, 6)}, batch_size=64), ["a", "b"])
    with pytest.raises(HookError, match="two or more different hooks"):
        JoinedSource(source_of(), ["a", "c"])
    with pytest.raises(HookError, match="do not hold"):
        joined(parts, {"a": torch.ones(2, 4)})


# ---------------------------------------------------------------------------------------------- planted data
def planted(n=24_000, seed=0, shared=16, only=8):
    """Rows of two sources A [n, 24] and B [n, 20] made of sparse features: `shared` write to both (different
    directions in each), `only` to A alone and `only` to B alone."""
    g = torch.Generator().manual_seed(seed)
    n_features = shared + 2 * only
    dirs_a = torch.nn.functional.normalize(torch.randn(n_features, 24, generator=g), dim=1)
    dirs_b = torch.nn.functional.normalize(torch.randn(n_features, 20, generator=g), dim=1)
    dirs_a[shared + only:] = 0  # B-only features write nothing to A
    dirs_b[shared:shared + only] = 0  # A-only features write nothing to B
    active = torch.rand(n, n_features, generator=g) < 3 / n_features
    codes = active * (0.5 + torch.rand(n, n_features, generator=g))
    kinds = ["shared"] * shared + ["a-only"] * only + ["b-only"] * only
    return codes @ dirs_a, codes @ dirs_b, dirs_a, dirs_b, kinds


def train_crosscoder(xa, xb, arch="topk", steps=600, seed=0):
    source = JoinedSource(TensorSource({"A": xa, "B": xb}, batch_size=256, seed=seed, model_name="m"), ["A", "B"])
    spec = dict(arch=arch, width=64, hook=source.name, lr=4e-3)
    if arch == "topk":
        spec["k"] = 4
    else:
        spec["options"] = dict(target_l0=4.0)
    config = TrainConfig(tokens=steps * 256, batch_size=256, seed=seed, log_every=10_000)
    [trained] = saelab.train(source, [spec], config, progress=False)
    return trained.sae, source


def best_latents(sae, dirs_a, dirs_b, parts):
    """For each planted feature, the latent whose joined decoder row points most like it (in the crosscoder's
    units), and that cosine."""
    planted_rows = torch.cat([dirs_a * parts[0]["scale"], dirs_b * parts[1]["scale"]], 1)
    cos = torch.nn.functional.normalize(planted_rows, dim=1) @ torch.nn.functional.normalize(sae.W_dec.detach(), dim=1).T
    return cos.max(1)


def test_crosscoder_labels_planted_shared_and_exclusive_features():
    xa, xb, dirs_a, dirs_b, kinds = planted()
    sae, source = train_crosscoder(xa, xb)
    assert sae.cfg.parts == source.parts[source.name] and sae.cfg.hook_name == "A+B"
    cosines, latents = best_latents(sae, dirs_a, dirs_b, sae.cfg.parts)
    found = cosines > 0.9
    assert found.float().mean() >= 0.9, cosines
    labels = classify(relative_norm(sae)[latents])
    right = [label == kind for label, kind, ok in zip(labels, kinds, found.tolist()) if ok]
    assert sum(right) >= 0.9 * len(right), list(zip(labels, kinds))
    rows = source.in_order([source.name])
    report = diffing_report(sae, rows)
    assert report.counts["a-only"] >= 6 and report.counts["b-only"] >= 6 and report.counts["shared"] >= 8
    assert sum(report.histogram) == report.live
    assert report.confirmed["a-only"] >= 5 and report.confirmed["b-only"] >= 5  # truly exclusive: scaling agrees


def test_the_token_shuffled_null_shares_few_latents():
    xa, xb, *_ = planted(seed=1)
    null = unpaired(TensorSource({"A": xa, "B": xb}, batch_size=256, model_name="m"), "B")
    assert torch.equal(null.acts["A"], xa) and not torch.equal(null.acts["B"], xb)
    assert torch.equal(null.acts["B"].sort(0).values, xb.sort(0).values)  # the same rows, another order
    sae, source = train_crosscoder(null.acts["A"], null.acts["B"], seed=1)
    real, _ = train_crosscoder(xa, xb, seed=1)
    shared = lambda s: sum(label == "shared" for label in classify(relative_norm(s)))  # noqa: E731
    assert shared(sae) < 0.5 * shared(real)


def test_latent_scaling_finds_an_exclusive_label_that_is_not():
    """A latent whose A-decoder is zero, though A carries its signal (another latent writes it there): decoder norm
    calls it B-only, latent scaling does not."""
    cfg = SAEConfig(arch="relu", d_in=4, width=2, hook_name="A+B",
                    parts=[dict(hook="A", model="", d=2, scale=1.0), dict(hook="B", model="", d=2, scale=1.0)])
    sae = create_sae(cfg)
    with torch.no_grad():
        sae.b_dec.zero_(); sae.b_enc.zero_()  # noqa: E702
        sae.W_enc.copy_(torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
        sae.W_dec.copy_(torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]))
    f = torch.rand(20_000, 2, generator=torch.Generator().manual_seed(0))
    x = torch.cat([f[:, :1] * torch.tensor([1.0, 0.0]), f @ torch.eye(2)], 1)  # A holds latent 0's signal, undecoded
    rows = [saelab.activations.ActivationBatch({"A+B": x}, torch.zeros(20_000, dtype=torch.long),
                                                 torch.arange(20_000))]
    assert relative_norm(sae).tolist() == [1.0, 1.0]  # both look B-only by decoder norm
    scaling = latent_scaling(sae, rows)
    assert scaling.fitted_norm[0, 0] == pytest.approx(1.0, abs=0.02)  # A's residual: latent 0's full signal
    assert scaling.fitted_norm[1, 0] == pytest.approx(0.0, abs=0.02)
    assert scaling.relative()[0] == pytest.approx(0.5, abs=0.02) and scaling.relative()[1] == pytest.approx(1.0, abs=0.03)


def test_decoder_cosine_needs_parts_of_one_width():
    sae = create_sae(SAEConfig(arch="topk", d_in=10, width=8, k=2, parts=PARTS))
    with pytest.raises(ValueError, match="one width"):
        decoder_cosine(sae)
    same = create_sae(SAEConfig(arch="topk", d_in=8, width=8, k=2, parts=[{**PARTS[0]}, {**PARTS[1], "d": 4}]))
    with torch.no_grad():
        same.W_dec[:, 4:] = same.W_dec[:, :4] * 2
    assert torch.allclose(decoder_cosine(same), torch.ones(8), atol=1e-6)
    assert torch.allclose(part_norms(same)[:, 1], 2 * part_norms(same)[:, 0])


# ---------------------------------------------------------------------------------------------- sources
def test_tensor_source_epochs_are_reproducible_and_file_round_trips(tmp_path):
    source = source_of(n=200, batch_size=64)
    first = [b.rows for _, b in zip(range(7), source.batches())]
    assert all(len(r) == 64 for r in first)
    assert torch.equal(torch.cat(first[:3]).sort().values.unique(), torch.cat(first[:3]).sort().values)  # no repeats
    assert torch.equal(next(source.batches(5)).rows, first[5])  # batch b is the same however it is reached
    source.save(tmp_path / "rows.safetensors")
    back = TensorSource.load(tmp_path / "rows.safetensors", batch_size=64)
    assert back.model_name == "m" and torch.equal(back.acts["a"], source.acts["a"])
    later_first = TensorSource({"z": torch.ones(10, 2), "a": torch.zeros(10, 3)}, batch_size=5)
    later_first.save(tmp_path / "order.safetensors")
    loaded = TensorSource.load(tmp_path / "order.safetensors")  # fewer rows than the default batch: fits to them
    assert loaded.hooks == ["z", "a"] and loaded.batch_size == 10  # the saved order, not the file's sorted one
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 12)
    with pytest.raises(CacheError, match="not a readable"):
        TensorSource.load(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="same rows"):
        TensorSource({"a": torch.ones(3, 2), "b": torch.ones(4, 2)})


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    from conftest import build_tiny_model

    from saelab.models import load_model

    return load_model(str(build_tiny_model(tmp_path_factory.mktemp("tiny-other-xc"), d_model=48, vocab=300)))


def test_paired_activations_align_two_tokenizers(tiny_model, other_model):
    other = other_model
    text = ["The quick brown fox jumps over the lazy dog, again and again, near Paris on Monday."] * 20
    hook = "blocks.1.hook_resid_post"
    source = paired_activations(tiny_model, hook, other, hook, text, tokens=150, batch_size=32, progress=False)
    ha, hb = paired_hook(tiny_model, hook), paired_hook(other, hook)
    assert ha == f"{Path(tiny_model.name).name}:{hook}"
    assert source.hooks == [ha, hb] and source.n == 150 and source.d == {ha: 64, hb: 48}
    # independent of the alignment code: row 0 is where "The" ends (character 3) in both tokenizations
    for model, h, width in ((tiny_model, ha, 64), (other, hb, 48)):
        tokens = model.tokenize(text[:1])
        position = max(i for i, (start, end) in enumerate(tokens.spans[0].tolist()) if end == 3 and start >= 0)
        every = model.activations_at(tokens, [hook], positions=None)[hook][0]  # [L, d]
        assert every.shape[-1] == width and torch.allclose(source.acts[h][0], every[position], atol=1e-5)
    crosscoder_input = JoinedSource(source, [ha, hb])
    assert crosscoder_input.parts[crosscoder_input.name][1] | {"scale": 0} == dict(model=other.name, hook=hook, d=48,
                                                                                  scale=0)
    with pytest.raises(ValueError, match="same model"):
        paired_activations(tiny_model, hook, tiny_model, hook, text, tokens=10, progress=False)


# --------------------------------------------------------------------------------- a first-class dictionary
@pytest.fixture(scope="module")
def layer_crosscoder(tiny_cache):
    """A crosscoder across the tiny cache's two layers, trained briefly (what matters here is how it is read)."""
    from helpers import CACHE_HOOKS

    source = JoinedSource(tiny_cache, list(CACHE_HOOKS), batch_size=256)
    config = TrainConfig(tokens=256 * 20, batch_size=256, log_every=10_000)
    [trained] = saelab.train(source, [dict(arch="topk", width=48, k=4, hook=source.name)], config, progress=False)
    return trained.sae


def test_codes_of_a_crosscoder_come_from_its_parts_joined(layer_crosscoder, tiny_cache):
    from helpers import CACHE_HOOKS

    from saelab.activations import ActivationStore
    from saelab.codes import iter_codes

    sae = layer_crosscoder
    codes = list(iter_codes(sae, tiny_cache, batch_size=512))
    store = ActivationStore(tiny_cache, list(CACHE_HOOKS))
    first = next(store.in_order())
    x = torch.cat([first.acts[h] * p["scale"] for h, p in zip(CACHE_HOOKS, sae.cfg.parts)], 1)  # by hand
    dense = sae.encode(x[:512])
    got = torch.zeros_like(dense)
    c = codes[0]
    for row in range(len(dense)):
        got[row, c.latents[c.crow[row]:c.crow[row + 1]]] = c.values[c.crow[row]:c.crow[row + 1]]
    assert torch.allclose(got, dense, atol=1e-5) and sum(len(c.rows) for c in codes) == store.manifest.tokens


def test_probes_dashboard_and_push_read_a_crosscoder(layer_crosscoder, tiny_model, tiny_cache, tmp_path):
    from helpers import CACHE_HOOKS

    from saelab.analysis.probes import Features, extract
    from saelab.explore import explore

    sae = layer_crosscoder
    texts = ["one two three four", "Monday Tuesday"]
    [features] = [Features(sae=sae)]
    assert features.reads == list(CACHE_HOOKS)
    pooled = extract(tiny_model, texts, [features], positions="last")[features.name]
    acts = tiny_model.activations_at(texts, list(CACHE_HOOKS), positions="last")
    assert torch.allclose(pooled, sae.encode(joined(sae.cfg.parts, acts)), atol=1e-5)
    cards = explore(sae, tiny_cache, tiny_model)
    assert cards.logits is not None  # the logit table reads the last layer's decoder block
    busiest = cards.most_active(1)[0]
    assert cards[busiest].count > 0 and cards[busiest].top  # a card with its top examples
    page = cards.dashboard(tmp_path / "dash", latents=[busiest])
    assert Path(page).exists()
    out = sae.push_to_hub("me/xc", dry_run=tmp_path / "push")
    pushed = saelab.SAE.load(out / sae.cfg.hook_name).cfg.parts  # a local model path is reduced to its last name
    assert pushed == [{**p, "model": Path(p["model"]).name} for p in sae.cfg.parts]


def test_matching_reads_a_crosscoder_on_its_model(layer_crosscoder, tiny_model, other_model):
    from helpers import CACHE_HOOKS

    from saelab.analysis.alignment import Side, aligned_chunks

    sae = layer_crosscoder
    side = Side(tiny_model, sae.cfg.hook_name, sae)
    assert side.reads == list(CACHE_HOOKS) and side.width == 48
    docs = ["The quick brown fox jumps over the lazy dog on Monday."] * 4
    [chunk] = list(aligned_chunks([side], [Side(other_model, "blocks.1.hook_resid_post")], docs))
    codes = chunk.a[side.label]
    tokens = tiny_model.tokenize(docs[:1])
    every = tiny_model.activations_at(tokens, list(CACHE_HOOKS), positions=None)
    position = max(i for i, (start, end) in enumerate(tokens.spans[0].tolist()) if end == 3 and start >= 0)
    expected = sae.encode(joined(sae.cfg.parts, {h: every[h][0, position:position + 1] for h in CACHE_HOOKS}))[0]
    got = torch.zeros(48)
    got[codes.latents[codes.crow[0]:codes.crow[1]]] = codes.values[codes.crow[0]:codes.crow[1]]
    assert torch.allclose(got, expected, atol=1e-5)
    with pytest.raises(ValueError, match="d_in=128 but"):  # the other model's layers are narrower
        Side(other_model, sae.cfg.hook_name, sae)


def test_cli_trains_a_crosscoder_on_joined_hooks(tiny_cache, tmp_path, capsys):
    from helpers import CACHE_HOOKS

    from saelab.cli import main

    out = tmp_path / "run"
    args = ["train", "--acts", str(tiny_cache), "--join", ",".join(CACHE_HOOKS), "--arch", "topk", "--width", "32",
            "--k", "4", "--tokens", "1024", "--batch-size", "256", "--out", str(out)]
    assert main(args) == 0
    assert "not evaluated by `train`" in capsys.readouterr().err
    sae = saelab.SAE.load(out / "+".join(CACHE_HOOKS) / "topk-32-k4")
    assert [p["hook"] for p in sae.cfg.parts] == list(CACHE_HOOKS) and sae.cfg.training_tokens == 1024
    assert main(args[:4] + ["blocks.0.hook_resid_post,blocks.9.hook_resid_post"] + args[5:]) == 2
    assert "two or more different hooks" in capsys.readouterr().err
