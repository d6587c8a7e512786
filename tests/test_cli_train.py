"""`saelab train`'s settings: run files and flags come from the same dataclasses, typos and wrong types are refused
naming what is valid, architecture options reach only the architectures that read them, and a full disk at checkpoint
time ends in a message that names the file and a rerun that resumes."""

import dataclasses
import errno

import pytest

from helpers import run_file
from saelab.cli import build_parser, main
from saelab.commands.train import option_owners
from saelab.options import SettingError, field_docs, from_mapping
from saelab.sae import available_architectures, sae_class
from saelab.training import SAESpec, TrainConfig


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
