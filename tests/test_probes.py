"""saelab.analysis: labelled data, document splits, probes (no test leakage), concept directions, steering, CLI."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import saelab.analysis.report as report
from saelab.analysis import (CausalInnerProduct, Features, LabelledTexts, LogitDiff, Steer, from_templates,
                             load_labelled, neuron_hook, run_probes, split_documents, sweep, tasks)
from saelab.analysis.concepts import SPLITS, calendar, from_sources, languages
from saelab.analysis.probes import extract, fit_probes
from saelab.analysis.report import ProbeConfig, run_probe_study
from saelab.analysis.steering import SteerConfig, SteeringPoint, SteeringResult, run_steering, target_of
from saelab.errors import DataError, HookError
from saelab.sae import SAEConfig, create_sae

HOOK = "blocks.0.hook_resid_post"


def planted(n=600, d=40, seed=0, strength=1.5):
    """Gaussian activations with a binary concept along a random unit direction u."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    u = torch.randn(d, generator=g)
    u /= u.norm()
    return torch.randn(n, d, generator=g) + strength * (2 * y[:, None] - 1) * u, y, u


def docs_data(n_docs=30, per_doc=4, labels=("a", "b")):
    texts, ys, docs = [], [], []
    for d in range(n_docs):
        for j in range(per_doc):
            texts.append(f"t{len(texts)}")
            ys.append(labels[d % len(labels)])
            docs.append(f"d{d}")
    return LabelledTexts(texts, ys, docs, "synthetic")


# ------------------------------------------------------------------------------------------- probes on planted data
def test_a_planted_linear_concept_is_recovered():
    X, y, u = planted()
    probes = fit_probes(X[:360], y[:360], X[360:480], y[360:480], ks=(1, 8))
    by = {(p.method, p.k): p for p in probes}
    for method in ("logistic", "diff_of_means", "diff_of_means_whitened"):
        probe = by[(method, None)]
        assert probe.score(X[480:], y[480:])["accuracy"] > 0.85
        assert probe.score(X[480:], y[480:])["auc"] > 0.93
        assert float(probe.direction() @ u) > 0.85, method
    assert by[("logistic", None)].C is not None


def test_a_planted_single_neuron_is_found_at_k_1():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 2, (500,), generator=g)
    X = torch.randn(500, 200, generator=g).relu()
    X[:, 37] = 2.0 * y + 0.3 * torch.randn(500, generator=g)
    for probe in fit_probes(X[:300], y[:300], X[300:400], y[300:400], ks=(1,),
                            methods=("sparse_mean_diff", "sparse_l1")):
        assert probe.features == [37], probe.method
        assert probe.score(X[400:], y[400:])["accuracy"] > 0.95


def fake_extract(X):
    """Stand-in for extract: text 't{i}' -> row i of X, for every feature set."""

    def extract(model, texts, features, positions="mean", batch_size=None, names=None):
        rows = [int(t[1:]) for t in texts]
        return {f.name: X[rows] for f in features}

    return extract


def test_no_test_example_is_used_for_selection_standardisation_or_C(monkeypatch):
    """Feature 1 equals the label on the test split only, and is noise elsewhere: a pipeline that let test examples
    into ranking, the L1 path, standardisation or the choice of C would pick it (and differ when the test rows
    change). Feature 0 carries the concept weakly everywhere."""
    data = docs_data(60, 4)
    split = split_documents(data, seed=0)
    test_rows = torch.tensor([i for i in split["test"]])
    labels = torch.tensor([1 if label == "b" else 0 for label in data.labels])
    g = torch.Generator().manual_seed(0)
    X = torch.randn(len(data), 6, generator=g)
    X[:, 0] += 0.8 * labels
    X[test_rows, 1] = 5.0 * labels[test_rows]

    def run(features_matrix):
        monkeypatch.setattr(report, "extract", fake_extract(features_matrix))
        return run_probes(SimpleNamespace(name="fake"), data, [Features("h")], ks=(1, 2), seed=0).records

    leaky = run(X)
    for r in leaky:
        if r.k == 1:
            assert r.selected == [0] and r.test_accuracy < 0.9, r
    other = X.clone()
    other[test_rows] = torch.randn(len(test_rows), 6, generator=g) * 100  # wildly different test examples
    for a, b in zip(leaky, run(other)):
        assert (a.method, a.k, a.C, a.selected, a.val_accuracy) == (b.method, b.k, b.C, b.selected, b.val_accuracy)


