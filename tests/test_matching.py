"""Feature matching across models: similarity measures against their reference values and invariances, streaming
correlation against dense numpy, matching on planted pairs, nulls, cross-tokenizer alignment and bad input."""

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from scipy.stats import kstest, ortho_group

from saelab.activations import cache_activations
from saelab.activations.manifest import Manifest
from saelab.analysis.alignment import Side, align_positions, aligned_cache_chunks, aligned_chunks, word_ends
from saelab.analysis.correlation import RunningCorrelation, TopActivations, dense_correlation
from saelab.analysis.matching import (GROUPS, filter_pairs, group_members, many_to_one, mutual_best, non_concept,
                                      one_to_one)
from saelab.analysis.similarity import (Paired, all_measures, canonical_correlations, linear_cka, mean_squared_cca,
                                        mutual_knn, random_subset_null, rsa, shuffled_pairing_null, svcca)
from saelab.analysis.universality import MATCHING_SCHEMA_VERSION, Accumulated, MatchConfig, MatchResults, MatchStudyConfig, accumulate, \
    compare, compare_all, match_models, run_match
from saelab.codes import Codes, sparse_rows
from saelab.data import TextConfig
from saelab.errors import DataError
from conftest import build_tiny_model
from helpers import make_sae

HOOK = "blocks.1.hook_resid_post"


def reference_pair():
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = np.random.randn(100, 10) + x
    return x, y


# ------------------------------------------------------------------------------------------ similarity measures
def test_reference_values_of_cka_and_cca():
    x, y = reference_pair()
    assert linear_cka(x, y) == pytest.approx(0.55761, abs=5e-6)
    assert mean_squared_cca(x, y, center=False) == pytest.approx(0.54312, abs=5e-6)  # Kornblith et al.'s demo
    # centred CCA against the textbook eigenproblem Sxx^-1 Sxy Syy^-1 Syx (an independent computation)
    xc, yc = x - x.mean(0), y - y.mean(0)
    sxx, syy, sxy = xc.T @ xc, yc.T @ yc, xc.T @ yc
    eig = np.linalg.eigvals(np.linalg.solve(sxx, sxy) @ np.linalg.solve(syy, sxy.T)).real
    np.testing.assert_allclose(np.sort(canonical_correlations(x, y) ** 2), np.sort(eig), atol=1e-10)
    assert mean_squared_cca(x, y) == pytest.approx(eig.mean(), abs=1e-10)


def test_invariances_and_identity():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)) @ rng.normal(size=(8, 12))  # rank 8 in 12 dims
    y = x @ rng.normal(size=(12, 12)) + 0.5 * rng.normal(size=(60, 12))
    rotation = ortho_group.rvs(12, random_state=1)
    for measure in (lambda a, b: svcca(a, b).value, linear_cka):
        base = measure(x, y)
        assert measure(x, y @ rotation) == pytest.approx(base, abs=1e-9)
        assert measure(x, 3.7 * y) == pytest.approx(base, abs=1e-9)
        assert measure(x, x) == pytest.approx(1.0, abs=1e-9)
    assert rsa(x, x) == pytest.approx(1.0) and mutual_knn(x, x, 5) == 1.0
    assert rsa(x, 2.5 * x @ rotation) == pytest.approx(1.0)  # cosines survive rotation and scaling
    eig = np.sort(np.linalg.eigvalsh(np.cov(x.T)))[::-1]  # independent: covariance spectrum
    assert svcca(x, y).kept_x == int(np.argmax(np.cumsum(eig) / eig.sum() >= 0.99)) + 1 > 1


def test_svcca_keeps_more_than_one_direction_for_unit_rows():
    """Lan et al.'s rule keeps one direction for unit-norm rows; 99 % of variance keeps many."""
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(400, 32))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    result = svcca(rows, rows @ ortho_group.rvs(32, random_state=2))
    assert result.kept_x > 20 and result.value == pytest.approx(1.0, abs=1e-9)


