"""Feature absorption (saelab.evals.absorption): the per-word calculation against a plain loop written from the
definitions, planted absorbers found and clean SAEs scoring 0 on synthetic activations, the feature-splitting rule,
SAEBench's record, the save/load round trip, and a run on the tiny model (SmolLM2 in the slow tier)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from saelab.errors import DataError
from saelab.evals import absorption as A
from saelab.evals.absorption import AbsorptionConfig, LetterAbsorption

CFG = AbsorptionConfig()


# ---------------------------------------------------------------------------------------------------- reference
def reference_word(x, codes, direction, W_dec, main, cfg=CFG):
    """One word's (absorption fraction, full absorption), written as a plain loop from the definitions."""
    p = [v / math.sqrt(sum(u * u for u in direction)) for v in direction]
    cos = [sum(a * b for a, b in zip(row, p)) / math.sqrt(sum(a * a for a in row)) for row in W_dec]
    proj = [a * c for a, c in zip(codes, cos)]
    total = sum(a * b for a, b in zip(x, p))
    main_proj = sum(proj[i] for i in main)
    others = sorted((proj[i] for i in range(len(proj)) if i not in main
                     and cos[i] >= cfg.absorption_fraction_probe_cos_sim_threshold and proj[i] > 0), reverse=True)
    absorbers = sum(others[:cfg.absorption_fraction_max_absorbing_latents])
    if total <= 0 or main_proj >= total or absorbers / total < cfg.probe_projection_proportion_threshold:
        fraction = 0.0
    elif main_proj <= 0:
        fraction = 1.0
    else:
        absorbed = min(absorbers, total - main_proj)
        fraction = min(1.0, max(0.0, absorbed / (absorbed + main_proj)))
    best = max(range(len(proj)), key=lambda i: proj[i])
    full = (all(codes[i] < A.EPS for i in main) and cos[best] >= cfg.full_absorption_probe_cos_sim_threshold
            and total > 0 and proj[best] / total >= cfg.probe_projection_proportion_threshold)
    return fraction, full


def planted_decoder(d=8):
    """Latent 0: the letter's direction e0; 1: an absorber (cos 0.6 with e0); 2, 3: unrelated; 4: barely aligned."""
    e = torch.eye(d)
    return torch.stack([e[0], 0.6 * e[0] + 0.8 * e[1], e[2], e[3], 0.05 * e[0] + (1 - 0.05**2) ** 0.5 * e[4]])


def test_the_calculation_matches_the_reference_on_planted_words():
    W = planted_decoder()
    codes = torch.tensor([[2.0, 0, 1, 0, 0],    # the main latent fires: no absorption
                          [0, 3.0, 0, 1, 0],    # only the absorber: full absorption
                          [1.0, 2.0, 0, 0, 0],  # both: partial, 1.2 / 2.2
                          [0, 0, 1.0, 0, 4.0],  # a barely aligned latent (cos 0.05) carries it: below the
                          [0, 0, 0, 0, 0]])
    X = codes @ W
    X[4] = 0.5 * torch.eye(8)[0]                 # fraction's gate (0.1), above full absorption's (0.025)
    scores = A.absorption_scores(X, codes, torch.eye(8)[0] * 3, W, [0], CFG)  # row 4: the direction lives in the
    assert scores.fraction.tolist() == pytest.approx([0, 1, 1.2 / 2.2, 0, 0], abs=1e-6)  # SAE's error: no absorber
    assert scores.full.tolist() == [False, True, False, True, False]
    assert scores.top_absorber.tolist() == [-1, 1, 1, -1, -1]
    for row in range(5):
        expected = reference_word(X[row].tolist(), codes[row].tolist(), [3.0] + [0] * 7, W.tolist(), [0])
        assert (float(scores.fraction[row]), bool(scores.full[row])) == pytest.approx(expected, abs=1e-6)


def test_the_calculation_matches_the_reference_on_random_sparse_codes():
    g = torch.Generator().manual_seed(0)
    d, width, n = 12, 40, 60
    direction = torch.randn(d, generator=g)
    W = torch.randn(width, d, generator=g) + 0.8 * direction / direction.norm()  # many latents pass the gates
    codes = torch.randn(n, width, generator=g).relu() * (torch.rand(n, width, generator=g) < 0.15)
    X = codes @ W + 0.3 * torch.randn(n, d, generator=g)
    main = [3, 17]
    scores = A.absorption_scores(X, codes, direction, W, main, CFG)
    expected = [reference_word(X[i].tolist(), codes[i].tolist(), direction.tolist(), W.tolist(), main)
                for i in range(n)]
    assert scores.fraction.tolist() == pytest.approx([f for f, _ in expected], abs=1e-5)
    assert scores.full.tolist() == [full for _, full in expected]
    assert 0 < float(scores.fraction.mean()) < 1  # the random case exercises every branch, not only zeros


