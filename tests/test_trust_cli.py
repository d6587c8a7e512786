"""Issue 9, settings and the command line: typos and wrong types are refused naming what is valid, every option is a
flag generated from the dataclasses, architecture knowledge comes from the architectures, and file-system failures
end in a message that names the file and what to do."""

import dataclasses
import errno
import re

import pytest
import yaml

import saelab.training
from saelab.cli import build_parser, main
from saelab.commands.train import option_fields, option_owners
from saelab.options import SettingError, field_docs, from_mapping
from saelab.sae import SAEConfig, available_architectures, sae_class
from saelab.training import SAESpec, TrainConfig


@pytest.fixture
def captured_train(monkeypatch):
    """Replace training by a recorder: these tests are about what reaches train(), not about training."""
    calls = []

    def record(source, saes, config, **kwargs):
        calls.append(dict(source=source, saes=saes, config=config, **kwargs))
        return []

    monkeypatch.setattr(saelab.training, "train", record)
    return calls


def run_file(tmp_path, tiny_model_dir, **overrides):
    data = {"model": str(tiny_model_dir), "hooks": "blocks.1.hook_resid_post", "text": {"context_len": 32},
            "out": str(tmp_path / "run"), "eval_tokens": 0, "train": {"tokens": 256, "batch_size": 64},
            "saes": [{"arch": "relu", "width": 32, "options": {"l1_coefficient": 2.0}}]}
    for key, value in overrides.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("overrides,expected", [
    ({"trian": {"tokens": 10}}, "no setting 'trian' (did you mean 'train'?)"),
    ({"train": {"tokns": 256}}, "no setting 'tokns' (did you mean 'tokens'?)"),
    ({"saes": [{"arch": "relu", "widht": 32}]}, "no setting 'widht' (did you mean 'width'?)"),
    ({"saes": [{"arch": "relu", "width": 32, "options": {"l1_coefficent": 2}}]},
     "no setting 'l1_coefficent' (did you mean 'l1_coefficient'?)"),
    ({"text": {"context_length": 32}}, "no setting 'context_length' (did you mean 'context_len'?)"),
    ({"train": {"tokens": "lots"}}, "train.tokens must be an integer >= 1, got 'lots'"),
    ({"train": {"adam_betas": [0.9]}}, "adam_betas must be a list of 2"),
    ({"train": {"kernel": "fast"}}, "train.kernel must be one of 'auto', 'triton', 'torch', 'dense', got 'fast'"),
    ({"saes": [{"arch": "topk", "width": 32.5}]}, "width must be an integer >= 1, got 32.5"),
    ({"saes": [{"arch": "topk", "width": 32, "options": {"l1_coefficient": 2}}]}, "no setting 'l1_coefficient'"),
    ({"saes": [{"arch": "relu", "width": 32, "k": 8}]}, "arch 'relu' takes no k"),
    ({"saes": [{"arch": "tpok", "width": 32}]}, "unknown SAE architecture 'tpok'"),
    ({"saes": {"arch": "relu"}}, "saes must be a list"),
    ({"eval_tokens": "none"}, "eval_tokens must be an integer"),
    ({"saes": [{"arch": "relu", "width": 32, "options": [1, 2]}]}, "saes[0].options must be a mapping or null"),
    ({"saes": [{"arch": "relu", "width": 32, "options": "l1_coefficient=2"}]}, "saes[0].options must be a mapping"),
    ({"saes": [{"arch": "relu", "width": 32, "options": {"l1_coefficient": "big"}}]},
     "options.l1_coefficient must be a number >= 0, got 'big'"),
    ({"saes": [{"arch": "topk", "width": 32, "k": 64}]}, "k must be an integer with 1 <= k <= width=32, got 64"),
    ({"text": {"context_len": 1}}, "text.context_len must be an integer >= 2"),
])
def test_run_file_mistakes_are_refused_naming_what_is_valid(tmp_path, tiny_model_dir, captured_train, capsys,
                                                           overrides, expected):
    assert main(["train", "--config", run_file(tmp_path, tiny_model_dir, **overrides)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not captured_train


def test_unknown_keys_list_the_valid_ones():
    with pytest.raises(SettingError) as error:
        from_mapping(TrainConfig, {"batchsize": 8}, "train")
    assert "batch_size" in str(error.value) and "valid settings: tokens, batch_size" in str(error.value)


def test_a_valid_run_file_reaches_train_with_every_setting(tmp_path, tiny_model_dir, captured_train):
    path = run_file(tmp_path, tiny_model_dir, train={"tokens": 256, "batch_size": 64, "adam_betas": [0.0, 0.999],
                                                     "kernel": "dense", "dead_tokens": 128})
    assert main(["train", "--config", path]) == 0
    (call,) = captured_train
    assert call["config"].adam_betas == (0.0, 0.999) and call["config"].kernel == "dense"
    assert call["config"].dead_tokens == 128
    (spec,) = call["saes"]
    assert spec.arch == "relu" and spec.k is None and spec.options == {"l1_coefficient": 2.0}


def test_every_setting_is_a_flag_with_its_docstring_as_help():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    flags = {option: action for action in train._actions for option in action.option_strings}
    expected = [(TrainConfig, f.name) for f in dataclasses.fields(TrainConfig)]
    expected += [(SAESpec, name) for name in ("arch", "width", "k", "hook", "lr")]
    expected += [(owner, name) for name, owner in option_owners().items()]
    for cls, name in expected:
        action = flags.get("--" + name.replace("_", "-"))
        assert action is not None, f"{cls.__name__}.{name} has no flag"
        doc = field_docs(cls).get(name)
        assert doc, f"{cls.__name__}.{name} has no docstring"
        assert doc.replace("%", "%%")[:30] in action.help
    # every option an architecture declares has a flag
    for arch in available_architectures():
        for name in sae_class(arch).options_cls.names():
            assert "--" + name.replace("_", "-") in flags


def test_flags_reach_the_run_and_override_the_file(tmp_path, tiny_model_dir, captured_train):
    path = run_file(tmp_path, tiny_model_dir)
    assert main(["train", "--config", path, "--device", "cpu", "--kernel", "torch", "--no-normalize-activations",
                 "--adam-betas", "0,0.99", "--l1-coefficient", "7.5", "--sparsity-warmup-steps", "3",
                 "--tokens", "1k"]) == 0
    (call,) = captured_train
    config = call["config"]
    assert (config.device, config.kernel, config.normalize_activations, config.adam_betas, config.tokens,
            config.batch_size) == ("cpu", "torch", False, (0.0, 0.99), 1000, 64)
    assert call["saes"][0].options == {"l1_coefficient": 7.5, "sparsity_warmup_steps": 3}


def test_product_flags_and_options_follow_each_architecture(tmp_path, tiny_model_dir, captured_train, capsys):
    base = ["train", "--model", str(tiny_model_dir), "--hooks", "blocks.1.hook_resid_post", "--context-len", "32",
            "--eval-tokens", "0", "--tokens", "256", "--batch-size", "64", "--out", str(tmp_path / "run")]
    assert main(base + ["--arch", "topk,relu", "--width", "32,64", "--k", "4,8", "--l1-coefficient", "3",
                        "--auxk-coefficient", "0.1"]) == 0
    specs = captured_train[0]["saes"]
    assert sorted(s.name() for s in specs) == ["relu-32", "relu-64", "topk-32-k4", "topk-32-k8", "topk-64-k4",
                                              "topk-64-k8"]
    for spec in specs:
        assert spec.options == ({"l1_coefficient": 3.0} if spec.arch == "relu" else {"auxk_coefficient": 0.1})
    assert main(base + ["--arch", "topk", "--l1-coefficient", "3"]) == 2
    assert "--l1-coefficient is read only by relu" in capsys.readouterr().err


def test_architecture_knowledge_lives_in_the_architecture():
    assert {a: sae_class(a).takes_k for a in ("topk", "batchtopk", "matryoshka", "relu", "jumprelu")} == {
        "topk": True, "batchtopk": True, "matryoshka": True, "relu": False, "jumprelu": False}
    assert SAESpec(arch="topk").k == 32 and SAESpec(arch="jumprelu").k is None
    with pytest.raises(ValueError, match="takes no k"):
        SAESpec(arch="jumprelu", k=16)
    with pytest.raises(ValueError, match="valid settings: dtype, d_in, .*l0_coefficient"):
        SAESpec(arch="jumprelu", options={"l1_coefficient": 1.0})


def test_a_path_through_a_file_names_the_file_and_what_to_do(tmp_path, tiny_model_dir, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a user's file")
    code = main(["cache", "--model", str(tiny_model_dir), "--hooks", "blocks.0.hook_resid_post", "--tokens", "256",
                 "--context-len", "32", "--out", str(blocker / "acts")])
    err = capsys.readouterr().err
    assert code == 2 and str(blocker) in err and "choose another path" in err and "Traceback" not in err
    assert blocker.read_text() == "a user's file"


def test_a_full_disk_names_the_file_and_rerunning_finishes_the_job(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import os

    import saelab.files

    out = tmp_path / "acts"
    args = ["cache", "--model", str(tiny_model_dir), "--hooks", "blocks.0.hook_resid_post", "--tokens", "2k",
            "--context-len", "32", "--batch-size", "4", "--shard-tokens", "512", "--out", str(out)]
    real_fsync, calls = os.fsync, []

    def full_after_a_while(fd):
        calls.append(fd)
        if len(calls) > 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(saelab.files.os, "fsync", full_after_a_while)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "the disk is full" in err and str(out) in err
    assert not list(out.glob("*.tmp"))
    monkeypatch.setattr(saelab.files.os, "fsync", real_fsync)
    assert main(args) == 0  # the advice works: the same command finishes the cache
    assert "complete" in capsys.readouterr().out


@pytest.mark.parametrize("name,text,where", [
    ("run.yaml", "eval_tokens: 0\nout: first\nout: second\n", "run.yaml, line 3: the key 'out'"),
    ("run.yaml", "train:\n  tokens: 256\n  batch_size: 64\n  tokens: 512\n", "run.yaml, line 4: the key 'tokens'"),
    ("run.json", '{"out": "first", "train": {"tokens": 256, "tokens": 512}}', "run.json: the key 'tokens'"),
])
def test_a_key_given_twice_in_a_run_file_is_refused_naming_it(tmp_path, captured_train, capsys, name, text, where):
    path = tmp_path / name
    path.write_text(text)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert where in err and "given twice" in err and "Traceback" not in err
    assert not captured_train


def test_yaml_merge_keys_still_override(tmp_path):
    from saelab.commands.run_file import load_config_file

    path = tmp_path / "run.yaml"
    path.write_text("train:\n  <<: {tokens: 256, batch_size: 64}\n  tokens: 512\n")
    assert load_config_file(str(path))["train"] == {"tokens": 512, "batch_size": 64}


def test_a_k_flag_no_architecture_reads_is_refused_not_dropped(tmp_path, tiny_model_dir, captured_train, capsys):
    base = ["train", "--model", str(tiny_model_dir), "--hooks", "blocks.1.hook_resid_post", "--context-len", "32",
            "--eval-tokens", "0", "--tokens", "256", "--batch-size", "64", "--out", str(tmp_path / "run")]
    for arch in ("relu", "jumprelu", "relu,jumprelu"):
        assert main(base + ["--arch", arch, "--k", "8"]) == 2
        err = capsys.readouterr().err
        assert "--k is read only by" in err and "topk" in err and "--target-l0" in err and "Traceback" not in err
    assert not captured_train
    assert main(base + ["--arch", "relu", "--target-l0", "8"]) == 0  # the advice works
    assert main(base + ["--arch", "topk,relu", "--k", "8"]) == 0  # k goes to the SAEs that read it, as options do
    assert [(s.arch, s.k) for s in captured_train[-1]["saes"]] == [("topk", 8), ("relu", None)]


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


# -- issue 21: every number is checked where it is parsed, and every piece of advice names flags the verb has
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


def test_batch_size_1_is_refused_where_it_is_parsed(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--batch-size", "1"])
    assert "argument --batch-size: must be an integer >= 2, got '1'" in capsys.readouterr().err
    with pytest.raises(SettingError, match="batch_size must be an integer >= 2"):
        from_mapping(TrainConfig, {"batch_size": 1}, "train")


def _no_space_in_save_file(error):
    """safetensors reports a full disk in words; the checkpoint code must still name the file and say what to do."""
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.fixture(scope="module")
def tiny_cache(tiny_model, tmp_path_factory):
    from saelab.activations import cache_activations
    from saelab.data import TextConfig

    out = tmp_path_factory.mktemp("tiny-cache")
    cache_activations(tiny_model, "blocks.1.hook_resid_post", out, text=TextConfig(context_len=32), tokens=2048,
                      progress=False)
    return out


@pytest.mark.parametrize("where", ["save_file", "fsync_file"])
def test_a_full_disk_at_checkpoint_time_names_the_file_and_the_rerun_resumes(tmp_path, tiny_cache, monkeypatch,
                                                                             capsys, where):
    import saelab.training.checkpoint as checkpoint
    from saelab.training.trainer import Trainer

    out = tmp_path / "run"
    args = ["train", "--acts", str(tiny_cache), "--tokens", "1024", "--batch-size", "64", "--checkpoint-every", "4",
            "--eval-tokens", "0", "--arch", "topk", "--width", "32", "--k", "4", "--out", str(out)]
    real, calls = getattr(checkpoint, where), []

    def full_at_the_second_checkpoint(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise (_no_space_in_save_file(None) if where == "save_file" else OSError(errno.ENOSPC, "No space left on device"))
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, where, full_at_the_second_checkpoint)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.count("saelab: error:") == 1
    err = err.splitlines()[-1]  # one line, after the progress bar's
    assert str(out / "checkpoint.tmp" / "tensors.safetensors") in err and "No space left on device" in err
    assert "free space" in err and "rerun the same command" in err
    assert not (out / "checkpoint.tmp").exists() and (out / "checkpoint").is_dir()  # the step-4 checkpoint stays

    monkeypatch.setattr(checkpoint, where, real)
    steps = []
    real_train_on = Trainer.train_on
    monkeypatch.setattr(Trainer, "train_on", lambda self, batch: steps.append(self.step) or real_train_on(self, batch))
    assert main(args) == 0  # the advice works: the rerun resumes from the last checkpoint and finishes
    assert steps[0] == 4 and len(steps) == 12


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


# -- issue 22: every verb's flags come from its config, and one list rule holds for every list flag
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
