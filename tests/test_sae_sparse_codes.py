"""ReLU / JumpReLU on CSR codes: once codes are sparse, the step decodes sparsely; loss, L0 and every gradient
(JumpReLU's straight-through threshold gradient, ReLU's norm-weighted L1) equal the dense step's."""
import math

import pytest
import torch

from helpers import make_sae
from saelab.sae import create_training
from saelab.sae.sparse_codes import SPARSE_MAX_DENSITY

D, W, N = 6, 64, 40


def make(arch, **kw):
    sae = make_sae(arch, d_in=D, width=W, dtype="float64", bias_std=0, threshold_range=None, sparsity_warmup_steps=0,
                   **kw)
    x = torch.randn(N, D, dtype=torch.float64) * 2
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.zero_()
        sae.b_enc.copy_(-sae.pre_acts(x).quantile(0.9, dim=0))  # sparse codes: about a tenth of the latents fire
    return sae, x


def step(sae, x, sparse: bool):
    training = create_training(sae)
    if sparse:
        training._density = 0.0  # as after a sparse step
    else:
        training.kernel = "dense"
    sae.zero_grad()
    out = training.loss(x, step=5)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in sae.named_parameters()}, training


def assert_same_steps(sae, x):
    (ours, our_grads, training), (want, want_grads, _) = step(sae, x, True), step(sae, x, False)
    for field in ("loss", "mse", "sparsity_loss", "l0", "x_hat"):
        torch.testing.assert_close(getattr(ours, field), getattr(want, field), msg=field)
    assert torch.equal(ours.fired, want.fired)
    for name, grad in want_grads.items():
        torch.testing.assert_close(our_grads[name], grad, msg=name)
    return ours, our_grads, training


def test_relu_sparse_step_equals_dense():
    sae, x = make("relu", l1_coefficient=0.3)
    out, grads, training = assert_same_steps(sae, x)
    assert 0 < float(out.l0) < W / 4
    assert training._density == pytest.approx(float(out.l0) / W)


def test_jumprelu_sparse_step_equals_dense_with_tokens_in_the_kernel_window():
    eps = 0.2  # wide, so that many pre-activations lie within eps/2 of a threshold on both sides
    sae, x = make("jumprelu", l0_coefficient=0.1, jumprelu_bandwidth=eps, jumprelu_init_threshold=0.3)
    with torch.no_grad():
        sae.log_threshold.copy_(torch.empty(W).uniform_(math.log(0.15), math.log(0.6)))
    z = sae.pre_acts(x).relu().detach()
    window = (z - sae.threshold.detach()).abs() < eps / 2
    assert int((window & (z < sae.threshold.detach())).sum()) > 5 and int((window & (z > sae.threshold)).sum()) > 5
    out, grads, _ = assert_same_steps(sae, x)
    assert float(out.l0) > 0 and grads["log_threshold"].abs().sum() > 0


def test_jumprelu_threshold_under_half_the_bandwidth_steps_dense():
    """Every z = 0 then lies in the kernel window of that latent: the step falls back to the dense path."""
    sae, x = make("jumprelu", l0_coefficient=0.1, jumprelu_bandwidth=0.2, jumprelu_init_threshold=0.3)
    with torch.no_grad():
        sae.log_threshold[3] = math.log(0.05)
    assert_same_steps(sae, x)


def test_dense_codes_take_the_dense_step():
    sae, x = make("relu")
    with torch.no_grad():
        sae.b_enc.fill_(2.0)  # most latents fire
    training = create_training(sae)
    out = training.loss(x)
    assert float(out.l0) / W > SPARSE_MAX_DENSITY and not training._sparse_step()
    with torch.no_grad():
        sae.b_enc.sub_(sae.pre_acts(x).max() + 1)  # none fire
    training.loss(x)
    assert training._sparse_step()
