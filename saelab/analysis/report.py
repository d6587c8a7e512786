"""Run probes over a labelled dataset and keep the results as a typed, versioned record (probes.json), a Markdown
table and an accuracy-vs-k figure, like eval's metrics.json."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch

from saelab.analysis.concepts import SPLITS, LabelledTexts, split_documents, tasks
from saelab.analysis.probes import C_GRID, METHODS, Features, extract, fit_probes, mean_interval
from saelab.analysis.study import SCHEMA_VERSION, StudyResult
from saelab.figures import GRID_ALPHA, pyplot, save_figure
from saelab.options import NonNegativeInt, PositiveInt, check_fields, split_list

RESULTS_FILE = "probes.json"


@dataclass
class ProbeRecord:
    """One probe's test scores (computed once, on the test split) and how it was chosen."""

    task: str
    features: str
    kind: str
    """resid, neurons, sae or hook."""
    hook: str
    method: str
    """logistic, diff_of_means, diff_of_means_whitened, sparse_mean_diff or sparse_l1."""
    k: int | None
    C: float | None
    val_accuracy: float | None
    test_accuracy: float
    test_auc: float
    n_train: int
    n_val: int
    n_test: int
    selected: list[int] | None = None
    """The features a sparse probe reads, in rank order."""
    split: int = 0
    """The seed of the document split the probe was fitted and scored on."""

    @property
    def layer(self) -> int | None:
        found = re.match(r"blocks\.(\d+)\.", self.hook)
        return int(found.group(1)) if found else None


@dataclass
class ProbeResults(StudyResult):
    """Every probe's test scores over one labelled dataset; saved as probes.json, probes.md and accuracy_vs_k.png."""

    NAME: ClassVar[str] = "probes"
    WHAT: ClassVar[str] = "probe results"

    model: str
    data: dict[str, Any]
    """Dataset name, sizes, classes, positions, seed and split fractions."""
    records: list[ProbeRecord] = field(default_factory=list)
    dashboards: dict[str, str] = field(default_factory=dict)
    """{SAE feature set: the folder of a dashboard of that SAE}: the report links the latents the probes chose to
    their pages there."""

    def mean_accuracy(self) -> dict[tuple[str, str, int | None], float]:
        """{(features, method, k): test accuracy averaged over tasks (one-vs-rest classes)}."""
        groups: dict[tuple, list[float]] = {}
        for r in self.records:
            groups.setdefault((r.features, r.method, r.k), []).append(r.test_accuracy)
        return {key: sum(v) / len(v) for key, v in groups.items()}

    def intervals(self, level: float = 0.95) -> dict[tuple[str, str, int | None], tuple[float, float, float]]:
        """{(features, method, k): (mean, low, high)} of the test accuracy (mean over tasks) over the document
        splits; one split gives a zero-width interval."""
        groups: dict[tuple, dict[int, list[float]]] = {}
        for r in self.records:
            groups.setdefault((r.features, r.method, r.k), {}).setdefault(r.split, []).append(r.test_accuracy)
        return {key: mean_interval([sum(v) / len(v) for v in by_split.values()], level)
                for key, by_split in groups.items()}

    def table(self, ks: Sequence[int] | None = None) -> str:
        """Markdown: one row per feature set, test accuracy (mean over tasks) per method and k (all, or `ks`)."""
        means = self.mean_accuracy()
        splits = sorted({r.split for r in self.records})
        spread = self.intervals() if len(splits) > 1 else {}
        columns = sorted({(m, k) for _, m, k in means if k is None or ks is None or k in ks},
                         key=lambda c: (METHODS.index(c[0]), c[1] or 0))
        head = ["features"] + [m if k is None else f"{m.replace('sparse_', '')} k={k}" for m, k in columns]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name in dict.fromkeys(r.features for r in self.records):
            cells = [_cell(means, spread, (name, m, k)) for m, k in columns]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        n_tasks = len({r.task for r in self.records})
        over = (f"; mean over {len(splits)} document splits (seeds {splits[0]}-{splits[-1]}) +- half the 95 % "
                "t interval" if spread else "")
        return (f"{self.data.get('name', 'data')} on {self.model}: test accuracy"
                f"{f', mean of {n_tasks} one-vs-rest tasks' if n_tasks > 1 else ''}{over}\n\n" + "\n".join(lines) + "\n")

    def plot(self, path: str | Path, title: str = "") -> Path:
        """Accuracy vs k (mean over tasks): one colour per feature set, solid |mean-diff| ranking, dotted L1 path,
        the dense logistic probe as a marker at the right."""
        plt = pyplot()
        means = self.mean_accuracy()
        names = list(dict.fromkeys(r.features for r in self.records))
        ks = sorted({k for _, _, k in means if k is not None})
        fig, ax = plt.subplots(figsize=(7, 4.2))
        right = (ks[-1] * 2.5) if ks else 1
        for i, name in enumerate(names):
            colour = plt.cm.viridis(i / max(len(names) - 1, 1)) if "sae" not in name else plt.cm.autumn(i / len(names))
            for method, style in (("sparse_mean_diff", "-"), ("sparse_l1", ":")):
                xs = [k for k in ks if (name, method, k) in means]
                if xs:
                    ax.plot(xs, [means[(name, method, k)] for k in xs], style, marker="o", ms=3, color=colour,
                            label=name if method == "sparse_mean_diff" else None)
            if (name, "logistic", None) in means:
                ax.plot([right], [means[(name, "logistic", None)]], marker="*", ms=9, color=colour)
        ax.set_xscale("log")
        ax.set_xticks(ks + [right], [str(k) for k in ks] + ["all"])
        ax.set_xlabel("k (features the probe reads; solid: top |mean diff|, dotted: L1 path; star: dense)")
        ax.set_ylabel("test accuracy")
        ax.set_title(title or f"{self.data.get('name', '')} on {self.model}")
        ax.grid(alpha=GRID_ALPHA)
        ax.legend(fontsize=7, loc="lower right")
        return save_figure(fig, path)

    def save_figures(self, folder: Path, name: str) -> None:
        self.plot(folder / "accuracy_vs_k.png")

    def write(self, folder: str | Path, name: str | None = None) -> Path:
        self._report_folder = Path(folder)  # the report's links to dashboard pages are relative to it
        return super().write(folder, name)

    def report(self) -> str:
        """The table, then the SAE latents each sparse probe read, linked to their dashboard pages where known."""
        return self.table() + chosen_latents(self, getattr(self, "_report_folder", Path(".")))


