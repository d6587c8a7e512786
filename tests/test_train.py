import json
import math

import pytest
import torch

from saelab.activations import ActivationBatch, ActivationStore, ModelStream, cache_activations
from saelab.data import TextConfig
from saelab.errors import HookError, TrainingError
from saelab.training import SAESpec, TrainConfig, Trainer, train
from saelab.training.checkpoint import CheckpointError

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
SPECS = [dict(arch="topk", width=128, k=8), dict(arch="batchtopk", width=96, k=4, hook=HOOKS[1])]
CONFIG = dict(tokens=40 * 256, batch_size=256, lr_warmup_steps=5, checkpoint_every=10, log_every=5)


@pytest.fixture(scope="module")
def cache(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("train-cache")
    cache_activations(tiny_model, HOOKS, out, text=TextConfig(context_len=32), tokens=6000, batch_size=8,
                      shard_tokens=1024, progress=False)
    return out


def weights(trained):
    return {f"{t.name}.{k}": v for t in trained for k, v in t.sae.state_dict().items()}


def test_several_saes_train_from_one_stream_and_learn(cache):
    trained = train(cache, SPECS, TrainConfig(**CONFIG), progress=False)
    assert [t.name for t in trained] == [f"{HOOKS[0]}/topk-128-k8", f"{HOOKS[1]}/batchtopk-96-k4"]
    assert trained[1].sae.cfg.arch == "jumprelu"  # BatchTopK exports as JumpReLU
    for t in trained:
        assert t.sae.cfg.input_scale == 1.0 and t.sae.cfg.training_tokens == 40 * 256
        torch.testing.assert_close(t.sae.W_dec.norm(dim=1), torch.ones(t.sae.cfg.width))
    x = next(iter(ActivationStore(cache, batch_size=512))).acts[HOOKS[0]]
    fvu = (x - trained[0].sae(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert fvu < 0.5  # raw activations in, raw reconstruction out: the input scale is folded in
    assert (trained[0].sae.encode(x) != 0).sum(-1).le(8).all()


def test_one_stream_for_many_saes_equals_training_each_alone(cache):
    config = TrainConfig(**{**CONFIG, "tokens": 10 * 256})
    together = weights(train(cache, SPECS, config, progress=False))
    alone = {**weights(train(cache, SPECS[:1], config, progress=False)),
             **weights(train(cache, SPECS[1:], config, progress=False))}
    assert together.keys() == alone.keys()
    for key in together:
        assert torch.equal(together[key], alone[key]), key


def test_resume_after_a_crash_ends_with_the_same_weights(cache, tmp_path, monkeypatch):
    config = TrainConfig(**CONFIG)
    reference = weights(train(cache, SPECS, config, out=tmp_path / "a", progress=False))
    real_step = Trainer._train_step

    def crash_at_step_27(self, member, acts):
        if self.step == 27:
            raise KeyboardInterrupt
        return real_step(self, member, acts)

    monkeypatch.setattr(Trainer, "_train_step", crash_at_step_27)
    with pytest.raises(KeyboardInterrupt):
        train(cache, SPECS, config, out=tmp_path / "b", progress=False)
    monkeypatch.setattr(Trainer, "_train_step", real_step)
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 20
    resumed = weights(train(cache, SPECS, config, out=tmp_path / "b", progress=False))
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key
    log_a = (tmp_path / "a" / "log.jsonl").read_text().splitlines()
    log_b = (tmp_path / "b" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log_b] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert log_a == log_b


def test_a_checkpoint_from_another_config_is_refused(cache, tmp_path):
    train(cache, SPECS[:1], TrainConfig(**{**CONFIG, "tokens": 10 * 256}), out=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="another run \\(differs in: specs\\)"):
        train(cache, [dict(arch="topk", width=128, k=16)], TrainConfig(**{**CONFIG, "tokens": 10 * 256}),
              out=tmp_path, progress=False)
    train(cache, [dict(arch="topk", width=128, k=16)], TrainConfig(**{**CONFIG, "tokens": 10 * 256}), out=tmp_path,
          resume=False, progress=False)


def test_a_cache_folder_is_read_in_the_order_of_the_run_seed(cache):
    """train(folder, ..., TrainConfig(seed=s)) reads the cache as `saelab train --acts folder --seed s` does (its
    store is seeded with s); the API read every folder with seed 0 whatever the run's seed."""
    def first_rows(seed):
        trainer = Trainer(str(cache), [dict(arch="topk", width=32, k=4)], TrainConfig(seed=seed, batch_size=64),
                          progress=False)
        return next(iter(trainer.source)).rows

    cli_store = ActivationStore(cache, batch_size=64, seed=3)
    assert torch.equal(first_rows(3), next(iter(cli_store)).rows)
    assert not torch.equal(first_rows(3), first_rows(0))


def test_epochs_wrap_around_a_small_cache(cache):
    store = ActivationStore(cache, batch_size=256)
    config = TrainConfig(**{**CONFIG, "tokens": (store.batches_per_epoch() + 3) * 256})
    (trained,) = train(store, SPECS[:1], config, progress=False)
    assert trained.steps == store.batches_per_epoch() + 3


class NaNStore:
    """An in-memory source (any iterable of ActivationBatches with hooks, d, batch_size) whose third batch has a NaN."""

    hooks = HOOKS[:1]
    d = {HOOKS[0]: 64}
    batch_size = 32

    def __iter__(self):
        for i in range(6):
            x = torch.randn(32, 64)
            if i == 2:
                x[5, 3] = math.nan
            yield ActivationBatch({HOOKS[0]: x}, torch.zeros(32, dtype=torch.long), torch.arange(32))


def test_nan_activations_stop_with_where_or_are_skipped_and_counted():
    config = dict(tokens=4 * 32, batch_size=32, lr_warmup_steps=0)
    with pytest.raises(TrainingError, match="1 of 32 tokens at blocks.0.hook_resid_post in batch 2"):
        train(NaNStore(), [dict(arch="topk", width=32, k=4)], TrainConfig(**config), progress=False)
    trainer = Trainer(NaNStore(), [dict(arch="topk", width=32, k=4)], TrainConfig(**config, nan_policy="skip"),
                      progress=False)
    trainer.fit()
    assert trainer.skipped == 1 and trainer.step == 4 and trainer.batches_read == 5


def test_bad_hyperparameters_and_hooks(cache):
    with pytest.raises(ValueError, match="k must be an integer with 1 <= k <= width=16"):
        train(cache, [dict(arch="topk", width=16, k=32)], TrainConfig(**CONFIG), progress=False)
    with pytest.raises(ValueError, match="l1_coefficient must be a number >= 0"):
        train(cache, [dict(arch="relu", width=16, options={"l1_coefficient": -1.0})], TrainConfig(**CONFIG),
              progress=False)
    with pytest.raises(ValueError, match="expects d_in=640 but hook blocks.0.hook_resid_post gives 64"):
        train(cache, [dict(width=16, k=4, options={"d_in": 640})], TrainConfig(**CONFIG), progress=False)
    with pytest.raises(ValueError, match="lr must be a number > 0"):
        SAESpec(lr=-1e-3)
    with pytest.raises(ValueError, match="TrainConfig.batch_size must be an integer >= 2"):
        TrainConfig(batch_size=0)
    with pytest.raises(HookError, match="reads hook 'blocks.5.hook_resid_post', but the activations hold"):
        train(cache, [dict(hook="blocks.5.hook_resid_post", width=16, k=4)], TrainConfig(**CONFIG), progress=False)
    with pytest.raises(ValueError, match="batches of 4096 but TrainConfig.batch_size is 256"):
        train(ActivationStore(cache), SPECS, TrainConfig(**CONFIG), progress=False)


def test_live_model_stream_trains_and_resumes_by_replay(tiny_model, tmp_path, monkeypatch):
    def stream():
        return ModelStream(tiny_model, HOOKS[0], TextConfig(context_len=32), batch_size=128, buffer_tokens=512)

    config = TrainConfig(tokens=12 * 128, batch_size=128, checkpoint_every=5, lr_warmup_steps=2)
    reference = weights(train(stream(), SPECS[:1], config, progress=False))
    real_step = Trainer._train_step
    monkeypatch.setattr(Trainer, "_train_step",
                        lambda self, m, a: (_ for _ in ()).throw(KeyboardInterrupt) if self.step == 7 else real_step(self, m, a))
    with pytest.raises(KeyboardInterrupt):
        train(stream(), SPECS[:1], config, out=tmp_path, progress=False)
    monkeypatch.setattr(Trainer, "_train_step", real_step)
    resumed = weights(train(stream(), SPECS[:1], config, out=tmp_path, progress=False))
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key


def test_learning_rate_schedule():
    config = TrainConfig(tokens=100 * 10, batch_size=10, lr_warmup_steps=10, lr_decay_fraction=0.2)
    factors = [config.lr_factor(s) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0 and factors[50] == 1.0
    assert factors[80] == 1.0 and factors[90] == pytest.approx(0.5) and factors[99] == pytest.approx(0.05)
    assert TrainConfig(tokens=300 * 10, batch_size=10).warmup_steps == 15
    assert TrainConfig(tokens=10_000 * 10, batch_size=10).warmup_steps == 100
    assert TrainConfig(tokens=10 * 10, batch_size=10).lr_factor(0) == 1.0  # too short for a warm-up
    assert SAESpec(width=2**14).learning_rate == pytest.approx(8e-4)
    assert SAESpec(width=2**16).learning_rate == pytest.approx(4e-4)
    assert SAESpec(arch="relu", width=2**14).learning_rate == pytest.approx(4e-4)  # its steering's calibration


def test_sparse_kernels_train_like_the_dense_reference(cache):
    results = {}
    for kernel in ("torch", "dense"):
        config = TrainConfig(**{**CONFIG, "tokens": 8 * 256, "kernel": kernel, "dead_tokens": 512})
        results[kernel] = weights(train(cache, SPECS[:1], config, progress=False))
    for key in results["dense"]:
        torch.testing.assert_close(results["torch"][key], results["dense"][key], atol=2e-5, rtol=1e-4)
