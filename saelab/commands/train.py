"""`saelab train`: train SAEs on an activation cache or a live model stream, described by flags, a run file, or
both (flags win). Transcoders too: `saelab train --acts CACHE --hook blocks.5.ln2.hook_normalized
--target-hook blocks.5.hook_mlp_out [--skip]`, or target_hook (and options: {skip: true}) in a run file's saes.
Crosscoders: `saelab train --acts CACHE --join blocks.6.hook_resid_post,blocks.9.hook_resid_post`."""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass, field
from typing import Annotated

from saelab.commands.common import RunsModel, Switch, print_metrics, text_flag
from saelab.commands.run_file import load_config_file
from saelab.data import ContextLen
from saelab.options import (Flag, NonNegativeInt, SettingError, add_flags, check_value, flag_values, from_mapping,
                            split_list)
from saelab.training.config import DEFAULT_K, SAESpec, TrainConfig

PRODUCT_FIELDS = ("arch", "width", "k", "hook")
"""SAESpec fields that name an SAE: on the command line each takes a comma list and the lists form a product."""
TRAIN_FLAGS = [name for name in TrainConfig.__dataclass_fields__]


@dataclass(kw_only=True)
class TrainCommand(RunsModel):
    """Train SAEs (several at once: comma lists form a product)."""

    config: str | None = None
    """YAML or JSON run file (acts / model+hooks+text, out, train, saes)"""
    acts: str | None = None
    """activation cache folder to train on"""
    model: str | None = None
    """stream live from this model instead of a cache (with --hooks)"""
    hooks: list[str] | None = None
    """hooks to stream, separated by commas or ';' outside braces (with --model)"""
    text: Annotated[str | None, Flag(parse=text_flag)] = None
    """text for --model streaming (default: the run file's, else built-in)"""
    context_len: ContextLen | None = None
    """tokens per context of --text (default: the run file's, else 128)"""
    out: str | None = None
    """run folder: checkpoints, log.jsonl, one folder per SAE (default runs/sae)"""
    no_resume: Switch = False
    """start over even if --out holds a checkpoint"""
    eval_tokens: NonNegativeInt | None = None
    """held-out tokens to evaluate on (0: skip; default 4096)"""
    join: list[str] | None = None
    """train crosscoders: one dictionary reading these hooks side by side, each at unit variance (its
    SAEs read the joined hook unless --hook says otherwise; not evaluated here: see saelab.crosscoder)"""
    given: argparse.Namespace = field(default_factory=argparse.Namespace)
    """The SAESpec, architecture-option and TrainConfig flags given (see add_setting_flags): they override the
    run file's `saes` and `train`, so only those given are set."""


def add_setting_flags(parser: argparse.ArgumentParser) -> list[str]:
    """Flags for every SAE and training setting, from SAESpec, SAEConfig and TrainConfig; they default to None, so
    a run file's values stand unless a flag is given. Returns their names (TrainCommand.given)."""

    readers = option_fields()
    options = parser.add_argument_group("architecture options (each applies to the SAEs whose architecture reads it)")
    saes = parser.add_argument_group("SAEs (SAESpec; comma lists form a product: --arch topk,relu --width 4608,9216 "
                                     "trains 4 SAEs; flags replace the run file's saes)")
    return [*add_flags(saes, SAESpec, [*PRODUCT_FIELDS, "lr"], lists=PRODUCT_FIELDS),
            *add_flags(saes, SAESpec, ["target_hook"], notes={"target_hook": "A comma list pairs with --hook's, in "
                                                              "order."}),
            *[added for name, owner in option_owners().items()  # each option from the class that declares it
              for added in add_flags(options, owner, [name], notes={name: f"Read by: {', '.join(readers[name])}."})],
            *add_flags(parser.add_argument_group("training (TrainConfig; flags override the run file's train)"),
                       TrainConfig, TRAIN_FLAGS)]


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
    targets = split_list(args.given.target_hook) if getattr(args.given, "target_hook", None) is not None else None
    if given or targets or not config.get("saes"):
        lists = {name: given.get(name, [getattr(SAESpec, name)]) for name in PRODUCT_FIELDS}  # parsed and checked
        target_of = paired_targets(lists["hook"], targets)
        if "k" in given and not any(sae_class(arch).takes_k for arch in lists["arch"]):
            takers = ", ".join(arch for arch in available_architectures() if sae_class(arch).takes_k)
            raise SettingError(f"--k is read only by {takers}, and no SAE here has that architecture; ask "
                               f"{', '.join(lists['arch'])} for an L0 with --target-l0 instead, and drop --k")
        specs, seen = [], set()
        for arch, width, k, hook in itertools.product(*lists.values()):
            takes_k = sae_class(arch).takes_k
            spec = dict(arch=arch, width=width, k=(k or DEFAULT_K) if takes_k else None, hook=hook or None,
                        target_hook=target_of.get(hook))
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


