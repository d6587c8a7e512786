"""saelab.evals.core: metrics against hand-computed values, streaming, the splice hook, input_scale, the saved record."""

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from saelab.activations.store import ActivationBatch
from saelab.data import TextConfig
from saelab.errors import DataError
from saelab.evals.core import (DENSITY_PLOT_FILE, FIRING_COUNTS_FILE, METRICS_FILE, Baselines, EvalResult,
                         ReconstructionStats, evaluate, feature_density, reconstruction_stats, spliced_metrics)
from saelab.sae import SAEConfig, create_sae

HOOK = "blocks.0.hook_resid_post"


def relu_sae(W_enc, W_dec, b_enc=None, b_dec=None, **cfg):
    d_in, width = W_enc.shape
    sae = create_sae(SAEConfig(arch="relu", d_in=d_in, width=width, **cfg))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_enc.copy_(torch.zeros(width) if b_enc is None else b_enc)
        sae.b_dec.copy_(torch.zeros(d_in) if b_dec is None else b_dec)
    return sae


def identity_sae(d, scale=1.0, **cfg):
    """ReLU SAE with W_enc = [I, -I], W_dec = [I; -I]: relu(x) - relu(-x) = x, exactly (times `scale`)."""
    eye = torch.eye(d)
    return relu_sae(torch.cat([eye, -eye], 1), scale * torch.cat([eye, -eye], 0), **cfg)


def context_tokens(model, n=4, length=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, model.vocab_size, (n, length), generator=g)
    ids[:, 0] = model.bos_token_id
    return ids


# ------------------------------------------------------------------------------------------- hand-computed metrics
def test_fvu_is_a_ratio_of_sums_not_a_mean_of_ratios():
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 3.0], [0.0, -3.0]])  # mean 0, sum ||x - mean||^2 = 20
    x_hat = x.clone()
    x_hat[0] = 0.0  # one error of squared norm 1, on the token with the smallest variance
    codes = torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 2, 0], [1, 0, 0]])
    stats = ReconstructionStats(d_in=2, width=3)
    stats.update(x, x_hat, codes)
    m = stats.metrics()
    per_token = ((x - x_hat).pow(2).sum(-1) / (x - x.mean(0)).pow(2).sum(-1)).mean()
    assert per_token == pytest.approx(0.25)  # the mean of per-token ratios differs...
    assert m.fvu == pytest.approx(1 / 20)  # ...and the ratio of sums is what is reported
    assert m.explained_variance == pytest.approx(19 / 20)
    assert m.mse == pytest.approx(1 / 4)
    assert m.cos_sim == pytest.approx(3 / 4)  # the zero reconstruction counts as cosine 0
    assert m.l2_ratio == pytest.approx(3 / 4)
    assert m.l0 == pytest.approx(4 / 4)
    assert m.n_tokens == 4 and m.mean_sq_norm == pytest.approx(20 / 4)
    assert stats.firing_counts.tolist() == [3, 1, 0]
    assert m.n_dead == 1 and m.frac_dead == pytest.approx(1 / 3)


def test_fvu_uses_the_mean_of_x():
    x = torch.tensor([[11.0, 5.0], [9.0, 5.0]])  # mean (10, 5): sum ||x - mean||^2 = 2
    x_hat = torch.tensor([[10.0, 5.0], [10.0, 5.0]])  # predicting the mean leaves all the variance
    stats = ReconstructionStats(2, 1)
    stats.update(x, x_hat, torch.ones(2, 1))
    assert stats.metrics().fvu == pytest.approx(1.0, abs=1e-12)


def test_dead_dense_and_l0_on_constructed_codes():
    n = 200
    codes = torch.zeros(n, 4)
    codes[:2, 0] = 1.0  # 2 / 200 = 1 %: not dense (the threshold is strict)
    codes[:3, 1] = 0.5  # 1.5 %: dense
    codes[:, 2] = 2.0  # always on: dense
    #                   latent 3 never fires: dead
    x = torch.randn(n, 3)
    stats = ReconstructionStats(3, 4)
    stats.update(x, x, codes)
    m = stats.metrics()
    assert m.l0 == pytest.approx((2 + 3 + 200) / 200)
    assert (m.n_dead, m.frac_dead) == (1, 0.25)
    assert (m.n_dense, m.frac_dense) == (2, 0.5)
    assert m.fvu == 0.0 and m.cos_sim == pytest.approx(1.0)


