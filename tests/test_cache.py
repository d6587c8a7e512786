"""The activation cache: it holds the model's activations, resumes exactly, loses nothing, is never silently wrong
and says clearly what went wrong; the store and the model stream read the same rows back."""

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import saelab.activations.manifest as manifest_module
import saelab.activations.writer as writer
import saelab.files
from saelab.activations import ActivationStore, Manifest, ModelStream, cache_activations
from saelab.cli import main
from saelab.data import TextConfig, iter_documents
from saelab.errors import CacheError, DataError, HookError, SaelabError
from saelab.files import FolderBusyError, FolderLock

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
TEXT = TextConfig(context_len=32)
RUN = dict(text=TEXT, tokens=4000, batch_size=4, shard_tokens=512, progress=False)


def all_rows(folder: Path) -> dict[str, torch.Tensor]:
    """Every shard's tensors concatenated in shard order."""
    manifest = Manifest.read(folder)
    shards = [load_file(folder / s.file) for s in manifest.shards]
    return {key: torch.cat([s[key] for s in shards]) for key in shards[0]}


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    cache_activations(tiny_model, HOOKS, out, **RUN)
    return out


def test_cache_holds_the_model_activations_of_the_packed_text(tiny_model, reference):
    manifest = Manifest.read(reference)
    assert manifest.complete and manifest.n_contexts == 125 and manifest.n_shards == 8
    assert manifest.tokens == 125 * 31  # BOS positions dropped
    assert manifest.hooks["blocks.0.hook_resid_post"]["d"] == 64
    rows = all_rows(reference)
    contexts = list(TEXT.contexts(tiny_model.tokenizer))[:125]
    assert rows["tokens"].tolist() == contexts
    expected = tiny_model.activations(torch.tensor(contexts[:4]), HOOKS)
    torch.testing.assert_close(rows["acts.blocks.1.hook_mlp_out"][:31], expected["blocks.1.hook_mlp_out"][0, 1:])
    torch.testing.assert_close(rows["acts.blocks.0.hook_resid_post"][31:62], expected["blocks.0.hook_resid_post"][1, 1:])
    assert rows["positions"][:3].tolist() == [1, 2, 3]


def test_keep_bos_and_bfloat16(tiny_model, tmp_path):
    manifest = cache_activations(tiny_model, HOOKS[0], tmp_path, **{**RUN, "tokens": 320}, drop_bos=False,
                                 dtype="bfloat16")
    assert manifest.tokens == 320
    assert all_rows(tmp_path)["acts.blocks.0.hook_resid_post"].dtype == torch.bfloat16


