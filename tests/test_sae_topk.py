"""TopK SAE: exactly k per token, sparse path == dense path, loss = mse + AuxK against a dense float64 reference."""
import pytest
import torch

from saelab.sae import SAEConfig, TopKSAE, create_sae, create_training

D, W, K, N = 6, 16, 3, 10


def setup(**kw):
    torch.manual_seed(0)
    common = {key: kw.pop(key) for key in list(kw) if key in SAEConfig.common_keys()}
    sae = create_sae(SAEConfig(arch="topk", d_in=D, width=W, k=K, dtype="float64", **common, options=kw))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_()
    return sae, torch.randn(N, D, dtype=torch.float64)


def rank_mask(scores, k):
    """1 where the entry is among its row's k largest (computed by sorting, not topk)."""
    order = scores.argsort(dim=1, descending=True)
    mask = torch.zeros_like(scores)
    for n in range(scores.shape[0]):
        mask[n, order[n, :k]] = 1
    return mask


def dense_auxk(P, pre, e, dead, k_aux, coef):
    if not dead.any():
        return torch.zeros((), dtype=torch.float64)
    n_dead = int(dead.sum())
    masked = torch.where(dead, pre.detach(), torch.full_like(pre, -1e30))
    a = torch.relu(pre) * rank_mask(masked, min(k_aux, n_dead))
    e = e.detach()
    e_hat = a @ P["W_dec"]
    return coef * min(1.0, n_dead / k_aux) * ((e_hat - e) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()


def reference(P, x, k, dead, k_aux, coef):
    pre = (x - P["b_dec"]) @ P["W_enc"] + P["b_enc"]
    f = torch.relu(pre) * rank_mask(pre.detach(), k)
    x_hat = f @ P["W_dec"] + P["b_dec"]
    mse = ((x - x_hat) ** 2).sum(1).mean()
    aux = dense_auxk(P, pre, x - x_hat, dead, k_aux, coef)
    return mse + aux, mse, aux


def test_exactly_k_per_token():
    sae, x = setup()
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive: no zeros inside the top k
    codes = sae.encode(x)
    assert ((codes > 0).sum(1) == K).all()
    out = create_training(sae).loss(x)
    assert float(out.l0) == K
    idx, vals = sae.encode_topk(x)
    assert idx.shape == (N, K) and (vals > 0).all()


@pytest.mark.parametrize("n_dead", [0, 2, 9])
def test_loss_and_grads_match_reference(n_dead):
    sae, x = setup(auxk_coefficient=0.5, k_aux=4)
    dead = torch.zeros(W, dtype=torch.bool)
    dead[torch.randperm(W)[:n_dead]] = True
    out = create_training(sae).loss(x, dead=dead)
    P = {n: p.detach().clone().requires_grad_(True) for n, p in sae.named_parameters()}
    loss, mse, aux = reference(P, x, K, dead, 4, 0.5)
    torch.testing.assert_close(out.loss, loss)
    torch.testing.assert_close(out.mse, mse.detach())
    torch.testing.assert_close(out.aux_loss, aux.detach())
    assert (float(out.aux_loss) > 0) == (n_dead > 0)
    out.loss.backward()
    loss.backward()
    for n, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, P[n].grad, msg=n)


def test_fired_and_sparse_matches_dense():
    sae, x = setup()
    out = create_training(sae).loss(x)
    codes = sae.encode(x)
    assert torch.equal(out.fired, (codes > 0).any(0))
    torch.testing.assert_close(out.x_hat, sae.decode(codes).detach())
    assert isinstance(sae, TopKSAE)
