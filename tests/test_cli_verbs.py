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
    "--min-corr": {"0", "-1"}, "--min-cosine": {"0", "-1"}, "--min-correlation": {"0", "-1"},  # in [-1, 1]
    "--random-draws": {"0"}, "--order-templates": {"0"},  # 0: no random clusters; the task's own template only
    "--significance": {"0"},  # 0: every positive correlation links
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
                "eval": ["s"], "evals": ["s"], "dashboard": ["s", "--acts", "a"],
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


def test_every_list_flag_help_says_its_separator():
    """Each flag that takes several items says how they are separated: commas or ';' (hooks, products), or '|'
    for prompts, which hold commas themselves."""
    import argparse

    from saelab.options import split_list

    for words, sub in _verbs(build_parser()):
        for action in sub._actions:
            if action.type is not None and action.metavar == "A,B,...":
                for text in ("1,1", "0,0", "days,days"):
                    try:
                        comma = action.type(text)
                    except argparse.ArgumentTypeError:
                        continue
                    assert comma == action.type(text.replace(",", ";")), (words, action.option_strings)
                    break
                else:
                    pytest.fail(f"no sample list parses for {words} {action.option_strings}")
    prompts = next(a for w, sub in _verbs(build_parser()) if w == ("steer",) for a in sub._actions
                   if "--prompts" in a.option_strings)
    assert "'|'" in prompts.help
    assert isinstance(prompts, argparse.Action) and split_list("a|b") == ["a|b"]


