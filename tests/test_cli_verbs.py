"""Rules every verb of the command line keeps: text flags resolve their source, every number is checked where it is
parsed (in run files too), advice names only flags the verb takes, list flags split alike, defaults come from each
verb's config and every flag has a type."""

import re

import pytest

from helpers import run_file
from saelab.cli import build_parser, main
from saelab.commands.train import option_fields
from saelab.training import SAESpec, TrainConfig


def _flags_naming_text(parser):
    """(verb, flag, action) of every flag of every (sub)command whose value is text to read."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for verb, sub in action.choices.items():
                yield from ((f"{verb} {v}".strip(), f, a) for v, f, a in _flags_naming_text(sub))
        for flag in action.option_strings:
            if flag in ("--text", "--side-text"):
                yield "", flag, action


def test_every_text_flag_resolves_its_source_and_a_missing_path_is_an_error(tmp_path, tiny_model_dir, capsys):
    from saelab.commands.common import text_flag

    found = list(_flags_naming_text(build_parser()))
    assert {verb for verb, _, _ in found} >= {"cache", "train", "eval", "match", "steer"}
    assert all(action.type is text_flag for _, _, action in found), [(v, f) for v, f, a in found if a.type is not text_flag]
    model = str(tiny_model_dir)
    commands = [["cache", "--model", model, "--hooks", "blocks.0.hook_resid_post", "--out", str(tmp_path / "c")],
                ["train", "--model", model, "--hooks", "blocks.0.hook_resid_post", "--out", str(tmp_path / "t")],
                ["eval", str(tmp_path / "sae")],
                ["match", "--a", f"{model}:blocks.0.hook_resid_post", "--b", f"{model}:blocks.1.hook_resid_post"],
                ["steer", "--model", model, "--prompts", "a", "--up", "b"]]
    for missing in ("missing file.txt", "some/folder/notes", str(tmp_path / "gone.jsonl")):
        for command in commands:
            flag = "--side-text" if command[0] == "steer" else "--text"
            with pytest.raises(SystemExit) as leaving:
                main(command + [flag, missing])
            err = capsys.readouterr().err
            assert leaving.value.code == 2 and f"text source {missing!r} does not exist" in err, (command, err)
    assert not (tmp_path / "c").exists() and not (tmp_path / "t").exists()


def test_match_reads_one_text_file_named_by_its_text(tmp_path, tiny_model_dir, capsys):
    model = str(tiny_model_dir)
    sides = ["match", "--a", f"{model}:blocks.0.hook_resid_post", "--b", f"{model}:blocks.1.hook_resid_post"]
    for source in ("default", str(tmp_path)):  # real sources, but not the one text file match reads
        assert main(sides + ["--text", source]) == 2
        err = capsys.readouterr().err
        assert "is not a text file" in err and "reads one local text file" in err and "Traceback" not in err


# -- every number is checked where it is parsed, and every piece of advice names flags the verb has
def _verbs(parser, words=()):
    """(words naming the verb, its parser) for every command and sub-command."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*words, name), sub
                yield from _verbs(sub, (*words, name))


def _arity(parse) -> int:
    """How many comma-separated numbers a flag's type reads (1, or 2 for a pair), or 0 if it reads no numbers."""
    import argparse

    for n in (1, 2):
        for sample in ("1", "0.5", "100000"):
            try:
                value = parse(",".join([sample] * n))
            except (argparse.ArgumentTypeError, ValueError, TypeError):
                continue
            values = value if isinstance(value, (list, tuple)) else [value]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                return n
    return 0


NUMERIC_FLAGS = [(words, action.option_strings[0], _arity(action.type)) for words, parser in _verbs(build_parser())
                 for action in parser._actions if action.option_strings and action.type and _arity(action.type)]
"""Every flag of every verb whose value is a number or a list of numbers: a new one is covered automatically."""
TAKES = {
    "--seed": {"0"}, "train --eval-tokens": {"0"},  # 0 skips the evaluation
    "--start-char": {"0"}, "--plots": {"0"}, "--neighbors": {"0"},  # 0: no plots; dense all-pairs affinity
    "--targets": {"0"},  # 0: every other item
    "--latent": {"0"}, "--latents": {"0"}, "--layers": {"0"}, "--intervene": {"0"},  # indices from 0
    "--positions": {"0", "-1"},  # a token index; negative counts from the end
    "--alphas": {"0", "-1"},  # 0: unsteered; negative steers the other way
    "--min-corr": {"0", "-1"}, "--min-cosine": {"0", "-1"},  # anywhere in [-1, 1]
    "--lr-warmup-steps": {"0"}, "--sparsity-warmup-steps": {"0"}, "--lr-decay-fraction": {"0"},  # none
    "--adam-betas": {"0"}, "--threshold-decay": {"0"},  # no memory
    "--l1-coefficient": {"0"}, "--l0-coefficient": {"0"}, "--auxk-coefficient": {"0"},  # no penalty
}
"""The values among 0 and -1 that a flag takes, and what they mean; every other numeric flag refuses both. NaN and
infinity are refused everywhere."""


