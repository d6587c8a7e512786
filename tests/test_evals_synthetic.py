"""The synthetic ground-truth benchmark: the generator gives the statistics it was asked for, and the scores tell a
perfect dictionary (1), an absorbing one (caught) and a random one (low) apart; a real TopK trained on the stream
through train() beats random."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import make_sae

from saelab import SAESpec, TrainConfig, train
from saelab.evals.synthetic import (HOOK, SyntheticConfig, SyntheticData, SyntheticScores, score_synthetic,
                                    unit)

HIERARCHY = dict(n_parents=4, children_per_parent=2, child_rate=0.5)
CLEAN = SyntheticConfig(n_features=80, d=64, p_max=0.03, p_min=0.005, max_cosine=0.15, magnitude_log_std=0.1,
                        firing_log_std=0.1, **HIERARCHY)
"""Nearly orthogonal features of narrow magnitudes, so that a planted dictionary reads every firing right."""


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These small tensors run many times faster on one thread than on two on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fired(data: SyntheticData, tokens: int = 40_000) -> torch.Tensor:
    return data.fires(tokens, data.generator(0, 0))


def test_firing_frequencies_follow_the_power_law_asked_for():
    data = SyntheticData(SyntheticConfig(n_features=64, d=32, p_max=0.2, p_min=0.02, exponent=1.0,
                                         correlation_groups=4, group_correlation=0.6, **HIERARCHY))
    base = data.base_probabilities
    assert base[0] == pytest.approx(0.2) and base[-1] == pytest.approx(0.02) and bool((base.diff() <= 0).all())
    seen = fired(data).float().mean(0)
    tolerance = 5 * (data.probabilities * (1 - data.probabilities) / 40_000).sqrt() + 1e-3
    assert bool(((seen - data.probabilities).abs() <= tolerance).all())
    parents, children = data.pairs
    assert data.probabilities[children] == pytest.approx(base[parents] * 0.5)


def test_children_never_fire_without_their_parent():
    data = SyntheticData(SyntheticConfig(n_features=64, d=32, p_max=0.3, p_min=0.05, **HIERARCHY))
    fires = fired(data)
    parents, children = data.pairs
    assert len(children) == 8 and set(parents.tolist()) == {0, 1, 2, 3}  # the most frequent features are parents
    assert not bool((fires[:, children] & ~fires[:, parents]).any())
    assert bool(fires[:, children].any(0).all())


def test_a_correlation_group_raises_joint_firing():
    def joint_excess(correlation: float) -> float:
        data = SyntheticData(SyntheticConfig(n_features=32, d=16, p_max=0.2, p_min=0.1, correlation_groups=2,
                                             group_correlation=correlation))
        fires = fired(data).float()
        together = fires.T @ fires / len(fires)
        apart = torch.outer(fires.mean(0), fires.mean(0))
        same = data.group_of[:, None] == data.group_of[None, :]
        same.fill_diagonal_(False)
        return float((together / apart)[same].mean())

    assert joint_excess(0.0) == pytest.approx(1.0, abs=0.05)
    assert joint_excess(0.6) > 1.5


def test_the_dictionary_keeps_the_cosines_asked_for():
    data = SyntheticData(SyntheticConfig(n_features=64, d=32, max_cosine=0.3, child_parent_cosine=0.6, **HIERARCHY))
    assert data.features.norm(dim=1) == pytest.approx(torch.ones(64), abs=1e-5)
    assert data.reached_max_cosine <= 0.3 + 1e-3
    parents, children = data.pairs
    assert (data.features[parents] * data.features[children]).sum(1) == pytest.approx(torch.full((8,), 0.6), abs=1e-5)


def test_the_stream_is_seeded_bounded_and_gives_the_true_codes():
    data = SyntheticData(SyntheticConfig(n_features=64, d=32, **HIERARCHY))
    source = data.source(batch_size=256, tokens=1000)
    batches = list(source)
    assert len(batches) == 3 and source.d == {HOOK: 32} and source.hooks == [HOOK]
    assert torch.equal(batches[1].acts[HOOK], list(source)[1].acts[HOOK])
    assert not torch.equal(batches[0].acts[HOOK], list(data.source(batch_size=256, tokens=1000, seed=1))[0].acts[HOOK])
    batch, codes = next(source.with_codes())
    assert torch.allclose(batch.acts[HOOK], codes @ data.features, atol=1e-5)  # noise=0: the codes make x
    assert bool((codes >= 0).all()) and torch.equal(batch.acts[HOOK], batches[0].acts[HOOK])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="p_min"):
        SyntheticConfig(p_min=0.5, p_max=0.1)
    with pytest.raises(ValueError, match="children"):
        SyntheticConfig(n_features=10, n_parents=5)
    with pytest.raises(ValueError, match="group_correlation"):
        SyntheticConfig(group_correlation=1.0)
    with pytest.raises(ValueError, match="d_in"):
        score_synthetic(make_sae("topk", d_in=16, width=32, k=2), SyntheticData(CLEAN), tokens=512)


def planted(data: SyntheticData):
    """A JumpReLU whose encoder and decoder are the true dictionary: it reads each feature where it fires."""
    sae = make_sae("jumprelu", d_in=data.config.d, width=data.config.n_features, hook_name=HOOK, bias_std=0,
                   threshold_range=None)
    with torch.no_grad():
        sae.W_dec.copy_(data.features)
        sae.W_enc.copy_(data.features.T)
        sae.log_threshold.fill_(math.log(0.5))
    return sae


def test_the_true_dictionary_scores_perfectly(tmp_path):
    data = SyntheticData(CLEAN)
    scores = score_synthetic(planted(data), data, tokens=16_384)
    assert scores.mcc == pytest.approx(1, abs=1e-5) and scores.recovery == pytest.approx(1, abs=1e-5)
    assert scores.f1 > 0.99 and scores.uniqueness == 1 and scores.absorption == 0 and scores.fvu < 0.03
    assert scores.absorption_parents == 4 and scores.l0 == pytest.approx(scores.true_l0, rel=0.02)
    again = SyntheticScores.load(scores.save(tmp_path))
    assert again.to_dict() == scores.to_dict() and "| mcc | 1 |" in (tmp_path / "synthetic.md").read_text()


def test_an_absorbing_dictionary_is_caught():
    """Each child's latent writes parent + child, and the parent's latent is silenced wherever a child fires: the
    sparser code that absorption buys."""
    data = SyntheticData(CLEAN)
    sae = planted(data)
    with torch.no_grad():
        for parent, child in zip(*data.pairs):
            sae.W_dec[child] = unit((data.features[parent] + data.features[child])[None])[0]
            sae.W_enc[:, child] *= math.sqrt(2)  # a code sized to rebuild parent + child
            sae.W_enc[:, parent] -= 2 * data.features[child]  # silent wherever any of its children fires
    scores = score_synthetic(sae, data, tokens=16_384)
    assert scores.absorption > 0.9 and scores.mcc > 0.9


def test_a_random_dictionary_scores_low():
    data = SyntheticData(CLEAN)
    scores = score_synthetic(make_sae("topk", d_in=64, width=80, k=4, hook_name=HOOK), data, tokens=8192)
    assert scores.mcc < 0.5 and scores.f1 < 0.2 and scores.uniqueness < 0.8
    assert scores.absorption_parents == 0  # it found no parent, so it absorbs none


def test_a_topk_trained_through_train_beats_random():
    data = SyntheticData(SyntheticConfig(n_features=48, d=32, p_max=0.08, p_min=0.02, noise=0.02, **HIERARCHY))
    (trained,) = train(data.source(batch_size=512), [SAESpec(arch="topk", width=48, k=3)],
                       TrainConfig(tokens=512 * 150, batch_size=512), progress=False)
    scores = score_synthetic(trained.sae, data, tokens=8192)
    chance = score_synthetic(make_sae("topk", d_in=32, width=48, k=3, hook_name=HOOK), data, tokens=8192)
    assert scores.mcc > chance.mcc + 0.3 and scores.f1 > chance.f1 + 0.3 and scores.fvu < 0.5


def test_the_table_script_gives_mean_and_range_over_seeds():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "synthetic_table.py"
    spec = importlib.util.spec_from_file_location("synthetic_table", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.spec("relu", 64, 8).options["target_l0"] == 8 and script.spec("matryoshka", 64, 8).k == 8
    rows = [{"arch": "topk", "l0_asked": 8, "seed": s, **{m: 0.5 + s / 10 for m in script.METRICS}} for s in range(3)]
    assert "| topk | 8 | 0.6 (0.5-0.7) |" in script.table(rows)


def test_the_suite_retrains_an_saes_architecture_on_planted_features_once_per_seed(tmp_path):
    from saelab.evals.saebench import read_intervals, write_output
    from saelab.evals.synthetic_recipe import SyntheticEvalConfig, run

    config = SyntheticEvalConfig(data=CLEAN, l0=3, width=80, tokens=40_960, batch_size=1024, seeds=2,
                                 score_tokens=8192)
    saved = make_sae("topk", d_in=576, width=4608, k=32)  # any SAE: only its architecture is used
    result = run(saved, None, config, progress=False)
    assert [s["seed"] for s in result.per_seed] == [0, 1] and result.arch == "topk"
    mcc = result.intervals["mcc"]
    assert mcc.n == 2 and mcc.min <= mcc.estimate <= mcc.max and mcc.estimate > 0.5  # random scores far lower
    record = result.saebench(saved)
    assert record["eval_type_id"] == "saelab_synthetic" and set(record["eval_result_metrics"]["synthetic"]) >= {
        "mcc", "f1", "uniqueness", "absorption", "fvu"}
    path = write_output(record, tmp_path)
    assert read_intervals(json.loads(path.read_text()))["synthetic.mcc"].n == 2
