"""ReLU and JumpReLU land at the L0 asked for (target_l0, 32 by default) instead of wherever their coefficient puts them."""

import math

import pytest
import torch

from saelab.activations import ActivationBatch
from saelab.sae import SAEConfig, create_sae, create_training
from saelab.sae.base import SparsityCoefficient, steered
from saelab.sae.jumprelu import MAX_THRESHOLD_SHIFT, START_L0_FACTOR, THRESHOLD_SHIFT_RATE
from saelab.sae.relu import BIAS_SHIFT_RATE, MAX_BIAS_SHIFT
from saelab.training import SAESpec, TrainConfig, Trainer

HOOK = "blocks.0.hook_resid_post"


class Planted:
    """Tokens that are sparse sums (about 6 of 256) of fixed unit directions in 32 dimensions."""

    hooks, d = [HOOK], {HOOK: 32}

    def __init__(self, batch_size: int = 256, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.batch_size, self.g = batch_size, g
        self.directions = torch.nn.functional.normalize(torch.randn(256, 32, generator=g), dim=1)

    def __iter__(self):
        while True:
            on = torch.rand(self.batch_size, 256, generator=self.g) < 6 / 256
            x = (torch.rand(self.batch_size, 256, generator=self.g) * 2 + 0.5) * on @ self.directions
            yield ActivationBatch({HOOK: x}, torch.zeros(self.batch_size, dtype=torch.long),
                                  torch.arange(self.batch_size))


def test_steering_moves_the_coefficient_towards_the_target_and_boundedly():
    assert steered(1.0, 64.0, 32.0) > 1.0 > steered(1.0, 16.0, 32.0)
    assert steered(1.0, 32.0, 32.0) == 1.0
    assert steered(1.0, 1e6, 32.0) == pytest.approx(math.exp(0.05))  # one odd batch moves it 5 % at most
    assert steered(1.0, 0.0, 32.0) == pytest.approx(math.exp(-0.05))  # a dead start is finite
    fixed = SparsityCoefficient(2.0, None, warmup_steps=10)
    fixed.observe(50, 1000.0, mse=1.0, penalty=1.0)
    assert fixed.at(5) == 1.0 and fixed.at(50) == 2.0 and fixed.state_dict() == {}
    steering = SparsityCoefficient(2.0, 8.0, warmup_steps=10)
    steering.observe(5, 1000.0, mse=1.0, penalty=1.0)  # still warming up: the recipe's ramp, untouched
    assert steering.value == 2.0
    steering.observe(10, 1000.0, mse=1.0, penalty=1.0)
    assert steering.value > 2.0
    restored = SparsityCoefficient(2.0, 8.0, warmup_steps=10)
    restored.load_state_dict(steering.state_dict())
    assert restored.value == steering.value
    # L0 below the target lowers the coefficient only until its term is 1 % of the reconstruction loss
    low = SparsityCoefficient(1.0, 8.0, warmup_steps=0)
    for step in range(400):
        low.observe(step, 1.0, mse=2.0, penalty=100.0)  # the floor: 0.01 * 2 / 100 = 2e-4
    assert low.value == pytest.approx(2e-4)
    low.observe(400, 20.0, mse=2.0, penalty=100.0)
    assert low.value > 2e-4  # and it rises again at once when L0 overshoots


def test_specs_default_to_a_target_unless_a_coefficient_is_given():
    assert SAESpec(arch="jumprelu").options["target_l0"] == 32
    assert SAESpec(arch="relu", options={"target_l0": 8}).name() == "relu-4608-target8"
    assert "target_l0" not in SAESpec(arch="relu", options={"l1_coefficient": 0.3}).options
    assert "target_l0" not in SAESpec(arch="topk").options
    with pytest.raises(ValueError, match="target_l0"):
        SAEConfig(arch="relu", d_in=8, width=16, options={"target_l0": 17})


def test_jumprelu_thresholds_start_at_the_first_batch_cut_for_the_target():
    torch.manual_seed(0)
    sae = create_sae(SAEConfig(arch="jumprelu", d_in=32, width=128, options={"target_l0": 5.0}))
    x = next(iter(Planted(batch_size=512)))
    create_training(sae).start(x.acts[HOOK])
    expected = START_L0_FACTOR * 5.0
    assert (sae.encode(x.acts[HOOK]) > 0).sum(-1).float().mean() == pytest.approx(expected, abs=0.01)


def training_l0s(spec: SAESpec, steps: int) -> tuple[list[float], Trainer]:
    """The L0 of every step of a run on planted data."""
    trainer = Trainer(Planted(), [spec], TrainConfig(tokens=steps * 256, batch_size=256, log_every=10**9,
                                                      lr_warmup_steps=10), progress=False)
    l0s = []
    for batch in iter(Planted(seed=1)):
        if trainer.step >= steps:
            break
        out, _ = trainer.train_on(batch)[0]
        l0s.append(float(out.l0))
    return l0s, trainer


@pytest.mark.parametrize("start", [1.0, 1e-3])
def test_relu_lands_at_the_target_l0_from_a_coefficient_far_off(start):
    spec = SAESpec(arch="relu", width=128, lr=3e-3, options={"target_l0": 8.0, "l1_coefficient": start})
    l0s, trainer = training_l0s(spec, 600)
    assert sum(l0s[-100:]) / 100 == pytest.approx(8.0, rel=0.2), (start, l0s[::50])
    assert trainer.members[0].training.coefficient.value != start


@pytest.mark.parametrize("target", [4.0, 16.0])
def test_relu_lands_at_the_target_l0_in_a_short_run_at_its_default_learning_rate(target):
    """The red-team case in small: 150 steps at the default rate. Adam moves the biases at its rate whatever the
    coefficient, so the coefficient alone overshot while L0 came down, the L1 penalty switched latents off for good,
    and L0 ended at half the target (1.9 for 4, 6.8 for 16); the bias shift lands it."""
    l0s, _ = training_l0s(SAESpec(arch="relu", width=512, options={"target_l0": target}), 150)
    assert sum(l0s[-10:]) / 10 == pytest.approx(target, rel=0.1), l0s[::15]


def test_relu_shifts_its_encoder_biases_towards_the_target_each_training_step():
    torch.manual_seed(0)
    x = next(iter(Planted(batch_size=512))).acts[HOOK]
    for target in (5.0, None):
        cfg = SAEConfig(arch="relu", d_in=32, width=128, options={"target_l0": target})
        sae = create_sae(cfg)
        training = create_training(sae)
        training.start(x)
        before = sae.b_enc.detach().clone()
        with torch.no_grad():
            training.loss(x, step=5)  # an evaluation pass: nothing moves
        assert torch.equal(sae.b_enc, before)
        codes = sae.encode(x).detach()
        typical = codes[codes > 0].log().mean().exp()  # the geometric mean of the active codes
        l0 = float(training.loss(x, step=5).l0)
        moved = sae.b_enc.detach() - before
        if target is None:  # a fixed coefficient (the April 2024 recipe): the biases move only by their gradient
            assert torch.equal(moved, torch.zeros_like(moved))
            continue
        expected = min(MAX_BIAS_SHIFT, BIAS_SHIFT_RATE * math.log(l0 / target)) * typical
        assert torch.allclose(moved, torch.full_like(moved, -float(expected)), rtol=1e-4)
        restored = create_training(create_sae(cfg))
        restored.load_state_dict(training.state_dict())  # the shift's unit is checkpointed with the coefficient
        assert restored.code_scale == training.code_scale == pytest.approx(float(typical), rel=1e-5)
        with torch.no_grad():
            sae.b_enc.fill_(-100.0)  # every latent switched off: no gradient reaches them, the shift does
        assert float(training.loss(x, step=6).l0) == 0
        assert torch.allclose(sae.b_enc, torch.full_like(sae.b_enc, -100.0 + MAX_BIAS_SHIFT * training.code_scale))


def test_the_logged_jumprelu_coefficient_follows_the_steering_rule(tmp_path):
    """The wiring: each step's coefficient is the rule applied to the previous step's logged L0, reconstruction
    loss and penalty."""
    spec = SAESpec(arch="jumprelu", width=128, lr=3e-3, options={"target_l0": 2.0, "sparsity_warmup_steps": 3})
    Trainer(Planted(), [spec], TrainConfig(tokens=30 * 256, batch_size=256, log_every=1, lr_warmup_steps=2),
            out=tmp_path, progress=False).fit()
    import json
    records = [json.loads(line)[f"{HOOK}/jumprelu-128-target2"]
               for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(records) == 30 and all(r["target_l0"] == 2.0 for r in records)
    for step, (before, after) in enumerate(zip(records, records[1:])):
        coefficient = before["l0_coefficient"]
        if step < 3:  # the warm-up ramp of the fixed start value
            assert coefficient == pytest.approx(1e-3 * step / 3)
            continue
        penalty = before["sparsity"] / coefficient
        floor = 0.01 * before["mse"] / penalty
        expected = max(steered(coefficient, before["l0"], 2.0), min(coefficient, floor))
        assert after["l0_coefficient"] == pytest.approx(expected, rel=1e-5)
    assert records[-1]["l0_coefficient"] > 1e-3  # L0 started at 3 x 2 latents, so the coefficient rose


def test_jumprelu_shifts_its_thresholds_towards_the_target_each_training_step():
    torch.manual_seed(0)
    x = next(iter(Planted(batch_size=512))).acts[HOOK]
    for target, shifts in ((5.0, True), (None, False)):
        sae = create_sae(SAEConfig(arch="jumprelu", d_in=32, width=128,
                                   options={"target_l0": target, "sparsity_warmup_steps": 0}))
        training = create_training(sae)
        training.start(x)
        before = sae.log_threshold.detach().clone()
        coefficient = training.coefficient.value
        with torch.no_grad():
            training.loss(x, step=5)  # an evaluation pass: nothing moves
        assert torch.equal(sae.log_threshold, before) and training.coefficient.value == coefficient
        l0 = float(training.loss(x, step=5).l0)
        moved = sae.log_threshold.detach() - before
        if shifts:  # L0 starts at 3 x the target: every threshold rises by 0.1 log(3) (capped at 0.05)
            assert l0 == pytest.approx(START_L0_FACTOR * 5.0, rel=0.01)
            expected = min(MAX_THRESHOLD_SHIFT, THRESHOLD_SHIFT_RATE * math.log(l0 / 5.0))
            assert torch.allclose(moved, torch.full_like(moved, expected))
        else:  # a fixed coefficient (the Gemma Scope recipe): the thresholds move only by their gradient
            assert torch.equal(moved, torch.zeros_like(moved))


def test_jumprelu_lands_at_the_target_l0():
    l0s, _ = training_l0s(SAESpec(arch="jumprelu", width=128, lr=3e-3, options={"target_l0": 8.0}), 300)
    assert sum(l0s[-50:]) / 50 == pytest.approx(8.0, rel=0.1), l0s[::25]


def test_an_sae_off_its_target_l0_says_so_in_the_log_the_metrics_and_the_last_message(tiny_model_dir, tmp_path,
                                                                                       capsys):
    """A ReLU asked for L0 2 but trained 4 steps still fires several times that (far too short to steer): it is
    saved, and the log, its metrics.json and train's last message say so; the TopK beside it (L0 = k) is not named."""
    import json

    from saelab.cli import main
    from saelab.hub import load_sae, read_metrics

    acts, run = tmp_path / "acts", tmp_path / "run"
    assert main(["cache", "--model", str(tiny_model_dir), "--hooks", HOOK, "--out", str(acts), "--tokens", "2k",
                 "--context-len", "32", "--batch-size", "4"]) == 0
    assert main(["train", "--acts", str(acts), "--arch", "relu,topk", "--width", "64", "--k", "4", "--target-l0", "2",
                 "--tokens", "512", "--batch-size", "128", "--out", str(run), "--eval-tokens", "256"]) == 0
    relu, topk = f"{HOOK}/relu-64-target2", f"{HOOK}/topk-64-k4"
    said = [line for line in capsys.readouterr().err.splitlines() if "off target" in line]
    assert len(said) == 1 and said[0].startswith(f"saelab: warning: SAE {relu} is off target: L0 ")
    assert "asked for 2 (more than 25% off)" in said[0] and "--tokens" in said[0]
    assert load_sae(run / relu).cfg.options.target_l0 == 2  # saved as it is
    last = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert list(last["off_target"]) == [relu] and "asked for 2" in last["off_target"][relu]
    landed = read_metrics(run / relu)["l0_target"]
    assert landed["target"] == 2 and landed["tolerance"] == 0.25 and landed["off_target"] is True
    assert landed["training"] > 2.5 and landed["held_out"] > 2.5
    assert read_metrics(run / topk)["l0_target"] == {"target": 4, "training": 4, "held_out": pytest.approx(4, rel=0.25),
                                                     "tolerance": 0.25, "off_target": False}


def test_an_off_target_sae_warns_in_python_too_and_a_fixed_coefficient_has_no_target():
    from saelab.training.landing import OffTarget

    specs = [SAESpec(arch="relu", width=128, options={"target_l0": 2.0}),
             SAESpec(arch="relu", width=128, options={"l1_coefficient": 0.1})]
    config = TrainConfig(tokens=3 * 256, batch_size=256, allow_diverged=True)  # 3 steps: far from done
    trainer = Trainer(Planted(), specs, config, progress=False)
    with pytest.warns(OffTarget, match="relu-128-target2 is off target"):
        steered, fixed = trainer.fit()
    assert steered.l0["off_target"] and steered.l0["training"] > 2.5 and steered.l0["held_out"] is None
    assert fixed.l0 is None
