"""Shared SAE machinery: init, decoder norm/grad surgery, b_dec init, sparse decode, input-scale folding, AuxK."""
import math
from functools import partial

import pytest
import torch

from helpers import make_sae
from saelab.sae import (auxk_loss, available_architectures, create_training, estimate_input_scale, geometric_median,
                        sae_class)

ARCHS = available_architectures()
make = partial(make_sae, d_in=6, width=16, k=3, dtype="float64", bias_std=0, threshold_range=None)
"""The SAEs of these tests, freshly initialised: some pin the initialisation itself."""


def test_init_unit_decoder_rows_encoder_is_transpose_biases_zero():
    sae = make("topk", d_in=10, width=40)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(40, dtype=torch.float64))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)
    assert sae.W_enc.data_ptr() != sae.W_dec.data_ptr()
    assert not sae.b_enc.any() and not sae.b_dec.any()


def test_normalize_decoder():
    sae = make("relu")
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(16, 1, dtype=torch.float64) * 5)
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(16, dtype=torch.float64))


def test_remove_parallel_grad_leaves_grad_orthogonal_to_rows():
    sae = make("relu")
    with torch.no_grad():
        sae.W_dec.mul_(3.0)  # works for rows that are not unit norm too
    g = torch.randn_like(sae.W_dec)
    sae.W_dec.grad = g.clone()
    sae.remove_parallel_grad_()
    w = sae.W_dec.detach()
    assert (sae.W_dec.grad * w).sum(1).abs().max() < 1e-12
    # only the parallel part was removed
    unit = w / w.norm(dim=1, keepdim=True)
    torch.testing.assert_close(sae.W_dec.grad, g - (g * unit).sum(1, keepdim=True) * unit)
    sae.W_dec.grad = None
    sae.remove_parallel_grad_()  # no grad yet: no-op


def test_geometric_median_is_robust_and_stationary():
    torch.manual_seed(1)
    pts = torch.cat([torch.randn(200, 5, dtype=torch.float64) * 0.1, torch.full((20, 5), 100.0, dtype=torch.float64)])
    m = geometric_median(pts, iters=500, tol=1e-12)
    assert m.norm() < 0.5 < pts.mean(0).norm()
    # first-order optimality: the unit vectors from the median to the points sum to ~0
    u = (pts - m) / (pts - m).norm(dim=1, keepdim=True)
    assert u.sum(0).norm() < 1e-3 * len(pts)


def test_init_b_dec():
    sae = make("topk")
    sample = torch.randn(50, 6, dtype=torch.float64) + 3
    sae.init_b_dec_(sample, method="mean")
    torch.testing.assert_close(sae.b_dec.detach(), sample.mean(0))
    sae.init_b_dec_(sample)
    torch.testing.assert_close(sae.b_dec.detach(), geometric_median(sample), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="method"):
        sae.init_b_dec_(sample, method="median")


def test_decode_topk_equals_dense_decode():
    sae = make("topk", d_in=8, width=32, k=5)
    with torch.no_grad():
        sae.b_dec.normal_()
    x = torch.randn(2, 7, 8, dtype=torch.float64)  # leading dims are kept
    idx, vals = sae.encode_topk(x)
    assert idx.shape == (2, 7, 5) and idx.dtype == torch.long and vals.shape == (2, 7, 5)
    dense = sae.encode(x)
    assert dense.shape == (2, 7, 32)
    torch.testing.assert_close(sae.decode_topk(idx, vals), sae.decode(dense))
    torch.testing.assert_close(torch.zeros_like(dense).scatter(-1, idx, vals), dense)
    # empty batch and k = 1
    assert sae.decode_topk(idx[:0, 0], vals[:0, 0]).shape == (0, 8)
    torch.testing.assert_close(sae.decode_topk(idx[..., :1], vals[..., :1]),
                               vals[..., :1] * sae.W_dec[idx[..., 0]] + sae.b_dec)
    with pytest.raises(ValueError, match="same shape"):
        sae.decode_topk(idx, vals[..., :2])