def _cell(means: dict, spread: dict, key: tuple) -> str:
    if key not in means:
        return ""
    if key not in spread:
        return f"{means[key]:.3f}"
    mean, low, high = spread[key]
    return f"{mean:.3f} +- {(high - low) / 2:.3f}"


def chosen_latents(results: ProbeResults, folder: Path) -> str:
    """Markdown: per task, SAE and sparse method, the latents its largest probe read (in rank order), each a link
    to its page in the SAE's dashboard (relative to `folder`, where the report is written) when that page exists,
    with the command that exports the others."""
    rows, missing = [], {}
    first = min((r.split for r in results.records), default=0)  # one split's latents: the others' would repeat them
    for r in results.records:
        if r.kind != "sae" or not r.selected or r.method not in ("sparse_mean_diff", "sparse_l1") or r.split != first:
            continue
        if any(o.task == r.task and o.features == r.features and o.method == r.method and (o.k or 0) > (r.k or 0)
               for o in results.records):
            continue  # only the largest probe of each method: it reads the smaller ones' latents and more
        dashboard = results.dashboards.get(r.features)
        cells = []
        for latent in r.selected:
            page = Path(dashboard) / "latents" / f"{latent}.html" if dashboard else None
            if page is not None and page.is_file():
                cells.append(f"[{latent}]({Path(os.path.relpath(page.resolve(), folder.resolve())).as_posix()})")
            else:
                cells.append(str(latent))
                if dashboard:
                    missing.setdefault(r.features, set()).add(latent)
        rows.append(f"| {r.task} | {r.features} | {r.method.replace('sparse_', '')} k={r.k} | {r.test_accuracy:.3f} | "
                    + ", ".join(cells) + " |")
    if not rows:
        return ""
    text = ("\nSAE latents the sparse probes read (largest k, in rank order"
            + ("; linked to their dashboard pages" if results.dashboards else "") + ")\n\n"
            "| task | features | probe | test accuracy | latents |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    for features, latents in missing.items():
        listed = ",".join(map(str, sorted(latents)))
        text += (f"\nLatents {listed} of {features} have no page in {results.dashboards[features]}; "
                 f"`saelab dashboard SAE --acts CACHE --latents {listed} --out FOLDER` makes a dashboard of them.\n")
    return text


def run_probes(model, data: LabelledTexts, features: Sequence[Features], *, ks: Sequence[int] = (1, 2, 4, 8, 16),
               positions="mean", seed: int = 0, fractions: Sequence[float] = (0.6, 0.2, 0.2),
               methods: Sequence[str] = METHODS, Cs: Sequence[float] = C_GRID, positive: str | None = None,
               batch_size: int | None = None, splits: int = 1, log=None) -> ProbeResults:
    """Split by document, build balanced binary tasks (one-vs-rest for more than two labels), read every feature
    set in one pass over the texts, fit each probe on train + validation and score it once on test. With
    `splits` > 1 all this is repeated on the document splits of seeds seed, seed + 1, ... (the texts are read
    once), and the table gives each accuracy's mean and 95 % interval over them."""
    started = time.perf_counter()
    if splits < 1:
        raise ValueError(f"splits must be at least 1, got {splits}")
    jobs = {s: tasks(data, split_documents(data, fractions, s), s, positive) for s in range(seed, seed + splits)}
    used = sorted({i for found in jobs.values() for t in found for s in SPLITS for i in t.rows[s]})
    where = {row: j for j, row in enumerate(used)}
    if log:
        log(f"{data.name}: {len(used)} of its {len(data)} texts (classes balanced in every split), "
            f"{len(jobs[seed])} task(s) x {splits} split(s), features: {', '.join(f.name for f in features)}")
    X = extract(model, [data.texts[i] for i in used], features, positions, batch_size=batch_size,
                names=lambda j: data.origin(used[j]))
    results = ProbeResults(model=model.name, data={
        "name": data.name, "n_examples": len(data), "n_documents": len(set(data.docs)), "classes": data.classes,
        "positions": positions if isinstance(positions, (str, int)) else "per-text", "seed": seed,
        "fractions": list(fractions), "ks": sorted(set(ks)), **({"splits": splits} if splits > 1 else {})})
    for split, found in jobs.items():
        for task in found:
            rows = {s: [where[i] for i in task.rows[s]] for s in SPLITS}
            results.records += _task_records(task.name, rows, {s: torch.tensor(task.y[s]) for s in SPLITS}, X,
                                             features, split, dict(ks=ks, methods=methods, Cs=Cs))
            if log:
                log(f"  {task.name}{f' (split {split})' if splits > 1 else ''}: " + ", ".join(
                    f"{r.features.split(' @ ')[0]}@L{r.layer} {r.test_accuracy:.2f}" for r in results.records
                    if r.task == task.name and r.split == split and r.method == "logistic"))
    results.seconds = time.perf_counter() - started
    return results


def _task_records(task: str, rows: dict, y: dict, X: dict, features: Sequence[Features], split: int,
                  options: dict) -> list[ProbeRecord]:
    """Every probe of one task and split, fitted on train + validation and scored once on test."""
    records = []
    for f in features:
        x = X[f.name]
        for probe in fit_probes(x[rows["train"]], y["train"], x[rows["val"]], y["val"], **options):
            score = probe.score(x[rows["test"]], y["test"])
            records.append(ProbeRecord(
                task=task, features=f.name, kind=f.kind, hook=f.hook, method=probe.method, k=probe.k, C=probe.C,
                val_accuracy=probe.val_accuracy, test_accuracy=score["accuracy"], test_auc=score["auc"],
                n_train=len(rows["train"]), n_val=len(rows["val"]), n_test=len(rows["test"]),
                selected=probe.features, split=split))
    return records


@dataclass
class ProbeConfig:
    """One probing study: which model, hooks and labelled data, and how the probes are fitted and scored."""

    model: str
    """Model to probe: smollm2-135m, gemma-3-270m, a Hub id or a local folder."""
    hooks: str
    """Hooks separated by commas or ';' (outside braces), e.g. 'blocks.{5,10,15}.hook_resid_post'."""
    data: str
    """JSONL / CSV (text, label[, doc]), a folder with one file or sub-folder per label, or a built-in concept:
    genre, calendar, languages, agreement."""
    sae: list[str] = field(default_factory=list)
    """SAE folders whose latents to probe too (each one's hook must be among the hooks)."""
    neurons: bool = False
    """Also probe each hook's block's MLP neurons."""
    k: list[PositiveInt] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    """Sparse probe sizes, e.g. 1,4,16."""
    positions: str = "mean"
    """'mean' (over tokens, no BOS), 'last', or a token index (negative: from the end of each text)."""
    seed: NonNegativeInt = 0
    """Seeds the document split and the class balancing."""
    splits: PositiveInt = 1
    """Document splits to repeat the study on (seeds seed, seed + 1, ...): with more than one, the table gives each
    accuracy's mean and 95 % interval over them."""
    batch_size: PositiveInt = 16
    """Texts per model forward (at most)."""
    shared_data: str | None = None
    """Folder holding wikitext-2-raw and tinyshakespeare (for genre); None: ../shared/data."""
    positive: str | None = None
    """For two labels: the class a probe detects (default: the data's own, else the second in sorted order)."""
    dashboard: list[str] = field(default_factory=list)
    """Dashboard folders of the SAEs (one per --sae, in order; saelab dashboard writes them): the report links the
    latents the probes chose to their pages."""

    def __post_init__(self):
        self.positions = str(self.positions)
        check_fields(self)
        position_of(self.positions)


def position_of(text: str):
    """'mean', 'last' or a token index, from its text form."""
    if text in ("mean", "last"):
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"positions must be 'mean', 'last' or a token index, got {text!r}") from None