def test_run_probes_is_deterministic_with_a_seed(monkeypatch):
    data = docs_data(40, 3)
    X, _, _ = planted(len(data), 12, seed=3)
    monkeypatch.setattr(report, "extract", fake_extract(X))
    a = run_probes(SimpleNamespace(name="fake"), data, [Features("h")], ks=(1, 2), seed=7)
    b = run_probes(SimpleNamespace(name="fake"), data, [Features("h")], ks=(1, 2), seed=7)
    assert a.to_dict()["records"] == b.to_dict()["records"]


# ------------------------------------------------------------------------------------------- data and splits
def test_split_by_document_never_cuts_a_document_and_is_seeded():
    data = docs_data(45, 5, labels=("a", "b", "c"))
    split = split_documents(data, seed=1)
    docs = {s: {data.docs[i] for i in split[s]} for s in SPLITS}
    assert not (docs["train"] & docs["val"]) and not (docs["train"] & docs["test"]) and not (docs["val"] & docs["test"])
    assert sorted(i for s in SPLITS for i in split[s]) == list(range(len(data)))
    for s in SPLITS:
        assert {data.labels[i] for i in split[s]} == {"a", "b", "c"}
    assert 0.5 < len(split["train"]) / len(data) < 0.7
    assert split_documents(data, seed=1) == split and split_documents(data, seed=2) != split


def test_templates_split_by_word():
    data = calendar()
    split = split_documents(data)
    words = {s: {data.docs[i] for i in split[s]} for s in SPLITS}
    assert not words["train"] & words["test"]
    assert data.texts[0] == "I will see you on Monday." and tasks(data, split)[0].positive == "calendar"


def test_one_vs_rest_is_balanced_with_negatives_from_every_class():
    counts = {"a": 60, "b": 20, "c": 20, "d": 20}
    texts, labels, docs = [], [], []
    for label, n in counts.items():
        for i in range(n):
            texts.append(f"{label}{i}")
            labels.append(label)
            docs.append(f"{label}{i // 2}")
    data = LabelledTexts(texts, labels, docs)
    jobs = tasks(data, split_documents(data), seed=0)
    assert [t.positive for t in jobs] == ["a", "b", "c", "d"]
    for task in jobs:
        for s in SPLITS:
            assert sum(task.y[s]) * 2 == len(task.y[s])  # as many negatives as positives
        negatives = [data.labels[i] for i, y in zip(task.rows["train"], task.y["train"]) if y == 0]
        assert set(negatives) == set(counts) - {task.positive}
        spread = [negatives.count(c) for c in set(negatives)]
        assert max(spread) - min(spread) <= 1  # drawn evenly from the other classes


def test_loaders(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "hello there", "label": "x", "doc": "1"}\n{"text": "bye", "label": "y"}\n')
    data = load_labelled(tmp_path / "d.jsonl")
    assert data.labels == ["x", "y"] and data.docs[0] == "1"
    (tmp_path / "d.csv").write_text("text,label\nhello,1\nworld,0\n")
    assert load_labelled(tmp_path / "d.csv").labels == ["1", "0"]
    for label in ("poems", "recipes"):
        (tmp_path / label).mkdir()
        for i in range(3):
            (tmp_path / label / f"{i}.txt").write_text(" ".join(f"{label}{j}" for j in range(30)))
    data = from_sources({label: tmp_path / label for label in ("poems", "recipes")}, words=10)
    assert len(data) == 18 and len(set(data.docs)) == 6
    assert len(from_templates(["a {} b", "{} c"], {"x": ["1", "2"], "y": ["3"]})) == 6


@pytest.mark.parametrize("line,shown", [('"label": null', "null"), ('"label": ""', '""'), ('"label": [1, 2]', "[1, 2]"),
                                        ('"label": {"a": 1}', '{"a": 1}'), ('"label": NaN', "nan")])