def _no_model(monkeypatch):
    """load_model replaced by a tripwire: a command that must fail before any model loads proves it did."""
    import saelab.models

    def tripwire(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(saelab.models, "load_model", tripwire)


def test_train_refuses_k_above_width_before_any_model_loads(tmp_path, tiny_model_dir, tiny_cache, monkeypatch,
                                                            capsys):
    _no_model(monkeypatch)
    for source in (["--model", str(tiny_model_dir), "--hooks", "blocks.0.hook_resid_post"], ["--acts", str(tiny_cache)]):
        assert main(["train", *source, "--width", "16", "--k", "32", "--out", str(tmp_path / "run")]) == 2
        assert "k <= width=16, got 32" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_misspelt_train_hook_fails_before_the_model_loads_or_anything_is_written(tmp_path, tiny_cache,
                                                                                  monkeypatch, capsys):
    _no_model(monkeypatch)
    assert main(["train", "--acts", str(tiny_cache), "--hook", "blocks.1.hook_resid_pots", "--width", "32",
                 "--k", "4", "--out", str(tmp_path / "run")]) == 2
    assert "did you mean blocks.1.hook_resid_post" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("verb", ["cache", "train"])
def test_a_misspelt_hook_fails_right_after_the_model_loads(tmp_path, tiny_model, monkeypatch, capsys, verb):
    """The model loads (it knows its hooks), then nothing runs: no forward, no folder, no training."""
    import saelab.models
    import saelab.training

    monkeypatch.setattr(saelab.models, "load_model", lambda *args, **kwargs: tiny_model)
    monkeypatch.setattr(type(tiny_model), "_capture", lambda *a, **k: pytest.fail("a forward ran"))
    monkeypatch.setattr(saelab.training, "train", lambda *a, **k: pytest.fail("training started"))
    out = tmp_path / "out"
    hooks = ["--hooks", "blocks.0.hook_resid_post;blocks.1.hook_resid_pots"]
    argv = ["cache", "--model", "tiny", *hooks, "--out", str(out)] if verb == "cache" else \
        ["train", "--model", "tiny", *hooks, "--width", "32", "--k", "4", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no hook point 'blocks.1.hook_resid_pots'; did you mean blocks.1.hook_resid_post" in err
    assert "separated by commas or ';'" in err
    assert not out.exists()


def test_circles_calendar_names_the_files_it_wrote(tmp_path, tiny_model, monkeypatch, capsys):
    import saelab.analysis.circles as circles
    from saelab.analysis.circles import CalendarStudy

    class Written:  # a study that saves a JSON, a report and one figure, as the real one does
        def __init__(self, name):
            self.task = name

        def name(self):
            return self.task

        def save(self, folder):
            for file in (f"{self.task}.json", f"{self.task}.md", f"{self.task}_layers.png"):
                (tmp_path / file).write_text("")
            return tmp_path

        def table(self):
            return ""

    assert CalendarStudy.name is not None
    monkeypatch.setattr(circles, "run_calendar", lambda *a, **k: [Written("days"), Written("months")])
    assert main(["circles", "calendar", "--model", "tiny", "--out", str(tmp_path)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"wrote {tmp_path}/: days.json, days.md, days_layers.png, months.json, months.md, months_layers.png"
    assert "<task>" not in last


def test_probe_says_how_many_of_the_texts_it_used_as_probes_json_counts_them(tmp_path, tiny_model_dir, capsys):
    import json

    rows = [{"text": f"a {word} story", "label": "a", "doc": f"a{i}"} for i, word in enumerate("red blue green".split())]
    rows += [{"text": f"the {word} cat sat", "label": "b", "doc": f"b{i}"} for i, word in enumerate("one two three four "
                                                                                                  "five six seven "
                                                                                                  "eight nine".split())]
    data = tmp_path / "concepts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["probe", "--model", str(tiny_model_dir), "--hooks", "blocks.0.hook_resid_post", "--data", str(data),
                 "--k", "1", "--out", str(tmp_path / "probe")]) == 0
    said = re.search(r"(\d+) of its (\d+) texts", capsys.readouterr().out)
    recorded = json.loads((tmp_path / "probe" / "probes.json").read_text())["data"]["n_examples"]
    assert said and int(said.group(2)) == recorded == len(rows) and int(said.group(1)) < len(rows)


def test_eval_writes_its_own_named_file_says_where_and_keeps_the_training_metrics(tmp_path, tiny_cache, capsys):
    import json

    from helpers import HOOK

    run = tmp_path / "run"
    assert main(["train", "--acts", str(tiny_cache), "--tokens", "512", "--batch-size", "64", "--eval-tokens", "256",
                 "--arch", "topk", "--width", "32", "--k", "4", "--out", str(run)]) == 0
    folder = run / HOOK / "topk-32-k4"
    training = (folder / "metrics.json").read_bytes()
    text = tmp_path / "other.txt"
    text.write_text("Other held-out text for the evaluation, long enough for a few contexts. " * 20)
    capsys.readouterr()
    command = ["eval", str(folder), "--text", str(text), "--context-len", "32", "--tokens", "200"]
    assert main(command) == 0
    out = capsys.readouterr().out
    (written,) = (folder / "eval").glob("*/metrics.json")
    metrics = json.loads(written.read_text())
    assert written.parent.name == f"other-{metrics['n_tokens']}" and metrics["n_tokens"] > 0
    assert (folder / "metrics.json").read_bytes() == training  # the training run's evaluation stays
    assert f"wrote {written} (the SAE's own metrics.json, which push publishes, is unchanged)" in out
    # 32 latents need 320 tokens for a dead share: the summary and the file say so instead of a number
    note = f"not measured on fewer than 320 tokens (10 x width 32); {metrics['n_tokens']:,} evaluated"
    assert metrics["notes"] == {"frac_dead": note}
    assert re.search(r"dead latents\s+" + re.escape(note), out)

    assert main([*command, "--replace-metrics"]) == 0
    assert f"wrote {folder / 'metrics.json'}, replacing the SAE's evaluation" in capsys.readouterr().out
    replaced = json.loads((folder / "metrics.json").read_text())
    assert replaced["settings"]["text"]["source"] == str(text.resolve()) and replaced["n_tokens"] == metrics["n_tokens"]
    assert main([*command, "--replace-metrics", "--out", str(tmp_path / "x")]) == 2
    assert "--out and --replace-metrics name two places" in capsys.readouterr().err
