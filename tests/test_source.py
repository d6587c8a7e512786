"""One activation-source contract, built in one place: the CLI and the Python API read the same batches."""

import argparse
import itertools

import pytest
import torch

from saelab.activations import ActivationSource, ActivationStore, IterableSource, ModelStream, open_source
from saelab.cli import main
from saelab.commands.train import train_text
from saelab.data import TextConfig
from saelab.hub import load_sae
from saelab.training import SAESpec, TrainConfig, train

HOOK = "blocks.0.hook_resid_post"
TEXT = TextConfig(context_len=32)


def same_weights(folder, trained) -> None:
    saved = load_sae(folder).state_dict()
    ours = trained.sae.state_dict()
    assert saved.keys() == ours.keys()
    for key in ours:
        assert torch.equal(saved[key], ours[key]), key


def test_store_and_stream_are_activation_sources(tiny_cache, tiny_model):
    store = open_source(tiny_cache, batch_size=100, seed=3)
    stream = ModelStream(tiny_model, HOOK, TEXT, batch_size=64, buffer_tokens=256)
    for source in (store, stream):
        assert isinstance(source, ActivationSource)
        assert source.model_name == tiny_model.name and source.d[HOOK] == 64 and source.world_size == 1
    assert store.fingerprint()["seed"] == 3 and stream.fingerprint()["buffer_tokens"] == 256


def test_batches_run_across_epochs_from_any_batch(tiny_cache):
    store = open_source(tiny_cache, batch_size=100, seed=3)
    per_epoch = store.batches_per_epoch(0)
    epochs = [b.rows for epoch in range(3) for b in store.iter_batches(epoch=epoch)]
    read = [b.rows for b in itertools.islice(store.batches(), 3 * per_epoch)]
    assert all(torch.equal(a, b) for a, b in zip(epochs, read, strict=True))
    later = [b.rows for b in itertools.islice(store.batches(start=per_epoch + 2), 3)]
    assert all(torch.equal(a, b) for a, b in zip(epochs[per_epoch + 2 : per_epoch + 5], later, strict=True))


def test_in_order_reads_every_row_once_whatever_the_shuffle(tiny_cache):
    store = open_source(tiny_cache, batch_size=100, seed=3)
    batches = list(store.in_order(hooks=[HOOK]))
    assert torch.equal(torch.cat([b.rows for b in batches]), torch.arange(store.n_tokens))
    assert list(batches[0].acts) == [HOOK]
    plain = ActivationStore(tiny_cache, HOOK, batch_size=100, shuffle=False, drop_last=False)
    for ours, theirs in zip(batches, plain, strict=True):
        assert torch.equal(ours.acts[HOOK], theirs.acts[HOOK])


