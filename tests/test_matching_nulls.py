"""Matching's chance levels: geometry on random directions (the degenerate defaults the held-out check found, and
the new ones), the token-shuffle null, the untrained-twin baseline, the decoder twin share, unique side labels,
and matching.json's schema versions."""

import json

import numpy as np
import pytest
import torch
from scipy.stats import ortho_group

from saelab.analysis.correlation import RunningCorrelation
from saelab.analysis.match_baselines import TokenShuffle, initialise_on, untrained_twin
from saelab.analysis.matching import best_cosines, twin_share
from saelab.analysis.similarity import linear_cka, random_direction_baseline, random_unit_rows, svcca
from saelab.analysis.universality import MatchConfig, MatchResults, compare, side_labels
from helpers import make_sae

HOOK = "blocks.1.hook_resid_post"


# ------------------------------------------------------------------------------------------------- geometry
def test_random_directions_reproduce_the_degenerate_scores_and_the_new_default_is_near_zero():
    rng = np.random.default_rng(0)
    n, d = 200, 576
    x, y = random_unit_rows(n, d, rng), random_unit_rows(n, d, rng)
    kept_99 = svcca(x, y, keep=0.99)
    assert (kept_99.kept_x, kept_99.kept_y) == (190, 190) and kept_99.value == pytest.approx(0.96, abs=0.01)
    assert linear_cka(x, y) == pytest.approx(n / (n + n * (n - 1) / d), abs=0.01)  # 0.743: the diagonal's share
    chance = random_direction_baseline(n, d, d, draws=3, seed=1)
    assert chance["cka"] == pytest.approx(0.743, abs=0.01) and chance["svcca"] == pytest.approx(0.96, abs=0.01)
    wide = random_direction_baseline(1000, d, d, draws=2, seed=2, dims=20)
    assert wide["svcca"] < 0.15 and abs(wide["rsa"]) < 0.02 and wide["mutual_knn"] < 0.05
    assert MatchConfig().svcca_dims == 20
    with pytest.raises(ValueError, match="at least 1 direction"):
        svcca(x, y, dims=0)
    with pytest.raises(ValueError, match="at least 1 draw"):
        random_direction_baseline(10, 4, 4, draws=0)


# ------------------------------------------------------------------------------------ planted SAEs and nulls
M, K = 64, 3


def planted_rows(n: int = 8000, seed: int = 0) -> np.ndarray:
    """Sparse ground-truth codes [n, M]: K features per token."""
    rng = np.random.default_rng(seed)
    codes = np.zeros((n, M))
    for i in range(n):
        codes[i, rng.choice(M, K, replace=False)] = rng.exponential(size=K) + 0.5
    return codes


def planted_sae(dictionary: np.ndarray, seed: int = 0):
    """A TopK SAE whose decoder is the ground-truth dictionary (and encoder its transpose)."""
    sae = make_sae("topk", d_in=dictionary.shape[1], width=M, k=K, seed=seed, bias_std=0)
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor(dictionary, dtype=torch.float32))
        sae.W_enc.copy_(torch.tensor(dictionary.T, dtype=torch.float32))
    return sae


