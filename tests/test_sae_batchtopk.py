"""BatchTopK (and Matryoshka): k*N active per batch, losses vs float64 references, running threshold, JumpReLU export."""
import pytest
import torch

from saelab.sae import (BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE, SAEConfig, create_sae, create_training)
from saelab.sae.matryoshka import PrefixResiduals, default_group_sizes

D, W, K, N = 6, 16, 3, 10


def setup(arch="batchtopk", **kw):
    torch.manual_seed(0)
    common = {key: kw.pop(key) for key in list(kw) if key in SAEConfig.common_keys()}
    sae = create_sae(SAEConfig(arch=arch, d_in=D, width=W, k=K, dtype="float64", **common, options=kw))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_()
    return sae, torch.randn(N, D, dtype=torch.float64)


def batch_mask(pre, k):
    """1 on the k*N largest entries of relu(pre) over the whole batch (by sorting)."""
    flat = torch.relu(pre).flatten()
    mask = torch.zeros_like(flat)
    mask[flat.argsort(descending=True)[: k * pre.shape[0]]] = 1
    return mask.view_as(pre)


def dense_auxk(P, pre, e, dead, k_aux, coef):
    if not dead.any():
        return torch.zeros((), dtype=torch.float64)
    n_dead = int(dead.sum())
    masked = torch.where(dead, pre.detach(), torch.full_like(pre, -1e30))
    keep = torch.zeros_like(pre)
    for n in range(pre.shape[0]):
        keep[n, masked[n].argsort(descending=True)[: min(k_aux, n_dead)]] = 1
    e = e.detach()
    e_hat = (torch.relu(pre) * keep) @ P["W_dec"]
    return coef * min(1.0, n_dead / k_aux) * ((e_hat - e) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()


def reference(P, x, dead, prefix_ends, k_aux=4, coef=0.5):
    pre = (x - P["b_dec"]) @ P["W_enc"] + P["b_enc"]
    f = torch.relu(pre) * batch_mask(pre.detach(), K)
    mses = []
    for m in prefix_ends:
        x_hat = f[:, :m] @ P["W_dec"][:m] + P["b_dec"]
        mses.append(((x - x_hat) ** 2).sum(1).mean())
    aux = dense_auxk(P, pre, x - x_hat, dead, k_aux, coef)
    return sum(mses) + aux, torch.stack(mses), aux


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_exactly_k_times_n_active_per_batch(arch):
    sae, x = setup(arch)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)
    codes = sae.encode(x)
    assert int((codes > 0).sum()) == K * N
    out = create_training(sae).loss(x)
    assert float(out.l0) == K
    # leading dims are flattened into one batch
    assert int((sae.encode(x.view(2, 5, D)) > 0).sum()) == K * N


@pytest.mark.parametrize("arch,groups", [("batchtopk", None), ("matryoshka", [4, 4, 8]), ("matryoshka", [1, 15])])
@pytest.mark.parametrize("n_dead", [0, 5])
def test_loss_and_grads_match_reference(arch, groups, n_dead):
    sae, x = setup(arch, auxk_coefficient=0.5, k_aux=4, **({"group_sizes": groups} if groups else {}))
    dead = torch.zeros(W, dtype=torch.bool)
    dead[torch.randperm(W)[:n_dead]] = True
    out = create_training(sae).loss(x, dead=dead)
    P = {n: p.detach().clone().requires_grad_(True) for n, p in sae.named_parameters()}
    ends = [4, 8, 16] if groups == [4, 4, 8] else [1, 16] if groups else [16]
    if arch == "matryoshka":
        assert sae.prefix_ends == ends
    loss, mses, aux = reference(P, x, dead, ends)
    torch.testing.assert_close(out.loss, loss)
    torch.testing.assert_close(out.mse, mses[-1].detach())  # mse reports the full reconstruction
    torch.testing.assert_close(out.aux_loss, aux.detach())
    if arch == "matryoshka":
        torch.testing.assert_close(out.prefix_mse, mses.detach())
    out.loss.backward()
    loss.backward()
    for n, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, P[n].grad, msg=n)


