"""saelab.evals.sparse_probing: the scoring against hand computations on planted features, labelled files and their
errors, SAEBench's record and names, save / load; one slow run on SmolLM2."""

import csv
import json
import math
import time

import pytest
import torch

from helpers import HOOK, make_sae
from saelab.analysis.concepts import LabelledTexts, split_documents, tasks
from saelab.errors import DataError
from saelab.evals.intervals import Interval
from saelab.evals.saebench import read_intervals, write_output
from saelab.evals.sparse_probing import (EVAL_TYPE_ID, SparseProbingConfig, SparseProbingResult, load_datasets,
                                         load_file, metric_names, run, score_dataset, subsample, truncate)

CLASSES = ("red", "green", "blue")
SAEBENCH_LLM = ["llm_test_accuracy", "llm_top_1_test_accuracy", "llm_top_2_test_accuracy", "llm_top_5_test_accuracy"]
SAEBENCH_SAE = ["sae_test_accuracy", "sae_top_1_test_accuracy", "sae_top_2_test_accuracy", "sae_top_5_test_accuracy"]


def labelled(per_class=40, classes=CLASSES, texts_per_doc=2) -> LabelledTexts:
    labels = [c for c in classes for _ in range(per_class)]
    docs = [f"{label}/{i // texts_per_doc}" for label in classes for i in range(per_class)]
    return LabelledTexts([f"text {i}" for i in range(len(labels))], labels, docs, name="planted")


def planted_features(data: LabelledTexts, seed=0):
    """Latent j (j < 3) is exactly 'label == CLASSES[j]' (plus 20 noise latents); the residual stream holds each
    class weakly in every one of 16 dimensions, so no single dimension separates it."""
    g = torch.Generator().manual_seed(seed)
    onehot = torch.tensor([[float(label == c) for c in CLASSES] for label in data.labels])
    X_sae = torch.cat([onehot, torch.rand(len(data), 20, generator=g)], 1)
    mixing = torch.randn(3, 16, generator=g) * 0.4
    X_llm = onehot @ mixing + torch.randn(len(data), 16, generator=g)
    return X_llm, X_sae


def quick(**fields) -> SparseProbingConfig:
    return SparseProbingConfig(**{"dataset_names": (), "dataset_paths": ("unused.jsonl",), "bootstrap_resamples": 200,
                                  "probe_c_grid": (0.1, 1.0), **fields})


# ------------------------------------------------------------------------------------------- scoring, no model
def test_a_planted_latent_gives_top_1_accuracy_1_where_the_residual_top_1_does_not():
    data = labelled()
    X_llm, X_sae = planted_features(data)
    scores = score_dataset(data, X_llm, X_sae, quick())
    assert scores.classes == sorted(CLASSES)  # one task per class
    assert scores.accuracy["sae_top_1_test_accuracy"] == 1.0
    assert scores.accuracy["llm_top_1_test_accuracy"] < 0.9
    assert scores.accuracy["sae_top_1_test_accuracy"] > scores.accuracy["llm_top_1_test_accuracy"]
    for task, latents in scores.top_latents.items():
        assert latents[0] == CLASSES.index(task)  # the planted latent ranks first
    for name, value in scores.accuracy.items():
        interval = scores.intervals[name]
        assert interval.estimate == value and interval.low <= value <= interval.high and interval.method == "bootstrap"
        mean_of_classes = sum(c[name] for c in scores.per_class.values()) / len(scores.per_class)
        assert value == pytest.approx(mean_of_classes)  # a dataset's score is the mean over its classes