# ---------------------------------------------------------------------------------------------------- synthetic letters
def synthetic_letters(absorbed: int, n_per_letter: int = 160, letters: int = 3, d: int = 32, seed: int = 0):
    """Words of `letters` letters: x = u_letter + a word direction; an SAE with one latent per letter and one per
    word direction. For letter 0, the first `absorbed` words of word 0 fire an absorbing latent (decoder u_0 + v_0,
    normalised) instead of the letter's and the word's latents: absorption as Chanin et al. describe it. Few enough
    that the absorber does not pass the feature-splitting rule. Words alternate between train and test in groups of
    four. Returns the LetterData and the absorbed words' mask among letter 0's test words."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0].T
    u, v = basis[:letters], basis[letters:letters + 4]          # letter directions, word directions
    absorber = F.normalize(u[0] + v[0], dim=0)
    W_dec = torch.cat([u, v, absorber[None]])                  # latents: letters, words, the absorber
    rows, codes, labels, taken = [], [], [], []
    for letter in range(letters):
        for i in range(n_per_letter):
            word = i % 4
            c = torch.zeros(len(W_dec))
            takes = letter == 0 and word == 0 and i // 4 < absorbed
            if takes:
                c[-1] = (u[0] + v[0]).norm()
            else:
                c[letter], c[letters + word] = 1.0, 1.0
            rows.append(c @ W_dec + 0.01 * torch.randn(d, generator=g))
            codes.append(c)
            labels.append(letter)
            taken.append(takes)
    X, Z, y, taken = torch.stack(rows), torch.stack(codes), torch.tensor(labels), torch.tensor(taken)
    test = torch.arange(len(y)) // 4 % 2 == 1
    W, b = A.letter_probes(X[~test], y[~test], C=1.0)
    data = A.LetterData(Z[~test], y[~test], X[test], Z[test], y[test], X[test].double() @ W.T + b, W, W_dec)
    return data, taken[test][y[test] == 0]


def test_a_planted_absorbing_latent_is_caught():
    data, absorbed = synthetic_letters(absorbed=6)
    result = A.score_letter(0, data, CFG)
    assert isinstance(result, LetterAbsorption), result
    assert result.split_features == [0] and result.probe_f1 == 1.0
    assert result.num_probe_true_positives == len(absorbed)
    assert result.mean_absorption_fraction == pytest.approx(float(absorbed.float().mean()))
    assert result.num_full_absorption == int(absorbed.sum()) > 0
    assert list(result.absorbing_latents) == [len(data.W_dec) - 1]  # the planted latent, nothing else


def test_a_clean_sae_scores_zero():
    data, absorbed = synthetic_letters(absorbed=0)
    assert not absorbed.any()
    for letter in range(3):
        result = A.score_letter(letter, data, CFG)
        assert result.split_features == [letter]
        assert result.mean_absorption_fraction == 0 and result.full_absorption_rate == 0


def test_a_letter_the_probe_cannot_read_is_left_out():
    data, _ = synthetic_letters(absorbed=0)
    data.test_scores[:, 1] = -1.0  # the probe never says "letter 1"
    assert A.score_letter(1, data, CFG).startswith("probe F1 0.00")


# ---------------------------------------------------------------------------------------------------- feature splitting
@pytest.mark.parametrize("f1s, kept", [
    ([0.5, 0.6, 0.61, 0.9], 2),  # stops at the first k that gains too little, even if a later k gains more
    ([0.8], 1),
    ([0.5, 0.52, 0.9], 1),       # 0.02 is not more than 0.03
    ([0.5, 0.54, 0.58, 0.62], 4),
    ([0.2, 0.2], 1),
])
def test_split_features_follow_the_f1_jump_rule(f1s, kept):
    order = [7, 3, 9, 1][:len(f1s)]
    assert A.split_features(order, f1s, 0.03) == order[:kept]


def test_k_sparse_probing_finds_split_latents():
    """Letter words fire latent 3 or latent 5 (never both): one latent explains half the words, two explain all."""
    g = torch.Generator().manual_seed(1)
    n, width = 400, 20
    y = torch.arange(n) % 4 == 0
    Z = torch.rand(n, width, generator=g) * (torch.rand(n, width, generator=g) < 0.1)
    half = torch.arange(n) % 8 == 0
    Z[:, 3], Z[:, 5] = torch.where(half, 2.0, 0.0), torch.where(y & ~half, 1.9, 0.0)
    test = torch.arange(n) // 8 % 2 == 1
    train = ~test
    order, f1s = A.k_sparse_f1s(Z[train], y[train], Z[test], y[test], max_k=4, C=1.0)
    assert set(order[:2]) == {3, 5} and len(order) == 4
    assert f1s[0] < 0.8 and f1s[1] == pytest.approx(1.0)
    assert sorted(A.split_features(order, f1s, 0.03)) == [3, 5]
    stopped = A.k_sparse_f1s(Z[train], y[train], Z[test], y[test], max_k=4, C=1.0, f1_jump_threshold=0.03)
    assert stopped == (order, f1s[:3])  # k = 3 gains nothing: k = 4 is never fitted


# ---------------------------------------------------------------------------------------------------- record
def made_result() -> A.AbsorptionResult:
    letters = [LetterAbsorption("a", 0.25, 0.1, 2, 20, 1, [4], [0.9], 0.95, {7: 3}),
               LetterAbsorption("b", 0.0, 0.0, 0, 18, 2, [5, 9], [0.7, 0.8], 0.9),
               LetterAbsorption("c", 0.5, 0.25, 4, 16, 1, [11], [0.85], 0.8, {12: 2, 13: 1})]
    config = AbsorptionConfig(bootstrap_resamples=200, min_feats_for_eval=2)
    metrics, intervals = A.summarise(letters, config)
    return A.AbsorptionResult(config=config, hook="blocks.0.hook_resid_post", sae_name="topk-96-k8", letters=letters,
                              metrics=metrics, intervals=intervals, skipped={"x": "probe F1 0.40 < 0.6"},
                              n_words={"train": 40, "test": 10}, seconds=1.5)


def test_the_metrics_are_saebench_s():
    result = made_result()
    assert set(result.metrics) == {"mean"}
    assert set(result.metrics["mean"]) == {
        "mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features",
        "std_dev_absorption_fraction_score", "std_dev_full_absorption_score", "std_dev_num_split_features"}
    mean = result.metrics["mean"]
    assert mean["mean_absorption_fraction_score"] == pytest.approx(0.25)
    assert mean["std_dev_absorption_fraction_score"] == pytest.approx(0.25)  # sample std of 0.25, 0, 0.5
    assert mean["mean_num_split_features"] == pytest.approx(4 / 3)
    interval = result.intervals["mean.mean_absorption_fraction_score"]
    assert interval.method == "bootstrap" and interval.n == 3 and interval.low <= 0.25 <= interval.high


def test_the_saebench_record(tmp_path):
    from helpers import make_sae

    from saelab.evals.saebench import read_intervals, write_output

    result, sae = made_result(), make_sae()
    record = result.saebench(sae)
    assert record["eval_type_id"] == "absorption_first_letter" == A.EVAL_TYPE_ID
    assert record["eval_result_metrics"] == result.metrics
    assert record["eval_result_details"][0] == {
        "first_letter": "a", "mean_absorption_fraction": 0.25, "full_absorption_rate": 0.1, "num_full_absorption": 2,
        "num_probe_true_positives": 20, "num_split_features": 1}
    assert record["eval_config"]["f1_jump_threshold"] == 0.03 and record["eval_config"]["max_k_value"] == 10
    assert set(read_intervals(record)) == {"mean.mean_absorption_fraction_score", "mean.mean_full_absorption_score",
                                           "mean.mean_num_split_features"}
    assert write_output(record, tmp_path).name == "absorption_first_letter.json"


def test_save_and_load_round_trip(tmp_path):
    result = made_result()
    result.save(tmp_path)
    again = A.AbsorptionResult.load(tmp_path)
    assert again.to_dict() == result.to_dict()
    assert again.letters[2].absorbing_latents == {12: 2, 13: 1} and isinstance(again.config, AbsorptionConfig)
    assert "mean_absorption_fraction_score: 0.25" in (tmp_path / "absorption_first_letter.md").read_text()


@pytest.mark.parametrize("fields, said", [
    (dict(prompt_template="{wrd} has:"), "{word} slot"),
    (dict(train_test_fraction=1.0), "train_test_fraction"),
    (dict(max_k_value=0), "max_k_value"),
    (dict(min_feats_for_eval=1), "min_feats_for_eval"),
])
def test_bad_config_is_refused(fields, said):
    with pytest.raises(ValueError, match=said.replace("{", r"\{").replace("}", r"\}")):
        AbsorptionConfig(**fields)


# ---------------------------------------------------------------------------------------------------- tiny model
def test_vocabulary_and_contexts_of_the_tiny_model(tiny_model):
    vocab = A.first_letter_vocab(tiny_model.tokenizer)
    words = [w for group in vocab.values() for w in group]
    assert len(words) > 20
    for letter, group in vocab.items():
        for w in group:
            assert w.text[0] == " " and len(w.text) >= 3 and w.text[1:].isascii() and w.text[1:].isalpha()
            assert w.text[1].lower() == letter == A.LETTERS[w.letter]
            assert tiny_model.tokenizer(w.text, add_special_tokens=False)["input_ids"] == [w.token]
    config = AbsorptionConfig(words_per_prompt=5, max_icl_examples=3)
    rows, positions = A.icl_contexts(tiny_model.tokenizer, words[:12], config, seed=0)
    assert [len(p) for p in positions] == [5, 5, 2]
    read = [rows[c][i] for c, where in enumerate(positions) for i in where]
    assert read == [w.token for w in words[:12]]
    assert rows[0][0] == tiny_model.tokenizer.bos_token_id


def test_word_activations_are_each_word_s_own(tiny_model):
    """Packed contexts read back in the order of the words, equal to a plain forward of each context."""
    words = [w for group in A.first_letter_vocab(tiny_model.tokenizer).values() for w in group][:11]
    config = AbsorptionConfig(words_per_prompt=4, max_icl_examples=2)
    hook = "blocks.0.hook_resid_post"
    X = A.word_activations(tiny_model, hook, words, config, seed=3)
    rows, positions = A.icl_contexts(tiny_model.tokenizer, words, config, seed=3)
    expected = [tiny_model.activations_at(torch.tensor([row]), hook, positions=None)[hook][0, where]
                for row, where in zip(rows, positions)]
    torch.testing.assert_close(X, torch.cat(expected), atol=1e-5, rtol=1e-4)


def letter_knowing_activations(model, hook, words, config, *, seed, progress=False, desc=""):
    """In place of the tiny random model's activations (which know no first letters): a direction per letter plus
    noise, so every letter can be probed and run() goes through all its steps."""
    g = torch.Generator().manual_seed(seed)
    letters = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))[0][:26]
    return torch.stack([10 * letters[w.letter] + torch.randn(64, generator=g) for w in words])


def test_run_on_the_tiny_model(tiny_model, tmp_path, monkeypatch):
    from helpers import make_sae

    monkeypatch.setattr(A, "word_activations", letter_knowing_activations)
    sae = make_sae(width=96, k=8)
    config = AbsorptionConfig(max_words_per_letter=12, max_k_value=3, min_feats_for_eval=2, bootstrap_resamples=50)
    result = A.run(sae, tiny_model, config, progress=False)
    assert len(result.letters) >= 5 and result.n_words["train"] > result.n_words["test"] > 0
    assert all(s.probe_f1 >= 0.6 for s in result.letters)
    mean = result.metrics["mean"]
    assert 0 <= mean["mean_absorption_fraction_score"] <= 1 and 0 <= mean["mean_full_absorption_score"] <= 1
    assert 1 <= mean["mean_num_split_features"] <= 3
    assert set(result.skipped) | {s.first_letter for s in result.letters} == set(A.LETTERS)
    result.save(tmp_path)
    assert A.AbsorptionResult.load(tmp_path).to_dict() == result.to_dict()


def test_a_model_that_does_not_know_first_letters_is_an_error(tiny_model):
    from helpers import make_sae

    config = AbsorptionConfig(max_words_per_letter=12, words_per_prompt=16, max_icl_examples=2, max_k_value=3)
    with pytest.raises(DataError, match="letters can be scored .* fewer than min_feats_for_eval=20"):
        A.run(make_sae(width=96, k=8), tiny_model, config, progress=False)


def test_an_sae_without_a_hook_is_refused(tiny_model):
    from helpers import make_sae

    with pytest.raises(ValueError, match="hook_name is empty"):
        A.run(make_sae(hook_name=""), tiny_model, progress=False)


# ---------------------------------------------------------------------------------------------------- slow: SmolLM2
@pytest.mark.slow
def test_absorption_of_a_quickly_trained_smollm2_sae(smollm2, smollm2_acts, tmp_path):
    """A TopK SAE trained for half a minute on 20k tokens of block 3: the residual stream knows most first letters
    (probe F1), main latents are found, and the scores are fractions."""
    from saelab.activations import ActivationStore
    from saelab.training import TrainConfig, Trainer

    store = ActivationStore(smollm2_acts, batch_size=256)
    trainer = Trainer(store, [dict(arch="topk", width=1152, k=16, lr=2e-3)],
                      TrainConfig(tokens=120 * 256, batch_size=256, log_every=60), out=tmp_path, progress=False)
    (trained,) = trainer.fit()
    config = AbsorptionConfig(max_words_per_letter=30, max_k_value=5, min_feats_for_eval=10, bootstrap_resamples=200)
    result = A.run(trained.sae, smollm2, config, progress=False)
    mean = result.metrics["mean"]
    assert len(result.letters) >= 10, result.table()
    assert all(s.probe_f1 >= 0.6 and 1 <= s.num_split_features <= 5 for s in result.letters)
    assert 0 <= mean["mean_absorption_fraction_score"] <= 0.8, result.table()
    assert 0 <= mean["mean_full_absorption_score"] <= 0.8, result.table()