def test_metrics_of_a_half_scale_sae():
    sae = identity_sae(2, scale=0.5)  # x_hat = x / 2
    x = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 4.0], [0.0, -4.0]])  # mean 0, sum ||x||^2 = 40
    m = reconstruction_stats(sae, x).metrics()
    assert m.mse == pytest.approx(0.25 * 40 / 4)
    assert m.fvu == pytest.approx(0.25)
    assert m.l0 == pytest.approx(1.0)  # one of relu(x_i), relu(-x_i) is active per non-zero coordinate
    assert m.frac_dead == pytest.approx(0.0) and m.frac_dense == pytest.approx(1.0)
    assert m.l2_ratio == pytest.approx(0.5) and m.cos_sim == pytest.approx(1.0)


def test_density_histogram():
    counts = torch.tensor([0, 0, 1, 10, 100, 1000])
    density = feature_density(counts, n_tokens=1000)
    assert density.n_dead == 2 and density.n_latents == 6 and sum(density.counts) == 4
    edges = torch.tensor(density.bin_edges)
    for freq in (1e-3, 1e-2, 1e-1, 1.0):  # each live latent sits in the bin of log10(frequency)
        b = min(int(torch.searchsorted(edges, torch.tensor(math.log10(freq)), right=True)) - 1, len(edges) - 2)
        assert density.counts[b] >= 1


# ------------------------------------------------------------------------------------------- streaming
def test_streaming_in_batches_equals_one_batch():
    torch.manual_seed(0)
    sae = create_sae(SAEConfig(arch="topk", d_in=8, width=32, k=4, hook_name=HOOK))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    x = torch.randn(103, 8) * 3 + 1
    one = reconstruction_stats(sae, x)
    many = reconstruction_stats(sae, list(x.split(10)))
    batches = (ActivationBatch({HOOK: part, "other": part[:, :3]}, torch.zeros(len(part)), torch.arange(len(part)))
               for part in x.split(17))
    as_batches = reconstruction_stats(sae, batches)
    for stats in (many, as_batches):
        assert stats.firing_counts.tolist() == one.firing_counts.tolist()
        for name, value in vars(stats.metrics()).items():  # equal up to float32 rounding inside the SAE
            assert value == pytest.approx(getattr(one.metrics(), name), rel=1e-6, abs=1e-9), name
    capped = reconstruction_stats(sae, x.split(10), max_tokens=25)
    assert capped.n_tokens == 25
    assert capped.metrics().fvu == pytest.approx(reconstruction_stats(sae, x[:25]).metrics().fvu, rel=1e-6)


# ------------------------------------------------------------------------------------------- input_scale
def test_input_scale_metrics_are_in_raw_units():
    torch.manual_seed(1)
    s = 0.25
    sae = create_sae(SAEConfig(arch="topk", d_in=8, width=24, k=3, input_scale=s))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    x = torch.randn(64, 8) * 4 + 2  # raw activations
    m = reconstruction_stats(sae, x).metrics()
    with torch.no_grad():  # by hand: the SAE as trained, on scaled inputs
        xs = x.double() * s
        codes = sae.encode(xs.float())
        err = (xs - sae.decode(codes).double()).pow(2).sum()
    assert m.fvu == pytest.approx(float(err / (xs - xs.mean(0)).pow(2).sum()), rel=1e-5)
    assert m.mse == pytest.approx(float(err / len(x)) / s**2, rel=1e-5)  # reported in raw units
    assert m.l0 == pytest.approx(float((codes != 0).sum(-1).double().mean()))