def paired_targets(hooks: list[str | None], targets: list[str] | None) -> dict[str, str]:
    """{input hook: target hook} of --hook and --target-hook: one target for every input, or one each, in order."""
    if not targets:
        return {}
    if hooks == [None]:
        raise SettingError("--target-hook needs --hook: the input hook each target is reconstructed from (e.g. "
                           "--hook blocks.5.ln2.hook_normalized --target-hook blocks.5.hook_mlp_out)")
    if len(targets) not in (1, len(hooks)):
        raise SettingError(f"--target-hook gives {len(targets)} hooks for --hook's {len(hooks)}: give one target, or "
                           "one per --hook, in the same order")
    return dict(zip(hooks, targets * len(hooks) if len(targets) == 1 else targets))


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


def check_hooks(specs: list[SAESpec], hooks: list[str]) -> None:
    """Refuse an SAE whose --hook the activations do not hold, before the model loads for the evaluation (or the
    stream's first forward), naming the closest hooks they do hold."""
    import difflib

    from saelab.errors import HookError

    for spec in specs:
        for hook, role in ((spec.hook, "reads hook"), (spec.target_hook, "reconstructs target hook")):
            if hook is not None and hook not in hooks:
                close = difflib.get_close_matches(hook, list(hooks), n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise HookError(f"SAE {spec.name()} {role} {hook!r}{hint}, but the activations hold "
                                f"{', '.join(hooks)}")


def crosscoder_source(source, join: list[str] | str | None, specs: list[SAESpec], eval_tokens: int):
    """(source, specs, eval_tokens) for --join: the source with the joined hook, every SAE that names no hook reading
    it, and no evaluation (the core evaluation splices one hook; a crosscoder's are read with saelab.crosscoder)."""
    if not join:
        return source, specs, eval_tokens
    import dataclasses

    from saelab.activations.joined import JoinedSource

    joined = JoinedSource(source, split_list(join) if isinstance(join, str) else join)
    if eval_tokens:
        print("saelab: crosscoders are not evaluated by `train`; read them with saelab.crosscoder (diffing_report)",
              file=sys.stderr)
    return joined, [spec if spec.hook else dataclasses.replace(spec, hook=joined.name) for spec in specs], 0


def cmd_train(args: TrainCommand) -> None:
    import warnings

    from saelab import distributed
    from saelab.activations.source import open_source, run_share
    from saelab.models import load_model
    from saelab.training import NotEvaluated, train
    from saelab.training.landing import OffTarget

    where = args.config or "command line"
    config = load_config_file(args.config)
    run = {key: check_value(config[key], hint, f"{where}: {key}") for key, hint in
           (("acts", str), ("model", str), ("hooks", str | list[str]), ("out", str), ("eval_tokens", int), ("join", str | list[str]))
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
        stream = dict(model=model, hooks=split_list(hooks) if isinstance(hooks, str) else hooks,
                      text=train_text(args, config, where), buffer_tokens=settings.stream_buffer_tokens)
    source = open_source(acts or None, batch_size=settings.batch_size, seed=settings.seed,
                         share=run_share(settings), **stream)
    eval_text = source.held_out_text(settings.tokens)
    source, specs, eval_tokens = crosscoder_source(source, args.join or run.get("join"), specs, eval_tokens)
    check_hooks(specs, source.hooks)  # a cache's hooks are known before any model loads
    if stream and world.main:
        print(f"saelab: streaming from {model.name}; the mixing buffer holds {settings.stream_buffer_tokens:,} tokens "
              "(--stream-buffer-tokens) and fills before the first step", file=sys.stderr)
    if acts and eval_tokens and world.main:  # rank 0 alone evaluates
        model = load_model(source.model_name, device=device, trust_remote_code=args.trust_remote_code,
                           max_batch_tokens=args.max_batch_tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotEvaluated)  # said once below, in one line
        warnings.simplefilter("ignore", OffTarget)  # likewise, once per SAE
        trained = train(source, specs, settings, out=out, resume=not args.no_resume,
                        model=model if eval_tokens else None, eval_text=eval_text, eval_tokens=eval_tokens or 0)
    if world.main:
        report(trained, eval_tokens, asked=args.eval_tokens is not None or "eval_tokens" in run)


def report(trained: list, eval_tokens: int, asked: bool) -> None:
    """Each SAE's metrics, then what went unsaid: L0s off target, evaluations missing
    (an error when the evaluation was asked for, a warning when it was the default)."""
    from saelab.errors import SaelabError
    from saelab.training.landing import describe

    for result in trained:
        print_metrics(result.folder, result.metrics)
    for result in trained:
        if result.l0 is not None and result.l0["off_target"]:
            print(f"saelab: warning: {describe(result.name, result.l0)}", file=sys.stderr)
    missed = [result for result in trained if result.not_evaluated]
    if missed:  # the SAEs are saved either way; the exit status says whether an evaluation asked for is missing
        message = (f"{len(missed)} of {len(trained)} SAEs were trained and saved but not evaluated: "
                   f"{missed[0].not_evaluated}. Evaluate on other held-out text with `saelab eval {missed[0].folder} "
                   f"--text FILE`{' (likewise the others)' if len(missed) > 1 else ''}, or train with --eval-tokens 0 "
                   "to skip the evaluation")
        if asked:
            raise SaelabError(message)
        print(f"saelab: warning: {message}", file=sys.stderr)
