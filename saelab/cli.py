"""The `saelab` command. With no arguments it runs the quickstart: the main job on an embedded default."""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import Annotated

from saelab.data import ContextLen
from saelab.options import (FiniteFloat, NonNegativeInt, PositiveInt, Range, SettingError, add_flags, check_keys,
                            check_value, flag_type, flag_values, from_mapping, parse_count)
from saelab.training.config import DEFAULT_K, SAESpec, TrainConfig

QUICKSTART_MODEL = "smollm2-135m"
QUICKSTART_HOOK = "blocks.15.hook_resid_post"
QUICKSTART_BATCH = 4096
"""Tokens per training step of the quickstart."""
Similarity = Annotated[float, Range(at_least=-1, at_most=1)]
"""A correlation or a cosine."""
PRODUCT_FIELDS = ("arch", "width", "k", "hook")
"""SAESpec fields that name an SAE: on the command line each takes a comma list and the lists form a product."""
TRAIN_FLAGS = [name for name in TrainConfig.__dataclass_fields__]
RUN_KEYS = ["acts", "model", "hooks", "text", "out", "eval_tokens", "train", "saes"]
"""Top-level keys of a YAML / JSON run file."""


def _text_flag(value: str) -> str:
    """The argparse type of every flag naming text: its source must resolve (saelab.data.text_source), so a
    mistyped path stops the command before any model loads, instead of being read as a dataset name or as text."""
    from saelab.data import text_source
    from saelab.errors import DataError

    try:
        text_source(value)
    except DataError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def _text_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", type=_text_flag, default="default",
                        help="text file, folder, JSONL file, Hub dataset name, or 'default' (built-in prose)")
    parser.add_argument("--field", default="text", help="JSONL / dataset field holding the text")
    parser.add_argument("--context-len", type=flag_type(ContextLen), default=128, help="tokens per context")
    parser.add_argument("--no-bos", action="store_true", help="do not start each context with BOS")
    parser.add_argument("--seed", type=flag_type(NonNegativeInt), default=None,
                        help="shuffle contexts in windows with this seed")


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
    manifest = cache_activations(model, args.hooks.split(";"), args.out, text=_text_config(args), tokens=args.tokens,
                                 batch_size=args.batch_size, shard_tokens=args.shard_tokens, dtype=args.dtype,
                                 drop_bos=not args.keep_bos, overwrite=args.overwrite)
    if world.main:
        print_cache_summary(args.out, manifest, time.perf_counter() - started)


def cmd_info(args) -> None:
    """Describe a cache and, unless --no-verify, check every shard's size and SHA-256: "complete" must mean usable."""
    from saelab.activations import Manifest
    from saelab.activations.manifest import cache_command, check_shard
    from saelab.errors import CacheError

    folder = Path(args.cache)
    manifest = Manifest.read(folder)
    problems = []
    for record in manifest.shards if args.verify else []:
        try:
            check_shard(folder, record)
        except CacheError as error:
            problems.append(str(error).split(";")[0])
    written = {s.index for s in manifest.shards if s.contexts == manifest.expected_contexts(s.index)}
    problems += [f"shard {i} is not written yet" for i in range(manifest.n_shards) if i not in written]
    status = "complete, verified" if args.verify else "complete (not verified)"
    if problems:
        status = f"{'DAMAGED' if manifest.complete else 'INCOMPLETE'}: {len(problems)} shard(s) missing or damaged"
    print_cache_summary(folder, manifest, status=status)
    if problems:
        command = cache_command(folder, manifest)
        for problem in problems:
            print(f"problem    {problem}")
        raise CacheError(f"{folder}: {len(problems)} of {manifest.n_shards} shards missing or damaged; re-run the "
                         "cache command that made it to recompute only those" + (f": {command}" if command else ""))


def print_cache_summary(folder, manifest, seconds: float | None = None, status: str | None = None) -> None:
    size = sum((Path(folder) / s.file).stat().st_size for s in manifest.shards if (Path(folder) / s.file).exists())
    status = status or ("complete" if manifest.complete else "INCOMPLETE")
    print(f"cache      {folder}  ({status})")
    if manifest.exhausted_at is not None and manifest.exhausted_at < manifest.target_contexts:
        print(f"text       ran out after {manifest.n_contexts * manifest.context_len:,} of the "
              f"{manifest.target_contexts * manifest.context_len:,} tokens asked")
    print(f"model      {manifest.run['model']}")
    print(f"tokens     {manifest.tokens:,} positions from {manifest.n_contexts:,} contexts of {manifest.context_len}")
    print(f"shards     {len(manifest.shards)} files, {size / 2**20:.1f} MiB, {manifest.dtype}")
    for hook, info in manifest.hooks.items():
        print(f"hook       {hook}  d={info['d']}")
    if seconds:
        print(f"time       {seconds:.1f} s  ({manifest.tokens / seconds:,.0f} tokens/s, this run)")


