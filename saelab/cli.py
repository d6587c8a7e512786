"""The `saelab` command. With no arguments it runs the quickstart: the main job on an embedded default.

Every verb is a row of VERBS: the config dataclass its flags come from (saelab.options.add_config_flags: a field's
docstring is its help, its annotation its type and range, its default the flag's) and the function in
saelab.commands that runs the config built from them.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path
from typing import Any, Callable

from saelab.commands.cache import CacheCommand, InfoCommand, info, print_cache_summary
from saelab.commands.circles import CalendarCommand, ClustersCommand, calendar, clusters
from saelab.commands.common import print_metrics
from saelab.commands.dashboard import DashboardCommand, dashboard
from saelab.commands.evaluate import EvalCommand, PushCommand, evaluate, push
from saelab.commands.match import MatchCommand, match
from saelab.commands.probe import ProbeCommand, SteerCommand, probe, steer
from saelab.commands.quickstart import QuickstartCommand, quickstart
from saelab.commands.train import TrainCommand, add_setting_flags
from saelab.options import (SettingError, add_config_flags, check_keys, check_value, config_from_flags, flag_values,
                            from_mapping, parse_count)
from saelab.training.config import DEFAULT_K, SAESpec, TrainConfig

PRODUCT_FIELDS = ("arch", "width", "k", "hook")
"""SAESpec fields that name an SAE: on the command line each takes a comma list and the lists form a product."""
TRAIN_FLAGS = [name for name in TrainConfig.__dataclass_fields__]
RUN_KEYS = ["acts", "model", "hooks", "text", "out", "eval_tokens", "train", "saes"]
"""Top-level keys of a YAML / JSON run file."""


def _text_config(args):
    from saelab.data import TextConfig

    return TextConfig(source=args.text, field=args.field, context_len=args.context_len,
                      prepend_bos=not args.no_bos, seed=args.seed)


def cmd_cache(args) -> None:
    from saelab import distributed
    from saelab.activations import cache_activations
    from saelab.models import load_model

    world = distributed.init()  # under torchrun: each rank writes its share of the shards
    model = load_model(args.model, trust_remote_code=args.trust_remote_code, max_batch_tokens=args.max_batch_tokens)
    started = time.perf_counter()
    manifest = cache_activations(model, args.hooks, args.out, text=_text_config(args), tokens=args.tokens,
                                 batch_size=args.batch_size, shard_tokens=args.shard_tokens, dtype=args.dtype,
                                 drop_bos=not args.keep_bos, overwrite=args.overwrite)
    if world.main:
        print_cache_summary(args.out, manifest, time.perf_counter() - started)


def option_fields() -> dict[str, list[str]]:
    """{option: architectures that read it}: dtype (every SAEConfig's), then each architecture's options class."""
    from saelab.sae import available_architectures, sae_class
    from saelab.training.config import COMMON_OPTIONS

    readers: dict[str, list[str]] = {}
    for arch in available_architectures():
        for name in (*COMMON_OPTIONS, *sae_class(arch).options_cls.names()):
            if name != "d_in":  # read off the activations, never a flag
                readers.setdefault(name, []).append(arch)
    return readers


def option_owners() -> dict[str, type]:
    """{option: the dataclass that declares it (its type, default and help)}, for the flags of option_fields."""
    from saelab.sae import SAEConfig, sae_class

    owners: dict[str, type] = {}
    for name, archs in option_fields().items():
        cls = sae_class(archs[0]).options_cls
        owners[name] = cls if name in cls.names() else SAEConfig
    return owners


def sae_specs(args, config: dict, where: str) -> list[SAESpec]:
    """The SAEs to train: the product of the comma lists --arch x --width x --k x --hook, else the run file's `saes`
    (else one SAE of SAESpec's defaults); --lr and architecture options then apply to every SAE that reads them."""
    from saelab.sae import available_architectures, sae_class

    given = flag_values(args.given, list(PRODUCT_FIELDS))
    if given or not config.get("saes"):
        lists = {name: given.get(name, [getattr(SAESpec, name)]) for name in PRODUCT_FIELDS}  # parsed and checked
        if "k" in given and not any(sae_class(arch).takes_k for arch in lists["arch"]):
            takers = ", ".join(arch for arch in available_architectures() if sae_class(arch).takes_k)
            raise SettingError(f"--k is read only by {takers}, and no SAE here has that architecture; ask "
                               f"{', '.join(lists['arch'])} for an L0 with --target-l0 instead, and drop --k")
        specs, seen = [], set()
        for arch, width, k, hook in itertools.product(*lists.values()):
            takes_k = sae_class(arch).takes_k
            spec = dict(arch=arch, width=width, k=(k or DEFAULT_K) if takes_k else None, hook=hook or None)
            if tuple(spec.values()) not in seen:
                seen.add(tuple(spec.values()))
                specs.append(spec)
        where = "command line"
    else:
        saes = check_value(config["saes"], list[dict], f"{where}: saes")
        specs = [dict(spec, options=check_value(spec.get("options"), dict | None, f"{where}: saes[{i}].options") or {})
                 for i, spec in enumerate(saes)]
    if getattr(args.given, "lr", None) is not None:
        for spec in specs:
            spec["lr"] = args.given.lr
    options = flag_values(args.given, list(option_fields()))
    for name, value in options.items():
        readers = [spec for spec in specs if sae_class(spec.get("arch", SAESpec.arch)).arch in option_fields()[name]]
        if not readers:
            archs = ", ".join(option_fields()[name])
            raise SettingError(f"--{name.replace('_', '-')} is read only by {archs}, and no SAE here has that "
                               "architecture")
        for spec in readers:
            spec.setdefault("options", {})[name] = value
    return [from_mapping(SAESpec, spec, f"{where}: saes[{i}]") for i, spec in enumerate(specs)]


def load_config_file(path: str | None) -> dict:
    """A run described in YAML or JSON (keys: RUN_KEYS); unknown keys are refused, naming the valid ones."""
    if path is None:
        return {}
    import json

    import yaml

    text = Path(path).read_text()
    try:
        data = (json.loads(text, object_pairs_hook=lambda pairs: _unique_keys(pairs, path)) if path.endswith(".json")
                else _load_yaml(text, path))
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise SettingError(f"{path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: {error}") from None
    if not isinstance(data, dict):
        raise SettingError(f"{path} must hold a mapping with keys {', '.join(RUN_KEYS)}")
    check_keys(data, RUN_KEYS, path)
    return data


def _unique_keys(pairs: list[tuple], where: str) -> dict:
    """A JSON object from its (key, value) pairs, refusing a key given twice (see _duplicate_key)."""
    mapping: dict = {}
    for key, value in pairs:
        if key in mapping:
            raise _duplicate_key(key, where)
        mapping[key] = value
    return mapping


def _load_yaml(text: str, path: str):
    """yaml.safe_load, but a key given twice in one mapping is refused, naming it and its line."""
    from collections.abc import Hashable

    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<` merges are overrides by design
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, Hashable):
                    continue  # PyYAML's own error says so
                if key in seen:
                    raise _duplicate_key(key, f"{path}, line {key_node.start_mark.line + 1}")
                seen.add(key)
            return super().construct_mapping(node, deep)

    return yaml.load(text, Loader=UniqueKeyLoader)


def _duplicate_key(key, where: str) -> SettingError:
    """JSON and YAML parsers keep the last of two equal keys silently: the run would use a setting its author
    did not see, so it is refused instead."""
    return SettingError(f"{where}: the key {key!r} is given twice in one mapping; keep one of them")


def train_config(args, config: dict, where: str) -> TrainConfig:
    """TrainConfig from the run file's `train` mapping, with command-line flags taking precedence."""
    fields = dict(check_value(config.get("train") or {}, dict, f"{where}: train"))
    fields.update(flag_values(args.given, TRAIN_FLAGS))
    return from_mapping(TrainConfig, fields, f"{where}: train")


def train_text(args, config: dict, where: str):
    """The text a stream trains on: the run file's `text` (a source, or TextConfig fields) with --text and
    --context-len over it (flags win; the file's other fields stay)."""
    from saelab.data import TextConfig

    fields = config.get("text") or {}
    fields = (dict(fields) if isinstance(fields, dict) else {"source": check_value(fields, str, f"{where}: text")})
    flags = {"source": args.text, "context_len": args.context_len}
    return from_mapping(TextConfig, {**fields, **{k: v for k, v in flags.items() if v is not None}},
                        f"{where}: text")


def cmd_train(args) -> None:
    import warnings

    from saelab import distributed
    from saelab.activations.source import open_source, run_share
    from saelab.errors import SaelabError
    from saelab.models import load_model
    from saelab.training import NotEvaluated, train
    from saelab.training.landing import OffTarget, describe

    where = args.config or "command line"
    config = load_config_file(args.config)
    run = {key: check_value(config[key], hint, f"{where}: {key}") for key, hint in
           (("acts", str), ("model", str), ("hooks", str | list[str]), ("out", str), ("eval_tokens", int))
           if config.get(key) is not None}
    settings = train_config(args, config, where)
    specs = sae_specs(args, config, where)
    world = distributed.init(settings.device)  # under torchrun: join the ranks (see TrainConfig.parallel)
    device = distributed.local_device(settings.device, world)
    acts = args.acts or run.get("acts")
    out = args.out or run.get("out") or "runs/sae"
    eval_tokens = args.eval_tokens if args.eval_tokens is not None else run.get("eval_tokens", 4096)
    model, stream = None, {}
    if not acts:
        name, hooks = args.model or run.get("model"), args.hooks or run.get("hooks")
        if not name or not hooks:
            raise SettingError("train needs --acts (an activation cache) or --model with --hooks (stream live)")
        model = load_model(name, device=device, trust_remote_code=args.trust_remote_code,
                           max_batch_tokens=args.max_batch_tokens)
        stream = dict(model=model, hooks=hooks.split(";") if isinstance(hooks, str) else hooks,
                      text=train_text(args, config, where))
    source = open_source(acts or None, batch_size=settings.batch_size, seed=settings.seed,
                         share=run_share(settings), **stream)
    if acts and eval_tokens and world.main:  # rank 0 alone evaluates
        model = load_model(source.model_name, device=device, trust_remote_code=args.trust_remote_code,
                           max_batch_tokens=args.max_batch_tokens)
    eval_text = source.held_out_text(settings.tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotEvaluated)  # said once below, in one line
        warnings.simplefilter("ignore", OffTarget)  # likewise, once per SAE
        trained = train(source, specs, settings, out=out, resume=not args.no_resume,
                        model=model if eval_tokens else None, eval_text=eval_text, eval_tokens=eval_tokens or 0)
    for result in trained if world.main else []:
        print_metrics(result.folder, result.metrics)
    for result in trained if world.main else []:
        if result.l0 is not None and result.l0["off_target"]:
            print(f"saelab: warning: {describe(result.name, result.l0)}", file=sys.stderr)
    missed = [result for result in trained if result.not_evaluated]
    if missed:  # the SAEs are saved either way; the exit status says whether an evaluation asked for is missing
        message = (f"{len(missed)} of {len(trained)} SAEs were trained and saved but not evaluated: "
                   f"{missed[0].not_evaluated}. Evaluate on other held-out text with `saelab eval {missed[0].folder} "
                   f"--text FILE`{' (likewise the others)' if len(missed) > 1 else ''}, or train with --eval-tokens 0 "
                   "to skip the evaluation")
        if args.eval_tokens is not None or "eval_tokens" in run:
            raise SaelabError(message)
        print(f"saelab: warning: {message}", file=sys.stderr)


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
    Verb("quickstart", QuickstartCommand, quickstart),
    Verb("cache", CacheCommand, cmd_cache),
    Verb("train", TrainCommand, cmd_train, settings=add_setting_flags),
    Verb("eval", EvalCommand, evaluate),
    Verb("push", PushCommand, push),
    Verb("probe", ProbeCommand, probe),
    Verb("steer", SteerCommand, steer),
    Verb("dashboard", DashboardCommand, dashboard),
    Verb("match", MatchCommand, match),
    Verb("circles", help="multi-dimensional features: SAE cluster search, calendar circles",
         verbs=(Verb("clusters", ClustersCommand, clusters), Verb("calendar", CalendarCommand, calendar))),
    Verb("info", InfoCommand, info),
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