def _takes(words, flag) -> set:
    return TAKES.get(f"{' '.join(words)} {flag}", TAKES.get(flag, set()))


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
@pytest.mark.parametrize("words,flag,arity", NUMERIC_FLAGS, ids=lambda x: " ".join(x) if isinstance(x, tuple) else x)
def test_every_numeric_flag_of_every_verb_is_checked_where_it_is_parsed(capsys, words, flag, arity, value):
    argv = [*words, flag, ",".join([value] * arity)]
    try:
        build_parser().parse_args(argv)
    except SystemExit as exit:
        refused = f"argument {flag}:" in capsys.readouterr().err
        assert exit.code == 2
    else:
        refused = False
    assert refused == (value not in _takes(words, flag)), f"saelab {' '.join(argv)}"
    if refused:
        parser = dict(_verbs(build_parser()))[tuple(words)]
        try:
            parser.parse_args([flag, ",".join([value] * arity)])
        except SystemExit:
            pass
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(f"saelab {' '.join(words)}: error: argument {flag}")


def _run_file_entry(name: str, value) -> dict:
    """Where a `saelab train` setting goes in a run file, holding `value`."""
    if name in TrainConfig.__dataclass_fields__:
        return {"train": {"tokens": 256, "batch_size": 64, name: value}}
    if name in SAESpec.__dataclass_fields__:
        return {"saes": [{"arch": "topk", "width": 32, name: value}]}
    return {"saes": [{"arch": option_fields()[name][0], "width": 32, "options": {name: value}}]}


@pytest.mark.parametrize("text,value", [("0", 0), ("-1", -1), ("nan", float("nan")), ("inf", float("inf"))])
def test_run_files_are_checked_like_the_flags(tmp_path, tiny_model_dir, captured_train, capsys, text, value):
    """The same ranges hold in run files (from_mapping) as on the command line (add_flags): one annotation each."""
    train_parser = dict(_verbs(build_parser()))[("train",)]
    dests = {action.option_strings[0]: action.dest for action in train_parser._actions if action.option_strings}
    checked = 0
    for words, flag, arity in NUMERIC_FLAGS:
        name = dests[flag] if words == ("train",) else None
        if name not in {*TrainConfig.__dataclass_fields__, *SAESpec.__dataclass_fields__, *option_fields()}:
            continue
        if text in _takes(words, flag):
            continue
        entry = _run_file_entry(name, [value] * arity if arity > 1 or name == "group_sizes" else value)
        assert main(["train", "--config", run_file(tmp_path, tiny_model_dir, **entry)]) == 2, name
        err = capsys.readouterr().err
        assert re.search(rf"\b{name}(\[\d+\])? must be", err) and "Traceback" not in err, err
        checked += 1
    assert checked >= 10 and not captured_train


def _flags_named(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))


