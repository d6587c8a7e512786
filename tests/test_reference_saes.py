"""scripts/reference_saes.py at toy size: the convergence rule, the held-out split, and every stage end to end on the
tiny model (caches, two training runs with held-out curves, core evals, cards, the table), resumed without redoing."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reference_saes.py"


@pytest.fixture(scope="module")
def reference():
    spec = importlib.util.spec_from_file_location("reference_saes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_a_flat_curve_converges_and_a_falling_one_does_not(reference):
    steps = range(0, 1001, 50)
    flat = [(s, 0.1 + 0.5 / (1 + s)) for s in steps]  # settled long before the last tenth
    falling = [(s, 0.5 - 0.0003 * s) for s in steps]  # still 0.03 down over the last 100 steps
    assert reference.converged(flat, tolerance=0.01)["converged"]
    verdict = reference.converged(falling, tolerance=0.01)
    assert not verdict["converged"] and verdict["change"] == pytest.approx(-0.03 / 0.2) and verdict["from_step"] == 900
    assert not reference.converged([(1000, 0.1)])["converged"]  # one point says nothing
    assert reference.converged([(0, 0.1), (1000, 0.1)])["converged"]  # a point before the tail is enough
    # flat at the full rate, then the decay over the last fifth lowers it: converged (the decay is left out)
    decayed = [(s, 0.2) for s in range(0, 801, 100)] + [(900, 0.19), (1000, 0.18)]
    assert reference.converged(decayed, decay_fraction=0.2)["converged"]
    assert not reference.converged(decayed)["converged"]


def test_the_held_out_chunks_come_from_every_text_and_the_plan_matches_gemma_depths(reference, tmp_path):
    texts = {"a": "".join(f"alpha line {i}\n" for i in range(9000)), "b": "".join(f"beta {i}\n" for i in range(9000))}
    train, heldout = reference.write_corpus(tmp_path, texts, every=4)
    held, kept = heldout.read_text(), train.read_text()
    assert "alpha" in held and "beta" in held
    assert not set(held.split("\n")) & set(kept.split("\n")) - {""}
    assert reference.GEMMA_BLOCKS == (1, 4, 7, 9, 12)
    assert reference.parse_tokens("20M") == 20_000_000 and reference.parse_tokens("300k") == 300_000


def test_every_stage_runs_end_to_end_at_toy_size_and_resumes(reference, tiny_model, tmp_path):
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))[:240_000]
    corpus = reference.write_corpus(tmp_path / "corpus", {"docs": text}, every=5)
    plan = reference.ModelPlan(tiny_model.name, (0, 1), 1, 128, 64, 1e6)
    settings = reference.Settings(out=tmp_path / "ref", tokens=6144, cache_tokens=4096, heldout_tokens=1024,
                                  curve_tokens=512, eval_tokens=256, eval_every=4, batch_size=256, progress=False)
    planned = reference.stages(plan, settings, reference.text_tokens(corpus[0]))
    rows = reference.run_model(tiny_model, plan, settings, corpus, reference.Progress(planned))
    assert [(r["hook"], Path(r["folder"]).name) for r in rows] == [
        ("blocks.0.hook_resid_post", "topk-128-k32-seed0"), ("blocks.1.hook_resid_post", "topk-128-k32-seed0"),
        ("blocks.1.hook_resid_post", "topk-128-k32-seed1")]
    for row in rows:
        folder = Path(row["folder"])
        written = {p.name for p in folder.iterdir()}
        assert {"cfg.json", "metrics.json", "curve.json", "curve.png", "README.md"} <= written
        curve = json.loads((folder / "curve.json").read_text())
        assert [p["step"] for p in curve["curve"]] == [4, 8, 12, 16, 20, 24]  # 6144 tokens in steps of 256
        assert row["tokens"] == 6144 and row["steps"] == 24 and 0 < row["fvu"] < 1 and row["ce_recovered"] is not None
        assert isinstance(row["converged"], bool) and 0 <= row["dead"] < 1 and row["dead_tokens"] > 0
    table = reference.write_table(rows, tmp_path / "ref" / "table.md")
    assert table.count("\n") == 4 and "topk-128-k32-seed1" in table
    (Path(rows[0]["folder"]) / "metrics.json").unlink()  # a finished SAE is not evaluated again
    again = reference.run_model(tiny_model, plan, settings, corpus, reference.Progress(planned))
    assert again == rows and not (Path(rows[0]["folder"]) / "metrics.json").exists()
