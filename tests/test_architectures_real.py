"""Every architecture, trained briefly with its defaults on real SmolLM2 activations, gives a saved SAE whose held-out
sparsity is what was asked for (issue 15: four of five used to be unusable with their defaults)."""

import pytest
import torch

from saelab.activations import ActivationBatch, ActivationStore
from saelab.training import TrainConfig, Trainer

HOOK = "blocks.3.hook_resid_post"  # of the smollm2_acts fixture (conftest.py)
ROWS = 512


class Rows:
    """Cached rows in a new random order each epoch, as a training source."""

    hooks, batch_size = [HOOK], ROWS

    def __init__(self, x: torch.Tensor):
        self.x, self.d = x, {HOOK: x.shape[1]}

    def __iter__(self):
        epoch = 0
        while True:
            order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(epoch))
            for start in range(0, len(order) - ROWS + 1, ROWS):
                rows = order[start : start + ROWS]
                yield ActivationBatch({HOOK: self.x[rows]}, torch.zeros(ROWS, dtype=torch.long), rows)
            epoch += 1


@pytest.fixture(scope="module")
def real_rows(smollm2_acts):
    """(training rows, held-out rows): every fifth context is held out, so both come from the same documents' mix."""
    store = ActivationStore(smollm2_acts, batch_size=1024, shuffle=False, drop_last=False)
    batches = list(store)
    x = torch.cat([b.acts[HOOK] for b in batches]).float()
    held = torch.cat([b.contexts for b in batches]) % 5 == 4
    return x[~held], x[held]


@pytest.mark.slow
@pytest.mark.parametrize("arch, tolerance", [
    ("topk", 0.0), ("batchtopk", 0.10), ("matryoshka", 0.10),  # the bound for the batch selections
    ("jumprelu", 0.10),  # steered to its target, thresholds shifted towards it every step
    ("relu", 0.10),  # steered, and its encoder biases shifted towards the target every step (was 0.25)
])
def test_held_out_l0_of_the_saved_sae_is_what_was_asked(real_rows, arch, tolerance, tmp_path):
    train_x, held_x = real_rows
    steps = 200
    trainer = Trainer(Rows(train_x), [dict(arch=arch, width=1152)],
                      TrainConfig(tokens=steps * ROWS, batch_size=ROWS, log_every=50), out=tmp_path, progress=False)
    (trained,) = trainer.fit()
    sae = trained.sae
    with torch.no_grad():
        codes = sae.encode(held_x)
        l0 = float((codes > 0).sum(-1).float().mean())
        fvu = float((held_x - sae.decode(codes)).square().sum() / (held_x - held_x.mean(0)).square().sum())
    if arch == "topk":
        assert 31 <= l0 <= 32
    else:
        assert l0 == pytest.approx(32, rel=tolerance), (arch, l0, fvu)
    print(f"{arch}: held-out L0 {l0:.1f}, FVU {fvu:.4f}")
    assert fvu < 0.5, (arch, l0, fvu)  # a usable SAE, not a dead or identity one


@pytest.mark.slow
@pytest.mark.parametrize("target", [16, 64])
def test_relu_lands_at_other_targets_too(real_rows, target, tmp_path):
    """ReLU at targets either side of the default (32, above). Held-out text fires a few % more than the training
    text (17.4 and 65.6 held out, 15.9 and 63.2 in training), hence the wider bound there."""
    train_x, held_x = real_rows
    trainer = Trainer(Rows(train_x), [dict(arch="relu", width=1152, options={"target_l0": target})],
                      TrainConfig(tokens=200 * ROWS, batch_size=ROWS, log_every=50), out=tmp_path, progress=False)
    (trained,) = trainer.fit()
    with torch.no_grad():
        l0 = float((trained.sae.encode(held_x) > 0).sum(-1).float().mean())
    print(f"relu, target {target}: held-out L0 {l0:.1f}, training L0 {trained.l0['training']:.1f}")
    assert l0 == pytest.approx(target, rel=0.15) and trained.l0["training"] == pytest.approx(target, rel=0.10)