def probe_features(model, config: ProbeConfig) -> list[Features]:
    """The feature sets a config names: each hook, its block's MLP neurons (with `neurons`), each SAE's latents."""
    from saelab.analysis.probes import neuron_hook
    from saelab.hub import load_sae

    hooks = model.resolve_hooks(split_list(config.hooks))
    features = [Features(hook) for hook in hooks]
    for hook in hooks if config.neurons else []:
        if not hook.startswith("blocks."):
            raise ValueError(f"neurons: {hook} is not inside a block, so it has no MLP neurons")
        features.append(Features(neuron_hook(model, int(hook.split(".")[1]))))
    for folder in config.sae:
        sae = load_sae(folder)
        if sae.cfg.hook_name not in hooks:
            raise ValueError(f"SAE {folder} was trained on {sae.cfg.hook_name or 'an unnamed hook'}, which is not "
                             f"among the hooks ({', '.join(hooks)}); add its hook or leave it out")
        features.append(Features(sae=sae, label=f"sae {Path(folder).name} @ {sae.cfg.hook_name}"))
    return features


def run_probe_study(config: ProbeConfig, *, model=None, data: LabelledTexts | None = None, log=None,
                    trust_remote_code: bool = False, max_batch_tokens: int | None = None) -> ProbeResults:
    """The probing study a config describes (what `saelab probe` runs); `model` and `data` skip loading them."""
    from saelab.analysis.concepts import load_data
    from saelab.models import load_model

    data = data if data is not None else load_data(config.data, config.shared_data)
    if model is None:
        options = {} if max_batch_tokens is None else {"max_batch_tokens": max_batch_tokens}
        model = load_model(config.model, trust_remote_code=trust_remote_code, **options)
    if len(config.dashboard) > len(config.sae):
        raise ValueError(f"{len(config.dashboard)} dashboards for {len(config.sae)} SAEs: give one dashboard per SAE, "
                         "in the order of the SAEs")
    features = probe_features(model, config)
    results = run_probes(model, data, features, ks=config.k, positions=position_of(config.positions),
                         seed=config.seed, positive=config.positive, batch_size=config.batch_size,
                         splits=config.splits, log=log)
    saes = [f.name for f in features if f.kind == "sae"]
    results.dashboards = {name: str(Path(folder).resolve()) for name, folder in zip(saes, config.dashboard)}
    return results


__all__ = ["ProbeConfig", "ProbeRecord", "ProbeResults", "RESULTS_FILE", "SCHEMA_VERSION", "position_of",
           "probe_features", "run_probe_study", "run_probes"]