def test_resume_after_a_crash_mid_write_gives_exactly_the_uninterrupted_cache(tiny_model, reference, tmp_path,
                                                                          monkeypatch):
    real_write = writer.write_atomic
    writes = {"n": 0}

    def crash_on_fourth_shard(path, payload):
        if path.name.startswith("shard_"):
            writes["n"] += 1
            if writes["n"] == 4:  # die with the shard half written to its temporary file
                path.with_name(path.name + ".tmp").write_bytes(payload[: len(payload) // 2])
                raise KeyboardInterrupt
        real_write(path, payload)

    monkeypatch.setattr(writer, "write_atomic", crash_on_fourth_shard)
    with pytest.raises(KeyboardInterrupt):
        cache_activations(tiny_model, HOOKS, tmp_path, **RUN)
    monkeypatch.setattr(writer, "write_atomic", real_write)
    partial = Manifest.read(tmp_path)
    assert not partial.complete and len(partial.shards) == 3
    with pytest.raises(CacheError, match="incomplete"):
        ActivationStore(tmp_path)
    cache_activations(tiny_model, HOOKS, tmp_path, **RUN)
    assert not list(tmp_path.glob("*.tmp"))
    resumed, uninterrupted = all_rows(tmp_path), all_rows(reference)
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key


KILL_SCRIPT = """
import sys
from saelab.models import load_model
from saelab.activations import cache_activations
from saelab.data import TextConfig
model = load_model(sys.argv[1])
cache_activations(model, {hooks!r}, sys.argv[2], text=TextConfig(context_len=32), tokens=int(sys.argv[3]),
                  batch_size=4, shard_tokens=512, progress=False)
"""


def test_kill_9_then_resume_has_every_token_once(tiny_model_dir, tiny_model, tmp_path):
    out, tokens = tmp_path / "acts", 16_000
    script = KILL_SCRIPT.format(hooks=HOOKS)
    process = subprocess.Popen([sys.executable, "-c", script, str(tiny_model_dir), str(out), str(tokens)])
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        try:
            if len(json.loads((out / "manifest.json").read_text())["shards"]) >= 3:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    assert process.poll() is None, "the cache run finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed = Manifest.read(out)
    assert 3 <= len(killed.shards) < killed.n_shards
    cache_activations(tiny_model, HOOKS, out, text=TEXT, tokens=tokens, batch_size=4, shard_tokens=512,
                      progress=False)
    rows = all_rows(out)
    contexts = list(TEXT.contexts(tiny_model.tokenizer))[: -(-tokens // 32)]
    assert rows["tokens"].tolist() == contexts  # none missing, none twice, in order
    assert len(rows["positions"]) == len(contexts) * 31 == Manifest.read(out).tokens
    sample = tiny_model.activations(torch.tensor(contexts[-4:]), HOOKS)
    torch.testing.assert_close(rows["acts.blocks.0.hook_resid_post"][-31:], sample["blocks.0.hook_resid_post"][-1, 1:])


def test_corrupt_and_truncated_shards_are_named_and_repaired(tiny_model, reference, tmp_path):
    import shutil

    out = tmp_path / "acts"
    shutil.copytree(reference, out)
    (out / "shard_00005.safetensors").write_bytes((out / "shard_00005.safetensors").read_bytes()[:100])
    with pytest.raises(CacheError, match="shard_00005.safetensors is truncated"):
        list(ActivationStore(out, batch_size=64))
    shard = out / "shard_00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="shard_00002.safetensors is corrupt"):
        list(ActivationStore(out, batch_size=64, shuffle=False))
    untouched = (out / "shard_00000.safetensors").stat().st_mtime_ns
    cache_activations(tiny_model, HOOKS, out, **RUN)  # recomputes only the two damaged shards
    assert (out / "shard_00000.safetensors").stat().st_mtime_ns == untouched
    for key, value in all_rows(out).items():
        assert torch.equal(value, all_rows(reference)[key])
    assert sum(len(b) for b in ActivationStore(out, batch_size=64, drop_last=False)) == 125 * 31


def test_a_folder_holding_another_run_is_refused(tiny_model, reference, tmp_path):
    import shutil

    out = tmp_path / "acts"
    shutil.copytree(reference, out)
    with pytest.raises(CacheError, match="holds a different run \\(differs in: hooks\\)"):
        cache_activations(tiny_model, HOOKS[:1], out, **RUN)
    with pytest.raises(CacheError, match="differs in: .*text"):
        cache_activations(tiny_model, HOOKS, out, **{**RUN, "text": TextConfig(context_len=16)})
    cache_activations(tiny_model, HOOKS[:1], out, **RUN, overwrite=True)
    assert list(Manifest.read(out).hooks) == HOOKS[:1]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not empty and holds no activation cache"):
        cache_activations(tiny_model, HOOKS, tmp_path / "other", **RUN)


def test_more_tokens_extends_an_existing_cache(tiny_model, reference, tmp_path):
    out = tmp_path / "acts"
    cache_activations(tiny_model, HOOKS, out, **{**RUN, "tokens": 2000})
    cache_activations(tiny_model, HOOKS, out, **RUN)
    for key, value in all_rows(out).items():
        assert torch.equal(value, all_rows(reference)[key])


def test_bad_arguments(tiny_model, tmp_path):
    with pytest.raises(HookError, match="did you mean"):
        cache_activations(tiny_model, "blocks.0.hook_resid_pots", tmp_path, **RUN)
    with pytest.raises(ValueError, match="longer than"):
        cache_activations(tiny_model, HOOKS, tmp_path, **{**RUN, "text": TextConfig(context_len=512)})
    with pytest.raises(ValueError, match="dtype must be one of"):
        cache_activations(tiny_model, HOOKS, tmp_path, **RUN, dtype="int8")


def test_text_running_out_ends_the_cache_cleanly(tiny_model, tmp_path):
    source = tmp_path / "short.txt"
    source.write_text("A short text. " * 60)
    with pytest.warns(UserWarning, match="ran out: the cache holds .* fewer than the 100,000 asked"):
        manifest = cache_activations(tiny_model, HOOKS, tmp_path / "acts", text=TextConfig(source=str(source),
                                     context_len=32), tokens=100_000, batch_size=4, shard_tokens=256, progress=False)
    assert manifest.complete and manifest.exhausted_at == manifest.n_contexts < 100_000 // 32
    assert all_rows(tmp_path / "acts")["tokens"].shape[0] == manifest.n_contexts


def test_store_visits_every_row_once_per_epoch_mixing_shards(reference):
    store = ActivationStore(reference, batch_size=100, drop_last=False, shards_per_window=3)
    batches = list(store)
    rows = torch.cat([b.rows for b in batches])
    assert sorted(rows.tolist()) == list(range(125 * 31))
    assert len(batches) == store.batches_per_epoch() == 39
    shard_of_row = rows[:100] // (16 * 31)
    assert len(set(shard_of_row.tolist())) > 1  # the first batch already mixes several shards
    second = torch.cat([b.rows for b in store.iter_batches(epoch=1)])
    assert not torch.equal(rows, second)
    again = torch.cat([b.rows for b in ActivationStore(reference, batch_size=100, drop_last=False,
                                                       shards_per_window=3)])
    assert torch.equal(rows, again)


def test_store_batches_carry_the_right_activations_and_tokens(reference):
    everything = all_rows(reference)
    shards = [load_file(reference / s.file) for s in Manifest.read(reference).shards]
    token_of_row = torch.cat([s["tokens"].flatten()[s["positions"].long()] for s in shards])
    store = ActivationStore(reference, hooks="blocks.1.hook_mlp_out", batch_size=128)
    batch = next(iter(store))
    assert set(batch.acts) == {"blocks.1.hook_mlp_out"}
    torch.testing.assert_close(batch.acts["blocks.1.hook_mlp_out"], everything["acts.blocks.1.hook_mlp_out"][batch.rows])
    assert torch.equal(batch.token_ids, token_of_row[batch.rows].long())
    context, position = store.locate(int(batch.rows[0]))
    assert context[position] == batch.token_ids[0]
    assert context[0] == 1  # each context starts with BOS
    with pytest.raises(HookError, match="has no hook 'blocks.5.hook_resid_post'"):
        ActivationStore(reference, hooks="blocks.5.hook_resid_post")


def test_store_skip_ahead_equals_the_tail_of_a_full_pass(reference):
    store = ActivationStore(reference, batch_size=90, shards_per_window=2)
    full = [b.rows for b in store.iter_batches(epoch=2)]
    for start in (0, 1, 5, 11, len(full) - 1):
        tail = [b.rows for b in store.iter_batches(epoch=2, start=start)]
        assert len(tail) == len(full) - start
        assert all(torch.equal(a, b) for a, b in zip(tail, full[start:]))


def test_store_ranks_split_the_data(reference):
    parts = [torch.cat([b.rows for b in ActivationStore(reference, batch_size=50, drop_last=False, rank=r,
                                                          world_size=3)]) for r in range(3)]
    joined = torch.cat(parts).tolist()
    assert sorted(joined) == list(range(125 * 31)) and len(set(joined)) == len(joined)


def test_stream_gives_the_same_activations_as_the_cache(tiny_model, reference):
    stream = ModelStream(tiny_model, HOOKS, TEXT, batch_size=64, buffer_tokens=512, max_tokens=125 * 31)
    batches = list(stream)
    assert all(len(b) == 64 for b in batches) and len(batches) == 125 * 31 // 64
    rows = torch.cat([b.rows for b in batches])
    assert len(set(rows.tolist())) == len(rows)
    assert not torch.equal(rows, rows.sort().values)  # shuffled
    cached = all_rows(reference)
    index = torch.tensor([cache_row_global(r, cached) for r in rows[:200].tolist()])
    acts = torch.cat([b.acts["blocks.1.hook_mlp_out"] for b in batches])[:200]
    torch.testing.assert_close(acts, cached["acts.blocks.1.hook_mlp_out"][index], atol=1e-5, rtol=1e-4)
    again = torch.cat([b.rows for b in ModelStream(tiny_model, HOOKS, TEXT, batch_size=64, buffer_tokens=512,
                                                   max_tokens=125 * 31)])
    assert torch.equal(rows, again)


def cache_row_global(stream_row: int, cached) -> int:
    """Cache row of a stream row (context * 32 + position), using shard-local positions of 16-context shards."""
    context, position = divmod(stream_row, 32)
    shard, local = divmod(context, 16)
    return shard * 16 * 31 + local * 31 + (position - 1)


def test_stream_ranks_take_disjoint_contexts(tiny_model):
    rows = [torch.cat([b.rows for b in ModelStream(tiny_model, HOOKS[0], TEXT, batch_size=31, buffer_tokens=62,
                                                   rank=r, world_size=2, max_tokens=620)]) for r in range(2)]
    contexts = [set((r // 32).tolist()) for r in rows]
    assert contexts[0].isdisjoint(contexts[1])
    assert all(c % 2 == 0 for c in contexts[0]) and all(c % 2 == 1 for c in contexts[1])


HOOK = "blocks.0.hook_resid_post"
SMALL_RUN = dict(text=TEXT, tokens=1024, batch_size=4, shard_tokens=256, progress=False)  # 32 contexts in 4 shards


def test_overwrite_deletes_only_what_saelab_wrote(tiny_model, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(SaelabError, match="thesis.tex.*nothing was deleted"):
        cache_activations(tiny_model, HOOK, mine, **SMALL_RUN, overwrite=True)
    assert (mine / "thesis.tex").read_text() == "years of work" and len(list(mine.iterdir())) == 1
    with pytest.raises(CacheError, match="not empty and holds no activation cache"):
        cache_activations(tiny_model, HOOK, mine, **SMALL_RUN)

    out = tmp_path / "acts"
    cache_activations(tiny_model, HOOK, out, **SMALL_RUN)
    (out / "notes.txt").write_text("mine too")  # a user's file beside a cache: kept, and overwrite refuses
    with pytest.raises(SaelabError, match="notes.txt.*nothing was deleted"):
        cache_activations(tiny_model, HOOK, out, **{**SMALL_RUN, "tokens": 512}, overwrite=True)
    assert Manifest.read(out).n_contexts == 32 and (out / "notes.txt").exists()
    (out / "notes.txt").unlink()
    (out / "shard_00003.safetensors.tmp").write_bytes(b"left by a crash")
    assert cache_activations(tiny_model, HOOK, out, **{**SMALL_RUN, "tokens": 512}, overwrite=True).n_contexts == 16
    assert sorted(p.name for p in out.iterdir() if p.name != ".saelab.lock") == [
        "manifest.json", "shard_00000.safetensors", "shard_00001.safetensors"]


def test_a_smaller_or_default_token_count_never_shrinks_a_finished_cache(tiny_model, tmp_path):
    out = tmp_path / "acts"
    cache_activations(tiny_model, HOOK, out, **SMALL_RUN)
    files = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*")}
    with pytest.warns(UserWarning, match="holds 1,024 tokens, more than the 100 asked; keeping them"):
        kept = cache_activations(tiny_model, HOOK, out, **{**SMALL_RUN, "tokens": 100})
    assert kept.complete and kept.n_contexts == 32 and len(kept.shards) == 4
    assert Manifest.read(out).tokens == 32 * 31
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*")} == files  # nothing recomputed
    assert sum(len(b) for b in ActivationStore(out, batch_size=31, drop_last=False)) == 32 * 31


def test_a_changed_text_file_is_a_different_run(tiny_model, tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_text("The first text, about rivers and their deltas. " * 200)
    text = TextConfig(source=str(source), context_len=32)
    out = tmp_path / "acts"
    cache_activations(tiny_model, HOOK, out, **{**SMALL_RUN, "text": text, "tokens": 512})
    source.write_text("A second text, about mountains and their glaciers. " * 200)  # same path, new content
    with pytest.raises(CacheError, match=r"differs in: text\.sha256\).*content of .*corpus.txt"):
        cache_activations(tiny_model, HOOK, out, **{**SMALL_RUN, "text": text, "tokens": 1024})
    # a manifest from before content hashes: a clear refusal, not a crash or a silent mix
    data = json.loads((out / "manifest.json").read_text())
    del data["run"]["text"]["sha256"]
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(CacheError, match=r"differs in: text\.sha256\).*older saelab"):
        cache_activations(tiny_model, HOOK, out, **{**SMALL_RUN, "text": text, "tokens": 1024})

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
        cache_activations(tiny_model, HOOK, tmp_path / "f16", **SMALL_RUN, dtype="float16")
    cache_activations(tiny_model, HOOK, tmp_path / "bf16", **SMALL_RUN, dtype="bfloat16")
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
        cache_activations(tiny_model, HOOK, tmp_path / "acts", **{**SMALL_RUN, "text": TextConfig(str(empty), 32)})
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("\n\n")
    (tmp_path / "blank" / "b.jsonl").write_text("")
    with pytest.raises(DataError, match="holds no text"):
        list(iter_documents(tmp_path / "blank"))
    assert not (tmp_path / "acts").exists()  # refused before anything was written

    short = tmp_path / "short.txt"
    short.write_text("A short text about nothing much at all. " * 30)
    with pytest.warns(UserWarning, match=r"short.txt' ran out: the cache holds [\d,]+ tokens, fewer than the 1,024"):
        manifest = cache_activations(tiny_model, HOOK, tmp_path / "acts", **{**SMALL_RUN, "text": TextConfig(str(short), 32)})
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
            cache_activations(tiny_model, HOOK, out, **SMALL_RUN)
    assert (out / ".saelab.lock").exists()  # the lock file is not "somebody's files" to the writer or the store
    assert cache_activations(tiny_model, HOOK, out, **SMALL_RUN).complete
    assert sum(len(b) for b in ActivationStore(out, batch_size=31, drop_last=False)) == 32 * 31


def test_one_atomic_write_everywhere():
    assert manifest_module.write_atomic is saelab.files.write_atomic


def test_the_same_cache_command_writes_the_same_bytes(tiny_model, tmp_path):
    """Caches compare by hash: safetensors wrote its metadata in hash-map order, which changed from call to call."""
    run = {**SMALL_RUN, "shard_tokens": 128}  # 8 shards: a hash-map order that happened to agree on all would be 1 in 256
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
    cache_activations(tiny_model, HOOK, cache, **SMALL_RUN)
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
    cache_activations(tiny_model, HOOK, cache, **SMALL_RUN)
    data = json.loads((cache / "manifest.json").read_text())
    data["shards"][0]["file"] = "../elsewhere.safetensors"
    (cache / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(CacheError, match=r"lists shard 0 as the file '\.\./elsewhere\.safetensors'"):
        Manifest.read(cache)


def test_caching_shows_tokens_within_shards(tiny_model, tmp_path, capsys, monkeypatch):
    """The bar counts tokens, so a run of one slow shard still moves, and says how many shards are written."""
    seen = []

    def watched(batches, bar):
        for batch in batches:
            seen.append(bar.n)
            yield batch

    compute = writer._compute_shard
    monkeypatch.setattr(writer, "_compute_shard", lambda model, hooks, batches, dtype, index, bar: compute(
        model, hooks, watched(batches, bar), dtype, index, bar))
    cache_activations(tiny_model, HOOKS[0], tmp_path / "acts", text=TEXT, tokens=512, batch_size=4, shard_tokens=256)
    assert seen == [0, 128, 256, 384]  # 16 contexts of 32 tokens, 8 a shard, 4 a forward: it moves every forward
    err = capsys.readouterr().err
    assert "caching 1 hook(s)" in err and "tok/s" in err and "2/2 shards written" in err