def test_prefix_residuals_match_autograd_of_the_prefix_sums():
    """The in-place prefix function against autograd of the plain expression: residuals, mses, and the gradients
    wrt parts, x and b_dec from both outputs (its backward runs once, so no gradcheck)."""
    torch.manual_seed(0)
    parts, x, b = (torch.randn(s, dtype=torch.float64, requires_grad=True) for s in ((4 * 3, 5), (4, 5), (5,)))
    grad_residuals, grad_mses = torch.randn(4 * 3, 5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    residuals, mses = PrefixResiduals.apply(parts.clone(), x, b)
    expected = parts.view(4, 3, 5).cumsum(1) + b - x.unsqueeze(1)
    expected_mses = expected.square().sum((0, 2)) / 4
    torch.testing.assert_close(residuals.view(4, 3, 5), expected)
    torch.testing.assert_close(mses, expected_mses)
    ours = torch.autograd.grad((residuals * grad_residuals).sum() + (mses * grad_mses).sum(), (parts, x, b))
    reference = torch.autograd.grad((expected.reshape(12, 5) * grad_residuals).sum() + (expected_mses * grad_mses).sum(),
                                    (parts, x, b))
    for got, want in zip(ours, reference):
        torch.testing.assert_close(got, want)


def test_matryoshka_with_one_group_is_batchtopk():
    m, x = setup("matryoshka", group_sizes=[W])
    b, _ = setup("batchtopk")
    b.load_state_dict(m.state_dict())
    torch.testing.assert_close(create_training(m).loss(x).loss, create_training(b).loss(x).loss)


def test_matryoshka_default_groups_are_resolved_into_the_config():
    assert default_group_sizes(4608) == [288, 288, 576, 1152, 2304]
    assert default_group_sizes(5) == [1, 1, 3]
    sae = create_sae(SAEConfig(arch="matryoshka", d_in=D, width=64, k=K))
    assert isinstance(sae, MatryoshkaSAE) and sae.cfg.options.group_sizes == [4, 4, 8, 16, 32]
    assert sae.prefix_ends == [4, 8, 16, 32, 64]
    with pytest.raises(ValueError, match="group_sizes"):
        SAEConfig(arch="matryoshka", d_in=D, width=64, k=K, options={"group_sizes": [4, 4]})


def cut_of(sae, x):
    """Halfway between the smallest activation the batch selection keeps and the largest it leaves out."""
    vals = sae.pre_acts(x).relu().flatten().sort(descending=True).values.detach()
    return float((vals[K * N - 1] + vals[K * N]) / 2)


def test_running_threshold_follows_recent_batches_and_no_update_under_no_grad():
    sae, x = setup(threshold_decay=0.9)
    tr = create_training(sae)
    x2 = torch.randn(N, D, dtype=torch.float64)
    with torch.no_grad():
        tr.loss(x)
    assert tr.threshold_updates == 0
    with pytest.raises(RuntimeError, match="threshold"):
        tr.export()
    m1, m2 = cut_of(sae, x), cut_of(sae, x2)
    tr.loss(x)
    assert tr.threshold.item() == pytest.approx(m1, rel=1e-12)
    tr.loss(x2)
    d = 1 - 1 / 1.1  # after one update the mean covers about the last tenth of the run: decay min(0.9, 1 - 1/1.1)
    assert tr.threshold.item() == pytest.approx(d * m1 + (1 - d) * m2, rel=1e-12)
    # checkpoint round trip
    state = tr.state_dict()
    tr2 = create_training(sae)
    tr2.load_state_dict(state)
    assert tr2.threshold.item() == tr.threshold.item() and tr2.threshold_updates == 2


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_export_to_jumprelu_gives_the_same_outputs(arch):
    sae, x = setup(arch, input_scale=2.0)
    tr = create_training(sae)
    # a threshold that agrees with the batch selection: between the k*N-th and (k*N+1)-th activations
    vals = sae.pre_acts(x).relu().flatten().sort(descending=True).values.detach()
    assert vals[K * N] > 0
    tr.load_state_dict({"threshold": float((vals[K * N - 1] + vals[K * N]) / 2), "threshold_updates": 1})
    jr = tr.export()
    assert isinstance(jr, JumpReLUSAE) and jr.cfg.arch == "jumprelu" and jr.cfg.k is None
    assert jr.cfg.input_scale == 2.0 and not hasattr(jr.cfg.options, "group_sizes")
    torch.testing.assert_close(jr.encode(x), sae.encode(x))
    torch.testing.assert_close(jr(x), sae(x))
    # per token it no longer depends on the batch
    torch.testing.assert_close(jr.encode(x[:3]), jr.encode(x)[:3])
    # the exported SAE survives the registry round trip and folds like any JumpReLU
    again = create_sae(jr.cfg.to_dict())
    again.load_state_dict(jr.state_dict())
    torch.testing.assert_close(again(x), jr(x))
    torch.testing.assert_close(jr.fold_input_scale()(x / 2.0), jr(x) / 2.0)
    assert isinstance(sae, BatchTopKSAE)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_the_exported_sae_selects_what_the_batch_selection_kept(arch):
    """Trained on a batch (weights held still), the threshold reproduces that batch's selection exactly."""
    sae, x = setup(arch)
    tr = create_training(sae)
    for _ in range(30):
        out = tr.loss(x)
    jr = tr.export()
    batch_codes = sae.encode(x)
    assert torch.equal(jr.encode(x) > 0, batch_codes > 0)
    torch.testing.assert_close(jr.encode(x), batch_codes)
    assert float(out.l0) == K


@pytest.mark.parametrize("kernel", ["auto", "dense"])
def test_a_row_taking_most_of_the_batch_budget_is_selected_exactly(kernel):
    """One row far larger than the others takes most of the batch's k*N latents: the selection (CSR codes, a
    variable number of latents per row) keeps them all, and loss and gradients equal the dense batch top-k's."""
    torch.manual_seed(0)
    sae = create_sae(SAEConfig(arch="batchtopk", d_in=D, width=64, k=2, dtype="float64"))
    x = torch.randn(N, D, dtype=torch.float64) * 0.01
    x[0] = torch.randn(D, dtype=torch.float64) * 100
    tr = create_training(sae)
    tr.kernel = kernel
    out = tr.loss(x)
    expected = sae.encode(x)
    assert int((expected[0] > 0).sum()) > 8
    torch.testing.assert_close(out.x_hat, sae.decode(expected))
    assert float(out.l0) == pytest.approx(float((expected > 0).sum(-1).float().mean()))
    assert torch.equal(out.fired, (expected > 0).any(0))
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    ours = torch.autograd.grad(out.loss, params)
    reference = ((x - sae.decode(sae.encode(x))) ** 2).sum(-1).mean()
    for got, want in zip(ours, torch.autograd.grad(reference, params)):
        torch.testing.assert_close(got, want)