@pytest.mark.parametrize("arch", ARCHS)
def test_fold_input_scale(arch):
    s = 2.5
    sae = make(arch, input_scale=s)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_()
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.rand(16, dtype=torch.float64).mul(0.5).add(0.05).log())
    folded = sae.fold_input_scale()
    assert folded.cfg.input_scale == 1.0 and sae.cfg.input_scale == s  # original untouched
    torch.testing.assert_close(folded.W_dec, sae.W_dec)  # decoder rows keep unit norm
    x = torch.randn(30, 6, dtype=torch.float64)  # raw activations
    codes = sae.encode(s * x)
    assert (codes > 0).sum() > 10  # the comparison is not vacuous
    torch.testing.assert_close(folded.encode(x), codes / s)
    torch.testing.assert_close(folded(x), sae(s * x) / s)


def ref_auxk(W_dec, pre, residual, dead, k_aux, coef):
    """AuxK written out with loops, in float64."""
    dead_ids = [i for i in range(pre.shape[1]) if dead[i]]
    if not dead_ids:
        return 0.0
    k = min(k_aux, len(dead_ids))
    e = residual.double()
    e_hat = torch.zeros_like(e)
    for n in range(pre.shape[0]):
        best = sorted(dead_ids, key=lambda i: -float(pre[n, i]))[:k]
        for i in best:
            e_hat[n] += max(float(pre[n, i]), 0.0) * W_dec[i].double()
    num = ((e_hat - e) ** 2).sum()
    den = ((e - e.mean(0)) ** 2).sum()
    return coef * min(1.0, len(dead_ids) / k_aux) * float(num / den)


def test_auxk_zero_without_dead_latents():
    sae = make("topk")
    pre = torch.randn(10, 16, dtype=torch.float64)
    r = torch.randn(10, 6, dtype=torch.float64)
    assert float(auxk_loss(sae.W_dec, pre, r, torch.zeros(16, dtype=torch.bool), 3, 1 / 32)) == 0.0
    assert float(auxk_loss(sae.W_dec, pre, r, None, 3, 1 / 32)) == 0.0


@pytest.mark.parametrize("n_dead,k_aux", [(1, 3), (2, 3), (3, 3), (9, 3), (16, 16)])
def test_auxk_matches_hand_computation(n_dead, k_aux):
    sae = make("topk")
    torch.manual_seed(n_dead)
    pre = torch.randn(10, 16, dtype=torch.float64)
    r = torch.randn(10, 6, dtype=torch.float64)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[torch.randperm(16)[:n_dead]] = True
    with torch.no_grad():
        got = auxk_loss(sae.W_dec, pre, r, dead, k_aux, 0.25).item()
    assert got > 0
    assert math.isclose(got, ref_auxk(sae.W_dec.detach(), pre, r, dead, k_aux, 0.25), rel_tol=1e-9)


def test_auxk_does_not_push_the_main_reconstruction():
    sae = make("topk")
    pre = torch.randn(10, 16, dtype=torch.float64)
    r = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    auxk_loss(sae.W_dec, pre, r, torch.ones(16, dtype=torch.bool), 3, 1.0).backward()
    assert r.grad is None and sae.W_dec.grad is not None


def test_training_state_and_warmup_defaults():
    for arch in ARCHS:
        tr = create_training(make(arch))
        assert isinstance(tr.state_dict(), dict)
        if "k_aux" in sae_class(arch).options_cls.names():
            assert tr.k_aux == 3  # d_in // 2


def test_auxk_rejects_a_wrong_dead_mask():
    sae = make("topk")
    with pytest.raises(ValueError, match="dead mask"):
        create_training(sae).loss(torch.randn(4, 6, dtype=torch.float64), dead=torch.zeros(15, dtype=torch.bool))


def test_estimate_input_scale_gives_unit_mean_squared_norm():
    x = torch.randn(2, 50, 6) * 7 + 1
    s = estimate_input_scale(x)
    assert float((s * x).pow(2).sum(-1).mean()) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="input_scale"):
        estimate_input_scale(torch.zeros(3, 6))
