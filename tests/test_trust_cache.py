"""The activation cache loses nothing, is never silently wrong, and says clearly what went wrong (issue 9).

One test per guarantee; each failed before its fix.
"""

import hashlib
import json
import shlex

import pytest
import torch

import saelab.activations.manifest as manifest_module
import saelab.files
from saelab.activations import ActivationStore, Manifest, cache_activations
from saelab.cli import main
from saelab.data import TextConfig, iter_documents
from saelab.errors import CacheError, DataError, SaelabError
from saelab.files import FolderBusyError, FolderLock

HOOK = "blocks.0.hook_resid_post"
TEXT = TextConfig(context_len=32)
RUN = dict(text=TEXT, tokens=1024, batch_size=4, shard_tokens=256, progress=False)  # 32 contexts in 4 shards


def test_overwrite_deletes_only_what_saelab_wrote(tiny_model, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(SaelabError, match="thesis.tex.*nothing was deleted"):
        cache_activations(tiny_model, HOOK, mine, **RUN, overwrite=True)
    assert (mine / "thesis.tex").read_text() == "years of work" and len(list(mine.iterdir())) == 1
    with pytest.raises(CacheError, match="not empty and holds no activation cache"):
        cache_activations(tiny_model, HOOK, mine, **RUN)

    out = tmp_path / "acts"
    cache_activations(tiny_model, HOOK, out, **RUN)
    (out / "notes.txt").write_text("mine too")  # a user's file beside a cache: kept, and overwrite refuses
    with pytest.raises(SaelabError, match="notes.txt.*nothing was deleted"):
        cache_activations(tiny_model, HOOK, out, **{**RUN, "tokens": 512}, overwrite=True)
    assert Manifest.read(out).n_contexts == 32 and (out / "notes.txt").exists()
    (out / "notes.txt").unlink()
    (out / "shard_00003.safetensors.tmp").write_bytes(b"left by a crash")
    assert cache_activations(tiny_model, HOOK, out, **{**RUN, "tokens": 512}, overwrite=True).n_contexts == 16
    assert sorted(p.name for p in out.iterdir() if p.name != ".saelab.lock") == [
        "manifest.json", "shard_00000.safetensors", "shard_00001.safetensors"]


def test_a_smaller_or_default_token_count_never_shrinks_a_finished_cache(tiny_model, tmp_path):
    out = tmp_path / "acts"
    cache_activations(tiny_model, HOOK, out, **RUN)
    files = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*")}
    with pytest.warns(UserWarning, match="holds 1,024 tokens, more than the 100 asked; keeping them"):
        kept = cache_activations(tiny_model, HOOK, out, **{**RUN, "tokens": 100})
    assert kept.complete and kept.n_contexts == 32 and len(kept.shards) == 4
    assert Manifest.read(out).tokens == 32 * 31
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*")} == files  # nothing recomputed
    assert sum(len(b) for b in ActivationStore(out, batch_size=31, drop_last=False)) == 32 * 31


def test_a_changed_text_file_is_a_different_run(tiny_model, tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_text("The first text, about rivers and their deltas. " * 200)
    text = TextConfig(source=str(source), context_len=32)
    out = tmp_path / "acts"
    cache_activations(tiny_model, HOOK, out, **{**RUN, "text": text, "tokens": 512})
    source.write_text("A second text, about mountains and their glaciers. " * 200)  # same path, new content
    with pytest.raises(CacheError, match=r"differs in: text\.sha256\).*content of .*corpus.txt"):
        cache_activations(tiny_model, HOOK, out, **{**RUN, "text": text, "tokens": 1024})
    # a manifest from before content hashes: a clear refusal, not a crash or a silent mix
    data = json.loads((out / "manifest.json").read_text())
    del data["run"]["text"]["sha256"]
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(CacheError, match=r"differs in: text\.sha256\).*older saelab"):
        cache_activations(tiny_model, HOOK, out, **{**RUN, "text": text, "tokens": 1024})

    from saelab.data import source_sha256

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha")
    (folder / "b.txt").write_text("beta")
    before = source_sha256(folder)
    (folder / "b.txt").write_text("beta!")
    assert source_sha256(folder) != before
    (folder / "b.txt").write_text("beta")
    assert source_sha256(folder) == before
    (folder / "b.txt").rename(folder / "c.txt")
    assert source_sha256(folder) != before
    assert "sha256" not in TextConfig().fingerprint()  # the built-in default is known by name


def test_float16_overflow_is_refused_with_the_fix(tiny_model, tmp_path, monkeypatch):
    real = tiny_model.activations
    monkeypatch.setattr(tiny_model, "activations", lambda *a, **k: {h: v * 1e6 for h, v in real(*a, **k).items()})
    with pytest.raises(CacheError, match="overflow float16.*--dtype bfloat16 or float32"):
        cache_activations(tiny_model, HOOK, tmp_path / "f16", **RUN, dtype="float16")
    cache_activations(tiny_model, HOOK, tmp_path / "bf16", **RUN, dtype="bfloat16")
    stored = torch.cat([b.acts[HOOK] for b in ActivationStore(tmp_path / "bf16", batch_size=64, drop_last=False)])
    assert torch.isfinite(stored).all()


def test_unreadable_empty_and_short_text_say_so(tiny_model, tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt is not UTF-8 text \(invalid byte at offset 3\).*iconv"):
        list(iter_documents(latin1))
    binary = tmp_path / "weights.txt"
    binary.write_bytes(b"PK\x03\x04\x00\x00" + bytes(range(256)))
    with pytest.raises(DataError, match="weights.txt holds NUL bytes: it is a binary file"):
        list(iter_documents(binary))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="holds no text"):
        cache_activations(tiny_model, HOOK, tmp_path / "acts", **{**RUN, "text": TextConfig(str(empty), 32)})
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("\n\n")
    (tmp_path / "blank" / "b.jsonl").write_text("")
    with pytest.raises(DataError, match="holds no text"):
        list(iter_documents(tmp_path / "blank"))
    assert not (tmp_path / "acts").exists()  # refused before anything was written

    short = tmp_path / "short.txt"
    short.write_text("A short text about nothing much at all. " * 30)
    with pytest.warns(UserWarning, match=r"short.txt' ran out: the cache holds [\d,]+ tokens, fewer than the 1,024"):
        manifest = cache_activations(tiny_model, HOOK, tmp_path / "acts", **{**RUN, "text": TextConfig(str(short), 32)})
    assert manifest.complete and manifest.exhausted_at == manifest.n_contexts < 32
    assert Manifest.read(tmp_path / "acts").exhausted_at == manifest.n_contexts


def test_info_verifies_every_shard_and_prints_a_working_repair(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "acts"
    assert main(["cache", "--model", str(tiny_model_dir), "--hooks", HOOK, "--out", str(out), "--tokens", "1024",
                 "--context-len", "32", "--batch-size", "4", "--shard-tokens", "256"]) == 0
    assert main(["info", str(out)]) == 0
    assert "(complete, verified)" in capsys.readouterr().out
    shard = out / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes: only the checksum can tell
    shard.write_bytes(bytes(data))
    assert main(["info", str(out), "--no-verify"]) == 0
    assert "(complete (not verified))" in capsys.readouterr().out
    assert main(["info", str(out)]) == 2
    printed = capsys.readouterr()
    assert "shard_00001.safetensors is corrupt" in printed.out and "DAMAGED" in printed.out
    assert "1 of 4 shards missing or damaged" in printed.err
    repair = printed.err.split("only those: ")[1].strip()
    assert main(shlex.split(repair)[1:]) == 0  # the advice works as printed
    assert main(["info", str(out)]) == 0
    assert "(complete, verified)" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["a JSON list", "torn JSON", "a missing key", "shards not a list",
                                    "run not a mapping", "a shard of the wrong type", "version a string"])
def test_a_damaged_manifest_is_one_line_whose_advice_works(tiny_model_dir, tmp_path, capsys, damage):
    out = tmp_path / "acts"
    command = ["cache", "--model", str(tiny_model_dir), "--hooks", HOOK, "--out", str(out), "--tokens", "256",
               "--context-len", "32", "--batch-size", "4", "--shard-tokens", "128"]
    assert main(command) == 0
    good = json.loads((out / "manifest.json").read_text())
    damaged = {"a JSON list": [good], "torn JSON": None, "a missing key": {k: v for k, v in good.items() if k != "dtype"},
               "shards not a list": {**good, "shards": 5}, "run not a mapping": {**good, "run": []},
               "a shard of the wrong type": {**good, "shards": [{**good["shards"][0], "rows": "many"}]},
               "version a string": {**good, "version": "1"}}[damage]
    (out / "manifest.json").write_text(json.dumps(good)[:60] if damaged is None else json.dumps(damaged))
    capsys.readouterr()
    for reader in (["info", str(out)], command):  # reading it, and the rerun that would resume it
        assert main(reader) == 2
        err = capsys.readouterr().err
        (line,) = [line for line in err.splitlines() if line.startswith("saelab: error:")]
        assert "Traceback" not in err and str(out / "manifest.json") in line and "with --overwrite" in line, err
    assert main(command + ["--overwrite"]) == 0  # the advice works
    assert main(["info", str(out)]) == 0 and "(complete, verified)" in capsys.readouterr().out


def test_a_second_writer_is_refused(tiny_model, tmp_path):
    out = tmp_path / "acts"
    with FolderLock(out, "activation cache"):  # flock: a second lock in this same process conflicts too
        with pytest.raises(FolderBusyError, match=r"another saelab process \(pid \d+\) is writing the activation cache"):
            cache_activations(tiny_model, HOOK, out, **RUN)
    assert (out / ".saelab.lock").exists()  # the lock file is not "somebody's files" to the writer or the store
    assert cache_activations(tiny_model, HOOK, out, **RUN).complete
    assert sum(len(b) for b in ActivationStore(out, batch_size=31, drop_last=False)) == 32 * 31


def test_one_atomic_write_everywhere():
    assert manifest_module.write_atomic is saelab.files.write_atomic


def test_the_same_cache_command_writes_the_same_bytes(tiny_model, tmp_path):
    """Caches compare by hash: safetensors wrote its metadata in hash-map order, which changed from call to call."""
    run = {**RUN, "shard_tokens": 128}  # 8 shards: a hash-map order that happened to agree on all would be 1 in 256
    first = cache_activations(tiny_model, HOOK, tmp_path / "a", **run)
    second = cache_activations(tiny_model, HOOK, tmp_path / "b", **run)
    assert len(first.shards) == 8
    assert [s.sha256 for s in first.shards] == [s.sha256 for s in second.shards]
    assert all((tmp_path / "a" / s.file).read_bytes() == (tmp_path / "b" / s.file).read_bytes() for s in first.shards)
    assert ActivationStore(tmp_path / "a").manifest.complete  # what is written still reads, hashes verified
    assert sum(len(b) for b in ActivationStore(tmp_path / "a", batch_size=31, drop_last=False)) == 32 * 31


def rename_hook(cache, new: str) -> None:
    """Rename the cached hook in the manifest and in every shard, with the shards' sizes and SHA-256 updated to match:
    a manifest that passes every integrity check but was written by hand."""
    from safetensors.torch import load_file

    data = json.loads((cache / "manifest.json").read_text())
    (old,) = data["hooks"]
    data["hooks"] = {new: data["hooks"][old]}
    data["run"]["hooks"] = [new]
    for record in data["shards"]:
        tensors = load_file(cache / record["file"])
        tensors[f"acts.{new}"] = tensors.pop(f"acts.{old}")
        payload = saelab.files.safetensors_bytes(tensors)
        (cache / record["file"]).write_bytes(payload)
        record["bytes"], record["sha256"] = len(payload), hashlib.sha256(payload).hexdigest()
    (cache / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize("hook", ["../../escaped_dir", "/tmp/escaped_dir", "..", "a\\b", "bad\nname"])
def test_a_hook_name_that_is_a_path_is_refused_and_nothing_is_written(tiny_model, tmp_path, monkeypatch, capsys, hook):
    """A manifest naming a hook '../../escaped_dir' (its shards' hashes updated to match) made `saelab train --acts C
    --out sub/t` write the SAE folder outside --out and exit 0."""
    cache = tmp_path / "work" / "C"
    cache_activations(tiny_model, HOOK, cache, **RUN)
    rename_hook(cache, hook)
    monkeypatch.chdir(tmp_path / "work")
    before = sorted(tmp_path.rglob("*"))
    assert main(["train", "--acts", "C", "--out", "sub/t", "--arch", "topk", "--width", "64", "--k", "4",
                 "--tokens", "512", "--batch-size", "128", "--eval-tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "names a hook" in err and "rebuild the cache" in err
    assert sorted(tmp_path.rglob("*")) == before and not (tmp_path / "escaped_dir").exists()
    with pytest.raises(CacheError, match="names a hook"):
        ActivationStore(cache)


def test_a_shard_file_outside_the_cache_is_refused(tiny_model, tmp_path):
    cache = tmp_path / "C"
    cache_activations(tiny_model, HOOK, cache, **RUN)
    data = json.loads((cache / "manifest.json").read_text())
    data["shards"][0]["file"] = "../elsewhere.safetensors"
    (cache / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(CacheError, match=r"lists shard 0 as the file '\.\./elsewhere\.safetensors'"):
        Manifest.read(cache)