def test_held_out_text_follows_the_source(tiny_cache, tiny_model):
    store = open_source(tiny_cache)
    assert store.held_out_text(10**6).start == store.manifest.n_contexts
    stream = ModelStream(tiny_model, HOOK, TEXT, batch_size=64, buffer_tokens=256)
    assert stream.held_out_text(1000).start == -(-(1000 + 256) // 31) + 1


def test_batches_held_in_memory_are_wrapped(tiny_cache):
    class Held(list):
        hooks, d, batch_size = [HOOK], {HOOK: 64}, 100

    held = Held(ActivationStore(tiny_cache, HOOK, batch_size=100))
    source = open_source(held)
    assert isinstance(source, IterableSource) and isinstance(source, ActivationSource)
    assert source.fingerprint() == {"source": "Held", "hooks": [HOOK]}
    assert torch.equal(next(source.batches(start=2)).rows, held[2].rows)
    with pytest.raises(TypeError, match="not int"):
        open_source(3)


def test_cli_and_api_train_the_same_weights_from_a_cache(tiny_cache, tmp_path):
    assert main(["train", "--acts", str(tiny_cache), "--seed", "3", "--arch", "topk", "--width", "64", "--k", "4",
                 "--tokens", "2560", "--batch-size", "256", "--out", str(tmp_path), "--eval-tokens", "0"]) == 0
    trained = train(tiny_cache, [SAESpec(arch="topk", width=64, k=4)], TrainConfig(seed=3, tokens=2560, batch_size=256),
                    progress=False)
    assert [t.hook for t in trained] == ActivationStore(tiny_cache).hooks  # no --hook: one SAE per cached hook
    for result in trained:
        same_weights(tmp_path / result.hook / "topk-64-k4", result)


def test_cli_and_api_train_the_same_weights_from_a_stream(tiny_model, tiny_model_dir, tmp_path):
    assert main(["train", "--model", str(tiny_model_dir), "--hooks", HOOK, "--context-len", "32", "--seed", "3",
                 "--arch", "topk", "--width", "64", "--k", "4", "--tokens", "1024", "--batch-size", "128",
                 "--out", str(tmp_path), "--eval-tokens", "0"]) == 0
    source = open_source(model=tiny_model, hooks=[HOOK], text=TEXT, batch_size=128, seed=3)
    (trained,) = train(source, [SAESpec(arch="topk", width=64, k=4)], TrainConfig(seed=3, tokens=1024, batch_size=128),
                       progress=False)
    same_weights(tmp_path / HOOK / "topk-64-k4", trained)


def test_the_stream_buffer_is_a_training_setting_said_when_streaming(tiny_model, tiny_model_dir, tmp_path, capsys):
    from saelab.commands.train import train_config
    from saelab.training.trainer import Trainer

    assert main(["train", "--model", str(tiny_model_dir), "--hooks", HOOK, "--context-len", "32", "--seed", "3",
                 "--arch", "topk", "--width", "64", "--k", "4", "--tokens", "512", "--batch-size", "128",
                 "--stream-buffer-tokens", "512", "--out", str(tmp_path), "--eval-tokens", "0"]) == 0
    assert "the mixing buffer holds 512 tokens (--stream-buffer-tokens)" in capsys.readouterr().err
    source = open_source(model=tiny_model, hooks=[HOOK], text=TEXT, batch_size=128, seed=3, buffer_tokens=512)
    assert source.buffer_tokens == 512
    (trained,) = train(source, [SAESpec(arch="topk", width=64, k=4)], TrainConfig(seed=3, tokens=512, batch_size=128),
                       progress=False)
    same_weights(tmp_path / HOOK / "topk-64-k4", trained)
    given = argparse.Namespace(given=argparse.Namespace())
    assert train_config(given, {"train": {"stream_buffer_tokens": 1024}}, "run.yaml").stream_buffer_tokens == 1024
    assert TrainConfig().stream_buffer_tokens == 65_536 == ModelStream(tiny_model, HOOK, TEXT).buffer_tokens
    with pytest.raises(ValueError, match="stream_buffer_tokens"):
        TrainConfig(stream_buffer_tokens=2)
    # a run that does not set it keeps its checkpoint's fingerprint: the stream's own holds the buffer, as before
    stream = open_source(model=tiny_model, hooks=[HOOK], text=TEXT, batch_size=128)
    fingerprint = Trainer(stream, [SAESpec(arch="topk", width=64, k=4)], TrainConfig(batch_size=128)).fingerprint()
    assert "stream_buffer_tokens" not in fingerprint["config"] and fingerprint["data"]["buffer_tokens"] == 65_536


def test_a_stream_says_how_full_its_mixing_buffer_is(tiny_model, capsys):
    stream = ModelStream(tiny_model, HOOK, TEXT, batch_size=64, buffer_tokens=256)
    next(iter(stream))
    assert "filling the mixing buffer: 0 of 256 tokens" in capsys.readouterr().err
    quiet = ModelStream(tiny_model, HOOK, TEXT, batch_size=64, buffer_tokens=256, progress=False)
    next(iter(quiet))
    assert "filling" not in capsys.readouterr().err


def test_text_flags_merge_over_the_run_files_text():
    file = {"text": {"source": "a.txt", "field": "body", "seed": 5, "context_len": 64}}
    flags = argparse.Namespace(text=None, context_len=32)
    assert train_text(flags, file, "run.yaml") == TextConfig(source="a.txt", field="body", seed=5, context_len=32)
    flags = argparse.Namespace(text="b.txt", context_len=None)
    assert train_text(flags, file, "run.yaml") == TextConfig(source="b.txt", field="body", seed=5, context_len=64)
    assert train_text(flags, {"text": "a.txt"}, "run.yaml") == TextConfig(source="b.txt")
    assert train_text(argparse.Namespace(text=None, context_len=None), {}, "cli") == TextConfig()
