"""Slow tier for saelab.analysis: steering SmolLM2-135M along a real concept, and the probes notebook."""

import re

import pytest
import torch

from notebook_runner import run_notebook

pytestmark = pytest.mark.slow


def test_steering_smollm2_along_the_calendar_direction(smollm2):
    """The difference of means of day/month names vs other nouns, added at layer 9: the day/month logits rise
    against the others', and KL to the clean model grows with alpha."""
    from saelab.analysis import LogitDiff, Steer, calendar, concept_direction, sweep

    data = calendar()
    data = data.subset([i for i in range(len(data)) if i % 10 < 2])
    hook = "blocks.9.hook_resid_post"
    X = smollm2.activations_at(data.texts, hook, "mean")[hook]
    theta = concept_direction(X, torch.tensor([label == "calendar" for label in data.labels]).long())
    side = ["The history of the city goes back to a small settlement on the river, which grew into a market town.",
            "Python lists are mutable sequences, typically used to store collections of homogeneous items."]
    steer = Steer.direction(smollm2, hook, theta, reference=side)
    target = LogitDiff(["We are going to the", "It all started with"], up=[" Monday", " Friday", " March"],
                       down=[" London", " house", " water"])
    result = sweep(smollm2, steer, [0.5, 1], target, side)
    targets, kls = [p.target for p in result.points], [p.kl for p in result.points]
    assert targets[1] > targets[0] + 1 and targets[2] > targets[0] + 1, result.table()
    assert kls[0] < 1e-6 and all(b > a for a, b in zip(kls, kls[1:])), result.table()
    assert result.points[-1].ce > result.ce_clean


def test_probes_notebook_runs(tmp_path):
    outputs = run_notebook("05_probes_and_steering.ipynb", tmp_path, timeout=300)
    assert "| resid @ blocks.9.hook_resid_post |" in outputs and "KL to clean" in outputs
    runs = tmp_path / "runs" / "notebook05"  # outside a checkout, runs_folder() is runs/ in the working folder
    assert (runs / "probes_calendar.png").exists() and (runs / "steering_calendar.png").exists()
    shares = {alpha: float(share) for alpha, share in re.findall(r"alpha ([\d.]+): day/month share ([\d.]+)", outputs)}
    assert shares["0.25"] > shares["0"], outputs  # the small push brings out more day and month names