def test_a_null_empty_or_non_scalar_label_is_refused_with_its_file_and_line(tmp_path, line, shown):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a fine text", "label": "x"}\n\n{"text": "another text", ' + line + '}\n')
    with pytest.raises(DataError, match=re.escape(f"{path}, line 3: the label is {shown}, not a class name")):
        load_labelled(path)
    (tmp_path / "d.csv").write_text("text,label\nhello,1\nworld\n")  # a row one cell short: no label
    with pytest.raises(DataError, match="d.csv, line 3: the label is null"):
        load_labelled(tmp_path / "d.csv")
    with pytest.raises(DataError, match="example 1: the label is null"):
        LabelledTexts(["one", "two"], ["a", None], ["1", "2"])
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text("".join(json.dumps({"text": f"text {i}", "label": x}) + "\n" for i, x in enumerate([3, True, 0.5])))
    assert load_labelled(numbers).labels == ["3", "True", "0.5"]  # numbers and booleans are class names


def test_languages_from_iso_codes():
    try:
        data = languages()
    except DataError as error:
        pytest.skip(f"iso-codes is not installed: {error}")
    assert data.classes == ["de", "es", "fr", "it", "nl"]
    germany = data.texts[data.labels.index("de")]
    assert "," in germany and len(data) > 500


def test_bad_input_gives_clear_errors(tiny_model, tmp_path):
    with pytest.raises(DataError, match="empty"):
        LabelledTexts(["fine", "  "], ["a", "b"], ["1", "2"])
    one = LabelledTexts(["x", "y", "z"], ["a", "a", "a"], ["1", "2", "3"])
    with pytest.raises(DataError, match="two classes"):
        split_documents(one)
    with pytest.raises(DataError, match="at least 3"):
        split_documents(LabelledTexts(["x", "y", "z", "w"], ["a", "a", "b", "b"], ["1", "1", "2", "3"]))
    (tmp_path / "bad.jsonl").write_text('{"text": "", "label": "x"}\n')
    with pytest.raises(DataError, match="line 1: the text is empty"):
        load_labelled(tmp_path / "bad.jsonl")
    X, y, _ = planted(100, 5)
    with pytest.raises(ValueError, match="k=8 is larger than the 5 features"):
        fit_probes(X[:60], y[:60], X[60:80], y[60:80], ks=(1, 8))
    with pytest.raises(DataError, match="both classes"):
        fit_probes(X[:60], torch.zeros(60), X[60:80], y[60:80], ks=(1,))
    with pytest.raises(DataError, match="text 2 is .* longer than the model's context"):
        extract(tiny_model, ["short", "also short", "word " * 300], [Features(HOOK)])
    with pytest.raises(ValueError, match="out of range"):
        extract(tiny_model, ["short text"], [Features(HOOK)], positions=40)
    sae = create_sae(SAEConfig(arch="topk", d_in=64, width=32, k=4, hook_name="blocks.1.hook_resid_post"))
    with pytest.raises(ValueError, match="trained on blocks.1.hook_resid_post, not blocks.0"):
        Features(HOOK, sae=sae)
    wide = create_sae(SAEConfig(arch="topk", d_in=128, width=32, k=4, hook_name=HOOK))
    with pytest.raises(ValueError, match="d_in=128 but hook blocks.0.hook_resid_post gives 64"):
        extract(tiny_model, ["short text"], [Features(sae=wide)])
    with pytest.raises(HookError, match="no blocks.7.mlp.hook_post"):
        neuron_hook(tiny_model, 7)


# ------------------------------------------------------------------------------------------- on the tiny model
def test_probes_read_residual_neurons_and_sae_latents_side_by_side(tiny_model, tmp_path):
    torch.manual_seed(0)
    sae = create_sae(SAEConfig(arch="topk", d_in=64, width=48, k=6, hook_name=HOOK))
    data = from_templates(["{} is here.", "I saw {} today."],
                          {"x": ["red", "blue", "green", "black", "white", "pink"],
                           "y": ["one", "two", "three", "four", "five", "six"]})
    features = [Features(HOOK), Features(neuron_hook(tiny_model, 1)), Features(sae=sae)]
    X = extract(tiny_model, data.texts, features, positions="mean")
    assert [x.shape[1] for x in X.values()] == [64, 128, 48]
    by_hand = sae.encode(tiny_model.activations_at(data.texts[:1], HOOK, None)[HOOK][0, 1:]).mean(0)
    torch.testing.assert_close(X[features[2].name][0], by_hand, atol=1e-5, rtol=1e-4)
    results = run_probes(tiny_model, data, features, ks=(1, 2))
    assert {r.kind for r in results.records} == {"resid", "neurons", "sae"}
    folder = results.save(tmp_path / "out")
    again = report.ProbeResults.load(folder)
    assert again.records == results.records and (folder / "accuracy_vs_k.png").stat().st_size > 0
    assert again.to_dict() == results.to_dict() and again.table() == results.table()
    assert "| resid @ blocks.0.hook_resid_post |" in (folder / "probes.md").read_text()