def cmd_quickstart(args) -> None:
    """The main job: cache a mid-depth residual stream of the offline SmolLM2-135M on built-in text, train a TopK
    SAE on it, evaluate it on held-out text with the SAE spliced into the model, and save it."""
    from saelab.activations import cache_activations
    from saelab.data import TextConfig
    from saelab.explore.dashboard import check_folder
    from saelab.models import load_model
    from saelab.training import SAESpec, TrainConfig, train

    out = Path(args.out)
    check_folder(out / "dashboard")  # before minutes of work, not after them
    spec = SAESpec(arch="topk", width=args.width, k=args.k)
    config = TrainConfig(tokens=args.tokens, batch_size=QUICKSTART_BATCH)
    print(f"loading {QUICKSTART_MODEL} (offline; the first load de-quantises and caches the weights)")
    model = load_model(QUICKSTART_MODEL)
    text = TextConfig(context_len=128)
    started = time.perf_counter()
    manifest = cache_activations(model, QUICKSTART_HOOK, out / "acts", text=text, tokens=args.cache_tokens,
                                 overwrite=args.overwrite)
    print_cache_summary(out / "acts", manifest, time.perf_counter() - started)
    print(f"training {spec.name()} on {QUICKSTART_HOOK} for {config.tokens:,} tokens "
          f"({config.steps} steps, {config.tokens / manifest.tokens:.1f} passes over the cache)")
    (result,) = train(out / "acts", [spec], config, out=out / "sae", resume=not args.no_resume, model=model,
                      eval_text=text.after(manifest.n_contexts), eval_tokens=args.eval_tokens)
    print_metrics(result.folder, result.metrics)
    from saelab.explore import explore

    started = time.perf_counter()
    features = explore(result.sae, out / "acts", model)
    index = features.dashboard(out / "dashboard", features.most_active(args.dashboard_latents))
    print(f"\ndashboard  {index}  ({args.dashboard_latents} most active latents, {time.perf_counter() - started:.0f} s; "
          f"opens from disk in any browser)")


def _model_of(sae, args, **options):
    """The language model an SAE reads: --model, else the one its cfg.json names (load_model's `options`)."""
    from saelab.models import load_model

    name = args.model or sae.cfg.model_name
    if not name:
        raise ValueError(f"{args.sae} does not say which model it belongs to (its cfg.json names none); pass --model")
    return load_model(name, trust_remote_code=args.trust_remote_code, **options)


def cmd_dashboard(args) -> None:
    """A static HTML dashboard of an SAE's features over an activation cache: index.html + one page per latent."""
    from saelab.explore import explore
    from saelab.explore.dashboard import check_folder
    from saelab.hub import load_sae

    check_folder(args.out)  # a folder the dashboard may not write is refused before the pass, not after it
    sae = load_sae(args.sae)
    model = _model_of(sae, args)
    started = time.perf_counter()
    features = explore(sae, args.acts, model, hook=args.hook, top=args.top, sample=args.sample, max_tokens=args.tokens,
                       check_model=args.model is None)
    latents = args.latents if args.latents else features.most_active(args.most_active) if args.most_active else None
    index = features.dashboard(args.out, latents)
    print(f"{features!r}: pass {features.stats.seconds:.1f} s, all {time.perf_counter() - started:.1f} s")
    print(f"dashboard  {index.resolve()}  (open it from disk in any browser)")


def print_metrics(folder, metrics) -> None:
    print(f"\nSAE        {folder}")
    if metrics is None:
        return
    flat = metrics.metrics()
    names = [("fvu", "fraction of variance unexplained"), ("explained_variance", "explained variance"),
             ("mse", "MSE (raw units)"), ("l0", "L0 (active latents per token)"), ("frac_dead", "dead latents"),
             ("frac_dense", "dense latents (>1% of tokens)"), ("ce_clean", "CE loss, clean model"),
             ("ce_sae", "CE loss, SAE spliced in"), ("ce_zero", "CE loss, hook zero-ablated"),
             ("ce_loss_recovered", "CE loss recovered"), ("kl_sae", "KL(clean || spliced), nats")]
    print(f"held-out   {metrics.n_tokens:,} tokens")
    for key, label in names:
        if flat.get(key) is not None:
            print(f"  {label:<34}{flat[key]:>10.4f}")


def option_fields() -> dict[str, list[str]]:
    """{SAEConfig field: architectures that read it}: the options each architecture file declares."""
    from saelab.sae import available_architectures, sae_class
    from saelab.training.config import COMMON_OPTIONS

    readers: dict[str, list[str]] = {}
    for arch in available_architectures():
        for name in (*COMMON_OPTIONS, *sae_class(arch).options):
            if name != "d_in":  # read off the activations, never a flag
                readers.setdefault(name, []).append(arch)
    return readers


def sae_specs(args, config: dict, where: str) -> list[SAESpec]:
    """The SAEs to train: the product of the comma lists --arch x --width x --k x --hook, else the run file's `saes`
    (else one SAE of SAESpec's defaults); --lr and architecture options then apply to every SAE that reads them."""
    from saelab.sae import available_architectures, sae_class

    given = flag_values(args, list(PRODUCT_FIELDS))
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
    if getattr(args, "lr", None) is not None:
        for spec in specs:
            spec["lr"] = args.lr
    options = flag_values(args, list(option_fields()))
    for name, value in options.items():
        readers = [spec for spec in specs if name in sae_class(spec.get("arch", SAESpec.arch)).options + ("dtype",)]
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
    fields.update(flag_values(args, TRAIN_FLAGS))
    return from_mapping(TrainConfig, fields, f"{where}: train")


