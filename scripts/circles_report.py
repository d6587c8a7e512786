"""The numbers and figures of docs/circles.md: days and months as circles in SmolLM2-135M-Instruct and Gemma 3 270M,
and a cluster search on a saelab SAE trained on WikiText.

Per model and task (49 day prompts, 144 month prompts): the model's accuracy, a circle probe at every layer that
places each left-out item (and one fitted on the prompts of some durations and scored on the others), each with a
shuffled-order control, the calendar order of the item means over several templates, the variance in the circle
plane, and interventions at a few layers against the baselines. Cluster search (--sae, with --acts): spectral and
graph clustering of the decoder directions and graph clustering by co-activation, ranked by the irreducibility
score over the cache beside random clusters of the same size.

    nice -n 5 python scripts/circles_report.py --models smollm2-135m:4,10,16 gemma-3-270m:3,7,11 --out docs/circles
    saelab cache --model smollm2-135m --hooks blocks.10.hook_resid_post --text wiki.test.raw --tokens 250k --out A
    saelab train --acts A --arch topk --width 4608 --k 32 --tokens 1M --out S
    nice -n 5 python scripts/circles_report.py --models --sae S/blocks.10.hook_resid_post/topk-4608-k32 --acts A
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

import saelab
from saelab.analysis.circles import CalendarConfig, run_calendar
from saelab.analysis.clusters import ClusterSearchConfig, cluster_decoder, run_cluster_search
from saelab.analysis.concepts import DAYS, MONTHS
from saelab.options import add_flags, flag_values

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["smollm2-135m:4,10,16", "gemma-3-270m:3,7,11"]
CALENDAR_FLAGS = ["tasks", "k", "test_fraction", "order_templates", "seed", "batch_size"]
CLUSTER_FLAGS = ["n_clusters", "window", "random_draws"]
CLUSTER_METHODS = ("spectral", "graph", "coactivation-graph")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def calendar(spec: str, out: Path, targets: dict[str, int], settings: dict, progress: bool) -> list[str]:
    """Every task of the calendar study on one model, intervening at the spec's layers with the task's targets."""
    name, layers = spec.split(":")
    config = CalendarConfig(model=name, intervene=[int(x) for x in layers.split(",") if x], **settings)
    model = saelab.load_model(name)
    log(f"loaded {model}")
    short = Path(name).name
    tables = []
    for task in config.task_list():
        one = dataclasses.replace(config, tasks=task.name, targets=targets[task.name])
        (study,) = run_calendar(one, model=model, progress=progress)
        folder = out / short
        study.save(folder)
        log(f"{short} {task.name}: {study.seconds:.0f} s, accuracy {study.accuracy.accuracy:.2f}")
        tables.append(f"### {model.name}: {task.name}\n\n{study.table()}")
        print(study.table(), flush=True)
    return tables


def clusters(sae_folder: str, acts: str, out: Path, settings: dict, progress: bool) -> list[str]:
    """The cluster search with both clusterings of the decoder and the co-activation graph."""
    sae = saelab.load_sae(sae_folder)
    model = saelab.load_model(sae.cfg.model_name)
    tables = []
    words = DAYS + MONTHS
    for method in CLUSTER_METHODS:
        config = ClusterSearchConfig(sae=sae_folder, acts=acts, method=method, **settings)
        started = time.perf_counter()
        found = cluster_decoder(sae, config)
        log(f"{method}: {len(found.groups())} clusters of 2+ latents in {time.perf_counter() - started:.0f} s")
        search = run_cluster_search(config, sae=sae, tokenizer=model.tokenizer, clusters=found, progress=progress)
        search.save(out / f"clusters_{method}", model.tokenizer, plots=4)
        calendar_clusters = search.find(words)
        summary = {"method": method, "found": search.clustering["n_clusters_found"],
                   "scored": len(search.clusters), "seconds": round(search.seconds),
                   "calendar": [(c.cluster, [search.clusters.index(c) + 1], c.top_tokens[:6], round(c.score, 3))
                                for c in calendar_clusters]}
        log(json.dumps(summary))
        tables.append(f"### {method} clustering ({json.dumps(found.settings)})\n\n{search.table()}\n"
                      f"clusters whose top tokens include a day or month: {summary['calendar']}\n")
    return tables


def build_parser() -> argparse.ArgumentParser:
    """The report's own flags, and the study settings it lets through from CalendarConfig and ClusterSearchConfig
    (their defaults and help come from the configs)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=MODELS, help="name:intervention_layers")
    parser.add_argument("--sae", help="SAE folder for the cluster search")
    parser.add_argument("--acts", help="activation cache of the SAE's hook")
    parser.add_argument("--targets", default="days:3,months:2", help="other items per held-out prompt, per task")
    parser.add_argument("--out", default=str(ROOT / "docs" / "circles"))
    parser.add_argument("--no-progress", action="store_true")
    add_flags(parser.add_argument_group("calendar study (CalendarConfig)"), CalendarConfig, CALENDAR_FLAGS)
    add_flags(parser.add_argument_group("cluster search (ClusterSearchConfig)"), ClusterSearchConfig, CLUSTER_FLAGS)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    targets = {k: int(v) for k, v in (part.split(":") for part in args.targets.split(","))}
    tables = []
    for spec in args.models:
        tables += calendar(spec, out, targets, flag_values(args, CALENDAR_FLAGS), not args.no_progress)
    if args.sae:
        tables += clusters(args.sae, args.acts, out, flag_values(args, CLUSTER_FLAGS), not args.no_progress)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    name = "tables_" + ("_".join(Path(s.split(":")[0]).name for s in args.models) or "clusters") + ".md"
    (out / name).write_text(f"Generated by scripts/circles_report.py ({stamp})\n\n" + "\n".join(tables))
    log(f"wrote {out / name}")


if __name__ == "__main__":
    main()
