"""Sparse probing (SAEBench's `sparse_probing`): can a handful of SAE latents, chosen per concept, classify labelled
text as well as the residual stream does?

    result = run(sae, model, SparseProbingConfig(dataset_names=("languages", "calendar")))
    print(result.table()); write_output(result.saebench(sae), sae_folder)

Per dataset and per class (one-vs-rest, negatives drawn evenly from the other classes, both classes balanced in
every split): each text is mean-pooled over its tokens without BOS and padding (no EOS is added), after cutting it
to `context_length` tokens; the SAE's latents are encoded per token, then pooled. Features are ranked by
|mean_pos - mean_neg| on the training split, and an L2 logistic probe is fitted on the top k (k in `k_values`) of
the residual dimensions (llm_top_k_test_accuracy) and of the latents (sae_top_k_test_accuracy); dense probes on the
whole residual stream (llm_test_accuracy) and on all latents (sae_test_accuracy) are the references. A dataset's
score is the mean over its classes, and the headline metric the mean over datasets.

How it differs from SAEBench's: splits are by document (a text's source), and each probe's C is chosen on a
validation split from a grid on standardised features (SAEBench fits C = 1 on raw features, and its dense probe
early-stops on *test* accuracy, which leaks the test split into the score); the test split is scored once. The test
AUC, which SAEBench's sae-probes variant reports beside accuracy, is kept in the record's unstructured part. The
data are saelab's offline concepts and the user's files, a few hundred texts each, not SAEBench's 4000 / 1000.
Intervals: a bootstrap over test documents per dataset (a document's texts share their words, so single texts are
not independent); the means over datasets combine those (half-widths in quadrature): two or three fixed datasets
are not a sample to resample.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch
from torch import Tensor

from saelab.analysis.concepts import BUILTINS, LabelledTexts, builtin, load_labelled, split_documents, tasks
from saelab.analysis.probes import C_GRID, Features, extract, fit_probes
from saelab.analysis.study import StudyResult
from saelab.errors import DataError
from saelab.evals.intervals import Interval, bootstrap_interval
from saelab.evals.saebench import saebench_output

if TYPE_CHECKING:
    from saelab.sae import SAE

EVAL_TYPE_ID = "sparse_probing"
CATEGORIES = ("llm", "sae")
"""SAEBench's metric categories: probes on the model's residual stream ("llm") and on the SAE's latents ("sae")."""


@dataclass
class SparseProbingConfig:
    """What to probe and how; field names follow SAEBench's SparseProbingEvalConfig where they mean the same."""

    dataset_names: tuple[str, ...] = ("languages", "calendar")
    """saelab's built-in concepts (genre, calendar, languages). The default leaves out genre: dense probes score
    about 1.0 on it, and its long passages would more than double the eval's time."""
    dataset_paths: tuple[str, ...] = ()
    """The user's labelled files (.jsonl or .csv), one dataset each, with `text_column` and `label_column`."""
    text_column: str = "text"
    label_column: str = "label"
    k_values: tuple[int, ...] = (1, 2, 5)
    context_length: int = 128
    """Texts are cut to their first context_length tokens (BOS included), as SAEBench does."""
    max_examples_per_class: int = 200
    """Each class is subsampled to at most this many texts (whole documents, seeded): it bounds the eval's time."""
    min_examples_per_class: int = 10
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    """Train, validation (chooses C) and test, by document."""
    probe_c_grid: tuple[float, ...] = C_GRID
    sae_dense_probe: bool = True
    """Also fit a dense probe on all latents (sae_test_accuracy)."""
    random_seed: int = 42
    llm_batch_size: int | None = None
    """Texts per forward at most (None: as many as the model's max_batch_tokens allows)."""
    bootstrap_resamples: int = 1000

    def __post_init__(self):
        if not self.dataset_names and not self.dataset_paths:
            raise ValueError("SparseProbingConfig: give dataset_names (built-in concepts) or dataset_paths (files)")
        unknown = [n for n in self.dataset_names if n not in BUILTINS]
        if unknown:
            raise ValueError(f"SparseProbingConfig: {unknown[0]!r} is not a built-in concept ({', '.join(BUILTINS)});"
                             " give a labelled file in dataset_paths instead")
        if not self.k_values or any(int(k) < 1 for k in self.k_values):
            raise ValueError(f"SparseProbingConfig: k_values must be whole numbers >= 1, got {self.k_values}")
        if self.context_length < 2:
            raise ValueError(f"SparseProbingConfig: context_length must be at least 2, got {self.context_length}")
        if self.min_examples_per_class < 3 or self.max_examples_per_class < self.min_examples_per_class:
            raise ValueError("SparseProbingConfig: need 3 <= min_examples_per_class <= max_examples_per_class, got "
                             f"{self.min_examples_per_class} and {self.max_examples_per_class}")