def cmd_train(args) -> None:
    import warnings

    from saelab import distributed
    from saelab.activations import ActivationStore, ModelStream
    from saelab.data import TextConfig
    from saelab.errors import SaelabError
    from saelab.models import load_model
    from saelab.training import train
    from saelab.training.landing import OffTarget, describe
    from saelab.training.trainer import NotEvaluated, run_share, source_share

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
    model = None
    if acts:
        source = ActivationStore(acts, batch_size=settings.batch_size, seed=settings.seed,
                                 **source_share(run_share(settings)))
        cache_run = source.manifest.run
        if eval_tokens and world.main:  # rank 0 alone evaluates
            model = load_model(cache_run["model"], device=device, trust_remote_code=args.trust_remote_code,
                               max_batch_tokens=args.max_batch_tokens)
        eval_text = TextConfig.from_fingerprint(cache_run["text"]).after(source.manifest.n_contexts)
    else:
        name = args.model or run.get("model")
        hooks = args.hooks or run.get("hooks")
        if not name or not hooks:
            raise SettingError("train needs --acts (an activation cache) or --model with --hooks (stream live)")
        model = load_model(name, device=device, trust_remote_code=args.trust_remote_code,
                           max_batch_tokens=args.max_batch_tokens)
        text_fields = config.get("text") or {}
        text = (from_mapping(TextConfig, text_fields, f"{where}: text") if isinstance(text_fields, dict)
                else TextConfig(source=check_value(text_fields, str, f"{where}: text")))
        if args.text is not None:
            text = TextConfig(source=args.text, context_len=args.context_len or text.context_len)
        hooks = hooks.split(";") if isinstance(hooks, str) else hooks
        source = ModelStream(model, hooks, text, batch_size=settings.batch_size, seed=settings.seed,
                             **source_share(run_share(settings), stream=True))
        used = -(-(settings.tokens + source.buffer_tokens) // (text.context_len - 1)) + 1
        eval_text = text.after(used)
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


def cmd_eval(args) -> None:
    from saelab.data import TextConfig
    from saelab.eval import evaluate
    from saelab.hub import load_sae

    sae = load_sae(args.sae)
    model = _model_of(sae, args, max_batch_tokens=args.max_batch_tokens)
    text = TextConfig(source=args.text, context_len=args.context_len)
    out = args.out or args.sae
    print_metrics(out, evaluate(sae, model=model, text=text, tokens=args.tokens, activations=args.acts, out=out))


def cmd_push(args) -> None:
    from saelab.hub import push_to_hub

    where = push_to_hub(args.folders if len(args.folders) > 1 else args.folders[0], args.repo_id, private=args.private,
                        dry_run=args.dry_run, commit_message=args.message, license=args.license)
    print(f"{'wrote what would be uploaded to' if args.dry_run else 'pushed to'} {where}")


def _positions(text: str):
    """'mean', 'last' or a token index (negative: from the end of each text)."""
    if text in ("mean", "last"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'mean', 'last' or a token index, got {text!r}") from None


def cmd_probe(args) -> None:
    """Probe residual dimensions, MLP neurons and SAE latents at each hook for a labelled concept."""
    from saelab.analysis import Features, neuron_hook, run_probes
    from saelab.analysis.concepts import load_data
    from saelab.hub import load_sae
    from saelab.models import load_model

    data = load_data(args.data, args.shared_data)
    model = load_model(args.model, trust_remote_code=args.trust_remote_code, max_batch_tokens=args.max_batch_tokens)
    hooks = model.resolve_hooks(args.hooks.split(";"))
    features = [Features(hook) for hook in hooks]
    for hook in hooks if args.neurons else []:
        layer = hook.split(".")[1] if hook.startswith("blocks.") else None
        if layer is None:
            raise ValueError(f"--neurons: {hook} is not inside a block, so it has no MLP neurons")
        features.append(Features(neuron_hook(model, int(layer))))
    for folder in args.sae or []:
        sae = load_sae(folder)
        if sae.cfg.hook_name not in hooks:
            raise ValueError(f"SAE {folder} was trained on {sae.cfg.hook_name or 'an unnamed hook'}, which is not "
                             f"among --hooks ({', '.join(hooks)}); add its hook or leave it out")
        features.append(Features(sae=sae, label=f"sae {Path(folder).name} @ {sae.cfg.hook_name}"))
    results = run_probes(model, data, features, ks=args.k, positions=args.positions, seed=args.seed,
                         batch_size=args.batch_size, log=print)
    out = results.save(args.out)
    print(results.table())
    print(f"wrote {out}/probes.json, probes.md, accuracy_vs_k.png ({results.seconds:.0f} s)")


def cmd_match(args) -> None:
    """Match features of two (model, hook, SAE) sides over the same text; see saelab.analysis.universality."""
    from saelab.analysis.alignment import Side, aligned_cache_chunks, read_documents
    from saelab.analysis.universality import MatchConfig, accumulate, compare_all, match_models
    from saelab.hub import load_sae
    from saelab.models import load_model

    config = MatchConfig(min_corr=args.min_corr, shared_top_word=args.shared_top_word, null_draws=args.nulls,
                         max_pairs=args.max_pairs, seed=args.seed, min_tokens=args.min_tokens)
    if args.cache_a or args.cache_b:
        if not (args.cache_a and args.cache_b and len(args.a) == len(args.b) == 1):
            raise ValueError("cache mode takes --cache-a, --cache-b and one SAE folder each as --a and --b")
        sae_a, sae_b = load_sae(args.a[0]), load_sae(args.b[0])
        model = load_model(_cache_model(args.cache_a))
        side_a = Side(model, sae_a.cfg.hook_name, sae_a, label=f"a:{sae_a.cfg.hook_name}:sae")
        side_b = Side(model, sae_b.cfg.hook_name, sae_b, label=f"b:{sae_b.cfg.hook_name}:sae")
        chunks = aligned_cache_chunks(sae_a, args.cache_a, sae_b, args.cache_b, max_tokens=args.tokens)
        chunks = (_relabel(c, side_a.label, side_b.label, model.tokenizer) for c in chunks)
        acc = accumulate(chunks, [side_a], [side_b])
        results = compare_all(acc, [side_a, side_b], config, log=print,
                              alignment={"mode": "cache rows", "cache_a": str(args.cache_a), "cache_b": str(args.cache_b)})
    else:
        text = _match_text(args.text)  # before any model loads
        models: dict[str, object] = {}
        sides = [[_match_side(spec, models, args.trust_remote_code, args.max_batch_tokens) for spec in specs]
                 for specs in (args.a, args.b)]
        if args.neurons:
            from saelab.analysis import neuron_hook

            for group in sides:
                for layer in sorted({int(s.hook.split(".")[1]) for s in group if s.hook.startswith("blocks.")}):
                    group.append(Side(group[0].model, neuron_hook(group[0].model, layer)))
        documents = read_documents(text, start_char=args.start_char)
        results = match_models(sides[0], sides[1], documents, mode=args.mode, max_tokens=args.tokens,
                               batch_size=args.batch_size, config=config, text=str(text), log=print)
    out = results.save(args.out)
    print(results.table())
    print(f"wrote {out}/matching.json, matching.md and figures ({results.seconds:.0f} s)")


MATCH_TEXT = "wikitext-2-raw/wiki.test.raw"
"""What `saelab match` reads without --text: WikiText-2's test split in the shared data (saelab.data.shared_data)."""


def _match_text(text: str | None) -> Path:
    """The one local text file both sides of `match` read, resolved like every text source."""
    from saelab.data import shared_data, text_source
    from saelab.errors import DataError

    source = text_source(text or shared_data(MATCH_TEXT))
    if not (isinstance(source, Path) and source.is_file()):
        raise DataError(f"--text {str(source)!r} is not a text file: match reads one local text file (cut into "
                        "documents of whole paragraphs); give its path")
    return source


def _match_side(spec: str, models: dict, trust_remote_code: bool, max_batch_tokens: int):
    from saelab.analysis.alignment import Side
    from saelab.hub import load_sae
    from saelab.models import load_model

    parts = spec.split(":", 2)
    if len(parts) < 2:
        raise ValueError(f"a side is MODEL:HOOK[:SAE_FOLDER], got {spec!r}")
    if parts[0] not in models:
        models[parts[0]] = load_model(parts[0], trust_remote_code=trust_remote_code, max_batch_tokens=max_batch_tokens)
    return Side(models[parts[0]], parts[1], load_sae(parts[2]) if len(parts) == 3 and parts[2] else None)


def _cache_model(cache) -> str:
    from saelab.activations.manifest import Manifest

    return Manifest.read(Path(cache)).run.get("model", "")


def _relabel(chunk, label_a: str, label_b: str, tokenizer):
    chunk.a, chunk.b = {label_a: chunk.a["a"]}, {label_b: chunk.b["b"]}
    chunk.words = tokenizer.batch_decode(chunk.token_a.unsqueeze(1).tolist())
    return chunk


def cmd_steer(args) -> None:
    """Sweep a steering strength: target effect and side effects (KL, CE on unrelated text) at each alpha."""
    import torch

    from saelab.analysis import LogitDiff, Steer, WordFrequency, sweep
    from saelab.analysis.concepts import load_data
    from saelab.analysis.probes import concept_direction
    from saelab.analysis.steering import side_passages
    from saelab.hub import load_sae
    from saelab.models import load_model

    model = load_model(args.model, trust_remote_code=args.trust_remote_code, max_batch_tokens=args.max_batch_tokens)
    side = side_passages(args.side_text, args.side_texts, args.side_words)
    if args.sae:
        sae = load_sae(args.sae)
        if args.latent is None:
            raise ValueError("--sae needs --latent (the latent to clamp or to steer along)")
        steer = Steer.clamp(sae, args.latent) if args.clamp else Steer.decoder_row(sae, args.latent, model, side)
    elif args.data:
        if not args.hook:
            raise ValueError("--data needs --hook (where to read the classes and to add the direction)")
        data = load_data(args.data, args.shared_data)
        positive = args.positive or data.positive or data.classes[-1]
        (hook,) = model.resolve_hooks(args.hook)
        X = model.activations_at(data.texts, hook, args.positions, names=data.origin)[hook]
        theta = concept_direction(X, torch.tensor([label == positive for label in data.labels]).long())
        steer = Steer.direction(model, hook, theta, side)
    else:
        raise ValueError("give --data (steer along the difference of class means) or --sae with --latent")
    prompts = args.prompts.split("|")
    if args.words:
        target = WordFrequency(prompts, args.words.split(","), n_new=args.new_tokens)
    elif args.up:
        target = LogitDiff(prompts, args.up.split(","), args.down.split(",") if args.down else [])
    else:
        raise ValueError("give a target: --up (and --down) words for a logit difference, or --words to count in "
                         "generations")
    result = sweep(model, steer, args.alphas, target, side, log=print)
    result.save(args.out)
    print(result.table())
    print(f"wrote {args.out}/steering.json and steering.png")


def cmd_circles_clusters(args) -> None:
    """Cluster an SAE's decoder directions and rank the clusters by how irreducible (circle-like) they are."""
    from saelab.analysis.clusters import graph_clusters, search_clusters, spectral_clusters
    from saelab.hub import load_sae
    from saelab.models import load_model

    sae = load_sae(args.sae)
    if args.method == "spectral":
        clusters = spectral_clusters(sae.W_dec, args.n_clusters, neighbors=args.neighbors or None, seed=args.seed)
    else:
        clusters = graph_clusters(sae.W_dec, top=args.top, min_cosine=args.min_cosine)
    print(f"{args.method}: {len(clusters.groups(args.min_size))} clusters of {args.min_size}+ latents")
    tokenizer = None
    name = args.model or sae.cfg.model_name
    if name and not args.no_model:
        tokenizer = load_model(name, trust_remote_code=args.trust_remote_code).tokenizer
    search = search_clusters(sae, args.acts, clusters, tokenizer=tokenizer, hook=args.hook, min_size=args.min_size,
                             max_size=args.max_size, min_tokens=args.min_tokens, max_tokens=args.tokens,
                             seed=args.seed)
    search.save(args.out, tokenizer, plots=args.plots)
    print(search.table())
    print(f"wrote {args.out}/clusters.json, clusters.md and the top {min(args.plots, len(search.clusters))} plots "
          f"({search.seconds:.0f} s)")


def cmd_circles_calendar(args) -> None:
    """Days / months arithmetic: accuracy, a circle probe per layer, calendar order, interventions vs baselines."""
    from saelab.analysis.circles import TASKS, calendar_study
    from saelab.models import load_model

    unknown = [t for t in args.tasks.split(",") if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}")
    model = load_model(args.model, trust_remote_code=args.trust_remote_code, max_batch_tokens=args.max_batch_tokens)
    for name in args.tasks.split(","):
        study = calendar_study(model, TASKS[name], args.layers, k=args.k, seed=args.seed,
                               test_fraction=args.test_fraction, intervention_layers=args.intervene,
                               targets=args.targets or None, batch_size=args.batch_size)
        study.save(args.out)
        print(study.table())
    print(f"wrote {args.out}/<task>.json, <task>.md and figures")


def _budget_argument(parser: argparse.ArgumentParser) -> None:
    """--max-batch-tokens, for every verb that runs a model (see saelab.interventions.plan_batches)."""
    from saelab.interventions import MAX_BATCH_TOKENS

    parser.add_argument("--max-batch-tokens", type=flag_type(PositiveInt), default=MAX_BATCH_TOKENS,
                        help=f"padded tokens per model forward, e.g. 8k (default {MAX_BATCH_TOKENS}): bounds memory; "
                             "a longer text or context is refused by name. Raise it for longer texts if memory allows")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saelab", description=__doc__)
    commands = parser.add_subparsers(dest="command")

    quick = commands.add_parser("quickstart", help="the main job on built-in defaults (what `saelab` alone runs)")
    quick.add_argument("--out", default="runs/quickstart")
    quick.add_argument("--cache-tokens", type=flag_type(Annotated[int, Range(at_least=2 * QUICKSTART_BATCH)]),
                       default=800 * 128, help=f"tokens of built-in text to cache (at least two training batches of "
                                               f"{QUICKSTART_BATCH})")
    quick.add_argument("--tokens", type=flag_type(PositiveInt), default=400_000,
                       help="training tokens (passes over the cache)")
    quick.add_argument("--width", type=flag_type(PositiveInt), default=SAESpec.width)
    quick.add_argument("--k", type=flag_type(PositiveInt), default=DEFAULT_K)
    quick.add_argument("--eval-tokens", type=flag_type(PositiveInt), default=4096,
                       help="held-out tokens for the spliced-model eval")
    quick.add_argument("--dashboard-latents", type=flag_type(PositiveInt), default=50,
                       help="latents in the closing dashboard (the most active)")
    quick.add_argument("--no-resume", action="store_true", help="start the training over even if --out holds a "
                                                               "checkpoint of another run")
    quick.add_argument("--overwrite", action="store_true", help="replace a different cache found in --out (deletes "
                                                                "only files saelab wrote)")
    quick.set_defaults(run=cmd_quickstart)

    cache = commands.add_parser("cache", help="cache activations to sharded safetensors (resumable)")
    cache.add_argument("--model", required=True, help="smollm2-135m, gemma-3-270m, a Hub id or a local folder")
    cache.add_argument("--hooks", required=True,
                       help="hook names or patterns separated by ';', e.g. 'blocks.{9,15}.hook_resid_post'")
    cache.add_argument("--out", required=True, help="output folder (re-run the same command to resume)")
    cache.add_argument("--tokens", type=flag_type(PositiveInt), default=100_000, help="tokens to cache, e.g. 300k")
    cache.add_argument("--batch-size", type=flag_type(PositiveInt), default=8, help="contexts per model forward")
    cache.add_argument("--shard-tokens", type=flag_type(PositiveInt), default=1 << 16,
                       help="approximate tokens per shard")
    cache.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    cache.add_argument("--keep-bos", action="store_true", help="also store the BOS position (an attention sink)")
    cache.add_argument("--overwrite", action="store_true", help="replace a different run found in --out (deletes only files saelab wrote)")
    cache.add_argument("--trust-remote-code", action="store_true", help="allow a Hub model's own code to run")
    _budget_argument(cache)
    _text_arguments(cache)
    cache.set_defaults(run=cmd_cache)

    trainer = commands.add_parser("train", help="train SAEs (several at once: comma lists form a product)")
    trainer.add_argument("--config", help="YAML or JSON run file (acts / model+hooks+text, out, train, saes)")
    trainer.add_argument("--acts", help="activation cache folder to train on")
    trainer.add_argument("--model", help="stream live from this model instead of a cache (with --hooks)")
    trainer.add_argument("--hooks", help="hooks to stream, separated by ';' (with --model)")
    trainer.add_argument("--text", type=_text_flag, default=None, help="text for --model streaming (default: built-in)")
    trainer.add_argument("--context-len", type=flag_type(ContextLen), default=None)
    trainer.add_argument("--out", help="run folder: checkpoints, log.jsonl, one folder per SAE (default runs/sae)")
    trainer.add_argument("--no-resume", action="store_true", help="start over even if --out holds a checkpoint")
    trainer.add_argument("--eval-tokens", type=flag_type(NonNegativeInt),
                         help="held-out tokens to evaluate on (0: skip; default 4096)")
    trainer.add_argument("--trust-remote-code", action="store_true")
    _budget_argument(trainer)
    add_flags(trainer.add_argument_group("SAEs (SAESpec; comma lists form a product: --arch topk,relu --width "
                                         "4608,9216 trains 4 SAEs; flags replace the run file's saes)"),
              SAESpec, [*PRODUCT_FIELDS, "lr"], lists=PRODUCT_FIELDS)
    from saelab.sae import SAEConfig

    readers = option_fields()
    add_flags(trainer.add_argument_group("architecture options (SAEConfig; each applies to the SAEs whose "
                                         "architecture reads it)"),
              SAEConfig, list(readers), notes={name: f"Read by: {', '.join(archs)}." for name, archs in readers.items()})
    add_flags(trainer.add_argument_group("training (TrainConfig; flags override the run file's train)"), TrainConfig,
              TRAIN_FLAGS)
    trainer.set_defaults(run=cmd_train)

    evaluator = commands.add_parser("eval", help="evaluate a saved SAE: reconstruction, sparsity, spliced CE / KL")
    evaluator.add_argument("sae", help="SAE folder (saelab, SAELens, sparsify or Gemma Scope format)")
    evaluator.add_argument("--model", help="default: the model named in the SAE's cfg.json")
    evaluator.add_argument("--text", type=_text_flag, default="default",
                           help="held-out text: file, folder, JSONL, Hub dataset, default")
    evaluator.add_argument("--context-len", type=flag_type(ContextLen), default=128)
    evaluator.add_argument("--tokens", type=flag_type(PositiveInt), default=20_000)
    evaluator.add_argument("--acts", help="also measure reconstruction on this activation cache")
    evaluator.add_argument("--out", help="where metrics.json goes (default: the SAE folder)")
    evaluator.add_argument("--trust-remote-code", action="store_true")
    _budget_argument(evaluator)
    evaluator.set_defaults(run=cmd_eval)

    push = commands.add_parser("push", help="publish SAE folders (or a whole training run) to a Hugging Face Hub repo")
    push.add_argument("folders", nargs="+", help="SAE folders or a run folder (one repo subfolder per SAE)")
    push.add_argument("repo_id", help="e.g. me/smollm2-135m-saes (the token comes from HF_TOKEN or `hf auth login`)")
    push.add_argument("--private", action="store_true")
    push.add_argument("--dry-run", nargs="?", const=True, metavar="FOLDER",
                      help="write exactly what would be uploaded (into FOLDER, or a temporary folder); upload nothing")
    push.add_argument("--message", help="commit message")
    push.add_argument("--license", help="license for the model card, e.g. apache-2.0")
    push.set_defaults(run=cmd_push)

    probe = commands.add_parser("probe", help="linear probes on residual dims, MLP neurons and SAE latents")
    probe.add_argument("--model", required=True, help="smollm2-135m, gemma-3-270m, a Hub id or a local folder")
    probe.add_argument("--hooks", required=True, help="hooks separated by ';', e.g. 'blocks.{5,10,15}.hook_resid_post'")
    probe.add_argument("--data", required=True,
                       help="JSONL / CSV (text, label[, doc]), a folder with one file or sub-folder per label, or a "
                            "built-in concept: genre, calendar, languages")
    probe.add_argument("--sae", action="append", help="SAE folder whose latents to probe too (repeatable; its hook "
                                                        "must be among --hooks)")
    probe.add_argument("--neurons", action="store_true", help="also probe each hook's block's MLP neurons")
    probe.add_argument("--k", type=flag_type(list[PositiveInt]), default=[1, 2, 4, 8, 16],
                       help="sparse probe sizes, e.g. 1,4,16")
    probe.add_argument("--positions", type=_positions, default="mean",
                       help="'mean' (over tokens, no BOS), 'last', or a token index")
    probe.add_argument("--seed", type=flag_type(NonNegativeInt), default=0,
                       help="seeds the document split and the class balancing")
    probe.add_argument("--batch-size", type=flag_type(PositiveInt), default=16)
    probe.add_argument("--shared-data", help="folder holding wikitext-2-raw and tinyshakespeare (for genre)")
    probe.add_argument("--out", default="runs/probe", help="folder for probes.json, probes.md, accuracy_vs_k.png")
    probe.add_argument("--trust-remote-code", action="store_true")
    _budget_argument(probe)
    probe.set_defaults(run=cmd_probe)

    steer = commands.add_parser("steer", help="steering sweep: target effect and side effects (KL, CE) per alpha")
    steer.add_argument("--model", required=True)
    steer.add_argument("--hook", help="where to add the direction (with --data)")
    steer.add_argument("--data", help="labelled data: steer along the difference of means of --positive vs the rest")
    steer.add_argument("--positive", help="the class to steer towards (default: the data's own, else the last)")
    steer.add_argument("--positions", type=_positions, default="mean",
                       help="positions the class means are read at: 'mean', 'last', or a token index")
    steer.add_argument("--sae", help="SAE folder: steer along --latent's decoder row, or --clamp it")
    steer.add_argument("--latent", type=flag_type(NonNegativeInt))
    steer.add_argument("--clamp", action="store_true", help="clamp the latent to alpha instead of adding its row")
    steer.add_argument("--alphas", type=flag_type(list[FiniteFloat]), default=[0, 0.25, 0.5, 1, 2],
                       help="steering strengths; for a direction in units of the hook's mean activation norm")
    steer.add_argument("--prompts", required=True, help="prompts separated by '|'")
    steer.add_argument("--up", help="comma list of one-token words whose logits should rise (target: logit diff)")
    steer.add_argument("--down", help="comma list of one-token words to subtract")
    steer.add_argument("--words", help="comma list of words to count in greedy generations (target: frequency)")
    steer.add_argument("--new-tokens", type=flag_type(PositiveInt), default=12)
    steer.add_argument("--side-text", type=_text_flag, default="default",
                       help="unrelated text for KL and CE (file, folder, Hub dataset, default)")
    steer.add_argument("--side-texts", type=flag_type(PositiveInt), default=16, help="passages of side text")
    steer.add_argument("--side-words", type=flag_type(PositiveInt), default=48, help="words per side passage")
    steer.add_argument("--shared-data", help="folder holding wikitext-2-raw and tinyshakespeare (for genre)")
    steer.add_argument("--out", default="runs/steer")
    steer.add_argument("--trust-remote-code", action="store_true")
    _budget_argument(steer)
    steer.set_defaults(run=cmd_steer)

    dash = commands.add_parser("dashboard", help="static HTML dashboard of an SAE's features (opens from disk, offline)")
    dash.add_argument("sae", help="SAE folder (saelab, SAELens, sparsify or Gemma Scope format)")
    dash.add_argument("--acts", required=True, help="activation cache folder holding the SAE's hook")
    dash.add_argument("--out", default="runs/dashboard", help="folder for index.html and latents/<i>.html")
    dash.add_argument("--model", help="default: the model named in the SAE's cfg.json (gives tokens and unembedding)")
    dash.add_argument("--hook", help="the cache hook to read (default: the SAE's own)")
    dash.add_argument("--latents", type=flag_type(list[NonNegativeInt]),
                      help="latents to export, e.g. 0,5,17 (default: all)")
    dash.add_argument("--most-active", type=flag_type(PositiveInt), help="export only the N latents that fire most often")
    dash.add_argument("--tokens", type=flag_type(PositiveInt),
                      help="read at most this many tokens of the cache (default: all)")
    dash.add_argument("--top", type=flag_type(PositiveInt), default=20, help="top activating examples per latent")
    dash.add_argument("--sample", type=flag_type(PositiveInt), default=50,
                      help="firings sampled per latent for the quantile groups")
    dash.add_argument("--trust-remote-code", action="store_true")
    dash.set_defaults(run=cmd_dashboard)

    match = commands.add_parser("match", help="match SAE features across models (or SAEs) on the same text")
    match.add_argument("--a", action="append", required=True,
                       help="side A: MODEL:HOOK[:SAE_FOLDER] (repeatable, one model); no SAE: the hook's own units")
    match.add_argument("--b", action="append", required=True, help="side B, as --a")
    match.add_argument("--text", type=_text_flag,
                       help="text file (cut into documents of whole paragraphs) both models read (default: "
                            "WikiText-2's test split in ../shared/data)")
    match.add_argument("--start-char", type=flag_type(NonNegativeInt), default=0,
                       help="skip the text before this character (held out)")
    match.add_argument("--tokens", type=flag_type(PositiveInt), default=20_000, help="aligned tokens to read")
    match.add_argument("--mode", choices=["word", "end"], default="word",
                       help="align tokens ending a word in both tokenizers, or any shared token end")
    match.add_argument("--neurons", action="store_true", help="also match the MLP neurons of each side's layers")
    match.add_argument("--cache-a", help="same-tokenizer mode: a cache folder for --a's SAE (rows align one to one)")
    match.add_argument("--cache-b", help="the cache for --b's SAE (same text and tokenizer as --cache-a)")
    match.add_argument("--min-corr", type=flag_type(Similarity), default=0.1, help="drop pairs below this correlation")
    match.add_argument("--shared-top-word", action="store_true", help="also require a shared top-5 word")
    match.add_argument("--nulls", type=flag_type(PositiveInt), default=1000,
                       help="draws of each null (shuffled pairing, random subsets)")
    match.add_argument("--max-pairs", type=flag_type(PositiveInt), default=1000,
                       help="score similarity on the most correlated pairs")
    match.add_argument("--min-tokens", type=flag_type(PositiveInt), default=1000,
                       help="fewer aligned tokens than this is an error")
    match.add_argument("--seed", type=flag_type(NonNegativeInt), default=0)
    match.add_argument("--batch-size", type=flag_type(PositiveInt), default=8, help="documents per forward")
    match.add_argument("--out", default="runs/match", help="folder for matching.json, matching.md and figures")
    match.add_argument("--trust-remote-code", action="store_true")
    _budget_argument(match)
    match.set_defaults(run=cmd_match)

    circles = commands.add_parser("circles", help="multi-dimensional features: SAE cluster search, calendar circles")
    circle_commands = circles.add_subparsers(dest="circles_command", required=True)
    search = circle_commands.add_parser("clusters", help="cluster an SAE's decoder and rank clusters by irreducibility")
    search.add_argument("sae", help="SAE folder (saelab, SAELens, sparsify or Gemma Scope format)")
    search.add_argument("--acts", required=True, help="activation cache holding the SAE's hook (of the SAE's model)")
    search.add_argument("--hook", help="the cache hook to read (default: the SAE's own)")
    search.add_argument("--method", choices=["spectral", "graph"], default="spectral",
                        help="spectral clustering on angular similarity, or the top-k-neighbour graph with a cosine cut")
    search.add_argument("--n-clusters", type=flag_type(PositiveInt), default=500, help="spectral: number of clusters")
    search.add_argument("--neighbors", type=flag_type(NonNegativeInt), default=32,
                        help="spectral: neighbours per latent in the sparse graph (0: dense all-pairs affinity)")
    search.add_argument("--top", type=flag_type(PositiveInt), default=2,
                        help="graph: link each latent to its top nearest latents")
    search.add_argument("--min-cosine", type=flag_type(Similarity), default=0.5,
                        help="graph: only links above this cosine")
    search.add_argument("--min-size", type=flag_type(Annotated[int, Range(at_least=2)]), default=2,
                        help="smallest cluster scored (2 or more latents)")
    search.add_argument("--max-size", type=flag_type(Annotated[int, Range(at_least=2)]), help="largest cluster scored")
    search.add_argument("--min-tokens", type=flag_type(PositiveInt), default=100,
                        help="score clusters firing on at least this many tokens")
    search.add_argument("--tokens", type=flag_type(PositiveInt), help="read at most this many tokens of the cache")
    search.add_argument("--plots", type=flag_type(NonNegativeInt), default=5,
                        help="plot the top N clusters in their PCA planes")
    search.add_argument("--model", help="tokenizer for labelling points (default: the SAE's model)")
    search.add_argument("--no-model", action="store_true", help="label points by token id (load no model)")
    search.add_argument("--seed", type=flag_type(NonNegativeInt), default=0)
    search.add_argument("--out", default="runs/circles", help="folder for clusters.json, clusters.md and plots")
    search.add_argument("--trust-remote-code", action="store_true")
    search.set_defaults(run=cmd_circles_clusters)
    cal = circle_commands.add_parser("calendar", help="days / months arithmetic: probes, order, interventions")
    cal.add_argument("--model", required=True, help="smollm2-135m, gemma-3-270m, a Hub id or a local folder")
    cal.add_argument("--tasks", default="days,months", help="comma list of days, months")
    cal.add_argument("--layers", type=flag_type(list[NonNegativeInt]), help="layers to probe, e.g. 0,4,8 (default: all)")
    cal.add_argument("--intervene", type=flag_type(list[NonNegativeInt]), default=[],
                     help="layers to intervene at, e.g. 4,10")
    cal.add_argument("--targets", type=flag_type(NonNegativeInt), default=3,
                     help="other items per held-out prompt (0: all)")
    cal.add_argument("--k", type=flag_type(PositiveInt), default=5, help="PCA components the circle probe reads")
    cal.add_argument("--test-fraction", type=flag_type(Annotated[float, Range(above=0, below=1)]), default=0.3,
                     help="share of durations held out")
    cal.add_argument("--seed", type=flag_type(NonNegativeInt), default=0)
    cal.add_argument("--batch-size", type=flag_type(PositiveInt), default=16)
    cal.add_argument("--out", default="runs/circles", help="folder for <task>.json, <task>.md and figures")
    cal.add_argument("--trust-remote-code", action="store_true")
    _budget_argument(cal)
    cal.set_defaults(run=cmd_circles_calendar)

    info = commands.add_parser("info", help="describe an activation cache")
    info.add_argument("cache")
    info.add_argument("--no-verify", dest="verify", action="store_false",
                      help="skip checking every shard's size and SHA-256 (fast on a big cache)")
    info.set_defaults(run=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    from saelab.errors import SaelabError, describe_os_error

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["quickstart", *(argv or [])])
    try:
        args.run(args)
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
