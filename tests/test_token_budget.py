"""Forwards batched on tokens: a budget per forward bounds memory, results do not depend on it, and a text that
cannot fit is refused by name before any forward runs (saelab.interventions.plan_batches)."""

import json
import random

import pytest
import torch
from pydoc_data.topics import topics

from saelab.analysis import Features, run_probes
from saelab.analysis.circles import patched_answer_logits
from saelab.analysis.concepts import LabelledTexts
from saelab.analysis.steering import side_effects
from saelab.errors import DataError
from saelab.evals.core import spliced_metrics
from saelab.interventions import Add, plan_batches
from saelab.sae import SAEConfig, create_sae

HOOK = "blocks.1.hook_resid_post"
WORDS = topics["if"].split() + topics["while"].split()
SHORT = ["The quick brown fox", "Return the value of x", "A list is a sequence of items in order", "x",
         "if a: b", " ".join(WORDS[:40]), "else", " ".join(WORDS[10:25])]
LONG = " ".join(WORDS[:80])  # about 200 tokens of the tiny model's 256


@pytest.fixture
def forwards(tiny_model, monkeypatch):
    """The [batch, pos] shape of every forward the tiny model runs while the test does."""
    shapes, original = [], tiny_model.bridge.run_with_hooks

    def run(ids, **kwargs):
        shapes.append(tuple(ids.shape))
        return original(ids, **kwargs)

    monkeypatch.setattr(tiny_model.bridge, "run_with_hooks", run)
    return shapes


def budget(model, monkeypatch, tokens: int) -> None:
    monkeypatch.setattr(model, "max_batch_tokens", tokens)


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- the plan
def test_batches_never_exceed_the_token_budget():
    rng = random.Random(0)
    lengths = [rng.choice([rng.randint(1, 30), rng.randint(1, 300)]) for _ in range(200)]
    for max_tokens, max_texts in [(300, None), (301, 3), (1000, None), (4096, 16)]:
        plan = plan_batches(lengths, max_tokens, max_texts)
        assert sorted(i for rows in plan for i in rows.tolist()) == list(range(len(lengths)))
        for rows in plan:
            assert len(rows) * max(lengths[i] for i in rows) <= max_tokens
            assert max_texts is None or len(rows) <= max_texts
            assert rows.tolist() == sorted(rows.tolist())
        padded = sum(len(rows) * max(lengths[i] for i in rows) for rows in plan)
        assert padded <= 1.2 * sum(lengths)  # shortest first: little of a forward is padding
    assert [rows.tolist() for rows in plan_batches([5] * 7, 10)] == [[0, 1], [2, 3], [4, 5], [6]]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_batch_tokens"):
            plan_batches([1], bad)


def test_every_forward_of_every_call_stays_within_the_budget(tiny_model, forwards, monkeypatch):
    texts = [*SHORT, LONG, *SHORT]
    budget(tiny_model, monkeypatch, 256)
    tiny_model.activations_at(texts, HOOK, "mean")
    tiny_model.logits(texts)
    tiny_model.loss(texts)
    tiny_model.generate(SHORT, 3)
    tiny_model.activations(torch.randint(0, 400, (8, 40)), [HOOK])
    assert max(b * n for b, n in forwards) <= 256
    assert len(forwards) > 8