def test_fast_repairing_equals_direct_formulas():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 6))
    y = x + rng.normal(size=(40, 6))
    paired = Paired(x, y, k=5)
    for perm in (None, rng.permutation(40), rng.permutation(40)):
        p = np.arange(40) if perm is None else perm
        fast, direct = paired.scores(perm), all_measures(x, y[p], k=5)
        for m in direct:
            assert fast[m] == pytest.approx(direct[m], abs=1e-9), m


def test_p_values_uniform_for_independent_small_for_planted():
    rng = np.random.default_rng(3)
    ps = {m: [] for m in ("svcca", "cka", "rsa", "mutual_knn")}
    for i in range(60):
        x, y = rng.normal(size=(30, 5)), rng.normal(size=(30, 5))
        for m, t in shuffled_pairing_null(x, y, draws=199, seed=i, k=4).items():
            ps[m].append(t.p_value)
    for m, values in ps.items():
        assert kstest(values, "uniform").pvalue > 0.001, m
        assert 0.3 < np.mean(values) < 0.7, m
    x = rng.normal(size=(50, 8))
    y = x @ rng.normal(size=(8, 8)) + 0.3 * rng.normal(size=(50, 8))
    planted = shuffled_pairing_null(x, y, draws=1000, seed=0, k=5)
    assert all(t.p_value <= 2 / 1001 and t.draws == 1000 for t in planted.values())
    pool_x = np.concatenate([x, rng.normal(size=(200, 8))])
    pool_y = np.concatenate([y, rng.normal(size=(200, 8))])
    subsets = random_subset_null({m: t.observed for m, t in planted.items()}, pool_x, pool_y, 50, draws=200)
    assert subsets["cka"].p_value < 0.01 and subsets["rsa"].p_value < 0.01
    again = shuffled_pairing_null(x, y, draws=50, seed=7, k=5)
    assert again == shuffled_pairing_null(x, y, draws=50, seed=7, k=5)  # seeded


# --------------------------------------------------------------------------------------- streaming correlation
def random_codes(n, width, k, rng, values=None):
    latents = np.stack([rng.choice(width, k, replace=False) for _ in range(n)])
    vals = rng.exponential(size=(n, k)) if values is None else values
    dense = np.zeros((n, width), dtype=np.float32)
    np.put_along_axis(dense, latents, vals.astype(np.float32), axis=1)
    return dense


def to_codes(dense: np.ndarray) -> Codes:
    crow, latents, values = sparse_rows(torch.from_numpy(dense))
    n = len(dense)
    zeros = torch.zeros(n, dtype=torch.long)
    return Codes(crow, latents, values, dense.shape[1], zeros, torch.arange(n), zeros, zeros)


def test_streaming_correlation_equals_dense_numpy_and_constant_latents_give_zero():
    rng = np.random.default_rng(4)
    a = random_codes(900, 40, 4, rng)
    b = 0.5 * a[:, rng.permutation(40)][:, :30] + random_codes(900, 30, 3, rng)
    a[:, 7] = 0.0  # never fires
    b[:, 3] = 2.0  # always fires at one value
    neurons = rng.normal(size=(900, 12)).astype(np.float32)
    acc = RunningCorrelation(40, 30)
    acc_mixed = RunningCorrelation(40, 12)
    for start in range(0, 900, 250):  # uneven chunks
        rows = slice(start, start + 250)
        acc.update(to_codes(a[rows]), to_codes(b[rows]))
        acc_mixed.update(to_codes(a[rows]), torch.from_numpy(neurons[rows]))
    corr = acc.correlation()
    np.testing.assert_allclose(corr.matrix, dense_correlation(a, b), atol=2e-5)
    np.testing.assert_allclose(acc_mixed.correlation().matrix, dense_correlation(a, neurons), atol=2e-5)
    assert corr.constant_a.tolist() == [i == 7 for i in range(40)]
    assert corr.constant_b.tolist() == [i == 3 for i in range(30)]
    assert np.isfinite(corr.matrix).all() and not corr.matrix[7].any() and not corr.matrix[:, 3].any()
    for pairing in (many_to_one, mutual_best, one_to_one):
        pairs = pairing(corr.matrix)
        assert 7 not in pairs.a and 3 not in pairs.b  # undefined correlations are never paired
    in_place = acc.correlation(in_place=True)
    np.testing.assert_allclose(in_place.matrix, corr.matrix, atol=1e-6)