def test_every_probing_result_loads_back_from_what_it_saved(tmp_path):
    probes = report.ProbeResults(model="m", data={"name": "d", "fractions": [0.6, 0.2, 0.2], "ks": [1, 2]},
                                 records=[report.ProbeRecord("t", "resid @ h", "resid", "h", "sparse_mean_diff", 2, 0.1, 0.75,
                                                             0.5, 0.625, 10, 4, 4, [3, 1])], seconds=1.5)
    steering = SteeringResult("m", "add alpha at h", "logit difference", 3.25,
                              [SteeringPoint(0.0, 1.0, 0.0, 3.25), SteeringPoint(1.0, 2.5, 0.125, 3.5, ["x y"])], 40,
                              seconds=0.25)
    for result in (probes, steering):
        result.save(tmp_path)
        again = type(result).load(tmp_path)
        assert again == result and again.to_dict() == result.to_dict() and again.table() == result.table()
        assert list(result.to_dict())[-3:] == ["seconds", "schema_version", "saelab_version"]
    assert SteeringResult.load(tmp_path / "steering.json") == steering and (tmp_path / "steering.png").exists()
    newer = {**probes.to_dict(), "schema_version": 99}
    with pytest.raises(ValueError, match="schema_version 99"):
        report.ProbeResults.from_dict(newer)
    with pytest.raises(ValueError, match="unknown field 'colour'"):
        report.ProbeResults.from_dict({**probes.to_dict(), "colour": 1})
    with pytest.raises(FileNotFoundError, match="matching.json"):
        report.ProbeResults.load(tmp_path / "matching.json")


def test_probe_and_steer_configs_hold_every_setting_with_checked_values():
    config = ProbeConfig(model="m", hooks="h", data="calendar")
    assert (config.k, config.positions, config.seed, config.batch_size, config.neurons) == ([1, 2, 4, 8, 16], "mean",
                                                                                         0, 16, False)
    assert report.position_of(ProbeConfig("m", "h", "d", positions=-1).positions) == -1
    with pytest.raises(ValueError, match="positions must be"):
        ProbeConfig("m", "h", "d", positions="first")
    with pytest.raises(ValueError, match="batch_size"):
        ProbeConfig("m", "h", "d", batch_size=0)
    assert config.splits == 1 and ProbeConfig("m", "h", "d", splits=5).splits == 5
    with pytest.raises(ValueError, match="splits"):
        ProbeConfig("m", "h", "d", splits=0)
    steer = SteerConfig(model="m", prompts="a|b")
    assert (steer.alphas, steer.new_tokens, steer.side_texts, steer.side_words) == ([0, 0.25, 0.5, 1, 2], 12, 16, 48)
    assert steer.unit is None  # separation with data, norm for an SAE's decoder row
    with pytest.raises(ValueError, match="give a target"):
        target_of(steer)
    assert target_of(SteerConfig("m", "a|b", up=" x, y", down=" z")).up == [" x", " y"]