def test_the_ranking_is_by_mean_difference_on_the_training_split_by_hand():
    data = labelled()
    X_llm, X_sae = planted_features(data, seed=3)
    X_sae[:, 3:] += torch.linspace(0, 1, 20)  # spread the noise latents' means so the order is not a tie
    config = quick(k_values=(1, 5))
    scores = score_dataset(data, X_llm, X_sae, config)
    split = split_documents(data, config.split_fractions, seed=config.random_seed)
    for task in tasks(data, split, seed=config.random_seed):
        rows, ys = task.rows["train"], task.y["train"]
        gaps = []
        for j in range(X_sae.shape[1]):
            pos = [float(X_sae[r, j]) for r, y in zip(rows, ys) if y == 1]
            neg = [float(X_sae[r, j]) for r, y in zip(rows, ys) if y == 0]
            gaps.append((-abs(sum(pos) / len(pos) - sum(neg) / len(neg)), j))
        assert scores.top_latents[task.name] == [j for _, j in sorted(gaps)[:5]]


def test_one_vs_rest_negatives_are_balanced_and_drawn_evenly_from_the_other_classes():
    data = labelled(per_class=30, classes=("a", "b", "c", "d"))
    config = quick()
    split = split_documents(data, config.split_fractions, seed=config.random_seed)
    for task in tasks(data, split, seed=config.random_seed):
        for s in ("train", "val", "test"):
            ys = task.y[s]
            assert sum(ys) == len(ys) - sum(ys)  # as many negatives as positives
            negatives = [data.labels[r] for r, y in zip(task.rows[s], ys) if y == 0]
            counts = [negatives.count(c) for c in ("a", "b", "c", "d") if c != task.positive]
            assert max(counts) - min(counts) <= 1, (task.name, s, counts)


def test_no_probe_sees_the_test_split(monkeypatch):
    import saelab.evals.sparse_probing as sparse_probing

    data = labelled()
    X_llm, X_sae = planted_features(data)
    seen = []
    real = sparse_probing.fit_probes

    def spy(Xtr, ytr, Xva, yva, **kwargs):
        seen.append(torch.cat([Xtr, Xva]))
        return real(Xtr, ytr, Xva, yva, **kwargs)

    monkeypatch.setattr(sparse_probing, "fit_probes", spy)
    config = quick()
    score_dataset(data, X_llm, X_sae, config)
    test_rows = split_documents(data, config.split_fractions, seed=config.random_seed)["test"]
    assert len(seen) == 2 * len(CLASSES)  # residual and latents, per class
    for fitted in seen:
        X = X_llm if fitted.shape[1] == X_llm.shape[1] else X_sae
        for row in test_rows:
            assert not (fitted == X[row]).all(1).any()  # no test text among the training and validation rows


def test_the_means_over_datasets_combine_each_datasets_interval():
    from saelab.evals.sparse_probing import summarise

    config = quick()
    scores = [score_dataset(data, *planted_features(data, seed), config)
              for seed, data in enumerate([labelled(), labelled(per_class=30)])]
    metrics, intervals = summarise(scores, config)
    assert list(metrics) == ["llm", "sae"] and list(metrics["llm"]) == SAEBENCH_LLM
    for category, values in metrics.items():
        for name, value in values.items():
            assert value == pytest.approx(sum(d.accuracy[name] for d in scores) / 2)
            interval, parts = intervals[f"{category}.{name}"], [d.intervals[name] for d in scores]
            half = math.hypot(*((p.high - p.low) / 2 for p in parts)) / 2  # independent halves add in quadrature
            assert interval.high - interval.estimate == pytest.approx(half)
            assert interval.n == sum(p.n for p in parts)  # the units are the test documents of both
    alone, _ = summarise(scores[:1], config)
    assert alone["sae"]["sae_top_1_test_accuracy"] == 1.0


def test_metric_names_are_saebench_s():
    names = metric_names((5, 1, 2))
    assert names == {"llm": SAEBENCH_LLM, "sae": SAEBENCH_SAE}
    assert metric_names((1,), sae_dense_probe=False)["sae"] == ["sae_top_1_test_accuracy"]


