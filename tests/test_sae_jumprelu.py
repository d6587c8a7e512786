"""JumpReLU: forward, straight-through gradients (Rajamanoharan et al. 2024, eqs. for the rectangle kernel), L0 loss."""
import math

import pytest
import torch

from saelab.sae import JumpReLUSAE, SAEConfig, create_sae, create_training
from saelab.sae.jumprelu import heaviside, jumprelu

EPS = 1e-3


def test_ste_gradients_on_hand_built_example():
    # (z - theta) / eps = 0.2, 10, -0.2, -10  ->  K = 1, 0, 1, 0
    z = torch.tensor([[0.0102, 0.0200, 0.0098, 0.0]], dtype=torch.float64, requires_grad=True)
    theta = torch.full((4,), 0.01, dtype=torch.float64, requires_grad=True)
    f = jumprelu(z, theta, EPS)
    torch.testing.assert_close(f.detach(), torch.tensor([[0.0102, 0.0200, 0.0, 0.0]], dtype=torch.float64))
    f.sum().backward()
    # d/dz: H(z - theta);  d/dtheta: -(theta / eps) K((z - theta) / eps)
    torch.testing.assert_close(z.grad, torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(theta.grad, torch.tensor([-10.0, 0.0, -10.0, 0.0], dtype=torch.float64))

    z.grad = theta.grad = None
    h = heaviside(z, theta, EPS)
    torch.testing.assert_close(h.detach(), torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64))
    (h * torch.tensor([2.0, 1.0, 3.0, 1.0], dtype=torch.float64)).sum().backward()
    # d/dz: 0;  d/dtheta: -(1 / eps) K((z - theta) / eps), times the upstream gradient
    torch.testing.assert_close(z.grad, torch.zeros_like(z))
    torch.testing.assert_close(theta.grad, torch.tensor([-2000.0, 0.0, -3000.0, 0.0], dtype=torch.float64))


def test_threshold_gradient_sums_over_tokens():
    z = torch.tensor([[0.0102, 0.5], [0.0099, 0.0104], [0.3, 0.0]], dtype=torch.float64)
    theta = torch.tensor([0.01, 0.01], dtype=torch.float64, requires_grad=True)
    jumprelu(z, theta, EPS).sum().backward()
    torch.testing.assert_close(theta.grad, torch.tensor([-20.0, -10.0], dtype=torch.float64))


def setup(step_warmup=0, lam=0.05):
    torch.manual_seed(0)
    sae = create_sae(SAEConfig(arch="jumprelu", d_in=6, width=16, dtype="float64",
                               options=dict(l0_coefficient=lam, sparsity_warmup_steps=step_warmup,
                                            jumprelu_bandwidth=EPS)))
    x = torch.randn(10, 6, dtype=torch.float64)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_()
        z = sae.pre_acts(x).relu()
        theta = torch.rand(16, dtype=torch.float64) * 0.5 + 0.05
        theta[:8] = z[torch.arange(8), torch.arange(8)].clamp_min(0.01) + 2e-4  # inside the kernel window
        sae.log_threshold.copy_(theta.log())
    return sae, x


def test_threshold_init():
    sae = create_sae(SAEConfig(arch="jumprelu", d_in=6, width=16))
    torch.testing.assert_close(sae.threshold, torch.full((16,), 1e-3))


@pytest.mark.parametrize("step,frac", [(0, 0.0), (5, 0.5), (10, 1.0)])
def test_loss_and_grads_match_the_paper(step, frac):
    sae, x = setup(step_warmup=10)
    lam = 0.05 * frac
    out = create_training(sae).loss(x, step=step)

    P = {n: p.detach().clone().requires_grad_(True) for n, p in sae.named_parameters()}
    theta = P["log_threshold"].detach().exp()
    pre = (x - P["b_dec"]) @ P["W_enc"] + P["b_enc"]
    z = torch.relu(pre)
    mask = (z.detach() > theta).double()
    f = z * mask
    f_leaf = f.detach().requires_grad_(True)
    mse = ((x - (f_leaf @ P["W_dec"] + P["b_dec"])) ** 2).sum(1).mean()
    l0 = mask.sum(1).mean()
    torch.testing.assert_close(out.loss, mse + lam * l0)
    torch.testing.assert_close(out.sparsity_loss, lam * l0)
    torch.testing.assert_close(out.l0, l0.float())

    # weights: ordinary gradients through f = z * H(z - theta) with H held fixed
    mse.backward()
    f.backward(f_leaf.grad)
    # threshold: the paper's pseudo-derivatives, chained through theta = exp(log_threshold)
    K = (((z.detach() - theta) / EPS).abs() < 0.5).double()
    assert K.sum() >= 4  # the example exercises the kernel
    n = x.shape[0]
    d_theta = (f_leaf.grad * (-(theta / EPS) * K)).sum(0) + lam / n * (-(1 / EPS) * K).sum(0)
    out.loss.backward()
    torch.testing.assert_close(sae.log_threshold.grad, theta * d_theta)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(sae, name).grad, P[name].grad, msg=name)


def test_inference_encode_matches_training_codes():
    sae, x = setup()
    out = create_training(sae).loss(x)
    codes = sae.encode(x)
    assert isinstance(sae, JumpReLUSAE)
    assert torch.equal(out.fired, (codes > 0).any(0))
    torch.testing.assert_close(out.x_hat, sae.decode(codes).detach())
    assert ((codes == 0) | (codes > sae.threshold)).all()
    assert math.isclose(float(out.l0), float((codes > 0).sum(1).double().mean()), rel_tol=1e-6)
