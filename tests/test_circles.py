"""Multi-dimensional features: the two indices, decoder clustering, cluster reconstruction over a cache, the
calendar tasks, the circle probe, the calendar order and interventions; each against an independent reference."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from helpers import make_sae
from saelab.analysis.circles import (DAYS_TASK, MONTHS_TASK, ORDER_TEMPLATES, CalendarConfig, CalendarStudy,
                                     CalendarTask, answer_logits, calendar_order, calendar_study, cyclic_sequence,
                                     fit_circle_probe, intervene, item_plane_order, item_positions,
                                     leave_one_item_out, order_agreement, run_calendar, shuffled_orders,
                                     split_by_duration)
from saelab.analysis.clusters import (ClusterSearch, ClusterSearchConfig, Clusters, cluster_points, coactivation,
                                      coactivation_clusters, graph_clusters, random_groups, run_cluster_search,
                                      search_clusters, spectral_clusters, window_cooccurrence)
from saelab.analysis.irreducibility import (BINS, RANGE, irreducibility_score, mixture_index, mutual_information,
                                            normalise, pair_indices, pca, separability_index)
from saelab.errors import DataError
from saelab.interventions import Read


# ------------------------------------------------------------------------------------------- planted point clouds
def planted_clouds(n=2000, seed=0):
    """A circle (one irreducible 2-D feature), two independent 1-D features that always co-occur (separable),
    and two 1-D features that never fire together (a mixture), each rotated by a random angle."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.rand(n, generator=g) * 2 * math.pi
    circle = torch.stack([theta.cos(), theta.sin()], 1) + 0.05 * torch.randn(n, 2, generator=g)
    independent = torch.randn(n, 2, generator=g) * torch.tensor([1.0, 0.6])
    size = torch.rand(n, generator=g) + 0.2
    which = torch.rand(n, generator=g) < 0.5
    mixture = torch.where(which[:, None], torch.stack([size, 0 * size], 1), torch.stack([0 * size, size], 1))
    mixture = mixture + 0.01 * torch.randn(n, 2, generator=g)
    angle = float(torch.rand(1, generator=g)) * math.pi
    rotate = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return {"circle": circle @ rotate, "independent": independent @ rotate, "mixture": mixture @ rotate}


def test_the_two_indices_rank_a_circle_over_separable_and_mixed_features():
    clouds = planted_clouds()
    M = {name: mixture_index(x) for name, x in clouds.items()}
    S = {name: separability_index(x) for name, x in clouds.items()}
    bias = (BINS - 1) ** 2 / (2 * 2000 * math.log(2))  # the plug-in estimator's bias for independent coordinates
    assert M["mixture"] > 0.45  # half the points lie on each axis
    assert M["circle"] < 0.3 and M["independent"] < 0.2
    assert S["independent"] < 1.5 * bias and S["circle"] > 0.8
    score = {name: (1 - M[name]) * S[name] for name in clouds}
    assert score["circle"] > 1.5 * max(score["independent"], score["mixture"]), (M, S)
    assert score["circle"] > 0.6


def test_the_indices_ignore_rotation_translation_and_scale():
    x = planted_clouds(seed=1)["circle"]
    a = 0.7
    moved = 5 * x @ torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) + torch.tensor([3.0, -2])
    assert abs(separability_index(moved) - separability_index(x)) < 0.05
    assert abs(mixture_index(moved) - mixture_index(x)) < 0.03


def test_mutual_information_matches_a_numpy_histogram():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(3000, generator=g).double()
    b = (a + 0.5 * torch.randn(3000, generator=g)).double()
    joint, _, _ = np.histogram2d(np.clip(a.numpy(), -RANGE, RANGE - 1e-9), np.clip(b.numpy(), -RANGE, RANGE - 1e-9),
                                 bins=BINS, range=[[-RANGE, RANGE], [-RANGE, RANGE]])
    p = joint / joint.sum()
    outer = p.sum(1, keepdims=True) * p.sum(0, keepdims=True)
    reference = float(np.sum(p[p > 0] * np.log2(p[p > 0] / outer[p > 0])))
    assert float(mutual_information(a[None], b[None])[0]) == pytest.approx(reference, abs=1e-9)


def test_mixture_index_finds_the_line_brute_force_finds():
    """On a small cloud, compare with a brute force over lines through every pair of points."""
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(30, 2, generator=g), torch.stack([torch.linspace(-1, 1, 20), 0.3 * torch.ones(20)], 1)])
    z = normalise(x)
    best = 0.0
    for i in range(len(z)):
        for j in range(i + 1, len(z)):
            d = z[j] - z[i]
            v = torch.stack([-d[1], d[0]]) / d.norm()
            proj = z @ v - z[i] @ v
            best = max(best, float((proj.abs() < 0.1 * proj.square().mean().sqrt()).double().mean()))
    assert mixture_index(x) >= best - 1e-9
    assert mixture_index(x) >= 20 / 50