# ------------------------------------------------------------------------------------------- spliced model
def test_identity_sae_restores_the_clean_model(tiny_model):
    sae = identity_sae(tiny_model.d_model, hook_name=HOOK)
    ids = context_tokens(tiny_model)
    for splice_bos in (False, True):
        m = spliced_metrics(sae, tiny_model, ids, splice_bos=splice_bos)
        assert m.ce_sae == pytest.approx(m.ce_clean, abs=1e-5)
        assert abs(m.kl_sae) < 1e-6
        assert m.ce_loss_recovered == pytest.approx(1.0, abs=1e-4)
        assert m.kl_zero > 1e-4 and m.ce_zero != pytest.approx(m.ce_clean, abs=1e-4)  # the hook matters
        assert m.n_predictions == ids.numel() - len(ids) and m.n_contexts == len(ids)


def test_zero_sae_equals_zero_ablation(tiny_model):
    eye = torch.eye(tiny_model.d_model)
    sae = relu_sae(torch.cat([eye, -eye], 1), torch.zeros(2 * tiny_model.d_model, tiny_model.d_model),
                   hook_name=HOOK)
    m = spliced_metrics(sae, tiny_model, context_tokens(tiny_model), mean_ablation=True)
    assert m.ce_sae == pytest.approx(m.ce_zero, abs=1e-6)
    assert m.kl_sae == pytest.approx(m.kl_zero, abs=1e-6)
    assert m.ce_loss_recovered == pytest.approx(0.0, abs=1e-5)
    assert m.ce_mean is not None and m.kl_mean >= 0 and m.ce_loss_recovered_mean is not None


def test_ce_clean_matches_the_hf_model(tiny_model):
    ids = context_tokens(tiny_model, n=3, length=12, seed=3)
    m = spliced_metrics(identity_sae(tiny_model.d_model, hook_name=HOOK), tiny_model, ids, batch_size=2)
    with torch.no_grad():
        logits = tiny_model.bridge.original_model(ids).logits
    direct = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert m.ce_clean == pytest.approx(float(direct), abs=1e-5)


def test_bos_position_is_left_clean_by_default(tiny_model):
    # Contexts of 2 tokens: the only prediction is made at the BOS position, which splice_bos=False leaves alone.
    sae = identity_sae(tiny_model.d_model, scale=0.0, hook_name=HOOK)
    ids = context_tokens(tiny_model, length=2)
    kept = spliced_metrics(sae, tiny_model, ids)
    assert kept.ce_zero == pytest.approx(kept.ce_clean, abs=1e-6) and kept.ce_loss_recovered is None
    spliced = spliced_metrics(sae, tiny_model, ids, splice_bos=True)
    assert spliced.ce_zero != pytest.approx(spliced.ce_clean, abs=1e-4)


def count_forwards(model, monkeypatch) -> list[int]:
    """Counts the model's forwards to the logits (one entry per call, its batch size)."""
    calls, logits = [], model.logits

    def counted(tokens, *args, **kwargs):
        calls.append(len(tokens.ids) if hasattr(tokens, "ids") else 1)
        return logits(tokens, *args, **kwargs)

    monkeypatch.setattr(model, "logits", counted)
    return calls