def test_top_activations_match_a_sort():
    rng = np.random.default_rng(5)
    a = random_codes(300, 20, 3, rng)
    tokens = torch.arange(300) + 1000
    top = TopActivations(20, n=4)
    for start in range(0, 300, 70):
        top.update(to_codes(a[start:start + 70]), tokens[start:start + 70], start)
    for latent in range(20):
        order = np.argsort(-a[:, latent], kind="stable")[:4]
        order = order[a[order, latent] > 0]
        assert top.rows[latent, : len(order)].tolist() == order.tolist()
        assert top.tokens(latent) == (order + 1000).tolist()


# ------------------------------------------------------------------------------------------------- matching
def planted_codes(n=20000, width=256, k=8, noise=0.3, seed=6):
    """B = a permuted, noised copy of A's codes (10 % of B's firings dropped, extra random firings added)."""
    rng = np.random.default_rng(seed)
    a = random_codes(n, width, k, rng)
    perm = rng.permutation(width)
    b = np.zeros_like(a)
    b[:, perm] = a * (1 + noise * rng.normal(size=a.shape)).clip(0)
    b *= rng.random(b.shape) > 0.1
    b += random_codes(n, width, 2, rng)
    return a, b, perm


def test_planted_pairs_are_recovered_by_every_pairing():
    a, b, perm = planted_codes()
    acc = RunningCorrelation(a.shape[1], b.shape[1])
    for start in range(0, len(a), 4096):
        acc.update(to_codes(a[start:start + 4096]), to_codes(b[start:start + 4096]))
    corr = acc.correlation().matrix
    for pairing in (many_to_one, mutual_best, one_to_one,
                    lambda c: one_to_one(c, dense_limit=0, candidates=4)):  # candidate Hungarian too
        pairs = pairing(corr)
        assert np.mean(perm[pairs.a] == pairs.b) >= 0.95 and len(pairs) >= 0.95 * a.shape[1]


def test_candidate_hungarian_matches_the_dense_optimum():
    rng = np.random.default_rng(7)
    corr = rng.normal(0, 0.05, (300, 260)).astype(np.float32)
    corr[rng.permutation(300)[:260], rng.permutation(260)] += rng.uniform(0.1, 0.8, 260).astype(np.float32)
    dense, sparse = one_to_one(corr), one_to_one(corr, dense_limit=0, candidates=6)
    full = one_to_one(corr, dense_limit=0, candidates=300)  # every edge a candidate: the same optimum
    assert full.corr.sum() == pytest.approx(dense.corr.sum(), rel=1e-6)
    strong = lambda p: {(a, b) for a, b, c in zip(p.a.tolist(), p.b.tolist(), p.corr.tolist()) if c > 0.2}
    assert strong(sparse) == strong(dense)  # the real pairs agree; only noise-level partners may differ
    assert sparse.corr.sum() >= 0.99 * dense.corr.sum()
    assert len(set(sparse.a)) == len(sparse.a) and len(set(sparse.b)) == len(sparse.b)  # truly 1:1


def test_one_to_one_keeps_the_best_partner_not_the_first_seen():
    corr = np.array([[0.5, 0.0], [0.9, 0.4]], dtype=np.float32)  # B0 is A1's best; A0 should take nothing better
    pairs = one_to_one(corr)
    assert dict(zip(pairs.a.tolist(), pairs.b.tolist())) == {0: 0, 1: 1} or pairs.corr.sum() >= 0.9
    assert pairs.corr.sum() == pytest.approx(max(0.5 + 0.4, 0.9 + 0.0))
    assert mutual_best(corr).a.tolist() == [1]