def test_pca_matches_the_covariance_eigenvalues():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(300, 6, generator=g) @ torch.randn(6, 6, generator=g)
    fitted = pca(x, 3)
    eig = np.sort(np.linalg.eigvalsh(np.cov(x.numpy().T)))[::-1]
    np.testing.assert_allclose(fitted.variance.numpy(), eig[:3], rtol=1e-4)
    np.testing.assert_allclose(fitted.explained.numpy(), eig[:3] / eig.sum(), rtol=1e-4)
    with pytest.raises(ValueError, match="needs at least 7 points"):
        pca(x[:6], 6)


def test_pair_indices_and_score():
    coords = torch.cat([planted_clouds()["circle"], torch.randn(2000, 1)], 1)
    pairs = pair_indices(coords)
    assert [p.components for p in pairs] == [(0, 1), (1, 2)]
    assert irreducibility_score(pairs) == pytest.approx(sum((1 - p.mixture) * p.separability for p in pairs) / 2)


# ------------------------------------------------------------------------------------------- clustering
def planted_decoder(groups=8, size=5, noise=300, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(groups, d, generator=g)
    W = torch.cat([centres.repeat_interleave(size, 0) + 0.35 * torch.randn(groups * size, d, generator=g),
                   torch.randn(noise, d, generator=g)])
    order = torch.randperm(len(W), generator=g)
    truth = torch.full((len(W),), -1)
    truth[torch.argsort(order)[: groups * size]] = torch.arange(groups).repeat_interleave(size)
    return W[order], truth


@pytest.mark.parametrize("method", ["spectral_dense", "spectral_knn", "graph"])
def test_clustering_recovers_planted_groups_and_is_seeded(method):
    W, truth = planted_decoder()
    run = {"spectral_dense": lambda seed: spectral_clusters(W, 40, neighbors=None, seed=seed),
           "spectral_knn": lambda seed: spectral_clusters(W, 40, neighbors=16, seed=seed),
           "graph": lambda seed: graph_clusters(W)}[method]
    found = run(0)
    for group in range(8):
        labels = found.labels[truth == group]
        assert (labels == labels[0]).all() and labels[0] >= 0, (group, labels)
        assert int((found.labels == labels[0]).sum()) <= 15  # the group, and not much else
    if method == "graph":  # random directions in 64-d never reach cosine 0.5
        assert sorted(map(len, found.groups().values())) == [5] * 8
    assert torch.equal(run(0).labels, found.labels)


def planted_day_codes(contexts=1000, length=32, width=300, background=4, d=256, seed=0):
    """An SAE-like setup where decoder directions do not show the days: 7 day latents (then 12 month latents)
    with mutually orthogonal decoder rows that fire (one at a time, on their own tokens) three (five) times in the
    30 % of contexts that name days (months); 8 groups of 5 distractor latents with near-parallel decoder rows that
    fire independently; every token fires `background` other latents at random. Returns the decoder [width, d]
    and the codes in text order."""
    from saelab.codes import Codes
    from saelab.kernels.layout import row_offsets

    g = torch.Generator().manual_seed(seed)
    W = torch.randn(width, d, generator=g)
    days = 19  # the days and the months
    W[:days] = 3 * torch.linalg.qr(torch.randn(d, days, generator=g)).Q.T
    for group in range(8):
        first = days + 5 * group
        W[first:first + 5] = W[first] + 0.3 * torch.randn(5, d, generator=g)
    n = contexts * length
    fired = torch.rand(n, width - days, generator=g).topk(background, dim=1).indices + days
    kind = torch.rand(contexts, generator=g)
    for named, first, count, mentions in ((kind < 0.3, 0, 7, 3), (kind > 0.7, 7, 12, 5)):
        where = named.nonzero().squeeze(1)
        at = where[:, None] * length + torch.rand(len(where), length, generator=g).topk(mentions, dim=1).indices
        fired[at.flatten(), 0] = first + torch.randint(count, (at.numel(),), generator=g)
    fired = fired.sort(dim=1).values
    values = torch.rand(n, background, generator=g) + 0.5
    ids = torch.arange(n)
    batches = []
    for start in range(0, n, 1000):  # batch edges cut windows, as a cache's do
        rows = ids[start:start + 1000]
        batches.append(Codes(row_offsets(rows.repeat_interleave(background) - start, len(rows)),
                             fired[rows].flatten(), values[rows].flatten(), width, torch.zeros(len(rows)).long(),
                             rows, rows // length, rows % length))
    return W, batches


def test_coactivation_groups_day_latents_that_decoder_clustering_cannot():
    W, codes = planted_day_codes()
    days = torch.arange(7)
    assert (W[:7] @ W[:7].T / 9 - torch.eye(7)).abs().max() < 1e-5  # mutually orthogonal decoder rows

    def days_grouped(clusters):
        """The most days one cluster holds, among clusters of at most twice the days' number of latents."""
        return max([int(torch.isin(group, days).sum()) for group in clusters.groups().values() if len(group) <= 14],
                   default=0)

    for decoder in (graph_clusters(W), graph_clusters(W, min_cosine=0.3), graph_clusters(W, min_cosine=0.1),
                    spectral_clusters(W, 60, seed=0)):
        assert days_grouped(decoder) <= 3, decoder
    assert sorted(map(len, graph_clusters(W).groups().values())) == [5] * 8  # what the decoder does show
    months = torch.arange(7, 19)
    for found in (coactivation_clusters(codes, window=32), coactivation_clusters(codes, window=32, n_clusters=2)):
        assert sorted(map(tuple, found.groups().values())) == [tuple(days.tolist()), tuple(months.tolist())]
        assert found.method in ("coactivation-graph", "coactivation-spectral") and found.settings["windows"] == 1000
    # counted per window of one context, whatever the batch edges: the same as one batch of everything
    from saelab.codes import Codes

    whole = Codes(torch.cat([codes[0].offsets[:1]] + [c.offsets[1:] + sum(b.nnz for b in codes[:i])
                                                       for i, c in enumerate(codes)]),
                  *(torch.cat([getattr(c, f) for c in codes]) for f in ("indices", "values")), 300,
                  *(torch.cat([getattr(c, f) for c in codes]) for f in ("token_ids", "rows", "contexts", "positions")))
    counts, windows = window_cooccurrence(codes, 32)
    again, _ = window_cooccurrence([whole], 32)
    assert torch.equal(counts, again) and windows == 1000
    dense = torch.zeros(1000, 300)
    rows = whole.row_ids()
    dense[whole.contexts[rows], whole.indices] = 1
    torch.testing.assert_close(counts, dense.T @ dense)
    torch.testing.assert_close(coactivation(counts, windows)[:20, :20].double(),
                               torch.from_numpy(np.nan_to_num(np.corrcoef(dense[:, :20].T.numpy()))), atol=1e-5,
                               rtol=1e-5)


def test_random_groups_have_the_found_sizes_and_are_disjoint_within_a_pass():
    pool = torch.arange(10, 40)
    rounds = random_groups({0: 7, 3: 12, 5: 2}, pool, draws=4, seed=1)
    keys = [key for r in rounds for key in r]
    assert sorted(keys) == sorted(draw * 6 + c for draw in range(4) for c in (0, 3, 5))
    for r in rounds:
        latents = torch.cat(list(r.values()))
        assert len(set(latents.tolist())) == len(latents) and bool(torch.isin(latents, pool).all())
    assert all(len(r[key]) == {0: 7, 3: 12, 5: 2}[key % 6] for r in rounds for key in r)
    assert random_groups({0: 31}, pool, draws=2) == []


def test_spectral_clusters_check_their_input():
    W, _ = planted_decoder()
    with pytest.raises(ValueError, match="n_clusters must be between 2"):
        spectral_clusters(W, 1)
    W[3] = 0
    with pytest.raises(ValueError, match="decoder row 3 is all zeros"):
        graph_clusters(W)


# ------------------------------------------------------------------------------------------- cluster reconstruction
def tiny_sae(model, hook="blocks.0.hook_resid_post", width=96, seed=0, **cfg):
    sae = make_sae("topk", d_in=model.d_model, width=width, k=8, seed=seed, model_name=model.name, hook_name=hook,
                   bias_std=0, **cfg)
    with torch.no_grad():  # 6 pairs of near-identical decoder rows: 2-latent clusters the graph method finds
        sae.W_dec[1:12:2] = sae.W_dec[0:12:2] + 0.05 * torch.randn(6, model.d_model)
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
        sae.W_enc.copy_(sae.W_dec.T)
    return sae


def test_cluster_points_match_a_dense_reconstruction(tiny_model, tiny_cache):
    from saelab.activations import ActivationStore

    sae = tiny_sae(tiny_model, input_scale=2.0)
    groups = {0: torch.tensor([0, 1, 5]), 1: torch.tensor([10, 11])}
    points, seen = cluster_points(sae, tiny_cache, groups, batch_size=512, progress=False)
    store = ActivationStore(tiny_cache, shuffle=False, drop_last=False, batch_size=10**6)
    x = next(iter(store)).acts["blocks.0.hook_resid_post"]
    raw = sae.fold_input_scale()
    codes = raw.encode(x)
    assert seen == len(x)
    for cluster, latents in groups.items():
        fired = (codes[:, latents] > 0).any(1)
        assert torch.equal(points[cluster].rows, fired.nonzero().squeeze(1))
        reference = codes[fired][:, latents] @ raw.W_dec[latents]
        torch.testing.assert_close(points[cluster].points(), reference, atol=1e-5, rtol=1e-5)
        fitted, coords = points[cluster].pca(2)
        direct = pca(reference, 2)
        torch.testing.assert_close(fitted.explained, direct.explained, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(coords.abs(), direct.project(reference).abs(), atol=1e-4, rtol=1e-4)


def test_search_ranks_scored_clusters_and_saves(tiny_model, tiny_cache, tmp_path):
    import json

    sae = tiny_sae(tiny_model)
    found = graph_clusters(sae.W_dec, min_cosine=0.5)
    assert {tuple(g.tolist()) for g in found.groups().values()} == {(i, i + 1) for i in range(0, 12, 2)}
    search = search_clusters(sae, tiny_cache, found, tokenizer=tiny_model.tokenizer, min_tokens=20, progress=False)
    scores = [c.score for c in search.clusters]
    assert scores == sorted(scores, reverse=True) and len(scores) >= 1
    for c in search.clusters:  # beside each score, random clusters of as many latents scored the same way
        assert 1 <= c.random_scored <= 3 and len(c.random_mixture) == len(c.mixture), c
        assert 0 <= c.random_score and all(0 <= m <= 1 for m in c.random_mixture)
    assert "random same size" in search.table() and search.clustering["random_draws"] == 3
    from saelab.activations import Manifest

    assert search.n_tokens == Manifest.read(tiny_cache).tokens
    search.save(tmp_path, tiny_model.tokenizer, plots=2)
    saved = json.loads((tmp_path / "clusters.json").read_text())
    assert [c["score"] for c in saved["clusters"]] == scores
    assert (tmp_path / "cluster_rank1.png").exists() and (tmp_path / "clusters.md").exists()
    loaded = ClusterSearch.load(tmp_path)
    assert loaded.to_dict() == search.to_dict() and loaded.table() == search.table()
    assert loaded.coords.keys() == search.coords.keys() and all(
        torch.equal(loaded.coords[c], search.coords[c]) and torch.equal(loaded.token_ids[c], search.token_ids[c])
        for c in search.coords)
    assert loaded.plot(1, tmp_path / "again.png", tiny_model.tokenizer).stat().st_size > 0  # plots from the file
    again = search_clusters(sae, tiny_cache, found, tokenizer=tiny_model.tokenizer, min_tokens=20, progress=False)
    assert [c.cluster for c in again.clusters] == [c.cluster for c in search.clusters]
    spectral = search_clusters(sae, tiny_cache, spectral_clusters(sae.W_dec, 40, seed=0), min_tokens=10**6,
                               progress=False)
    assert spectral.clustering["n_clusters"] == 40 and spectral.clustering["pca_components"] == 5
    assert spectral.clusters == [] and spectral.clustering["n_clusters_found"] >= 10


def test_mismatched_sae_and_cache_and_one_latent_clusters_are_refused(tiny_model, tiny_cache):
    groups = {0: torch.tensor([0, 1])}
    other = tiny_sae(tiny_model)
    other.cfg.model_name = "other-model"
    with pytest.raises(DataError, match="trained on other-model"):
        cluster_points(other, tiny_cache, groups, progress=False)
    with pytest.raises(DataError, match="no hook 'blocks.0.hook_mlp_out'"):  # a hook the cache does not hold
        cluster_points(tiny_sae(tiny_model, hook="blocks.0.hook_mlp_out"), tiny_cache, groups, progress=False)
    with pytest.raises(ValueError, match="cluster 0 has one latent"):
        cluster_points(tiny_sae(tiny_model), tiny_cache, {0: torch.tensor([4])}, progress=False)
    with pytest.raises(ValueError, match="no cluster has between"):
        search_clusters(tiny_sae(tiny_model), tiny_cache, Clusters(torch.arange(96), "manual"), progress=False)


# ------------------------------------------------------------------------------------------- tasks
def test_tasks_have_49_and_144_prompts_with_modular_answers():
    for task, n in ((DAYS_TASK, 49), (MONTHS_TASK, 144)):
        prompts = task.prompts()
        assert len(prompts) == n and len({p.text for p in prompts}) == n
        for p in prompts:
            assert p.text[slice(*p.span)] == task.items[p.item]
            assert p.answer == (p.item + p.shift) % task.period and 1 <= p.shift <= task.period
    assert DAYS_TASK.prompts()[7 + 2].text == "Let's do some days of the week math. Two days from Wednesday is"
    assert MONTHS_TASK.prompts()[3 * 12 + 2].text == "Let's do some calendar math. Four months from March is"


def test_split_holds_out_whole_durations_and_keeps_every_item():
    prompts = MONTHS_TASK.prompts()
    split = split_by_duration(MONTHS_TASK, seed=0)
    assert not set(split["train"]) & set(split["test"]) and len(split["train"]) + len(split["test"]) == 144
    shifts = {s: {prompts[i].shift for i in split[s]} for s in split}
    assert not shifts["train"] & shifts["test"]
    for s in split:
        assert {prompts[i].item for i in split[s]} == set(range(12))
    assert split_by_duration(MONTHS_TASK, seed=0) == split != split_by_duration(MONTHS_TASK, seed=1)


def word_task(model, n=6):
    """A calendar-like task on words the tiny tokenizer keeps whole; the item is the prompt's last token."""
    vocab = model.tokenizer.get_vocab()
    words = sorted(w[1:] for w in vocab if w.startswith("Ġ") and w[1:].isalpha() and len(w) > 4)[:n]
    return CalendarTask("toy", "Count {duration} from {item}", tuple(words), tuple(f"n{i}" for i in range(n)))


def test_item_positions_by_characters_and_split_words_refused(tiny_model):
    task = word_task(tiny_model)
    prompts = task.prompts()
    tokens, positions = item_positions(tiny_model, prompts)
    for i, p in enumerate(prompts):
        assert tiny_model.tokenizer.decode([int(tokens.ids[i, positions[i]])]).strip() == task.items[p.item]
    assert torch.equal(positions, tokens.lengths - 1)
    with pytest.raises(DataError, match="splits 'Monday' into"):
        item_positions(tiny_model, DAYS_TASK.prompts())
    with pytest.raises(DataError, match=r"must hold \{item\} exactly once"):
        CalendarTask("bad", "{duration} from here", ("a", "b", "c"), ("1", "2", "3")).prompts()


# ------------------------------------------------------------------------------------------- probe and order
def planted_circle_acts(period=12, per_item=10, d=32, seed=0, order=None):
    """Activations with items on a circle in a random plane (in calendar order unless `order` permutes them),
    plus larger noise in other directions; returns x, items, the plane."""
    g = torch.Generator().manual_seed(seed)
    plane = torch.linalg.qr(torch.randn(d, 2, generator=g)).Q.T  # [2, d]
    items = torch.arange(period).repeat(per_item)
    place = items if order is None else order[items]
    angle = 2 * math.pi * place / period + 0.05 * torch.randn(len(items), generator=g)
    x = 3 * torch.stack([angle.cos(), angle.sin()], 1) @ plane + 0.3 * torch.randn(len(items), d, generator=g)
    return x, items, plane, angle


def test_probe_recovers_a_planted_circles_angles_on_held_out_points():
    x, items, plane, angle = planted_circle_acts()
    train, test = torch.arange(len(x)) < 80, torch.arange(len(x)) >= 80
    probe = fit_circle_probe(x[train], items[train], 12)
    error = torch.remainder(probe.angles(x[test]).double() - angle[test].double() + math.pi, 2 * math.pi) - math.pi
    assert float(error.abs().mean()) < 0.15
    assert probe.score(x[test], items[test])["accuracy"] > 0.9
    # the plane the probe reads is the planted one
    assert torch.linalg.svdvals(probe.plane() @ plane.T).min() > 0.95
    assert probe.variance_share(x[test]) > 0.5


def test_moving_along_the_circle_changes_only_the_circle_plane():
    x, items, _, _ = planted_circle_acts()
    probe = fit_circle_probe(x, items, 12)
    target = (items + 5) % 12
    moved = probe.to_angle(x, target)
    torch.testing.assert_close(probe.reading(moved), torch.stack(
        [torch.cos(2 * math.pi * target / 12), torch.sin(2 * math.pi * target / 12)], 1).double(), atol=1e-4,
        rtol=1e-4)
    outside = torch.eye(x.shape[1]) - probe.plane().T @ probe.plane()
    torch.testing.assert_close(moved @ outside, x @ outside, atol=1e-4, rtol=1e-4)
    centred = probe.reading(probe.to_centre(x))
    torch.testing.assert_close(centred, probe.weights[-1].expand_as(centred), atol=1e-4, rtol=1e-4)


def test_calendar_order_against_a_direct_count():
    x, items, _, _ = planted_circle_acts()
    assert calendar_order(pca(x, 2).project(x), items, 12).fraction == 1.0
    mirrored = pca(x, 2).project(x) * torch.tensor([1.0, -1.0])
    assert calendar_order(mirrored, items, 12).fraction == 1.0
    assert calendar_order(mirrored, items, 12).direction == -calendar_order(pca(x, 2).project(x), items, 12).direction
    order = torch.randperm(12, generator=torch.Generator().manual_seed(5))
    x, items, _, _ = planted_circle_acts(order=order)
    # the reference: walk the planted places round the circle and count calendar successors
    walk = torch.argsort(order).tolist()  # item at each place, counter-clockwise
    forward = sum(walk[(walk.index(a) + 1) % 12] == (a + 1) % 12 for a in range(12)) / 12
    backward = sum(walk[(walk.index((a + 1) % 12) + 1) % 12] == a for a in range(12)) / 12
    assert calendar_order(pca(x, 2).project(x), items, 12).fraction == max(forward, backward)


def test_leaving_one_item_out_places_a_planted_circles_items_and_its_control_falls_to_chance():
    """Seven tight clusters on a circle: the held-out-duration probe would fit any order, but a probe fitted on six
    items places the seventh between its neighbours only when the order it was fitted to is the planted one."""
    x, items, _, _ = planted_circle_acts(period=7, per_item=7)
    left_out = leave_one_item_out(x, items, 7)
    assert left_out.nearest > 0.9 and left_out.between > 0.95 and left_out.error_degrees < 15, left_out
    controls = [leave_one_item_out(x, items, 7, order=o) for o in shuffled_orders(7, 20, seed=0)]
    assert sum(c.between for c in controls) / 20 < 0.45  # chance 2/7
    assert sum(c.nearest for c in controls) / 20 < 0.3  # chance 1/7
    # an order that is the calendar's turned round the circle is the calendar order to a probe: never a control
    dihedral = {tuple((s * a + r) % 7 for a in range(7)) for r in range(7) for s in (1, -1)}
    assert not {tuple(o.tolist()) for o in shuffled_orders(7, 50)} & dihedral
    assert leave_one_item_out(x, items, 7, order=torch.tensor([3, 4, 5, 6, 0, 1, 2])).between > 0.95
    with pytest.raises(ValueError, match="rotation or mirror"):
        shuffled_orders(3, 1)


def test_order_over_templates_shows_a_template_that_flips_it():
    x, items, _, _ = planted_circle_acts(period=7, per_item=7)
    swapped, _, _, _ = planted_circle_acts(period=7, per_item=7, seed=1, order=torch.tensor([0, 2, 1, 3, 4, 5, 6]))
    turned, _, _, _ = planted_circle_acts(period=7, per_item=7, seed=2, order=torch.tensor([6, 5, 4, 3, 2, 1, 0]))
    orders = [item_plane_order(a, items, 7) for a in (x, turned, swapped)]
    assert [o.fraction for o in orders][:2] == [1.0, 1.0] and orders[2].fraction < 1
    assert cyclic_sequence(orders[0]) == cyclic_sequence(orders[1]) == (0, 1, 2, 3, 4, 5, 6)
    assert order_agreement(orders) == pytest.approx(2 / 3) and order_agreement(orders[:2]) == 1.0


def test_probe_refuses_fewer_prompts_than_components():
    x, items, _, _ = planted_circle_acts()
    with pytest.raises(ValueError, match="needs more prompts than that; got 5"):
        fit_circle_probe(x[:5], items[:5], 12, k=5)


# ------------------------------------------------------------------------------------------- interventions
def test_patching_the_last_layer_at_the_last_token_gives_the_source_prompts_answer(tiny_model):
    """In the tiny model the item is the last token; at the last layer nothing but the unembedding follows, so
    the 'layer' patch must give exactly the (a', b) prompt's own clean answer logits (computed separately)."""
    task = word_task(tiny_model)
    prompts = task.prompts()
    tokens, positions = item_positions(tiny_model, prompts)
    answers = torch.tensor([tiny_model.tokenizer(" " + w, add_special_tokens=False)["input_ids"][0]
                            for w in task.items])
    clean = answer_logits(tiny_model, tokens, answers)
    layer = tiny_model.n_layers - 1
    hook = f"blocks.{layer}.hook_resid_post"
    x = tiny_model.activations_at(tokens, hook, positions.tolist())[hook]
    probe = fit_circle_probe(x, torch.tensor([p.item for p in prompts]), task.period, k=3)
    rows = [0, 7, 20]
    (record,) = intervene(tiny_model, task, layer, probe, x, tokens, positions, prompts, rows, answers, clean,
                          targets=None, methods=["layer"], progress=False)
    p = task.period
    diffs = []
    for row in rows:
        a, b, c = prompts[row].item, prompts[row].shift, prompts[row].answer
        for target in (t for t in range(p) if t != a):
            new = (target + b) % p
            source = clean[(b - 1) * p + target]
            diffs.append(float((clean[row, c] - clean[row, new]) - (source[c] - source[new])))
    assert record.n == len(diffs) == 3 * (p - 1)
    assert record.logit_shift == pytest.approx(sum(diffs) / len(diffs), abs=1e-4)
    assert record.recovered == pytest.approx(1.0, abs=1e-4)  # the patched run is the (a', b) prompt's


def test_a_circle_intervention_runs_the_model_on_the_moved_point(tiny_model):
    """patched_answer_logits (one batch, Replace) against one text at a time with an Add of the move."""
    from saelab.analysis.circles import patched_answer_logits
    from saelab.interventions import Add

    task = word_task(tiny_model)
    prompts = task.prompts()
    tokens, positions = item_positions(tiny_model, prompts)
    hook = "blocks.0.hook_resid_post"
    x = tiny_model.activations_at(tokens, hook, positions.tolist())[hook]
    items = torch.tensor([p.item for p in prompts])
    probe = fit_circle_probe(x, items, task.period, k=3)
    rows = torch.tensor([1, 2, 30])
    moved = probe.to_angle(x[rows], (items[rows] + 2) % task.period)
    answers = torch.arange(task.period)
    got = patched_answer_logits(tiny_model, tokens, rows, positions[rows], hook, moved, answers)
    for i, row in enumerate(rows.tolist()):
        one = tokens[row : row + 1]
        add = Add(hook, moved[i] - x[row], positions=[int(positions[row])])
        reference = answer_logits(tiny_model, one, answers, patches=[add])
        torch.testing.assert_close(got[i], reference[0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, answer_logits(tiny_model, tokens[rows], answers), atol=1e-3)


def test_calendar_study_runs_end_to_end_on_the_tiny_model(tiny_model, tmp_path):
    import json

    study = calendar_study(tiny_model, word_task(tiny_model), layers=[0, 1], intervention_layers=[1], targets=1,
                           order_templates=["Then {duration} after {item}", "Go {item} and {duration}"],
                           progress=False)
    assert [r.layer for r in study.layers] == [0, 1]
    assert study.record_version == 2 and all(len(r.template_orders) == 3 for r in study.layers)
    assert all(r.left_out is not None and r.left_out_control is not None for r in study.layers)
    table = study.table()
    assert table.index("| layer | left-out nearest") < table.index("| layer | probe acc (held out)")
    assert {r.method for r in study.interventions} == {"circle", "layer", "pca_subspace", "mean_ablate",
                                                        "zero_circle"}
    assert study.accuracy.chance == pytest.approx(1 / 6)
    study.save(tmp_path)
    saved = json.loads((tmp_path / "toy.json").read_text())
    assert saved["settings"]["n_prompts"] == 36 and len(saved["layers"]) == 2
    for name in ("toy_layers.png", "toy_planes.png", "toy_interventions.png", "toy.md"):
        assert (tmp_path / name).exists()
    loaded = CalendarStudy.load(tmp_path, name="toy")
    assert loaded.to_dict() == study.to_dict() and loaded.table() == study.table()
    assert loaded == CalendarStudy.load(tmp_path / "toy.json")
    assert all(torch.equal(loaded.activations[layer], study.activations[layer]) for layer in study.activations)
    x = study.activations[1]
    torch.testing.assert_close(loaded.probes[1].reading(x), study.probes[1].reading(x))
    with pytest.raises(ValueError, match="name="):
        CalendarStudy.load(tmp_path)
    for record in saved["layers"]:  # a record written before the leave-one-out probe still loads
        for key in ("left_out", "left_out_control", "template_orders", "template_agreement"):
            del record[key]
    del saved["record_version"]
    old = CalendarStudy.from_dict(saved)
    assert old.record_version == 1 and old.layers[0].left_out is None and "left-out" not in old.table()
    with pytest.raises(ValueError, match="layer 7 is out of range"):
        calendar_study(tiny_model, word_task(tiny_model), layers=[7], progress=False)


def test_circle_configs_hold_the_command_settings_and_check_them():
    calendar = CalendarConfig(model="m")
    assert (calendar.tasks, calendar.layers, calendar.intervene, calendar.targets, calendar.k, calendar.test_fraction,
            calendar.seed, calendar.batch_size) == ("days,months", None, [], 3, 5, 0.3, 0, 16)
    assert [t.name for t in calendar.task_list()] == ["days", "months"]
    assert calendar.order_templates == 3 and all(len(ORDER_TEMPLATES[t]) == 3 for t in ("days", "months"))
    for task in (DAYS_TASK, MONTHS_TASK):  # the other wordings build their prompts as the task's own does
        for template in ORDER_TEMPLATES[task.name]:
            prompts = dataclasses.replace(task, template=template).prompts()
            assert [(p.item, p.shift, p.answer) for p in prompts] == [(p.item, p.shift, p.answer)
                                                                       for p in task.prompts()]
    with pytest.raises(ValueError, match="order_templates"):
        CalendarConfig(model="m", order_templates=4)
    with pytest.raises(ValueError, match="unknown task 'weeks'"):
        CalendarConfig(model="m", tasks="days,weeks")
    with pytest.raises(ValueError, match="test_fraction"):
        CalendarConfig(model="m", test_fraction=1.0)
    search = ClusterSearchConfig(sae="s", acts="a")
    assert (search.method, search.n_clusters, search.neighbors, search.top, search.min_cosine, search.min_size,
            search.min_tokens, search.plots) == ("spectral", 500, 32, 2, 0.5, 2, 100, 5)
    assert (search.window, search.mutual, search.min_correlation, search.significance, search.random_draws) == (
        32, 3, 0.1, 5.0, 3)
    with pytest.raises(ValueError, match="method"):
        ClusterSearchConfig(sae="s", acts="a", method="cooccurrence")
    with pytest.raises(ValueError, match="min_size"):
        ClusterSearchConfig(sae="s", acts="a", min_size=1)


def test_the_circle_studies_run_from_their_configs(tiny_model, tiny_cache, tmp_path):
    tiny_sae(tiny_model).save(tmp_path / "sae")
    config = ClusterSearchConfig(sae=str(tmp_path / "sae"), acts=str(tiny_cache), method="graph", min_tokens=20,
                                 no_model=True)
    search = run_cluster_search(config, progress=False)
    assert search.clustering["method"] == "graph" and search.clustering["n_clusters_found"] == 6
    config = dataclasses.replace(config, method="coactivation-graph", window=8, significance=3, random_draws=0)
    search = run_cluster_search(config, progress=False)
    assert search.clustering["method"] == "coactivation-graph" and search.clustering["window"] == 8
    assert search.clustering["windows"] == 4096 // 8 and all(c.random_score is None for c in search.clusters)
    with pytest.raises(DataError, match="splits 'Monday' into"):
        run_calendar(CalendarConfig(model="unused", tasks="days"), model=tiny_model, progress=False)


# ------------------------------------------------------------------------------------------- CLI
def test_cli_cluster_search_and_calendar_errors(tiny_model, tiny_model_dir, tiny_cache, tmp_path, capsys):
    import json

    from saelab.cli import main

    sae = tiny_sae(tiny_model)
    sae.save(tmp_path / "sae")
    out = tmp_path / "search"
    assert main(["circles", "clusters", str(tmp_path / "sae"), "--acts", str(tiny_cache), "--method", "graph",
                 "--min-tokens", "20", "--no-model", "--plots", "1", "--out", str(out)]) == 0
    saved = json.loads((out / "clusters.json").read_text())
    assert saved["clustering"]["method"] == "graph" and saved["clustering"]["n_clusters_found"] == 6
    assert (out / "cluster_rank1.png").exists()
    assert main(["circles", "clusters", str(tmp_path / "sae"), "--acts", str(tiny_cache), "--method",
                 "coactivation-spectral", "--n-clusters", "8", "--window", "4", "--significance", "2",
                 "--random-draws", "1", "--min-tokens", "20", "--no-model", "--plots", "0", "--out", str(out)]) == 0
    saved = json.loads((out / "clusters.json").read_text())
    assert saved["clustering"]["method"] == "coactivation-spectral" and saved["clustering"]["window"] == 4
    assert main(["circles", "calendar", "--model", str(tiny_model_dir), "--tasks", "days", "--out",
                 str(tmp_path / "cal")]) == 2
    assert "splits 'Monday' into" in capsys.readouterr().err
    assert main(["circles", "calendar", "--model", str(tiny_model_dir), "--tasks", "weeks"]) == 2
    assert "unknown task 'weeks'" in capsys.readouterr().err
