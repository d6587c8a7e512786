"""The `saelab` command. With no arguments it runs the quickstart: the main job on an embedded default.

Every verb is a row of VERBS: the config dataclass its flags come from (saelab.options.add_config_flags: a field's
docstring is its help, its annotation its type and range, its default the flag's) and the function in
saelab.commands that runs the config built from them.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Callable

from saelab.commands.cache import CacheCommand, InfoCommand, cmd_cache, cmd_info
from saelab.commands.circles import CalendarCommand, ClustersCommand, cmd_circles_calendar, cmd_circles_clusters
from saelab.commands.dashboard import DashboardCommand, cmd_dashboard
from saelab.commands.evaluate import EvalCommand, PushCommand, cmd_eval, cmd_push
from saelab.commands.evals import EvalsCommand, cmd_evals
from saelab.commands.match import MatchCommand, cmd_match
from saelab.commands.probe import ProbeCommand, SteerCommand, cmd_probe, cmd_steer
from saelab.commands.quickstart import QuickstartCommand, cmd_quickstart
from saelab.commands.train import TrainCommand, add_setting_flags, cmd_train
from saelab.options import add_config_flags, config_from_flags, flag_values


@dataclasses.dataclass(frozen=True)
class Verb:
    """One `saelab` verb: its flags are the fields of `config`, and `run` gets the config built from them; a verb
    made of sub-verbs (`circles clusters`) has those instead."""

    name: str
    config: type | None = None
    run: Callable[[Any], None] | None = None
    verbs: tuple["Verb", ...] = ()
    help: str | None = None
    """default: the first line of the config's docstring"""
    settings: Callable[[argparse.ArgumentParser], list[str]] | None = None
    """Adds flags that are not fields of `config` but override a run file (train's SAE and training settings):
    `run` gets those given as `config.given`."""

    def summary(self) -> str:
        text = self.help or (self.config.__doc__ or "").strip().split("\n")[0].rstrip(".")
        return text[:1].lower() + text[1:]


VERBS = (
    Verb("quickstart", QuickstartCommand, cmd_quickstart),
    Verb("cache", CacheCommand, cmd_cache),
    Verb("train", TrainCommand, cmd_train, settings=add_setting_flags),
    Verb("eval", EvalCommand, cmd_eval),
    Verb("evals", EvalsCommand, cmd_evals),
    Verb("push", PushCommand, cmd_push),
    Verb("probe", ProbeCommand, cmd_probe),
    Verb("steer", SteerCommand, cmd_steer),
    Verb("dashboard", DashboardCommand, cmd_dashboard),
    Verb("match", MatchCommand, cmd_match),
    Verb("circles", help="multi-dimensional features: SAE cluster search, calendar circles",
         verbs=(Verb("clusters", ClustersCommand, cmd_circles_clusters),
                Verb("calendar", CalendarCommand, cmd_circles_calendar))),
    Verb("info", InfoCommand, cmd_info),
)


def build_parser(verbs: tuple[Verb, ...] = VERBS) -> argparse.ArgumentParser:
    """The `saelab` parser, every subparser made from the verb table."""
    parser = argparse.ArgumentParser(prog="saelab", description=__doc__.split("\n")[0])
    _add_verbs(parser, verbs, "command", required=False)
    return parser


def _add_verbs(parser: argparse.ArgumentParser, verbs: tuple[Verb, ...], dest: str, required: bool) -> None:
    commands = parser.add_subparsers(dest=dest, required=required)
    for verb in verbs:
        sub = commands.add_parser(verb.name, help=verb.summary())
        if verb.verbs:
            _add_verbs(sub, verb.verbs, f"{verb.name}_command", required=True)
            continue
        add_config_flags(sub, verb.config)
        sub.set_defaults(_verb=verb, _given=verb.settings(sub) if verb.settings else [])


def run(args: argparse.Namespace) -> None:
    """Build the verb's config from the parsed flags (its checks run here) and run it."""
    config = config_from_flags(args._verb.config, args)
    if args._given:
        config = dataclasses.replace(config, given=argparse.Namespace(**flag_values(args, args._given)))
    args._verb.run(config)


def main(argv: list[str] | None = None) -> int:
    from saelab.errors import SaelabError, describe_os_error

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["quickstart", *(argv or [])])
    try:
        run(args)
    except (SaelabError, ValueError) as error:
        print(f"saelab: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # disk full, read-only or occupied paths: name the file and what to do
        print(f"saelab: error: {describe_os_error(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("saelab: interrupted; rerun the same command to continue where it stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
