"""Run several evals on several SAEs, write each record beside its SAE, and read them back as one table, with
seeds of one recipe pooled and recipes compared against their seed spread.

    results = run_suite(["runs/sae/a", "runs/sae/b"], ["core", "absorption"])
    print(suite_table(results))                 # one row per SAE, every headline metric with its interval
    print(seeds_table(results))                 # SAEs of one recipe pooled: mean [t interval], and recipe vs recipe

Each eval is a module of saelab.evals with EVAL_TYPE_ID, a config class and run(sae, model, config, progress=...);
its result's saebench(sae) is the record written to <sae>/evals/<eval_type_id>.json (saelab.evals.saebench).
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from saelab.evals.intervals import Interval, compare, over_seeds
from saelab.evals.saebench import read_intervals, read_outputs, write_output

EVALS = {"core": "saelab.evals.core", "absorption": "saelab.evals.absorption",
         "sparse_probing": "saelab.evals.sparse_probing", "synthetic": "saelab.evals.synthetic_recipe"}
"""Suite name -> the module that runs it."""
DEFAULT_SUITE = ("core", "absorption", "sparse_probing")
RECIPE_KEYS = ("arch", "d_in", "width", "k", "hook_name", "model_name")
"""What two SAEs must share to count as seeds of one recipe (with their architecture's options)."""


def eval_module(name: str):
    """The module running the suite's eval `name`."""
    if name not in EVALS:
        raise ValueError(f"no eval named {name!r}; the suite has {', '.join(EVALS)}")
    return importlib.import_module(EVALS[name])


@dataclass
class SAEEvals:
    """One SAE's eval records, as written beside it."""

    folder: Path
    label: str
    recipe: dict[str, Any]
    records: dict[str, dict] = field(default_factory=dict)

    def headline(self) -> dict[str, Interval]:
        """{"<eval>: <category>.<metric>": Interval} for every metric its eval gave an interval, and the core eval's
        fvu and fvu_typical ("core: saelab.fvu"), which SAEBench's layout has no field for."""
        found = {}
        for eval_id, record in sorted(self.records.items()):
            found.update({f"{eval_id}: {name}": i for name, i in read_intervals(record).items()})
            extra = record.get("eval_result_unstructured", {}).get("saelab", {}).get("fvu_intervals", {})
            found.update({f"{eval_id}: saelab.{name}": Interval(**fields) for name, fields in extra.items()})
        return found


def recipe_of(sae, folder: Path | None = None) -> dict[str, Any]:
    """What identifies the SAE's recipe: its config but the weights, and the name saelab's training gave it
    (`saelab_recipe` in cfg.json's metadata: a BatchTopK SAE is saved as a JumpReLU, yet is not a JumpReLU recipe)."""
    cfg = sae.cfg
    options = cfg.options if isinstance(cfg.options, dict) else getattr(cfg.options, "__dict__", {})
    return {"recipe": _trained_as(folder), **{key: getattr(cfg, key) for key in RECIPE_KEYS},
            **{f"options.{k}": v for k, v in options.items()}}


def _trained_as(folder: Path | None) -> str | None:
    from saelab.hub.folder import read_run_keys

    try:
        return read_run_keys(folder).get("saelab_recipe") if folder is not None else None
    except (OSError, ValueError):  # not a saelab folder (a Gemma Scope params file, say): its config is all there is
        return None


def label_of(folder: Path) -> str:
    """A short name for an SAE folder: its last two path parts (hook/arch-width-k in a training run)."""
    return "/".join(Path(folder).resolve().parts[-2:])


def run_suite(folders: Sequence[str | Path], suite: Sequence[str] = DEFAULT_SUITE, *,
              configs: dict[str, Any] | None = None, load_model: Callable[[Any, Path], Any] | None = None,
              out: str | Path | None = None, hook: str | None = None, progress: bool = True) -> list[SAEEvals]:
    """Run every eval of `suite` on every SAE folder and write each record to <folder>/evals/ (or <out>/<label>/evals
    with `out`). `configs` maps a suite name to its config; `load_model(sae, folder)` gives the model an SAE reads
    (default: the one its cfg names; one model is loaded once for all SAEs that share it). `hook` is the hook point
    every SAE reads, in place of the one its cfg names: an SAE trained outside a model run (on cached activations)
    names none, or its trainer's own name for the tensor."""
    from saelab.hub import load_sae

    modules = {name: eval_module(name) for name in suite}  # an unknown name fails before any SAE is loaded
    models: dict[str, Any] = {}
    results = []
    for folder in map(Path, folders):
        sae = with_hook(load_sae(folder), hook)
        key = sae.cfg.model_name
        if key not in models:
            models[key] = (load_model or _default_model)(sae, folder)
        where = Path(out) / label_of(folder).replace("/", "__") if out is not None else folder
        entry = SAEEvals(folder, label_of(folder), recipe_of(sae, folder))
        for name, module in modules.items():
            result = module.run(sae, models[key], (configs or {}).get(name), progress=progress)
            record = result.saebench(sae)
            write_output(record, where)
            entry.records[record["eval_type_id"]] = record
        results.append(entry)
    return results


def with_hook(sae, hook: str | None):
    """`sae` reading `hook` (its config checks the name), or as it is when no hook is given."""
    if hook:
        sae.cfg = dataclasses.replace(sae.cfg, hook_name=hook)
    return sae


def _default_model(sae, folder: Path):
    from saelab.models import load_model

    if not sae.cfg.model_name:
        raise ValueError(f"{folder} does not say which model it belongs to (its cfg names none); pass the model")
    return load_model(sae.cfg.model_name)


def read_suite(folders: Sequence[str | Path]) -> list[SAEEvals]:
    """The records already written beside each SAE folder (no model, no eval run)."""
    from saelab.hub import load_sae

    return [SAEEvals(Path(f), label_of(Path(f)), recipe_of(load_sae(f), Path(f)), read_outputs(f)) for f in folders]


def suite_table(results: Sequence[SAEEvals]) -> str:
    """Markdown: one row per metric, one column per SAE, each cell `estimate [low, high]`."""
    metrics = sorted({name for r in results for name in r.headline()})
    lines = ["| metric | " + " | ".join(r.label for r in results) + " |", "|---" * (len(results) + 1) + "|"]
    for metric in metrics:
        cells = [str(r.headline().get(metric, "")) for r in results]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def recipes(results: Sequence[SAEEvals]) -> dict[str, list[SAEEvals]]:
    """SAEs grouped by recipe (everything but the seed), named by their first SAE's label."""
    groups: dict[tuple, list[SAEEvals]] = {}
    for result in results:
        groups.setdefault(tuple(sorted((k, str(v)) for k, v in result.recipe.items())), []).append(result)
    def name(group: list[SAEEvals]) -> str:
        first = group[0].recipe
        recipe = first["recipe"] or f"{first['arch']}-{first['width']}"
        return f"{recipe} ({len(group)} seed{'s' if len(group) > 1 else ''})"

    return {name(group): group for group in groups.values()}


def pooled(group: Sequence[SAEEvals]) -> dict[str, Interval]:
    """Each headline metric over the seeds of one recipe (mean and t interval)."""
    names = sorted(set.intersection(*(set(r.headline()) for r in group)))
    return {name: over_seeds([r.headline()[name].estimate for r in group]) for name in names}


def seeds_table(results: Sequence[SAEEvals]) -> str:
    """Markdown: each recipe's metrics pooled over its seeds, then every pair of recipes compared metric by metric
    (is the difference beyond the seed spread?)."""
    groups = {name: pooled(group) for name, group in recipes(results).items()}
    metrics = sorted(set.union(*(set(g) for g in groups.values()))) if groups else []
    lines = ["| metric | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
    for metric in metrics:
        cells = [_seed_cell(groups[g].get(metric)) for g in groups]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    seeded = {name: g for name, g in groups.items() if all(i.n >= 2 for i in g.values())}
    if len(seeded) < len(groups):
        lines += ["", "Recipes with one seed are not compared: one SAE has no seed spread to compare a difference with."]
    for (a, ga), (b, gb) in itertools.combinations(seeded.items(), 2):
        lines += ["", f"{b} against {a}:"]
        lines += [f"- {metric}: {compare(ga[metric], gb[metric])}" for metric in metrics if metric in ga and metric in gb]
    return "\n".join(lines)


def _seed_cell(interval: Interval | None) -> str:
    if interval is None:
        return ""
    if interval.n < 2:
        return f"{interval.estimate:.4g} (1 seed)"
    return f"{interval} (sd {interval.std:.2g}, n={interval.n})"