@pytest.mark.parametrize("mean_ablation", [False, True])
def test_shared_baselines_give_the_same_metrics_with_fewer_forwards(tiny_model, monkeypatch, mean_ablation):
    torch.manual_seed(0)
    d = tiny_model.d_model
    saes = [identity_sae(d, scale=0.5, hook_name=HOOK),
            relu_sae(torch.randn(d, 3 * d) / d**0.5, torch.randn(3 * d, d) / d**0.5, hook_name=HOOK)]
    ids = context_tokens(tiny_model, n=6)
    options = dict(model=tiny_model, text=ids, tokens=None, batch_size=2, mean_ablation=mean_ablation, progress=False)
    calls = count_forwards(tiny_model, monkeypatch)
    alone = [evaluate(sae, **options) for sae in saes]
    forwards_alone = len(calls)
    calls.clear()
    baselines = Baselines.compute(tiny_model, ids, HOOK, tokens=None, batch_size=2, mean_ablation=mean_ablation,
                                  progress=False)
    shared = [evaluate(sae, baselines=baselines, **options) for sae in saes]
    batches, ablations = 3, 2 if mean_ablation else 1
    assert forwards_alone == len(saes) * batches * (2 + ablations)  # clean, SAE, ablations for each SAE
    assert len(calls) == batches * (1 + ablations) + len(saes) * batches  # the baselines once, then the SAE alone
    for one, other in zip(alone, shared):
        assert one.metrics() == other.metrics()  # identical, not just close
        assert one.firing_counts == other.firing_counts and one.settings == other.settings
    with pytest.raises(ValueError, match="other settings .*differ in: batch_size"):
        evaluate(saes[0], baselines=baselines, **{**options, "batch_size": 3})
    with pytest.raises(ValueError, match="differ in: text"):
        evaluate(saes[0], baselines=baselines, **{**options, "text": context_tokens(tiny_model, n=6, seed=1)})


def test_baselines_too_large_to_keep_rerun_only_the_clean_forward(tiny_model, monkeypatch):
    import saelab.evals.core

    monkeypatch.setattr(saelab.evals.core, "CLEAN_LOGP_BYTES", 1)
    sae = identity_sae(tiny_model.d_model, scale=0.5, hook_name=HOOK)
    ids = context_tokens(tiny_model, n=4)
    alone = evaluate(sae, model=tiny_model, text=ids, tokens=None, batch_size=2, progress=False)
    baselines = Baselines.compute(tiny_model, ids, HOOK, tokens=None, batch_size=2, progress=False)
    assert baselines.clean_logp is None
    calls = count_forwards(tiny_model, monkeypatch)
    shared = evaluate(sae, model=tiny_model, text=ids, tokens=None, batch_size=2, baselines=baselines, progress=False)
    assert len(calls) == 2 * 2  # clean and SAE per batch; the zero ablation is not rerun
    assert shared.metrics() == alone.metrics()


def test_reconstruction_from_the_spliced_pass_matches_a_model_stream(tiny_model, tmp_path):
    from pydoc_data.topics import topics

    from saelab.activations import ModelStream

    source = tmp_path / "held_out.txt"
    source.write_text(topics[sorted(topics)[5]][:600])
    text = TextConfig(source=str(source), context_len=16)
    torch.manual_seed(2)
    sae = create_sae(SAEConfig(arch="topk", d_in=tiny_model.d_model, width=128, k=8, hook_name=HOOK))
    result = evaluate(sae, model=tiny_model, text=text, tokens=None, batch_size=4)
    stream = ModelStream(tiny_model, HOOK, text, batch_size=15, buffer_tokens=1 << 14)
    reference = reconstruction_stats(sae, stream).metrics()
    assert result.n_tokens == reference.n_tokens == result.spliced.n_contexts * 15
    assert result.reconstruction.fvu == pytest.approx(reference.fvu, rel=1e-6)
    assert result.reconstruction.l0 == pytest.approx(reference.l0, rel=1e-9)
    assert result.settings["reconstruction_source"] == "spliced pass"


# ------------------------------------------------------------------------------------------- the saved record
def test_metrics_json_round_trip_and_png(tiny_model, tmp_path):
    torch.manual_seed(0)
    sae = create_sae(SAEConfig(arch="topk", d_in=tiny_model.d_model, width=96, k=4, hook_name=HOOK,
                               model_name="tiny"))
    acts = torch.randn(300, tiny_model.d_model)
    result = evaluate(sae, activations=acts.split(128), model=tiny_model, text=context_tokens(tiny_model, n=2),
                      mean_ablation=True, out=tmp_path)
    assert result.reconstruction.n_tokens == 300 and result.settings["mean_source"] == "activations"
    record = json.loads((tmp_path / METRICS_FILE).read_text())
    assert record["schema_version"] == 1 and record["saelab_version"]
    assert record["sae"] == {"arch": "topk", "d_in": 64, "width": 96, "k": 4, "hook_name": HOOK,
                             "model_name": "tiny", "input_scale": 1.0, "dtype": "float32"}
    assert "firing_counts" not in record
    again = EvalResult.from_json(result.to_json())
    assert again == EvalResult(**{**vars(result), "firing_counts": None})
    loaded = EvalResult.load(tmp_path)
    assert loaded == result and (tmp_path / FIRING_COUNTS_FILE).exists()
    assert set(result.metrics()) >= {"fvu", "mse", "l0", "frac_dead", "ce_loss_recovered", "kl_sae"}
    png = (tmp_path / DENSITY_PLOT_FILE).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / DENSITY_PLOT_FILE).shape[:2] == (360, 640)