def test_the_probe_and_steering_studies_run_from_their_configs(tiny_model, tmp_path):
    rows = [{"text": f"{w} is {c}.", "label": lab, "doc": w} for lab, words in
            {"colour": ["red", "blue", "green", "pink", "black"], "number": ["one", "two", "three", "four", "five"]}.items()
            for w in words for c in ("here", "there")]
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = ProbeConfig(model="unused", hooks="blocks.{0,1}.hook_resid_post", data=str(data), k=[1, 2], neurons=True)
    results = run_probe_study(config, model=tiny_model)
    assert {r.kind for r in results.records} == {"resid", "neurons"} and results.data["ks"] == [1, 2]
    with pytest.raises(ValueError, match="k=999 is larger"):
        run_probe_study(ProbeConfig("unused", HOOK, str(data), k=[999]), model=tiny_model)
    steer = SteerConfig(model="unused", prompts="It is|Look at", hook=HOOK, data=str(data), positive="colour",
                        alphas=[0, 1], up=" the", side_texts=2, side_words=10)
    result = run_steering(steer, model=tiny_model)
    assert [p.alpha for p in result.points] == [0, 1] and "add alpha" in result.steer
    with pytest.raises(ValueError, match="needs a latent"):
        run_steering(SteerConfig("unused", "It is", sae=str(tmp_path), up=" the", side_texts=2), model=tiny_model)


def test_causal_inner_product(tiny_model):
    causal = CausalInnerProduct.from_model(tiny_model)
    x, y = torch.randn(64), torch.randn(64)
    assert abs(causal.cosine(x, x) - 1) < 1e-6
    assert abs(float(causal.whiten(x) @ causal.whiten(y)) - causal.inner(x, y)) < 1e-3 * abs(causal.inner(x, x))


def test_steering_moves_the_target_logit_and_kl_grows_with_alpha(tiny_model):
    target_word = " the"
    token = tiny_model.tokenizer(target_word, add_special_tokens=False)["input_ids"][0]
    hook = "blocks.1.hook_resid_post"
    direction = tiny_model.bridge.W_U[:, token].detach()  # the target's unembedding: raises its logit
    steer = Steer.direction(tiny_model, hook, direction, ["Return the value of x"])
    side = ["A list is a sequence of items in order", "The quick brown fox jumps"]
    result = sweep(tiny_model, steer, [0.5, 1, 2, 4], LogitDiff(["Return a value", "The list"], [target_word]), side)
    assert [p.alpha for p in result.points] == [0, 0.5, 1, 2, 4]
    targets, kls = [p.target for p in result.points], [p.kl for p in result.points]
    assert all(b > a for a, b in zip(targets, targets[1:])) and targets[-1] - targets[0] > 0.5
    assert kls[0] == pytest.approx(0, abs=1e-6) and all(b > a for a, b in zip(kls, kls[1:]))
    sae = create_sae(SAEConfig(arch="topk", d_in=64, width=32, k=4, hook_name=hook))
    clamped = sweep(tiny_model, Steer.clamp(sae, 3), [0, 5], LogitDiff(["The list"], [target_word]), side)
    assert clamped.points[1].kl > 0 and clamped.seconds > 0
    with pytest.raises(ValueError, match="out of range"):
        Steer.clamp(sae, 99)
    with pytest.raises(DataError, match="one-token words"):
        LogitDiff(["x"], [" Monday Tuesday Wednesday"]).measure(tiny_model, None)


def test_probe_and_steer_commands(tiny_model_dir, tmp_path):
    from saelab.cli import main

    rows = [{"text": f"{w} is {c}.", "label": lab, "doc": w} for lab, words in
            {"colour": ["red", "blue", "green", "pink", "black"], "number": ["one", "two", "three", "four", "five"]}.items()
            for w in words for c in ("here", "there")]
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "probe"
    assert main(["probe", "--model", str(tiny_model_dir), "--hooks", "blocks.{0,1}.hook_resid_post", "--data",
                 str(data), "--k", "1,2", "--neurons", "--out", str(out)]) == 0
    saved = json.loads((out / "probes.json").read_text())
    assert saved["schema_version"] == 1 and {r["kind"] for r in saved["records"]} == {"resid", "neurons"}
    assert main(["probe", "--model", str(tiny_model_dir), "--hooks", HOOK, "--data", str(data), "--k", "999",
                 "--out", str(out)]) == 2
    assert main(["steer", "--model", str(tiny_model_dir), "--hook", HOOK, "--data", str(data), "--positive",
                 "colour", "--alphas", "0,1", "--prompts", "It is|Look at", "--up", " the", "--side-texts", "2",
                 "--side-words", "10", "--out", str(tmp_path / "steer")]) == 0
    assert len(json.loads((tmp_path / "steer" / "steering.json").read_text())["points"]) == 2


