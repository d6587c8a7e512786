"""`saelab probe` and `saelab steer`: linear probes for a labelled concept, and a steering sweep along a direction.
Their settings are the studies' own configs (saelab.analysis: ProbeConfig, SteerConfig)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from saelab.analysis.report import ProbeConfig
from saelab.analysis.steering import SteerConfig
from saelab.commands.common import RunsModel, report_study, text_flag, token_position
from saelab.options import Flag, Group

SWITCH, POSITIONS = Flag(switch=True), Flag(parse=token_position, metavar="POSITIONS")


@dataclass(kw_only=True)
class ProbeCommand(RunsModel):
    """Linear probes on residual dims, MLP neurons and SAE latents."""

    study: Annotated[ProbeConfig, Group(spell={"sae": Flag(repeat=True), "dashboard": Flag(repeat=True),
                                               "neurons": SWITCH, "positions": POSITIONS})]
    out: str = "runs/probe"
    """folder for probes.json, probes.md, accuracy_vs_k.png"""


def cmd_probe(config: ProbeCommand) -> None:
    """Probe residual dimensions, MLP neurons and SAE latents at each hook for a labelled concept."""
    from saelab.analysis.report import run_probe_study

    results = run_probe_study(config.study, log=print, trust_remote_code=config.trust_remote_code,
                              max_batch_tokens=config.max_batch_tokens)
    report_study(results, config.out, "probes.json, probes.md, accuracy_vs_k.png")


@dataclass(kw_only=True)
class SteerCommand(RunsModel):
    """Steering sweep: target effect and side effects (KL, CE) per alpha."""

    study: Annotated[SteerConfig, Group(spell={"clamp": SWITCH, "positions": POSITIONS,
                                               "side_text": Flag(parse=text_flag)})]
    out: str = "runs/steer"
    """folder for steering.json and steering.png"""


def cmd_steer(config: SteerCommand) -> None:
    """Sweep a steering strength: target effect and side effects (KL, CE on unrelated text) at each alpha."""
    from saelab.analysis.steering import run_steering

    result = run_steering(config.study, log=print, trust_remote_code=config.trust_remote_code,
                          max_batch_tokens=config.max_batch_tokens)
    report_study(result, config.out, "steering.json, steering.md and steering.png")