def test_newer_schema_is_refused():
    with pytest.raises(ValueError, match="schema_version"):
        EvalResult.from_dict({"schema_version": 99})


# ------------------------------------------------------------------------------------------- bad input
def test_width_mismatch_names_the_hook(tiny_model):
    sae = identity_sae(32, hook_name=HOOK)
    with pytest.raises(ValueError, match=f"SAE expects d_in=32 but hook {HOOK} gives 64"):
        evaluate(sae, model=tiny_model, text=context_tokens(tiny_model))
    with pytest.raises(ValueError, match=f"SAE expects d_in=32 but hook {HOOK} gives 64"):
        evaluate(sae, activations=torch.randn(5, 64))


def test_non_finite_activations_are_refused():
    x = torch.randn(10, 4)
    x[2, 1] = float("nan")
    x[7, 0] = float("inf")
    x[7, 3] = float("nan")
    with pytest.raises(ValueError, match=rf"hook {HOOK} contain 3 NaN/Inf values \(in 2 of 10"):
        reconstruction_stats(identity_sae(4, hook_name=HOOK), [torch.randn(6, 4), x])


def test_empty_input_is_refused(tiny_model):
    sae = identity_sae(4, hook_name=HOOK)
    with pytest.raises(DataError, match="0 tokens"):
        evaluate(sae, activations=torch.empty(0, 4))
    with pytest.raises(DataError, match="0 tokens"):
        reconstruction_stats(sae, [])
    with pytest.raises(DataError, match="0 rows"):
        spliced_metrics(identity_sae(64, hook_name=HOOK), tiny_model, torch.empty(0, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="needs text="):
        evaluate(sae, model=tiny_model)


def test_evaluate_reads_an_activation_cache(tiny_model, tmp_path):
    from saelab.activations import ActivationStore, cache_activations

    text = TextConfig(context_len=16)
    cache_activations(tiny_model, HOOK, tmp_path / "acts", text=text, tokens=200, progress=False)
    torch.manual_seed(0)
    sae = create_sae(SAEConfig(arch="topk", d_in=tiny_model.d_model, width=96, k=4, hook_name=HOOK))
    result = evaluate(sae, activations=tmp_path / "acts")
    store = ActivationStore(tmp_path / "acts", HOOK, batch_size=50, shuffle=False, drop_last=False)
    assert result.n_tokens == store.n_tokens
    assert result.reconstruction.fvu == pytest.approx(reconstruction_stats(sae, store).metrics().fvu, rel=1e-6)
    assert result.spliced is None and result.settings["reconstruction_source"] == "activations"


# ------------------------------------------------------------------------------------------- typical-token FVU
def massive_case():
    """Four typical tokens (norm 1, mean 0) rebuilt at half length, and one massive token (norm 1000) off by 10."""
    x = torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1], [1000, 0]])
    x_hat = torch.cat([x[:4] * 0.5, torch.tensor([[990.0, 0]])])
    return x, x_hat