# ------------------------------------------------------------------------------------------- intervals over splits
def test_mean_interval_is_students_t_and_covers_the_mean_about_95_percent_of_the_time():
    from saelab.analysis.probes import mean_interval

    mean, low, high = mean_interval([0.7, 0.8, 0.9])  # sd 0.1, t(0.975, 2 df) = 4.302653
    assert (mean, high - mean, mean - low) == (pytest.approx(0.8), pytest.approx(0.248414, abs=1e-5),
                                               pytest.approx(0.248414, abs=1e-5))
    assert mean_interval([0.6]) == (0.6, 0.6, 0.6)
    g = torch.Generator().manual_seed(0)
    for n in (3, 10):
        draws = 0.8 + 0.05 * torch.randn(2000, n, generator=g)
        covered = [low <= 0.8 <= high for low, high in (mean_interval(row.tolist())[1:] for row in draws)]
        assert 0.93 < sum(covered) / len(covered) < 0.97, n
    with pytest.raises(ValueError, match="at least one"):
        mean_interval([])


def test_probe_intervals_over_splits_contain_the_true_accuracy_and_shrink_with_more_splits(monkeypatch):
    """One planted feature shifted by +-1 with unit noise: the best linear probe's accuracy is Phi(1) = 0.841
    (3000 texts, so this sample's accuracy is within about 0.01 of it)."""
    data = docs_data(1000, 3)
    y = torch.tensor([1.0 if label == "b" else 0.0 for label in data.labels])
    X = torch.randn(len(data), 3, generator=torch.Generator().manual_seed(0))
    X[:, 0] += 2 * y - 1
    monkeypatch.setattr(report, "extract", fake_extract(X))
    truth = 0.5 * (1 + torch.erf(torch.tensor(1 / 2**0.5))).item()
    widths = []
    for splits in (3, 12):
        results = run_probes(SimpleNamespace(name="fake"), data, [Features("h")], ks=(1,), splits=splits,
                             methods=("diff_of_means", "sparse_mean_diff"))
        assert {r.split for r in results.records} == set(range(splits)) and results.data["splits"] == splits
        for key, (mean, low, high) in results.intervals().items():
            assert low < truth < high, (splits, key)
        mean, low, high = results.intervals()[("hook @ h", "diff_of_means", None)]
        widths.append(high - low)
        assert f"{mean:.3f} +- {(high - low) / 2:.3f}" in results.table() and f"{splits} document splits" in results.table()
    assert widths[1] < widths[0] / 2
    single = run_probes(SimpleNamespace(name="fake"), data, [Features("h")], ks=(1,), methods=("diff_of_means",))
    assert "+-" not in single.table() and "splits" not in single.data and single.intervals()


def test_agreement_is_graded_and_no_single_word_tells_its_class():
    from collections import Counter

    from saelab.analysis.concepts import AGREEMENT_NOUNS, agreement, builtin

    data = builtin("agreement")
    assert len(data) == 24 * 2 * 3 * 4 and data.positive == "violates" and data.classes == ["agrees", "violates"]
    words = {label: Counter(w.strip(".") for t, l in zip(data.texts, data.labels) if l == label for w in t.split())
             for label in data.classes}
    assert set(words["agrees"]) == set(words["violates"])  # every word occurs in both classes
    for verb in ("is", "are"):
        assert abs(words["agrees"][verb] - words["violates"][verb]) < 0.1 * words["agrees"][verb]
    easy, hard = agreement(0), agreement(2)
    assert easy.texts[0].split()[1] == "key" and "violates" in easy.labels
    for text, label in zip(hard.texts, hard.labels):  # two nouns of the other number between subject and verb
        words = text.rstrip(".").split()
        plural, verb = words[1].endswith("s"), words[words.index("are" if "are" in words else "is")]
        attractors = [w for w in words[2:] if w.rstrip("s") in AGREEMENT_NOUNS]
        assert len(attractors) == 2 and all(w.endswith("s") != plural for w in attractors)
        assert ((verb == "are") == plural) == (label == "agrees")
    split = split_documents(data)
    assert not {data.docs[i] for i in split["train"]} & {data.docs[i] for i in split["test"]}
    with pytest.raises(DataError, match="attractors must be"):
        agreement(3)