# ---------------------------------------------------------------------------------------------------- the numbers
def test_batching_on_tokens_gives_the_numbers_of_each_text_alone(tiny_model, monkeypatch):
    texts = [*SHORT[:4], LONG, *SHORT[4:]]
    lengths = tiny_model.tokenize(texts).lengths
    at = [int(n) // 2 for n in lengths]
    mask = torch.rand(len(texts), int(lengths.max()), generator=torch.Generator().manual_seed(0)) < 0.3
    alone = {
        "mean": torch.cat([tiny_model.activations_at(t, HOOK, "mean")[HOOK] for t in texts]),
        "at": torch.cat([tiny_model.activations_at(t, HOOK, [i])[HOOK] for t, i in zip(texts, at)]),
        "every": [tiny_model.activations_at(t, HOOK, None)[HOOK][0] for t in texts],
        "logits": [tiny_model.logits(t)[0] for t in texts],
        "loss": [tiny_model.loss(t).per_token[0] for t in texts],
        "new": torch.cat([tiny_model.generate(t, 3).new_ids for t in texts]),
        "steered": [tiny_model.logits(t, patches=[Add(HOOK, torch.ones(tiny_model.d_model), positions=-1)])[0]
                    for t in texts],
    }
    budget(tiny_model, monkeypatch, int(lengths.max()) + 3)  # the long text alone, the short ones together
    assert len(tiny_model.batches(texts)) > 1
    close(tiny_model.activations_at(texts, HOOK, "mean")[HOOK], alone["mean"])
    close(tiny_model.activations_at(texts, HOOK, at)[HOOK], alone["at"])
    close(tiny_model.activations_at(texts, HOOK, mask)[HOOK],
          torch.cat([alone["every"][i][mask[i, : len(alone["every"][i])]] for i in range(len(texts))]))
    every, logits = tiny_model.activations_at(texts, HOOK, None)[HOOK], tiny_model.logits(texts)
    loss = tiny_model.loss(texts)
    steered = tiny_model.logits(texts, patches=[Add(HOOK, torch.ones(tiny_model.d_model), positions=-1)])
    for i, n in enumerate(lengths.tolist()):
        close(every[i, :n], alone["every"][i])
        close(logits[i, :n], alone["logits"][i])
        close(steered[i, :n], alone["steered"][i])
        close(loss.per_token[i, : n - 1], alone["loss"][i])
        assert not every[i, n:].any() and not logits[i, n:].any()  # padding is zero, however it was batched
    close(tiny_model.logits(texts, positions="last"), torch.stack([x[-1] for x in alone["logits"]]))
    assert torch.equal(tiny_model.generate(texts, 3).new_ids, alone["new"])


def test_analyses_that_patch_each_batch_give_the_same_numbers_under_any_budget(tiny_model, monkeypatch):
    """patched_answer_logits' replacement and the side effects' clean reference must follow each forward's rows."""
    tokens = tiny_model.tokenize([*SHORT, LONG])
    rows = torch.tensor([0, 8, 3, 3, 5, 1, 8, 2])
    positions = torch.tensor([1, 5, 1, 0, 7, 3, 100, 1])
    values = torch.randn(len(rows), tiny_model.d_model, generator=torch.Generator().manual_seed(1))
    answers = torch.tensor([5, 17, 40])
    patch = Add(HOOK, torch.randn(tiny_model.d_model, generator=torch.Generator().manual_seed(2)), scale=3.0)
    wide = (patched_answer_logits(tiny_model, tokens, rows, positions, HOOK, values, answers),
            side_effects(tiny_model, SHORT, patch))
    budget(tiny_model, monkeypatch, int(tokens.lengths.max()))
    close(patched_answer_logits(tiny_model, tokens, rows, positions, HOOK, values, answers), wide[0])
    assert side_effects(tiny_model, SHORT, patch) == pytest.approx(wide[1], rel=1e-5)


def test_eval_splices_each_forward_and_refuses_a_context_longer_than_the_budget(tiny_model, forwards, monkeypatch):
    torch.manual_seed(0)
    sae = create_sae(SAEConfig(arch="topk", d_in=tiny_model.d_model, width=64, k=4, hook_name=HOOK))
    ids = torch.randint(4, 400, (12, 32))
    wide = spliced_metrics(sae, tiny_model, ids, tokens=None, batch_size=12)
    budget(tiny_model, monkeypatch, 100)
    forwards.clear()
    narrow = spliced_metrics(sae, tiny_model, ids, tokens=None, batch_size=12)
    assert max(b * n for b, n in forwards) <= 100
    assert narrow.ce_sae == pytest.approx(wide.ce_sae, rel=1e-5)
    assert narrow.kl_sae == pytest.approx(wide.kl_sae, abs=1e-6)
    budget(tiny_model, monkeypatch, 16)
    with pytest.raises(DataError, match=r"a context \(--context-len\) is 32 tokens long.*max_batch_tokens 16"):
        spliced_metrics(sae, tiny_model, ids, tokens=None)


# ---------------------------------------------------------------------------------------------------- refusals
def test_a_text_that_cannot_fit_is_refused_by_name_before_any_forward(tiny_model, forwards, monkeypatch):
    budget(tiny_model, monkeypatch, 64)
    with pytest.raises(DataError, match=r"^text 2 is \d+ tokens long \(BOS included\), more than one forward may "
                                        r"hold \(max_batch_tokens 64\).*--max-batch-tokens"):
        tiny_model.activations_at([SHORT[0], SHORT[1], LONG, SHORT[2]], HOOK)
    with pytest.raises(DataError, match=r"^text 1 is \d+ tokens long.*longer than the model's context of 256"):
        tiny_model.logits([SHORT[0], LONG + " " + LONG])
    with pytest.raises(DataError, match=r"^data.jsonl, line 7 is \d+ tokens long"):
        tiny_model.activations_at([*SHORT[:3], LONG], HOOK, names=lambda i: f"data.jsonl, line {2 * i + 1}")
    assert forwards == []


def test_the_probe_command_names_the_file_and_line_of_a_text_that_cannot_fit(tiny_model_dir, tmp_path, capsys):
    from saelab.cli import main

    rows = [{"text": text, "label": "ab"[i % 2]} for i, text in enumerate([*SHORT, *SHORT, "y"])]
    rows.insert(5, {"text": LONG, "label": "b"})  # 9 of each label: every text is used
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["probe", "--model", str(tiny_model_dir), "--hooks", HOOK, "--data", str(data), "--out", str(tmp_path)]
    assert main([*args, "--max-batch-tokens", "128"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("saelab: error:")]
    assert len(errors) == 1 and f"{data}, line 6 is " in errors[0] and "--max-batch-tokens" in errors[0]
    with pytest.raises(SystemExit):
        main([*args, "--max-batch-tokens", "0"])
    assert "argument --max-batch-tokens: must be" in capsys.readouterr().err


def test_probe_with_one_long_text_among_short_ones_stays_within_the_budget(tiny_model, forwards, monkeypatch):
    """The red-team case: 59 short texts and one long one. Each forward holds at most the budget (here the model's
    context, room for the long text alone), so the long text runs alone and no short text is padded to it."""
    budget(tiny_model, monkeypatch, tiny_model.n_ctx)
    texts = [SHORT[i % len(SHORT)] + f" {i}" for i in range(59)]
    texts.insert(30, LONG)
    data = LabelledTexts(texts, ["ab"[i % 2] for i in range(60)], [f"d{i}" for i in range(60)])
    run_probes(tiny_model, data, [Features(HOOK)], ks=(1,), methods=("diff_of_means",))
    long = int(tiny_model.tokenize(LONG).lengths[0])
    real = int(tiny_model.tokenize(texts).lengths.sum())
    assert max(b * n for b, n in forwards) <= tiny_model.max_batch_tokens
    assert (1, long) in forwards and all(n < long for b, n in forwards if b > 1)
    assert sum(b * n for b, n in forwards) <= 1.5 * real
