"""Slow tier for circles: the day task on SmolLM2-135M (real tokenizer, real interventions) and the circles notebook."""

import pytest
import torch

from notebook_runner import run_notebook

pytestmark = pytest.mark.slow


def test_days_on_smollm2_positions_accuracy_and_the_whole_layer_patch(smollm2):
    """Every day is one token found by its characters; the accuracy is the argmax over the seven answers; patching
    the day token's whole residual (or its 5 PCA coordinates) at layer 1 with the (a', b) prompt's reproduces the
    change in the answer logits from (a, b) to (a', b), far more than mean-ablating it does; the day means are in
    calendar order."""
    from saelab.analysis.circles import DAYS_TASK, answer_ids, calendar_study, item_positions

    prompts = DAYS_TASK.prompts()
    tokens, positions = item_positions(smollm2, prompts)
    for i in (0, 20, 48):
        assert smollm2.tokenizer.decode([int(tokens.ids[i, positions[i]])]).strip() == DAYS_TASK.items[prompts[i].item]
    study = calendar_study(smollm2, DAYS_TASK, layers=[2, 8], intervention_layers=[1], targets=1, progress=False)
    logits = smollm2.logits(tokens)[torch.arange(len(prompts)), tokens.lengths - 1][:, answer_ids(smollm2, DAYS_TASK)]
    answers = torch.tensor([p.answer for p in prompts])
    assert study.accuracy.accuracy == pytest.approx(float((logits.argmax(1) == answers).float().mean()))
    assert [r.order for r in study.layers] == [1.0, 1.0]  # the day means go round in calendar order
    recovered = {r.method: r.recovered for r in study.interventions}
    assert recovered["layer"] > 0.9 and recovered["pca_subspace"] > 0.8, recovered
    assert recovered["layer"] > recovered["mean_ablate"] + 0.25, recovered


def test_circles_notebook_runs(tmp_path):
    outputs = run_notebook("04_circles.ipynb", tmp_path)
    assert "shuffled-order control" in outputs and "| 1 | layer |" in outputs and "graph clustering" in outputs
    runs = tmp_path / "runs" / "notebook04"  # outside a checkout, runs_folder() is runs/ in the working folder
    assert (runs / "days_planes.png").exists() and (runs / "top_cluster.png").exists()