def test_typical_fvu_leaves_out_the_massive_tokens_by_hand():
    x, x_hat = massive_case()
    # typical: error 4 x 0.25 = 1 over variance 4 (mean 0); all: error 1 + 100 over sum ||x - (200, 0)||^2
    all_variance = 199**2 + 201**2 + 2 * (200**2 + 1) + 800**2
    for chunks in (1, 2, 5):
        stats = ReconstructionStats(2, 3)
        for part, part_hat in zip(x.tensor_split(chunks), x_hat.tensor_split(chunks)):
            stats.update(part, part_hat, torch.ones(len(part), 3))
        m = stats.metrics()
        assert m.fvu == pytest.approx(101 / all_variance, rel=1e-12)
        assert m.fvu_typical == pytest.approx(0.25, rel=1e-12)
        assert m.massive_tokens == 1 and m.massive_norm == pytest.approx(10.0)  # 10 x the median norm (1)
    no_massive = ReconstructionStats(2, 3)
    no_massive.update(x[:4], x_hat[:4], torch.ones(4, 3))
    assert no_massive.metrics().fvu_typical == pytest.approx(no_massive.metrics().fvu) == pytest.approx(0.25)
    assert no_massive.metrics().massive_tokens == 0


def test_typical_fvu_is_none_when_the_massive_tokens_outnumber_the_rows_kept():
    x, x_hat = massive_case()
    x, x_hat = torch.cat([x, x[4:] * 2]), torch.cat([x_hat, x_hat[4:] * 2])  # two massive tokens now
    for kept, expected in ((2, None), (3, 2)):
        stats = ReconstructionStats(2, 3, max_massive_rows=kept)
        stats.update(x, x_hat, torch.ones(len(x), 3))
        assert stats.metrics().massive_tokens == expected
        assert (stats.metrics().fvu_typical is None) == (expected is None)
    assert stats.metrics().fvu_typical == pytest.approx(0.25)


def test_typical_fvu_goes_to_metrics_json_and_the_summary_names_both(tmp_path, capsys):
    from saelab.commands.common import print_metrics

    x, _ = massive_case()
    x = torch.cat([x[:4].repeat(5, 1), x[4:]])  # 21 tokens, one massive
    result = evaluate(identity_sae(2, scale=0.5, hook_name=HOOK), activations=x, out=tmp_path)
    record = json.loads((tmp_path / METRICS_FILE).read_text())["reconstruction"]
    assert record["fvu_typical"] == pytest.approx(0.25) and record["massive_tokens"] == 1
    assert record["fvu"] == pytest.approx(result.reconstruction.fvu) and record["fvu"] != pytest.approx(0.25)
    assert EvalResult.load(tmp_path).reconstruction == result.reconstruction
    old = {k: v for k, v in record.items() if k not in ("fvu_typical", "massive_tokens", "massive_norm")}
    assert EvalResult.from_dict({**result.to_dict(), "reconstruction": old}).reconstruction.fvu_typical is None
    print_metrics(tmp_path, result)
    out = capsys.readouterr().out
    assert re.search(rf"FVU, all tokens +{result.reconstruction.fvu:.4f}\n", out)
    assert re.search(r"FVU, typical tokens +0\.2500 +\(1 massive token left out: norm > 10x the median\)", out)
    assert "(these are held-out; the training bar's fvu is the last training batch's, massive tokens in only if it " \
        "held one)" in out


def test_a_dead_share_needs_ten_tokens_per_latent():
    from saelab.evals.core import DEAD_TOKENS_PER_LATENT, dead_share_note

    assert DEAD_TOKENS_PER_LATENT == 10
    assert dead_share_note(4_064, 4_608) == ("not measured on fewer than 46,080 tokens (10 x width 4,608); "
                                            "4,064 evaluated")
    assert dead_share_note(46_080, 4_608) is None and dead_share_note(46_079, 4_608) is not None
    sae = create_sae(SAEConfig(arch="topk", d_in=4, width=8, k=2))
    few = evaluate(sae, activations=torch.randn(79, 4))
    assert few.notes() == {"frac_dead": "not measured on fewer than 80 tokens (10 x width 8); 79 evaluated"}
    assert few.to_dict()["notes"] == few.notes()
    assert EvalResult.from_json(few.to_json()).notes() == few.notes()  # derived, not stored twice
    enough = evaluate(sae, activations=torch.randn(80, 4))
    assert enough.notes() == {} and "notes" not in enough.to_dict()
