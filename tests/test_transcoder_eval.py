"""Transcoder evaluation: target FVU, and CE / KL with the target replaced by the transcoder's output computed from the
input hook of the same forward; the replacement model with several targets replaced at once; train() evaluates them.

Checked against independent references: a skip transcoder whose skip path is the least-squares map of a linear
target (the MLP's down projection, blocks.L.mlp.out.hook_in -> blocks.L.hook_mlp_out) reproduces the model, so CE
loss recovered is 1 and KL 0; the FVU is the one computed directly from the model's activations of both hooks.
"""

from __future__ import annotations

import json

import pytest
import torch

from saelab.activations import ActivationBatch
from saelab.evals.core import evaluate
from saelab.evals.replacement import replacement_metrics
from saelab.sae import SAEConfig, create_sae
from saelab.training import SAESpec, TrainConfig, train

IN, OUT = "blocks.{}.ln2.hook_normalized", "blocks.{}.hook_mlp_out"
DOWN_IN = "blocks.{}.mlp.out.hook_in"
"""The input of the MLP's down projection: the MLP's output is a linear map of it (the tiny Llama has no bias)."""


def context_tokens(model, n=6, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, model.vocab_size, (n, length), generator=g)
    ids[:, 0] = model.bos_token_id
    return ids


def paired(model, ids, input_hook, target_hook):
    """The activations of both hooks at every position but the leading BOS (what the splice replaces)."""
    acts = model.activations(ids, [input_hook, target_hook], flatten=True)
    return acts[input_hook][:, 1:].reshape(-1, acts[input_hook].shape[-1]).double(), \
        acts[target_hook][:, 1:].reshape(-1, acts[target_hook].shape[-1]).double()


def exact_skip_transcoder(model, layer, ids):
    """A skip transcoder DOWN_IN -> hook_mlp_out whose latents never fire and whose skip path (and b_dec) is the
    least-squares map of the target on these tokens: the down projection itself."""
    input_hook, target_hook = DOWN_IN.format(layer), OUT.format(layer)
    x, y = paired(model, ids, input_hook, target_hook)
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    solution = torch.linalg.lstsq(design, y, driver="gelsd").solution
    sae = create_sae(SAEConfig(arch="relu", d_in=x.shape[1], width=8, hook_name=input_hook, target_hook=target_hook,
                               d_out=y.shape[1], skip=True))
    with torch.no_grad():
        sae.W_skip.copy_(solution[:-1])
        sae.b_dec.copy_(solution[-1])
        sae.b_enc.fill_(-1e4)  # no latent fires: the skip path alone is the output
    return sae


def test_an_exact_transcoder_recovers_all_the_loss_and_changes_nothing(tiny_model):
    ids = context_tokens(tiny_model)
    tc = exact_skip_transcoder(tiny_model, 0, ids)
    result = evaluate(tc, model=tiny_model, text=ids, tokens=None, progress=False)
    assert result.sae.target_hook == OUT.format(0)
    assert result.spliced.ce_zero != pytest.approx(result.spliced.ce_clean, abs=1e-3)  # the target matters
    assert result.spliced.ce_loss_recovered == pytest.approx(1.0, abs=1e-4)
    assert result.spliced.kl_sae == pytest.approx(0.0, abs=1e-7)
    assert result.reconstruction.fvu == pytest.approx(0.0, abs=1e-8)
    assert result.reconstruction.l0 == 0
    assert "target_hook" in result.to_dict()["sae"]


def test_target_fvu_and_l0_match_a_direct_computation(tiny_model):
    ids = context_tokens(tiny_model, seed=1)
    input_hook, target_hook = IN.format(1), OUT.format(1)
    torch.manual_seed(0)
    tc = create_sae(SAEConfig(arch="topk", d_in=64, width=96, k=5, hook_name=input_hook, target_hook=target_hook))
    x, y = paired(tiny_model, ids, input_hook, target_hook)
    with torch.no_grad():
        y_hat = tc(x.float()).double()
    direct = float((y - y_hat).square().sum() / (y - y.mean(0)).square().sum())
    spliced = evaluate(tc, model=tiny_model, text=ids, tokens=None, progress=False)
    assert spliced.reconstruction.fvu == pytest.approx(direct, rel=1e-5)
    assert spliced.reconstruction.fvu_typical is not None
    assert spliced.reconstruction.l0 == pytest.approx(5.0)
    assert spliced.n_tokens == len(x)
    batches = [ActivationBatch({input_hook: x.float(), target_hook: y.float()}, torch.zeros(len(x), dtype=torch.long),
                               torch.arange(len(x)))]
    cached = evaluate(tc, activations=batches, progress=False)
    assert cached.reconstruction.fvu == pytest.approx(direct, rel=1e-5)
    assert evaluate(tc, activations=batches, model=tiny_model, text=ids, tokens=None,
                    progress=False).spliced == spliced.spliced


def test_a_batch_without_the_target_is_refused_by_name(tiny_model):
    tc = create_sae(SAEConfig(arch="topk", d_in=64, width=32, k=2, hook_name=IN.format(0), target_hook=OUT.format(0)))
    batch = ActivationBatch({IN.format(0): torch.randn(4, 64)}, torch.zeros(4, dtype=torch.long), torch.arange(4))
    with pytest.raises(Exception, match="both"):
        evaluate(tc, activations=[batch], progress=False)