CONFIG = SparseProbingConfig
"""The config class the suite builds for this eval."""


# ---------------------------------------------------------------------------------------------------- results
@dataclass
class DatasetScores:
    """One dataset's scores: `accuracy` by SAEBench's metric name (mean over its classes), the same per class,
    their intervals (bootstrap over test documents), AUCs, and each class's top latents by |mean difference|."""

    dataset_name: str
    classes: list[str]
    n_texts: dict[str, int]
    """Texts in the train, val and test splits."""
    accuracy: dict[str, float]
    per_class: dict[str, dict[str, float]]
    auc: dict[str, float]
    intervals: dict[str, Interval]
    top_latents: dict[str, list[int]] = field(default_factory=dict)

    def detail(self) -> dict[str, Any]:
        """SAEBench's per-dataset record (eval_result_details)."""
        return {"dataset_name": self.dataset_name, **self.accuracy}


@dataclass(kw_only=True)
class SparseProbingResult(StudyResult):
    """Sparse probing of one SAE: per-dataset scores, the means over datasets in SAEBench's categories, and their
    intervals ("category.metric": Interval)."""

    NAME: ClassVar[str] = EVAL_TYPE_ID
    WHAT: ClassVar[str] = "sparse probing results"

    config: SparseProbingConfig
    hook: str
    sae_name: str
    datasets: list[DatasetScores]
    metrics: dict[str, dict[str, float]]
    intervals: dict[str, Interval]

    def table(self) -> str:
        names = [m for c in CATEGORIES for m in self.metrics[c]]
        head = f"Sparse probing of {self.sae_name} at {self.hook}: test accuracy, mean over each dataset's classes"
        rows = ["| dataset | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for d in self.datasets:
            rows.append(f"| {d.dataset_name} | " + " | ".join(str(d.intervals[m]) for m in names) + " |")
        means = [str(self.intervals[f"{c}.{m}"]) for c in CATEGORIES for m in self.metrics[c]]
        rows.append("| **mean** | " + " | ".join(means) + " |")
        note = ("llm: residual stream (dense probe, then top-k dimensions); sae: latents. Intervals: 95 % bootstrap "
                "over test documents per dataset; the mean's combines them.")
        return "\n".join([head, "", *rows, "", note]) + "\n"

    def saebench(self, sae) -> dict:
        """This result in SAEBench's layout (write it with saelab.evals.saebench.write_output)."""
        extra = {"seconds": self.seconds, "hook": self.hook,
                 "per_class": {d.dataset_name: d.per_class for d in self.datasets},
                 "test_auc": {d.dataset_name: d.auc for d in self.datasets},
                 "top_latents": {d.dataset_name: d.top_latents for d in self.datasets},
                 "n_texts": {d.dataset_name: d.n_texts for d in self.datasets}}
        return saebench_output(EVAL_TYPE_ID, self.config, self.metrics, sae, details=[d.detail() for d in self.datasets],
                               intervals=self.intervals, extra=extra)


def metric_names(k_values: Sequence[int], sae_dense_probe: bool = True) -> dict[str, list[str]]:
    """SAEBench's metric names per category, in table order."""
    ks = sorted(set(int(k) for k in k_values))
    llm = ["llm_test_accuracy"] + [f"llm_top_{k}_test_accuracy" for k in ks]
    sae = (["sae_test_accuracy"] if sae_dense_probe else []) + [f"sae_top_{k}_test_accuracy" for k in ks]
    return {"llm": llm, "sae": sae}


# ---------------------------------------------------------------------------------------------------- data
def load_datasets(config: SparseProbingConfig) -> list[LabelledTexts]:
    """The built-in concepts and the user's files, each checked and subsampled per class (seeded)."""
    found = [builtin(name) for name in config.dataset_names]
    for path in config.dataset_paths:
        found.append(load_file(path, config.text_column, config.label_column))
    names = [d.name for d in found]
    if len(set(names)) != len(names):
        raise DataError(f"two datasets share the name {sorted(n for n in names if names.count(n) > 1)[0]!r}; "
                        "rename one of the files")
    least = config.min_examples_per_class
    return [check_dataset(subsample(check_dataset(d, least), config.max_examples_per_class, config.random_seed), least)
            for d in found]


def load_file(path: str | Path, text_column: str = "text", label_column: str = "label") -> LabelledTexts:
    """A JSONL / CSV file of labelled text; a missing column is named, with the columns the file has."""
    path = Path(path)
    if path.suffix.lower() not in (".jsonl", ".json", ".csv"):
        raise DataError(f"{path}: expected a .jsonl or .csv file of '{text_column}' and '{label_column}' columns")
    try:
        return load_labelled(path, text_field=text_column, label_field=label_column)
    except DataError as error:
        columns = _columns(path)
        missing = [c for c in (text_column, label_column) if columns is not None and c not in columns]
        if not missing:
            raise
        raise DataError(f"{path}: no column {missing[0]!r} (its columns: {', '.join(columns) or 'none'}); set "
                        "text_column / label_column in SparseProbingConfig") from None


def _columns(path: Path) -> list[str] | None:
    """The first record's columns (None when it cannot be read)."""
    import csv
    import json

    try:
        with path.open(newline="", encoding="utf-8") as f:
            if path.suffix.lower() == ".csv":
                return list(next(csv.reader(f), []))
            first = next((line for line in f if line.strip()), "{}")
            record = json.loads(first)
            return list(record) if isinstance(record, dict) else []
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def check_dataset(data: LabelledTexts, min_per_class: int) -> LabelledTexts:
    """Refuse a dataset one-vs-rest probing cannot use: one class, or a class with too few texts."""
    counts = {c: data.labels.count(c) for c in data.classes}
    if len(counts) < 2:
        raise DataError(f"{data.name}: every example has the label {data.classes[0]!r}; sparse probing needs at "
                        "least two classes")
    small = {c: n for c, n in counts.items() if n < min_per_class}
    if small:
        c, n = sorted(small.items(), key=lambda item: item[1])[0]
        raise DataError(f"{data.name}: class {c!r} has {n} example(s); sparse probing needs at least "
                        f"{min_per_class} per class (min_examples_per_class) to split train / val / test")
    return data


def subsample(data: LabelledTexts, per_class: int, seed: int) -> LabelledTexts:
    """At most `per_class` texts of each class, whole documents at a time (visited in a seeded order, a document
    taken when none of its classes would overflow), in their original order. Whole documents keep the split by
    document and the bootstrap over documents what they are on the full data."""
    rows_of: dict[str, list[int]] = {}
    for i, doc in enumerate(data.docs):
        rows_of.setdefault(doc, []).append(i)
    order = sorted(rows_of)
    random.Random(f"{seed}-{data.name}").shuffle(order)
    counts = {c: 0 for c in data.classes}
    keep: list[int] = []
    for doc in order:
        labels = [data.labels[i] for i in rows_of[doc]]
        if all(counts[c] + labels.count(c) <= per_class for c in set(labels)):
            keep += rows_of[doc]
            for c in labels:
                counts[c] += 1
    return data if len(keep) == len(data) else data.subset(sorted(keep))


def truncate(tokenizer, texts: Sequence[str], context_length: int) -> list[str]:
    """Each text cut after its first context_length - 1 tokens (BOS takes one place), at a token boundary."""
    keep = context_length - 1
    encoded = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for text, ids, offsets in zip(texts, encoded["input_ids"], encoded["offset_mapping"]):
        out.append(text if len(ids) <= keep else text[: offsets[keep - 1][1]])
    return out


def pooled_features(model, sae: "SAE", data: LabelledTexts, config: SparseProbingConfig) -> tuple[Tensor, Tensor]:
    """Mean-pooled residual stream [n, d] and SAE latents [n, width] of every text, one forward per batch."""
    hook = sae.cfg.hook_name
    texts = truncate(model.tokenizer, data.texts, min(config.context_length, model.n_ctx))
    resid, latents = Features(hook, label="llm"), Features(hook, sae=sae, label="sae")
    X = extract(model, texts, [resid, latents], "mean", batch_size=config.llm_batch_size,
                names=lambda i: f"{data.name}: {data.origin(i)}")
    return X["llm"], X["sae"]


# ---------------------------------------------------------------------------------------------------- scoring
def score_dataset(data: LabelledTexts, X_llm: Tensor, X_sae: Tensor, config: SparseProbingConfig) -> DatasetScores:
    """Every class's probes on one dataset's pooled features; scores with intervals over test documents."""
    split = split_documents(data, config.split_fractions, seed=config.random_seed)
    found = tasks(data, split, seed=config.random_seed)
    names = metric_names(config.k_values, config.sae_dense_probe)
    test_docs = sorted({data.docs[i] for i in split["test"]})
    column = {doc: j for j, doc in enumerate(test_docs)}
    tallies = {m: torch.zeros(len(test_docs), len(found), 2, dtype=torch.float64) for c in names.values() for m in c}
    per_class, auc, top = {}, {}, {}
    for t, task in enumerate(found):
        scores = {}
        for category, X in (("llm", X_llm), ("sae", X_sae)):
            dense = category == "llm" or config.sae_dense_probe
            probes = probe_task(X, task, config, dense)
            for probe, name in zip(probes, names[category]):
                rows, y = task.rows["test"], torch.tensor(task.y["test"], dtype=torch.float64)
                correct = ((probe.decision(X[rows]) > 0).double() == y).double()
                for row, hit in zip(rows, correct.tolist()):
                    tallies[name][column[data.docs[row]], t] += torch.tensor([hit, 1.0], dtype=torch.float64)
                scores[name] = float(correct.mean())
                auc[f"{task.name}/{name}"] = probe.score(X[rows], y)["auc"]
            if category == "sae":
                top[task.name] = list(probes[-1].features)
        per_class[task.name] = scores
    intervals = {m: bootstrap_interval(tallies[m], _class_mean_accuracy, resamples=config.bootstrap_resamples,
                                       seed=config.random_seed) for m in tallies}
    mean_auc = {m: sum(auc[f"{t.name}/{m}"] for t in found) / len(found) for m in tallies}
    return DatasetScores(data.name, [t.name for t in found], {s: len(split[s]) for s in split},
                         {m: intervals[m].estimate for m in tallies}, per_class, mean_auc, intervals, top)


def probe_task(X: Tensor, task, config: SparseProbingConfig, dense: bool) -> list:
    """The dense probe (if `dense`) and one probe per k on the top-k features by |mean difference| on the training
    split, each with C chosen on the validation split; the test split is not passed."""
    methods = ("logistic", "sparse_mean_diff") if dense else ("sparse_mean_diff",)
    train, val = task.rows["train"], task.rows["val"]
    return fit_probes(X[train], torch.tensor(task.y["train"]), X[val], torch.tensor(task.y["val"]),
                      ks=config.k_values, methods=methods, Cs=config.probe_c_grid)


def _class_mean_accuracy(tallies: Tensor) -> float:
    """Mean over classes of correct / scored in [docs, classes, (correct, scored)]; classes a resample left
    without test texts are skipped."""
    sums = tallies.sum(0)
    seen = sums[:, 1] > 0
    return float((sums[seen, 0] / sums[seen, 1]).mean()) if bool(seen.any()) else math.nan


def mean_of_intervals(parts: Sequence[Interval]) -> Interval:
    """The mean of independent estimates with their intervals (one part: itself)."""
    if len(parts) == 1:
        return parts[0]
    mean = sum(p.estimate for p in parts) / len(parts)
    half = math.sqrt(sum(((p.high - p.low) / 2) ** 2 for p in parts)) / len(parts)
    return Interval(mean, mean - half, mean + half, sum(p.n for p in parts), "bootstrap per dataset, combined",
                    parts[0].level)


def summarise(datasets: Sequence[DatasetScores], config: SparseProbingConfig
              ) -> tuple[dict[str, dict[str, float]], dict[str, Interval]]:
    """Means over datasets per SAEBench metric. Their interval combines each dataset's own (over its test
    documents): the datasets are the fixed set asked about, not a sample of datasets, so resampling two or three of
    them would say nothing; half-widths add in quadrature, divided by the number of datasets."""
    metrics, intervals = {}, {}
    for category, names in metric_names(config.k_values, config.sae_dense_probe).items():
        metrics[category] = {}
        for name in names:
            interval = mean_of_intervals([d.intervals[name] for d in datasets])
            metrics[category][name] = interval.estimate
            intervals[f"{category}.{name}"] = interval
    return metrics, intervals


# ---------------------------------------------------------------------------------------------------- run
def run(sae: "SAE", model, config: SparseProbingConfig | None = None, *, progress: bool = True
        ) -> SparseProbingResult:
    """Sparse probing of `sae` at its hook (sae.cfg.hook_name) on `model`, for every dataset of `config`."""
    import time

    from saelab.progress_bars import tqdm

    config = config or SparseProbingConfig()
    if not sae.cfg.hook_name:
        raise ValueError("sparse probing reads the SAE's hook, but its cfg.hook_name is empty")
    start = time.perf_counter()
    datasets = load_datasets(config)
    scores = []
    for data in tqdm(datasets, desc="sparse probing", unit="dataset", disable=not progress, leave=False):
        X_llm, X_sae = pooled_features(model, sae, data, config)
        scores.append(score_dataset(data, X_llm, X_sae, config))
    metrics, intervals = summarise(scores, config)
    return SparseProbingResult(config=config, hook=sae.cfg.hook_name, sae_name=sae_label(sae), datasets=scores,
                               metrics=metrics, intervals=intervals, seconds=time.perf_counter() - start)


def sae_label(sae) -> str:
    cfg = sae.cfg
    return f"{cfg.arch}-{cfg.width}" + (f"-k{cfg.k}" if getattr(cfg, "k", None) else "")


__all__ = ["CATEGORIES", "EVAL_TYPE_ID", "DatasetScores", "SparseProbingConfig", "SparseProbingResult",
           "check_dataset", "load_datasets", "load_file", "metric_names", "pooled_features", "run",
           "score_dataset", "subsample", "summarise", "truncate"]
