"""`saelab match`: match SAE features across models (or SAEs) on the same text, each number beside its chance
level (token shuffle, an untrained twin of B's SAE, random directions). Its settings are the matching study's
config (saelab.analysis.universality.MatchStudyConfig)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from saelab.analysis.universality import MatchStudyConfig
from saelab.commands.common import RunsModel, report_study, text_flag
from saelab.options import Flag, Group

SIDE = Flag(repeat=True, required=True, metavar="MODEL:HOOK[:SAE_FOLDER]")


@dataclass(kw_only=True)
class MatchCommand(RunsModel):
    """Match SAE features across models (or SAEs) on the same text."""

    study: Annotated[MatchStudyConfig, Group(spell={
        "a": SIDE, "b": SIDE, "text": Flag(parse=text_flag), "null_draws": Flag(name="nulls"),
        "shared_top_word": Flag(switch=True), "neurons": Flag(switch=True)})]
    out: str = "runs/match"
    """folder for matching.json, matching.md and figures"""


def cmd_match(config: MatchCommand) -> None:
    """Match features of two (model, hook, SAE) sides over the same text; see saelab.analysis.universality."""
    from saelab.analysis.universality import run_match

    results = run_match(config.study, log=print, trust_remote_code=config.trust_remote_code,
                        max_batch_tokens=config.max_batch_tokens)
    report_study(results, config.out, "matching.json, matching.md and figures")
