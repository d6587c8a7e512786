"""ReLU SAE: loss = mse + l1 * sum_i |f_i| ||W_dec[i]||, with the l1 coefficient warming up linearly."""
import pytest
import torch

from saelab.sae import ReLUSAE, ReLUTraining, SAEConfig, create_sae, create_training


def setup(warmup=0, l1=0.3):
    torch.manual_seed(0)
    sae = create_sae(SAEConfig(arch="relu", d_in=6, width=16, dtype="float64",
                               options=dict(l1_coefficient=l1, sparsity_warmup_steps=warmup)))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_()
        sae.W_dec.mul_(torch.rand(16, 1, dtype=torch.float64) + 0.5)  # non-unit rows: the weighting matters
    x = torch.randn(10, 6, dtype=torch.float64)
    return sae, x


def reference(P, x, lam):
    """Plain float64 recomputation, element by element over latents."""
    pre = (x - P["b_dec"]) @ P["W_enc"] + P["b_enc"]
    f = torch.where(pre > 0, pre, torch.zeros_like(pre))
    x_hat = P["b_dec"] + sum(f[:, i:i + 1] * P["W_dec"][i] for i in range(f.shape[1]))
    mse = ((x - x_hat) ** 2).sum(1).mean()
    penalty = sum(f[:, i].abs() * torch.sqrt((P["W_dec"][i] ** 2).sum()) for i in range(f.shape[1])).mean()
    return mse + lam * penalty, mse, lam * penalty


@pytest.mark.parametrize("step,frac", [(0, 0.0), (25, 0.25), (100, 1.0), (1000, 1.0)])
def test_loss_and_grads_match_reference_with_warmup(step, frac):
    sae, x = setup(warmup=100)
    tr = create_training(sae)
    assert isinstance(sae, ReLUSAE) and isinstance(tr, ReLUTraining)
    out = tr.loss(x, step=step)
    P = {n: p.detach().clone().requires_grad_(True) for n, p in sae.named_parameters()}
    loss, mse, pen = reference(P, x, 0.3 * frac)
    torch.testing.assert_close(out.loss, loss)
    torch.testing.assert_close(out.mse, mse.detach())
    torch.testing.assert_close(out.sparsity_loss, pen.detach())
    out.loss.backward()
    loss.backward()
    for n, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, P[n].grad, msg=n)


def test_outputs_l0_and_fired():
    sae, x = setup()
    out = create_training(sae).loss(x)
    codes = sae.encode(x)
    assert codes.min() >= 0
    torch.testing.assert_close(out.l0, (codes > 0).sum(1).double().mean().float())
    assert torch.equal(out.fired, (codes > 0).any(0))
    torch.testing.assert_close(out.x_hat, sae(x).detach())
    assert not out.mse.requires_grad and out.loss.requires_grad
    assert float(out.aux_loss) == 0.0
