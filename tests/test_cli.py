"""The `saelab` command end to end on the tiny model (cache -> train (two SAEs) -> eval -> push --dry-run), and its
failures: one line that names the file and what to do, never a traceback."""

import errno
import json

import pytest
import yaml

from saelab.cli import main
from saelab.hub import load_sae
from saelab.options import parse_count


def test_parse_count():
    assert parse_count("300k") == 300_000 and parse_count("1.5M") == 1_500_000 and parse_count("42") == 42
    with pytest.raises(Exception, match="not a count"):
        parse_count("lots")


def test_cache_train_eval_push(tiny_model_dir, tmp_path, capsys):
    acts, run, dry = tmp_path / "acts", tmp_path / "run", tmp_path / "dry"
    assert main(["cache", "--model", str(tiny_model_dir), "--hooks", "blocks.{0,1}.hook_resid_post", "--out", str(acts),
                 "--tokens", "3k", "--context-len", "32", "--batch-size", "4"]) == 0
    assert main(["info", str(acts)]) == 0
    assert "blocks.1.hook_resid_post  d=64" in capsys.readouterr().out

    assert main(["train", "--acts", str(acts), "--hook", "blocks.0.hook_resid_post", "--arch", "topk", "--width", "64",
                 "--k", "4,8", "--tokens", "2560", "--batch-size", "256", "--out", str(run), "--eval-tokens", "256"]) == 0
    out = capsys.readouterr().out
    assert out.count("CE loss recovered") == 2
    folders = sorted(p.parent for p in run.rglob("cfg.json"))
    assert [f.name for f in folders] == ["topk-64-k4", "topk-64-k8"]
    assert all(f.parent.name == "blocks.0.hook_resid_post" for f in folders)
    metrics = json.loads((folders[0] / "metrics.json").read_text())
    assert metrics["spliced"]["ce_clean"] > 0
    assert load_sae(folders[1]).cfg.k == 8

    assert main(["eval", str(folders[0]), "--model", str(tiny_model_dir), "--tokens", "128", "--context-len", "32",
                 "--out", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "metrics.json").exists()

    assert main(["push", str(run), "me/tiny-saes", "--dry-run", str(dry)]) == 0
    card = (dry / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["library_name"] == "saelab"
    assert (dry / "blocks.0.hook_resid_post" / "topk-64-k8" / "sae_weights.safetensors").exists()
    assert not list(dry.rglob("checkpoint*"))


def test_train_from_a_config_file(tiny_model_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "hooks": "blocks.1.hook_resid_post", "text": {"context_len": 32},
        "out": str(tmp_path / "run"), "eval_tokens": 0,
        "train": {"tokens": 1024, "batch_size": 128, "lr_warmup_steps": 2},
        "saes": [{"arch": "jumprelu", "width": 96}, {"arch": "batchtopk", "width": 96, "k": 6}],
    }))
    assert main(["train", "--config", str(config)]) == 0
    names = sorted(p.parent.name for p in (tmp_path / "run").rglob("cfg.json"))
    assert names == ["batchtopk-96-k6", "jumprelu-96-target32"]


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["cache", "--model", "no-such-model", "--hooks", "x", "--out", str(tmp_path)]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert main(["info", str(tmp_path)]) == 2
    assert "not an activation cache" in capsys.readouterr().err


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
