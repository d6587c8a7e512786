"""Steering's units and where it writes, checked against forwards computed by hand on the tiny Llama through
Hugging Face directly (not through saelab's hooks)."""

import json

import pytest
import torch

from saelab.analysis import Steer, sweep
from saelab.analysis.probes import concept_separation
from saelab.analysis.steering import LogitDiff, SteerConfig, run_steering, side_effects, steer_of
from saelab.sae import SAEConfig, create_sae

HOOK = "blocks.0.hook_resid_post"
WORDS = {"colour": ["red", "blue", "green", "pink", "black"], "number": ["one", "two", "three", "four", "five"]}
SIDE = ["A list is a sequence of items in order", "The quick brown fox jumps over it"]


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def hf_forward(hf_model, text: str, add: torch.Tensor | None = None, first: int = 1):
    """(block 0's output [L, d], logits [L, vocab]) of one text with BOS prepended, `add` added to block 0's
    output at positions first.. (first=1: BOS left alone)."""
    model, tokenizer = hf_model
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]])

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[:, first:] += add
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = model.model.layers[0].register_forward_hook(hook) if add is not None else None
    try:
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
    finally:
        if handle:
            handle.remove()
    return out.hidden_states[1][0], out.logits[0]


def labelled(tmp_path):
    rows = [{"text": f"{w} is {c}.", "label": lab, "doc": w} for lab, words in WORDS.items() for w in words
            for c in ("here", "there")]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def test_separation_is_the_distance_between_the_class_means_at_the_hook(tiny_model, hf_model, tmp_path):
    path, rows = labelled(tmp_path)
    means = {}
    for label in WORDS:  # by hand: each text's block-0 output averaged over its tokens without BOS
        pooled = [hf_forward(hf_model, r["text"])[0][1:].mean(0) for r in rows if r["label"] == label]
        means[label] = torch.stack(pooled).mean(0)
    expected = float((means["colour"] - means["number"]).norm())
    config = SteerConfig("unused", "It is", hook=HOOK, data=str(path), positive="colour", alphas=[1], up=" the",
                         side_texts=2, side_words=10)
    steer = steer_of(tiny_model, config, SIDE)
    assert steer.scale == "separation" and steer.norm == pytest.approx(expected, rel=1e-4)
    result = run_steering(config, model=tiny_model, progress=False)
    assert (result.unit, result.unit_value) == ("separation", pytest.approx(expected, rel=1e-4))
    assert "separation" in result.table() and "(separation)" in result.steer
    X = torch.tensor([[0.0, 0.0], [2.0, 0.0], [3.0, 4.0], [5.0, 4.0]])
    assert concept_separation(X, [0, 0, 1, 1]) == pytest.approx(5.0)  # means (1, 0) and (4, 4)


def test_the_other_units_are_kept_and_named(tiny_model, hf_model, tmp_path):
    path, _ = labelled(tmp_path)
    norm = SteerConfig("unused", "It is", hook=HOOK, data=str(path), up=" the", unit="norm")
    steer = steer_of(tiny_model, norm, SIDE)
    by_hand = torch.cat([hf_forward(hf_model, text)[0][1:] for text in SIDE]).norm(dim=-1).mean()  # BOS left out
    assert steer.scale == "norm" and steer.norm == pytest.approx(float(by_hand), rel=1e-4)
    raw = steer_of(tiny_model, SteerConfig("unused", "It is", hook=HOOK, data=str(path), up=" the", unit="raw"), SIDE)
    assert (raw.scale, raw.norm) == ("raw", 1.0)
    with pytest.raises(ValueError, match="unit must be one of"):
        SteerConfig("unused", "It is", unit="mean")
    sae = create_sae(SAEConfig(arch="topk", d_in=64, width=32, k=4, hook_name=HOOK))
    sae.save(tmp_path / "sae")
    row = steer_of(tiny_model, SteerConfig("unused", "It is", sae=str(tmp_path / "sae"), latent=3, up=" the"), SIDE)
    assert row.scale == "norm" and row.norm == pytest.approx(float(by_hand), rel=1e-4)
    with pytest.raises(ValueError, match="needs data"):
        steer_of(tiny_model, SteerConfig("unused", "It is", sae=str(tmp_path / "sae"), latent=3, up=" the",
                                         unit="separation"), SIDE)
    with pytest.raises(ValueError, match="clamp's alpha"):
        steer_of(tiny_model, SteerConfig("unused", "It is", sae=str(tmp_path / "sae"), latent=3, clamp=True,
                                         up=" the", unit="norm"), SIDE)


def test_steering_never_writes_at_bos(tiny_model, hf_model):
    torch.manual_seed(0)
    direction = torch.randn(64)
    steer = Steer.direction(tiny_model, HOOK, direction, separation=3.0)
    push = 1.5 * 3.0 * direction / direction.norm()
    text = "Return the value of x"
    _, expected = hf_forward(hf_model, text, push, first=1)
    _, at_bos_too = hf_forward(hf_model, text, push, first=0)
    clean_acts, _ = hf_forward(hf_model, text)
    steered = tiny_model.logits([text], patches=[steer.patch(1.5)])[0].float()
    assert torch.allclose(steered, expected, atol=1e-4)
    assert not torch.allclose(steered, at_bos_too, atol=1e-2)  # the check can tell the two apart
    acts = tiny_model.activations_at([text], HOOK, positions=None, patches=[steer.patch(1.5)])[HOOK][0]
    assert torch.allclose(acts[0], clean_acts[0], atol=1e-5)
    assert torch.allclose(acts[1:] - clean_acts[1:], push.expand(len(acts) - 1, -1), atol=1e-4)


def test_side_effects_are_measured_at_every_alpha(tiny_model):
    token = tiny_model.tokenizer(" the", add_special_tokens=False)["input_ids"][0]
    steer = Steer.direction(tiny_model, "blocks.1.hook_resid_post", tiny_model.bridge.W_U[:, token].detach(),
                            separation=2.0)
    result = sweep(tiny_model, steer, [0.5, 1, 2], LogitDiff(["The list"], [" the"]), SIDE, progress=False)
    assert [p.alpha for p in result.points] == [0, 0.5, 1, 2] and (result.unit, result.unit_value) == ("separation", 2)
    for point in result.points:
        kl, ce = side_effects(tiny_model, SIDE, steer.patch(point.alpha) if point.alpha else None)
        assert (point.kl, point.ce) == (pytest.approx(kl, abs=1e-6), pytest.approx(ce, abs=1e-6))
    assert result.points[0].kl == pytest.approx(0, abs=1e-6) and all(p.kl > 0 for p in result.points[1:])