def test_a_target_before_the_input_is_refused(tiny_model):
    tc = create_sae(SAEConfig(arch="topk", d_in=64, width=32, k=2, hook_name=OUT.format(1),
                              target_hook=IN.format(0)))
    with pytest.raises(Exception, match="earlier"):
        evaluate(tc, model=tiny_model, text=context_tokens(tiny_model), tokens=None, progress=False)


def test_the_replacement_model_with_exact_transcoders_is_the_model(tiny_model):
    ids = context_tokens(tiny_model, seed=2)
    transcoders = [exact_skip_transcoder(tiny_model, layer, ids) for layer in (0, 1)]
    both = replacement_metrics(transcoders, tiny_model, ids, tokens=None, progress=False)
    assert both.ce_loss_recovered == pytest.approx(1.0, abs=1e-4)
    assert both.kl_sae == pytest.approx(0.0, abs=1e-7)
    assert both.kl_zero > 0


def test_the_replacement_model_of_one_transcoder_is_its_splice_and_of_two_replaces_both(tiny_model):
    ids = context_tokens(tiny_model, seed=3)
    torch.manual_seed(1)
    tcs = [create_sae(SAEConfig(arch="topk", d_in=64, width=64, k=4, hook_name=IN.format(layer),
                                target_hook=OUT.format(layer))) for layer in (0, 1)]
    one = replacement_metrics(tcs[:1], tiny_model, ids, tokens=None, progress=False)
    spliced = evaluate(tcs[0], model=tiny_model, text=ids, tokens=None, progress=False).spliced
    assert one.ce_sae == pytest.approx(spliced.ce_sae, rel=1e-6)
    assert one.ce_zero == pytest.approx(spliced.ce_zero, rel=1e-6)
    both = replacement_metrics(tcs, tiny_model, ids, tokens=None, progress=False)
    assert both.ce_sae != pytest.approx(one.ce_sae, rel=1e-4)  # the second layer's target is replaced too
    with pytest.raises(ValueError, match="same hook"):
        replacement_metrics([tcs[0], tcs[0]], tiny_model, ids, tokens=None, progress=False)
    sae = create_sae(SAEConfig(arch="topk", d_in=64, width=64, k=4, hook_name=IN.format(0)))
    with pytest.raises(ValueError, match="transcoders"):
        replacement_metrics([sae], tiny_model, ids, tokens=None, progress=False)


class ModelPairs:
    """Batches of the tiny model's two hooks on random tokens (what a cache of both would hold)."""

    def __init__(self, model, hooks):
        self.model, self.hooks, self.d, self.batch_size = model, hooks, {h: 64 for h in hooks}, 96

    def __iter__(self):
        seed = 10
        while True:
            seed += 1
            ids = context_tokens(self.model, n=4, length=25, seed=seed)
            acts = self.model.activations(ids, self.hooks, flatten=True)
            acts = {h: a[:, 1:].reshape(-1, 64) for h, a in acts.items()}
            yield ActivationBatch(acts, torch.zeros(96, dtype=torch.long), torch.arange(96))


def test_train_evaluates_a_transcoder_on_its_target(tiny_model, tmp_path, recwarn):
    hooks = [IN.format(0), OUT.format(0)]
    spec = SAESpec(arch="topk", width=64, k=4, hook=hooks[0], target_hook=hooks[1])
    (trained,) = train(ModelPairs(tiny_model, hooks), [spec], TrainConfig(tokens=4 * 96, batch_size=96, allow_diverged=True),
                       out=tmp_path / "run", progress=False, model=tiny_model,
                       eval_text=context_tokens(tiny_model, seed=5), eval_tokens=96)
    assert trained.not_evaluated is None
    assert trained.metrics.sae.target_hook == hooks[1]
    assert trained.metrics.reconstruction.l0 == pytest.approx(4.0)
    assert trained.metrics.spliced.ce_loss_recovered is not None
    assert (trained.folder / "metrics.json").exists()
    assert not [w for w in recwarn if "not evaluated" in str(w.message)]


def test_the_eval_commands_evaluate_a_transcoder_folder(tiny_model_dir, tmp_path, capsys):
    from saelab.cli import main
    from saelab.hub.folder import save_sae

    torch.manual_seed(2)
    tc = create_sae(SAEConfig(arch="topk", d_in=64, width=64, k=4, hook_name=IN.format(0),
                              target_hook=OUT.format(0), skip=True, model_name=str(tiny_model_dir)))
    folder = save_sae(tc, tmp_path / "tc")
    assert main(["eval", str(folder), "--model", str(tiny_model_dir), "--tokens", "128", "--context-len", "32",
                 "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["sae"]["target_hook"] == OUT.format(0)
    assert metrics["spliced"]["ce_loss_recovered"] is not None and metrics["reconstruction"]["l0"] == 4
    assert main(["evals", str(folder), "--suite", "core", "--model", str(tiny_model_dir), "--tokens", "128",
                 "--context-len", "32", "--resamples", "20", "--out", str(tmp_path / "suite")]) == 0