# ------------------------------------------------------------------------------------------- labelled files
def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_and_csv_files_load_with_their_column_names(tmp_path):
    rows = [{"sentence": f"text number {i}", "topic": "x" if i % 2 else "y"} for i in range(24)]
    data = load_file(write_jsonl(tmp_path / "mine.jsonl", rows), "sentence", "topic")
    assert data.name == "mine" and data.classes == ["x", "y"] and len(data) == 24
    with (tmp_path / "other.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["sentence", "topic"])
        writer.writeheader()
        writer.writerows(rows)
    again = load_file(tmp_path / "other.csv", "sentence", "topic")
    assert again.texts == data.texts and again.labels == data.labels
    config = SparseProbingConfig(dataset_names=(), dataset_paths=(str(tmp_path / "mine.jsonl"),),
                                 text_column="sentence", label_column="topic", max_examples_per_class=10)
    (loaded,) = load_datasets(config)
    assert [loaded.labels.count(c) for c in loaded.classes] == [10, 10]  # subsampled per class


def test_bad_files_and_configs_give_clear_errors(tmp_path):
    rows = [{"text": f"text number {i}", "label": "x" if i % 2 else "y"} for i in range(24)]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(DataError, match=r"no column 'sentence' \(its columns: text, label\).*text_column"):
        load_file(path, "sentence", "label")
    with (tmp_path / "data.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["body", "label"], ["hello there", "x"]])
    with pytest.raises(DataError, match=r"no column 'text' \(its columns: body, label\)"):
        load_file(tmp_path / "data.csv")
    with pytest.raises(DataError, match="no such file"):
        load_file(tmp_path / "absent.jsonl")
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": f"t {i}", "label": "x"} for i in range(20)])
    with pytest.raises(DataError, match="one.*every example has the label 'x'.*two classes"):
        load_datasets(SparseProbingConfig(dataset_names=(), dataset_paths=(str(one),)))
    few = write_jsonl(tmp_path / "few.jsonl", rows[:20] + [{"text": "lonely", "label": "z"}])
    with pytest.raises(DataError, match="class 'z' has 1 example.*at least 10"):
        load_datasets(SparseProbingConfig(dataset_names=(), dataset_paths=(str(few),)))
    with pytest.raises(ValueError, match="'weather' is not a built-in concept"):
        SparseProbingConfig(dataset_names=("weather",))
    with pytest.raises(ValueError, match="k_values"):
        SparseProbingConfig(k_values=(0, 1))
    with pytest.raises(DataError, match="share the name 'data'"):
        load_datasets(SparseProbingConfig(dataset_names=(), dataset_paths=(str(path), str(path))))


def test_subsampling_is_seeded_and_keeps_small_classes_whole():
    data = labelled(per_class=40, classes=("a", "b"))
    data = data.subset(list(range(40)) + list(range(40, 55)))
    small = subsample(data, 20, seed=1)
    assert [small.labels.count(c) for c in ("a", "b")] == [20, 15]
    assert small.texts == subsample(data, 20, seed=1).texts != subsample(data, 20, seed=2).texts


# ------------------------------------------------------------------------------------------- with the tiny model
def tiny_files(tmp_path):
    topics = {"code": "def function return value import module class object",
              "nature": "the river runs past green hills and old trees in spring",
              "numbers": "one two three four five six seven eight nine ten"}
    rows = []
    for label, words in topics.items():
        words = words.split()
        for i in range(16):
            rows.append({"text": " ".join(words[(i + j) % len(words)] for j in range(4 + i % 5)), "label": label})
    return write_jsonl(tmp_path / "topics.jsonl", rows)


def test_run_on_the_tiny_model_writes_saebench_s_record_and_round_trips(tiny_model, tmp_path):
    sae = make_sae(d_in=64, width=96, hook_name=HOOK)
    config = SparseProbingConfig(dataset_names=("calendar",), dataset_paths=(str(tiny_files(tmp_path)),),
                                 max_examples_per_class=40, bootstrap_resamples=100, probe_c_grid=(1.0,))
    result = run(sae, tiny_model, config, progress=False)
    assert [d.dataset_name for d in result.datasets] == ["calendar", "topics"]
    record = result.saebench(sae)
    assert record["eval_type_id"] == EVAL_TYPE_ID == "sparse_probing"
    assert record["eval_result_metrics"] == {"llm": {m: result.metrics["llm"][m] for m in SAEBENCH_LLM},
                                             "sae": {m: result.metrics["sae"][m] for m in SAEBENCH_SAE}}
    assert all(0 <= v <= 1 for c in record["eval_result_metrics"].values() for v in c.values())
    assert [d["dataset_name"] for d in record["eval_result_details"]] == ["calendar", "topics"]
    assert set(record["eval_result_details"][0]) == {"dataset_name", *SAEBENCH_LLM, *SAEBENCH_SAE}
    assert record["eval_config"]["k_values"] == [1, 2, 5] and record["eval_config"]["context_length"] == 128
    intervals = read_intervals(record)
    assert sorted(intervals) == sorted(f"{c}.{m}" for c, ms in (("llm", SAEBENCH_LLM), ("sae", SAEBENCH_SAE))
                                       for m in ms)
    test_docs = {name: result.datasets[0].intervals[name.split(".")[1]].n + result.datasets[1].intervals[
        name.split(".")[1]].n for name in intervals}
    assert all(isinstance(i, Interval) and i.n == test_docs[name] for name, i in intervals.items())
    path = write_output(record, tmp_path / "sae")
    assert path == tmp_path / "sae" / "evals" / "sparse_probing.json" and json.loads(path.read_text()) == record
    result.save(tmp_path / "result")
    again = SparseProbingResult.load(tmp_path / "result")
    assert again.to_dict() == result.to_dict() and again.config == config
    assert "| **mean** |" in (tmp_path / "result" / "sparse_probing.md").read_text()


def test_pooling_is_the_mean_over_the_tokens_after_bos(tiny_model):
    from saelab.evals.sparse_probing import pooled_features

    sae = make_sae(d_in=64, width=96, hook_name=HOOK)
    data = LabelledTexts(["the river runs past green hills", "def function return"], ["a", "b"], ["1", "2"])
    X_llm, X_sae = pooled_features(tiny_model, sae, data, SparseProbingConfig())
    for i, text in enumerate(data.texts):
        acts = tiny_model.activations_at([text], HOOK, None)[HOOK][0]  # [L, d], BOS first, no padding
        assert torch.allclose(X_llm[i], acts[1:].mean(0), atol=1e-5)
        assert torch.allclose(X_sae[i], sae.encode(acts[1:]).mean(0), atol=1e-5)


def test_texts_are_cut_to_the_context_length_at_a_token_boundary(tiny_model):
    text = "the river runs past green hills and old trees in spring " * 20
    (cut,) = truncate(tiny_model.tokenizer, [text], 16)
    ids = tiny_model.tokenizer(cut, add_special_tokens=False)["input_ids"]
    assert len(ids) == 15 and text.startswith(cut)  # BOS takes the 16th place
    assert truncate(tiny_model.tokenizer, ["short"], 16) == ["short"]


# ------------------------------------------------------------------------------------------- slow: SmolLM2
@pytest.mark.slow
def test_sparse_probing_on_smollm2_with_a_small_sae(smollm2):
    """A random 512-latent SAE at block 3 on the calendar words: the dense residual probe separates day and month
    names from other nouns (unseen words in the test split), and the record has SAEBench's names."""
    sae = make_sae(d_in=576, width=512, k=16, model_name="smollm2-135m", hook_name="blocks.3.hook_resid_post")
    config = SparseProbingConfig(dataset_names=("calendar",), bootstrap_resamples=200)
    start = time.perf_counter()
    result = run(sae, smollm2, config, progress=False)
    assert time.perf_counter() - start < 120
    assert result.metrics["llm"]["llm_test_accuracy"] >= 0.9, result.table()
    assert result.metrics["llm"]["llm_top_5_test_accuracy"] > 0.5, result.table()
    for name, interval in result.intervals.items():
        assert interval.low <= interval.estimate <= interval.high and not math.isnan(interval.low), name
    assert list(result.saebench(sae)["eval_result_metrics"]["sae"]) == SAEBENCH_SAE