def encoded(sae, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return sae.encode(x)


def decoder(sae) -> np.ndarray:
    return sae.W_dec.detach().double().numpy()


def matched(sae_a, x_a, sae_b, x_b, *, seed: int = 0, chunk: int = 1000):
    """compare() of A's SAE with B's, with the token-shuffle null and an untrained twin of B's SAE."""
    twin = initialise_on(untrained_twin(sae_b, seed), x_b[:chunk])
    f_a, f_b, f_twin = encoded(sae_a, x_a), encoded(sae_b, x_b), encoded(twin, x_b)
    observed, untrained = RunningCorrelation(M, M), RunningCorrelation(M, M)
    shuffle = TokenShuffle([("a", "b")], {"a": M, "b": M}, seed)
    for start in range(0, len(x_a), chunk):
        rows = slice(start, start + chunk)
        observed.update(f_a[rows], f_b[rows])
        untrained.update(f_a[rows], f_twin[rows])
        shuffle.update({"a": f_a[rows], "b": f_b[rows]})
    words = [[f"w{i}"] for i in range(M)]
    return compare(observed.correlation(), a="a", b="b", top_words_a=words, top_words_b=words,
                   directions_a=decoder(sae_a), directions_b=decoder(sae_b), shuffled=shuffle.correlations()[("a", "b")],
                   untrained=untrained.correlation(), untrained_directions=decoder(twin), untrained_top_words=words,
                   untrained_label="b:untrained", config=MatchConfig(null_draws=50, direction_draws=2))


@pytest.fixture(scope="module")
def planted():
    """One feature set read by two 'models': B's space is A's rotated, so activations and geometry are shared."""
    rng = np.random.default_rng(1)
    codes = planted_rows()
    dictionary = random_unit_rows(M, 32, rng)
    rotated = dictionary @ ortho_group.rvs(32, random_state=2)
    x_a = torch.tensor(codes @ dictionary + 0.05 * rng.normal(size=(len(codes), 32)), dtype=torch.float32)
    x_b = torch.tensor(codes @ rotated + 0.05 * rng.normal(size=(len(codes), 32)), dtype=torch.float32)
    return planted_sae(dictionary), x_a, planted_sae(rotated[np.random.default_rng(3).permutation(M)]), x_b


def test_a_planted_shared_feature_set_is_found_above_both_nulls(planted):
    sae_a, x_a, sae_b, x_b = planted
    c = matched(sae_a, x_a, sae_b, x_b)
    assert c.mean_best_corr_a > 0.65 and c.frac_best_above["0.5"] > 0.95
    # picking partners by activation finds something in an untrained SAE too; the token shuffle finds nothing
    assert 0.2 < c.untrained.mean_best_corr_a < c.mean_best_corr_a - 0.25
    assert c.untrained.frac_best_above["0.5"] < 0.5 and c.excess_over_untrained > 0.25
    assert c.token_shuffle.mean_best_corr_a < 0.06 and c.token_shuffle.frac_best_above["0.3"] == 0
    assert c.untrained.label == "b:untrained" and c.token_shuffle.label == "b"
    for m in ("cka", "rsa", "mutual_knn"):  # the shared geometry stands out from random directions
        assert c.similarity[m]["observed"] > c.similarity[m]["random_directions"] + 0.4, m
        assert c.similarity[m]["observed"] > c.untrained.similarity[m] + 0.4, m
    assert c.svcca_kept == [20, 20] and c.scored_pairs == M


def test_an_untrained_sae_scores_its_own_baseline(planted):
    """B an untrained SAE (another seed than the baseline's twin): the excess over the untrained twin is ~ 0."""
    sae_a, x_a, sae_b, x_b = planted
    untrained_b = initialise_on(untrained_twin(sae_b, seed=7), x_b[:1000])
    c = matched(sae_a, x_a, untrained_b, x_b)
    assert abs(c.excess_over_untrained) < 0.05 and c.mean_best_corr_a < 0.45
    assert abs(c.frac_best_above["0.5"] - c.untrained.frac_best_above["0.5"]) < 0.25  # 64 latents: steps of 1/64


def test_token_shuffle_is_near_zero_on_independent_data_and_on_one_chunk():
    rng = np.random.default_rng(4)
    a, b = torch.tensor(rng.exponential(size=(6000, 20)) * (rng.random((6000, 20)) < 0.1), dtype=torch.float32), \
        torch.tensor(rng.exponential(size=(6000, 30)) * (rng.random((6000, 30)) < 0.1), dtype=torch.float32)
    for chunk in (6000, 700):  # one chunk (paired with itself, shuffled) and uneven chunks (a ring of chunks)
        shuffle = TokenShuffle([("a", "b")], {"a": 20, "b": 30}, seed=0)
        for start in range(0, 6000, chunk):
            shuffle.update({"a": a[start:start + chunk], "b": b[start:start + chunk]})
        corr = shuffle.correlations()[("a", "b")]
        assert corr.n_tokens == 6000 and corr.matrix.max(1).mean() < 0.05
    same = TokenShuffle([("a", "a2")], {"a": 20, "a2": 20}, seed=0)  # a side against itself: the shuffle breaks it
    same.update({"a": a, "a2": a})
    assert same.correlations()[("a", "a2")].matrix.max(1).mean() < 0.05


def test_untrained_twin_is_initialised_as_saelab_initialises():
    trained = make_sae("topk", d_in=16, width=40, k=4, seed=0, input_scale=2.0)
    twin = untrained_twin(trained, seed=5)
    assert (twin.cfg.arch, twin.cfg.width, twin.cfg.k, twin.cfg.hook_name) == ("topk", 40, 4, trained.cfg.hook_name)
    assert torch.allclose(twin.W_dec.norm(dim=1), torch.ones(40)) and torch.equal(twin.W_enc.T, twin.W_dec)
    state = torch.random.get_rng_state()
    assert torch.equal(untrained_twin(trained, seed=5).W_dec, twin.W_dec)  # seeded ...
    assert torch.equal(torch.random.get_rng_state(), state)  # ... without touching the global generator
    x = 3.0 * torch.randn(500, 16) + 1.0
    ready = initialise_on(twin, x)
    assert ready.cfg.input_scale == 1.0 and ready.b_dec.abs().sum() > 0  # decoder bias from the rows, scale folded


# --------------------------------------------------------------------------------------------------- twins
def test_twin_share_counts_latents_with_a_near_copy():
    rng = np.random.default_rng(5)
    a = random_unit_rows(300, 64, rng)
    copy = a[rng.permutation(300)] + 0.02 * rng.normal(size=(300, 64))
    copy[:60] = random_unit_rows(60, 64, rng)  # 60 of A's latents lose their twin
    assert twin_share(a, copy) == pytest.approx(0.8, abs=0.01)
    assert twin_share(a, random_unit_rows(300, 64, rng)) == 0.0 and best_cosines(a, a).min() > 0.999
    with pytest.raises(ValueError, match="one space"):
        twin_share(a, a[:, :10])


# -------------------------------------------------------------------------------------------------- labels
def test_side_labels_are_unique():
    specs = ["m:h:/runs/s1/h/topk-64-k4", "m:h:/runs/s2/h/topk-64-k4", "m:h", "n:h:/runs/s1/h/topk-64-k4",
             "m:h:/runs/s1/h/topk-64-k4"]
    labels = side_labels(specs)
    assert labels[2] == labels[3] == ""  # unique by default: the default label stays
    assert labels[0] == "m:h:s1/h/topk-64-k4#1" and labels[1] == "m:h:s2/h/topk-64-k4"
    assert labels[4] == "m:h:s1/h/topk-64-k4#2"
    with pytest.raises(ValueError, match="MODEL:HOOK"):
        side_labels(["nohook"])


def test_match_cli_two_seeds_reports_baselines_and_twin_share(tiny_model, tmp_path):
    """Two SAEs of one width at one hook on side A, one on side B, one model: labels differ, every SAE pair has
    its token shuffle and untrained twin, and the same-space pairs their twin share."""
    from saelab.cli import main

    for seed in (0, 1, 2):
        make_sae("topk", d_in=64, width=48, k=4, seed=seed, model_name=tiny_model.name, hook_name=HOOK).save(tmp_path / f"s{seed}"
                                                                                                 / "sae")
    (tmp_path / "text.txt").write_text("\n".join(["The quick brown fox jumps over the lazy dog on Monday.",
                                                  "Interpreting transformers requires patience and experiments."] * 20))
    args = ["match", "--a", f"{tiny_model.name}:{HOOK}:{tmp_path / 's0' / 'sae'}",
            "--a", f"{tiny_model.name}:{HOOK}:{tmp_path / 's1' / 'sae'}",
            "--b", f"{tiny_model.name}:{HOOK}:{tmp_path / 's2' / 'sae'}", "--text", str(tmp_path / "text.txt"),
            "--nulls", "10", "--direction-draws", "1", "--min-tokens", "100", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    results = MatchResults.load(tmp_path / "out")
    assert [c.a.split(":")[-1] for c in results.comparisons] == ["s0/sae", "s1/sae"]
    for c in results.comparisons:
        assert c.untrained is not None and c.untrained.label == c.b + ":untrained"
        assert c.token_shuffle is not None and c.token_shuffle.mean_best_corr_a < c.untrained.mean_best_corr_a
        assert 0 <= c.decoder["twin_share_0.9"] <= 1
    report = (tmp_path / "out" / "matching.md").read_text()
    assert "vs untrained" in report and "excess" in report and "random directions" in report
    assert "twin share" in report
    assert main(args[:-2] + ["--no-untrained", "--no-token-shuffle", "--out", str(tmp_path / "bare")]) == 0
    bare = MatchResults.load(tmp_path / "bare")
    assert all(c.untrained is None and c.token_shuffle is None for c in bare.comparisons)


# -------------------------------------------------------------------------------------------------- schema
def test_version_1_records_still_load_and_newer_ones_are_refused(planted, tmp_path):
    sae_a, x_a, sae_b, x_b = planted
    results = MatchResults(alignment={"mode": "word"}, comparisons=[matched(sae_a, x_a, sae_b, x_b)])
    path = results.write(tmp_path)
    record = json.loads(path.read_text())
    assert record["schema_version"] == 2 and "untrained" in record["comparisons"][0]
    old = dict(record, schema_version=1)
    for comparison in old["comparisons"]:
        for name in ("untrained", "token_shuffle"):
            del comparison[name]
        for s in comparison["similarity"].values():
            del s["random_directions"]
    path.write_text(json.dumps(old))
    again = MatchResults.load(path)
    assert again.schema_version == 1 and again.comparisons[0].untrained is None
    assert "vs untrained" in again.report()  # the table still renders, with the new columns empty
    path.write_text(json.dumps(dict(record, schema_version=3)))
    with pytest.raises(ValueError, match="schema_version 3"):
        MatchResults.load(path)


def test_cache_mode_has_both_baselines(tiny_model, tmp_path):
    """Two SAEs over two caches of one text: the token shuffle, the untrained twin (over cache b's rows) and the
    twin share all come out."""
    from saelab.activations import cache_activations
    from saelab.analysis.universality import MatchStudyConfig, run_match
    from saelab.data import TextConfig

    for name in ("one", "two"):
        cache_activations(tiny_model, HOOK, tmp_path / name, text=TextConfig(context_len=32), tokens=3000,
                          batch_size=4, progress=False)
    for seed in (0, 1):
        make_sae("topk", d_in=64, width=48, k=4, seed=seed, model_name=tiny_model.name,
                 hook_name=HOOK).save(tmp_path / f"sae{seed}")
    results = run_match(MatchStudyConfig(a=[str(tmp_path / "sae0")], b=[str(tmp_path / "sae1")],
                                         cache_a=str(tmp_path / "one"), cache_b=str(tmp_path / "two"), null_draws=10,
                                         direction_draws=1, min_tokens=100), progress=False)
    (c,) = results.comparisons
    assert c.untrained.label == c.b + ":untrained" and c.n_tokens >= 2900
    assert c.token_shuffle.mean_best_corr_a < c.mean_best_corr_a and "twin_share_0.9" in c.decoder
