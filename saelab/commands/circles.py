"""`saelab circles clusters` and `saelab circles calendar`: multi-dimensional features. Their settings are the
studies' own configs (saelab.analysis: ClusterSearchConfig, CalendarConfig)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from saelab.analysis.circles import CalendarConfig
from saelab.analysis.clusters import ClusterSearchConfig
from saelab.commands.common import LoadsModel, RunsModel
from saelab.options import Flag, Group


@dataclass(kw_only=True)
class ClustersCommand(LoadsModel):
    """Cluster an SAE's latents (by decoder direction or by co-activation) and rank clusters by irreducibility."""

    study: Annotated[ClusterSearchConfig, Group(spell={"sae": Flag(positional=True),
                                                       "no_model": Flag(switch=True)})]
    out: str = "runs/circles"
    """folder for clusters.json, clusters.md and plots"""


def cmd_circles_clusters(config: ClustersCommand) -> None:
    """Cluster an SAE's latents (by decoder direction, or by where they fire: --method coactivation-graph) and rank
    the clusters by how irreducible (circle-like) they are, beside random clusters of the same size."""
    from saelab.analysis.clusters import run_cluster_search
    from saelab.hub import load_sae
    from saelab.models import load_model

    study = config.study
    sae = load_sae(study.sae)
    name = None if study.no_model else study.model or sae.cfg.model_name
    tokenizer = load_model(name, trust_remote_code=config.trust_remote_code).tokenizer if name else None
    search = run_cluster_search(study, sae=sae, tokenizer=tokenizer, log=print)
    search.save(config.out, tokenizer, plots=study.plots)
    print(search.table())
    print(f"wrote {config.out}/clusters.json, clusters.md and the top {min(study.plots, len(search.clusters))} plots "
          f"({search.seconds:.0f} s)")


@dataclass(kw_only=True)
class CalendarCommand(RunsModel):
    """Days / months arithmetic: leave-one-out circle probes, order over templates, interventions."""

    study: CalendarConfig
    out: str = "runs/circles"
    """folder for <task>.json, <task>.md and figures"""


def cmd_circles_calendar(config: CalendarCommand) -> None:
    """Days / months arithmetic: accuracy, a circle probe per layer (left one item out, beside its shuffled-order
    control; and on held-out durations), calendar order over --order-templates wordings, interventions vs
    baselines."""
    import time

    from saelab.analysis.circles import run_calendar

    written = []
    for study in run_calendar(config.study, trust_remote_code=config.trust_remote_code,
                              max_batch_tokens=config.max_batch_tokens):
        saving = time.time()
        folder, name = study.save(config.out), study.name()
        print(study.table())
        written += sorted(path.name for pattern in (f"{name}.*", f"{name}_*.png") for path in folder.glob(pattern)
                          if path.stat().st_mtime >= saving - 1)  # not an older run's figures
    print(f"wrote {config.out}/: {', '.join(written)}")