def test_filters_each_remove_what_they_should():
    pairs = one_to_one(np.diag([0.9, 0.8, 0.05, 0.7]).astype(np.float32))
    words_a = [["Monday", "Friday"], [",", ".", "\n"], ["cat"], ["river"]]
    words_b = [["monday"], ["the"], ["cat"], ["mountain"]]
    junk_a, junk_b = non_concept(words_a), non_concept(words_b)
    assert junk_a.tolist() == [False, True, False, False]
    kept, steps = filter_pairs(pairs, min_corr=0.1, junk_a=junk_a, junk_b=junk_b, top_words_a=words_a,
                               top_words_b=words_b, shared_top_word=True)
    assert [s.removed for s in steps] == [1, 1, 1]  # each filter did something, and says so
    assert kept.a.tolist() == [0]


def test_semantic_groups_match_whole_words():
    top = [["Monday"], ["Mondays"], [" the", "March"], ["marching"]]
    assert group_members(top, GROUPS["calendar"]).tolist() == [True, False, True, False]


# ------------------------------------------------------------------------------------------ records and nulls
def test_compare_record_round_trips_without_nan(tmp_path):
    a, b, perm = planted_codes(n=6000, width=64, k=4)
    a[:, 5] = 0
    acc = RunningCorrelation(64, 64)
    acc.update(to_codes(a), to_codes(b))
    rng = np.random.default_rng(8)
    dirs_a = rng.normal(size=(64, 16))
    dirs_b = np.zeros((64, 16))
    dirs_b[perm] = dirs_a @ ortho_group.rvs(16, random_state=3) + 0.1 * rng.normal(size=(64, 16))
    words = [[f"w{i}", "Monday" if i % 3 == 0 else "x"] for i in range(64)]
    words_b = [None] * 64
    for i in range(64):
        words_b[perm[i]] = words[i]
    record = compare(acc.correlation(), a="A", b="B", top_words_a=words, top_words_b=words_b, directions_a=dirs_a,
                     directions_b=dirs_b, config=MatchConfig(null_draws=200))
    assert record.constant_a == 1 and record.n_pairs >= 60
    assert record.similarity["cka"]["observed"] > 0.9
    assert record.similarity["cka"]["shuffled"]["p_value"] < 0.01
    assert record.similarity["rsa"]["subsets"]["p_value"] < 0.01
    assert record.svcca_kept[0] > 1
    calendar = next(g for g in record.groups if g.name == "calendar")
    assert calendar.pairs >= 15 and calendar.similarity["cka"]["shuffled"]["draws"] == 200
    results = MatchResults(alignment={"mode": "word"}, comparisons=[record])
    results.save(tmp_path)
    text = (tmp_path / "matching.json").read_text()
    assert "NaN" not in text and json.loads(text)["schema_version"] == MATCHING_SCHEMA_VERSION == 2
    again = MatchResults.load(tmp_path)
    assert again.comparisons[0].groups[0].name == "calendar" and again == results
    assert again.to_dict() == results.to_dict() and again.report() == (tmp_path / "matching.md").read_text()
    assert {p.name for p in tmp_path.iterdir()} >= {"matching.md", "similarity.png", "correlation.png", "layers.png"}


def test_match_configs_check_their_values_and_record_only_the_matching_settings():
    config = MatchStudyConfig(a=["m:h"], b=["n:h"], null_draws=5)
    assert (config.tokens, config.mode, config.batch_size, config.start_char, config.max_pairs) == (20_000, "word", 8,
                                                                                                  0, 1000)
    with pytest.raises(ValueError, match="min_corr"):
        MatchConfig(min_corr=1.5)
    with pytest.raises(ValueError, match="mode"):
        MatchStudyConfig(mode="char")
    with pytest.raises(ValueError, match="at least one side"):
        run_match(MatchStudyConfig())
    recorded = compare_all(Accumulated({}, {}, 0, 0), [], config).config
    assert recorded == dataclasses.asdict(MatchConfig(null_draws=5))