def _advice(capsys, words: tuple, argv: list[str]) -> str:
    """Run `saelab <words> <argv>`, expecting an error; its line, once every flag it names is one the verb takes."""
    assert main([*words, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("saelab: error:"), err
    parser = dict(_verbs(build_parser()))[words]
    unknown = _flags_named(err) - {option for action in parser._actions for option in action.option_strings}
    assert not unknown, f"{err!r} names {unknown}, which `saelab {' '.join(words)}` does not take"
    return err


def test_quickstart_advice_names_flags_it_takes_and_following_it_works(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import saelab.commands.quickstart as quickstart

    monkeypatch.setattr(quickstart, "QUICKSTART_MODEL", str(tiny_model_dir))
    monkeypatch.setattr(quickstart, "QUICKSTART_HOOK", "blocks.1.hook_resid_post")
    monkeypatch.setattr(quickstart, "QUICKSTART_BATCH", 64)
    base = ["--out", str(tmp_path / "quick"), "--width", "32", "--k", "4", "--eval-tokens", "64",
            "--dashboard-latents", "2"]
    assert main(["quickstart", *base, "--cache-tokens", "8192", "--tokens", "256"]) == 0
    err = _advice(capsys, ("quickstart",), [*base, "--cache-tokens", "8192", "--tokens", "512"])  # another training
    assert "--no-resume" in err
    assert main(["quickstart", *base, "--cache-tokens", "8192", "--tokens", "512", "--no-resume"]) == 0
    other = tmp_path / "other"  # a folder holding a cache of another run
    assert main(["cache", "--model", str(tiny_model_dir), "--hooks", "blocks.0.hook_resid_post", "--tokens", "256",
                 "--context-len", "32", "--out", str(other / "acts")]) == 0
    base[1] = str(other)
    err = _advice(capsys, ("quickstart",), [*base, "--cache-tokens", "8192", "--tokens", "256"])
    assert "--overwrite" in err
    assert main(["quickstart", *base, "--cache-tokens", "8192", "--tokens", "256", "--overwrite"]) == 0


def test_train_advice_names_flags_train_takes(tmp_path, tiny_cache, capsys):
    base = ["--acts", str(tiny_cache), "--tokens", "512", "--batch-size", "64", "--eval-tokens", "0",
            "--arch", "topk", "--width", "32", "--k", "4", "--out", str(tmp_path / "run")]
    assert "--lr" in _advice(capsys, ("train",), [*base, "--lr", "1e30"])  # a non-finite loss
    assert main(["train", *base]) == 0
    assert "--no-resume" in _advice(capsys, ("train",), [*base, "--seed", "1"])  # a checkpoint of another run
    assert main(["train", *base, "--seed", "1", "--no-resume"]) == 0


# -- every verb's flags come from its config, and one list rule holds for every list flag
def test_list_flags_split_on_commas_or_semicolons_outside_braces():
    from saelab.options import split_list

    assert split_list("blocks.{9,15}.hook_resid_post") == ["blocks.{9,15}.hook_resid_post"]
    assert split_list("a;b") == split_list("a,b") == split_list("a, b") == ["a", "b"]
    assert split_list("blocks.{0,1}.x;blocks.3.y,z") == ["blocks.{0,1}.x", "blocks.3.y", "z"]
    verbs = dict(_verbs(build_parser()))
    for words, flag, others in [(("cache",), "--hooks", ["--model", "m", "--out", "o"]), (("train",), "--hooks", []),
                                (("train",), "--hook", [])]:
        for text in ("blocks.{0,1}.x;blocks.2.x", "blocks.{0,1}.x,blocks.2.x"):
            args = verbs[words].parse_args([*others, flag, text])
            assert getattr(args, flag[2:]) == ["blocks.{0,1}.x", "blocks.2.x"], (words, flag, text)


def test_every_verb_takes_its_defaults_from_its_config():
    """Parsing no flags gives the config's own defaults: no verb restates one."""
    from saelab.analysis import CalendarConfig, ClusterSearchConfig, MatchStudyConfig, ProbeConfig, SteerConfig
    from saelab.cli import VERBS
    from saelab.options import config_from_flags

    required = {"cache": ["--model", "m", "--hooks", "h", "--out", "o"], "push": ["f", "me/r"], "info": ["c"],
                "eval": ["s"], "dashboard": ["s", "--acts", "a"],
                "probe": ["--model", "m", "--hooks", "h", "--data", "d"],
                "steer": ["--model", "m", "--prompts", "p"], "match": ["--a", "m:h", "--b", "m:h"],
                "clusters": ["s", "--acts", "a"], "calendar": ["--model", "m"]}
    verbs = {words[-1]: parser for words, parser in _verbs(build_parser())}
    for verb in [v for top in VERBS for v in (top.verbs or (top,))]:
        config = config_from_flags(verb.config, verbs[verb.name].parse_args(required.get(verb.name, [])))
        assert isinstance(config, verb.config)
    studies = {"probe": ProbeConfig("m", "h", "d"), "steer": SteerConfig("m", "p"),
               "match": MatchStudyConfig(a=["m:h"], b=["m:h"]), "clusters": ClusterSearchConfig("s", "a"),
               "calendar": CalendarConfig("m")}
    for name, study in studies.items():
        verb = next(v for top in VERBS for v in (top.verbs or (top,)) if v.name == name)
        assert config_from_flags(verb.config, verbs[name].parse_args(required[name])).study == study, name


def test_every_flag_of_every_verb_has_a_type():
    """Each value is parsed (and checked) by its field's annotation; switches take none and choices are named."""
    import argparse

    for words, parser in _verbs(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.nargs == 0:
                continue
            assert action.type is not None or action.choices, f"saelab {' '.join(words)} {action.option_strings}"