def test_too_few_tokens_is_an_error():
    acc = RunningCorrelation(3, 3)
    acc.update(torch.randn(50, 3), torch.randn(50, 3))
    with pytest.raises(DataError, match="only 50 aligned tokens"):
        compare(acc.correlation(), a="A", b="B", top_words_a=[[]] * 3, top_words_b=[[]] * 3)
    with pytest.raises(ValueError, match="at least 2"):
        RunningCorrelation(3, 3).correlation()


# ------------------------------------------------------------------------------------ cross-tokenizer alignment
@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A second tiny model with a different tokenizer (smaller BPE vocabulary) and width."""
    from saelab.models import load_model

    return load_model(str(build_tiny_model(tmp_path_factory.mktemp("tiny-other"), d_model=48, vocab=300)))


SENTENCES = ["The quick brown fox jumps over the lazy dog.", "On Monday, the river flooded (again) near Paris!",
             "Interpreting transformers requires patience and 12345 experiments."]


def test_alignment_lands_on_shared_word_ends(tiny_model, other_model):
    tokens_a, tokens_b = tiny_model.tokenize(SENTENCES), other_model.tokenize(SENTENCES)
    assert not torch.equal(tokens_a.ids[:, :5], tokens_b.ids[:, :5]) or tokens_a.ids.shape != tokens_b.ids.shape
    for i, text in enumerate(SENTENCES):
        pos_a, pos_b, ends = align_positions(tokens_a.spans[i], tokens_b.spans[i], text, "word")
        expected = {m.end() for m in re.finditer(r"\w+|[^\w\s]", text)}  # independent: the words themselves
        ends_a = {int(e) for e in tokens_a.spans[i, :, 1] if e > 0}
        ends_b = {int(e) for e in tokens_b.spans[i, :, 1] if e > 0}
        assert set(ends.tolist()) == expected & ends_a & ends_b
        assert len(ends) >= 0.6 * len(expected)  # byte-level BPE splits at word boundaries
        assert (pos_a > 0).all() and (pos_b > 0).all()  # never BOS
        assert (pos_a < tokens_a.lengths[i]).all() and (pos_b < tokens_b.lengths[i]).all()  # never padding
        assert tokens_a.spans[i, pos_a, 1].tolist() == ends.tolist() == tokens_b.spans[i, pos_b, 1].tolist()
        # the decoded prefixes up to each aligned token are the same text on both sides
        for pa, pb, e in zip(pos_a.tolist(), pos_b.tolist(), ends.tolist()):
            text_a = tiny_model.tokenizer.decode(tokens_a.ids[i, 1:pa + 1])
            text_b = other_model.tokenizer.decode(tokens_b.ids[i, 1:pb + 1])
            assert text_a == text_b == text[:e]
        _, _, every_end = align_positions(tokens_a.spans[i], tokens_b.spans[i], text, "end")
        assert set(ends.tolist()) <= set(every_end.tolist()) and word_ends(text) == expected


def tiny_sae(model, d_in, width=48, seed=0, hook=HOOK, name=None):
    return make_sae("topk", d_in=d_in, width=width, k=4, seed=seed, model_name=name or model.name, hook_name=hook)


def test_aligned_chunks_end_to_end(tiny_model, other_model):
    docs = SENTENCES * 12
    sides_a = [Side(tiny_model, HOOK, tiny_sae(tiny_model, 64)), Side(tiny_model, "blocks.1.mlp.hook_post")]
    sides_b = [Side(other_model, HOOK, tiny_sae(other_model, 48)), Side(other_model, "blocks.1.mlp.hook_post")]
    chunks = list(aligned_chunks(sides_a, sides_b, docs, batch_size=18))
    n = sum(len(c) for c in chunks)
    assert n > 300 and sum(len(c) for c in aligned_chunks(sides_a, sides_b, docs[:6], max_tokens=25)) == 25
    first = chunks[0]
    assert len(first.a[sides_a[0].label]) == len(first.b[sides_b[0].label]) == len(first)
    assert first.words[:4] == ["The", "quick", "brown", "fox"]
    # the activations at aligned rows are the ones of those positions in a plain forward
    tokens = tiny_model.tokenize(SENTENCES[:1])
    pos_a, _, _ = align_positions(tokens.spans[0], other_model.tokenize(SENTENCES[:1]).spans[0], SENTENCES[0])
    direct = tiny_model.activations_at(tokens, "blocks.1.mlp.hook_post", positions=None)["blocks.1.mlp.hook_post"]
    torch.testing.assert_close(first.a[sides_a[1].label][: len(pos_a)], direct[0, pos_a], atol=1e-5, rtol=1e-5)
    acc = accumulate(iter(chunks), sides_a, sides_b)
    assert set(acc.correlations) == {(sides_a[0].label, sides_b[0].label), (sides_a[1].label, sides_b[1].label)}
    assert all(np.isfinite(c.matrix).all() for c in acc.correlations.values())
    results = match_models(sides_a, sides_b, docs, batch_size=18, config=MatchConfig(null_draws=50, min_tokens=100))
    assert results.alignment["tokens"] == n and len(results.comparisons) == 2
    assert [c.kind for c in results.comparisons] == ["sae", "units"]


def test_bad_sides_are_refused(tiny_model, other_model):
    with pytest.raises(ValueError, match="d_in=48 but hook blocks.1.hook_resid_post .* gives 64"):
        Side(tiny_model, HOOK, tiny_sae(tiny_model, 48))
    with pytest.raises(ValueError, match="trained on 'gemma-3-270m'"):
        Side(tiny_model, HOOK, tiny_sae(tiny_model, 64, name="gemma-3-270m"))


def test_caches_align_only_on_the_same_text(tiny_model, tmp_path):
    first = TextConfig(context_len=32)
    (tmp_path / "other.txt").write_text("Entirely different words here. " * 200)
    other = TextConfig(source=str(tmp_path / "other.txt"), context_len=32)
    for name, text in (("one", first), ("two", first), ("other", other)):
        cache_activations(tiny_model, HOOK, tmp_path / name, text=text, tokens=600, batch_size=4, progress=False)
    sae_a, sae_b = tiny_sae(tiny_model, 64, seed=0), tiny_sae(tiny_model, 64, seed=1)
    chunks = list(aligned_cache_chunks(sae_a, tmp_path / "one", sae_b, tmp_path / "two", batch_size=200))
    assert sum(len(c) for c in chunks) == Manifest.read(tmp_path / "one").tokens
    assert torch.equal(chunks[0].token_a, chunks[0].token_b)
    assert torch.is_grad_enabled()  # the encoding's no_grad does not leak out of the finished iteration
    with pytest.raises(DataError, match="different text"):
        next(aligned_cache_chunks(sae_a, tmp_path / "one", sae_b, tmp_path / "other"))
    with pytest.raises(ValueError, match="trained on 'gemma-3-270m'"):
        next(aligned_cache_chunks(tiny_sae(tiny_model, 64, name="gemma-3-270m"), tmp_path / "one", sae_b,
                                  tmp_path / "two"))
    with pytest.raises(ValueError, match="d_in=48"):
        next(aligned_cache_chunks(tiny_sae(tiny_model, 48), tmp_path / "one", sae_b, tmp_path / "two"))


def test_cli_match_end_to_end(tiny_model, other_model, tmp_path):
    from saelab.cli import main

    tiny_sae(tiny_model, 64).save(tmp_path / "sae-a")
    tiny_sae(other_model, 48).save(tmp_path / "sae-b")
    (tmp_path / "text.txt").write_text("\n".join(SENTENCES * 8))
    args = ["match", "--a", f"{tiny_model.name}:{HOOK}:{tmp_path / 'sae-a'}",
            "--b", f"{other_model.name}:{HOOK}:{tmp_path / 'sae-b'}", "--text", str(tmp_path / "text.txt"),
            "--neurons", "--nulls", "20", "--min-tokens", "100", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    results = MatchResults.load(tmp_path / "out")
    assert [c.kind for c in results.comparisons] == ["sae", "units"]
    assert results.comparisons[0].similarity is None or results.comparisons[0].similarity["cka"]["shuffled"]["draws"] == 20
    bad = list(args)
    bad[2] = f"{tiny_model.name}:{HOOK}:{tmp_path / 'sae-b'}"  # an SAE of the other model (d_in 48, not 64)
    assert main(bad) == 2


def test_the_matching_study_runs_from_its_config(tiny_model, other_model, tmp_path):
    tiny_sae(tiny_model, 64).save(tmp_path / "sae-a")
    tiny_sae(other_model, 48).save(tmp_path / "sae-b")
    (tmp_path / "text.txt").write_text("\n".join(SENTENCES * 8))
    config = MatchStudyConfig(a=[f"{tiny_model.name}:{HOOK}:{tmp_path / 'sae-a'}"],
                              b=[f"{other_model.name}:{HOOK}:{tmp_path / 'sae-b'}"], text=str(tmp_path / "text.txt"),
                              neurons=True, null_draws=20, min_tokens=100)
    results = run_match(config)
    assert [c.kind for c in results.comparisons] == ["sae", "units"]
    assert results.config == {f.name: getattr(config, f.name) for f in dataclasses.fields(MatchConfig)}
    assert results.alignment["text"] == str(tmp_path / "text.txt") and results.seconds > 0
    with pytest.raises(ValueError, match="cache mode takes"):
        run_match(MatchStudyConfig(a=["x"], b=["y", "z"], cache_a="c"))


def test_an_sae_is_read_only_at_its_own_hook_by_every_analysis(tiny_model, tmp_path, capsys):
    """An SAE of blocks.0 has the width of blocks.1, so only its recorded hook tells them apart: every analysis
    handed a model, a hook and an SAE refuses the pair, naming both hooks."""
    from saelab.analysis import Features
    from saelab.analysis.clusters import check_pairing
    from saelab.cli import main
    from saelab.codes import iter_codes
    from saelab.evals.core import evaluate
    from saelab.explore import explore
    from saelab.interventions import Splice

    other = "blocks.0.hook_resid_post"
    sae = tiny_sae(tiny_model, 64, hook=other)
    cache_activations(tiny_model, [other, HOOK], tmp_path / "acts", text=TextConfig(context_len=32), tokens=256,
                      batch_size=4, progress=False)
    named = f"trained on {other}, not {HOOK}"
    refusals = {"match": lambda: Side(tiny_model, HOOK, sae), "probe": lambda: Features(HOOK, sae=sae),
                "steer / splice": lambda: tiny_model.loss(SENTENCES, patches=[Splice(sae, hook=HOOK)]),
                "dashboard": lambda: explore(sae, tmp_path / "acts", tiny_model, hook=HOOK),
                "codes": lambda: next(iter_codes(sae, tmp_path / "acts", hook=HOOK)),
                "circles": lambda: check_pairing(sae, Manifest.read(tmp_path / "acts"), HOOK),
                "eval": lambda: evaluate(sae, model=tiny_model, text=TextConfig(context_len=32), tokens=64, hook=HOOK),
                "eval on a cache": lambda: evaluate(sae, activations=tmp_path / "acts", hook=HOOK)}
    for analysis, run in refusals.items():
        with pytest.raises(ValueError, match=named):
            run()
    sae.save(tmp_path / "sae-0")
    (tmp_path / "text.txt").write_text("\n".join(SENTENCES * 8))
    assert main(["match", "--a", f"{tiny_model.name}:{HOOK}:{tmp_path / 'sae-0'}", "--b", f"{tiny_model.name}:{HOOK}",
                 "--text", str(tmp_path / "text.txt"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err and not (tmp_path / "out").exists()
    # one activation under two names: blocks.1's resid_pre is blocks.0's resid_post
    assert Side(tiny_model, other, tiny_sae(tiny_model, 64, hook="blocks.1.hook_resid_pre")).hook == other
