"""The benchmark scripts run end to end at toy sizes and end with their machine-readable RESULT line; the report
scripts take their study settings from the study configs."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_bench_train_prints_a_result_line(arch):
    args = ["--d", "32", "--n", "256", "--k", "4", "--batch", "64", "--steps", "1", "--rounds", "1", f"--arch={arch}"]
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_train.py"), *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"RESULT saelab_tok_s=\d+ ceiling_tok_s=\d+ ratio=[\d.]+ sparsify_tok_s=na saelens_tok_s=na",
                        result), result
    assert re.search(r"saelab \(sparse kernels\)\s+[\d,]+\s+[\d.]+\s+[\d.]+", proc.stdout)  # tokens/s, ratio, GB


@pytest.mark.parametrize("arch, extra, row", [
    ("transcoder", r" skip_tok_s=\d+ vs_sae=[\d.]+ skip_vs_sae=[\d.]+", r"TopK transcoder \(d -> 48\)\s+[\d,]+"),
    ("crosscoder", r" vs_sae=[\d.]+ sae_ratio=[\d.]+", r"TopK crosscoder \(32 \+ 48\)\s+[\d,]+"),
])
def test_bench_train_times_a_dictionary_of_two_hooks_beside_the_sae(arch, extra, row):
    args = ["--d", "32", "--d-out", "48", "--n", "256", "--k", "4", "--batch", "64", "--steps", "1", "--rounds", "1",
            f"--arch={arch}"]
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_train.py"), *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"RESULT saelab_tok_s=\d+ ceiling_tok_s=\d+ ratio=[\d.]+ sparsify_tok_s=na saelens_tok_s=na "
                        r"sae_tok_s=\d+" + extra, result), result
    assert re.search(row, proc.stdout)


def _script(name: str):
    """A report script as a module (its main() does not run on import)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_scripts_take_their_study_settings_from_the_configs():
    from saelab.analysis import CalendarConfig, ClusterSearchConfig, MatchConfig
    from saelab.options import flag_values

    match_report = _script("match_report")
    parser, names = match_report.build_parser()
    assert names == [f.name for f in dataclasses.fields(MatchConfig)]
    assert MatchConfig(**flag_values(parser.parse_args([]), names)) == MatchConfig()
    given = flag_values(parser.parse_args(["--max-pairs", "200", "--null-draws", "5"]), names)
    assert MatchConfig(**given) == MatchConfig(max_pairs=200, null_draws=5)
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-pairs", "0"])
    probe_report = _script("probe_report")
    args = probe_report.build_parser().parse_args(["--k", "1,4", "--positions", "last"])
    assert flag_values(args, probe_report.PROBE_FLAGS) == {"k": [1, 4], "positions": "last"}
    circles_report = _script("circles_report")
    args = circles_report.build_parser().parse_args(["--n-clusters", "40", "--tasks", "days"])
    assert CalendarConfig("m", **flag_values(args, circles_report.CALENDAR_FLAGS)).tasks == "days"
    assert ClusterSearchConfig("s", "a", **flag_values(args, circles_report.CLUSTER_FLAGS)).n_clusters == 40


def test_recipe_study_scores_fvu_from_per_context_sums_and_scales_the_default_rate():
    import torch

    from saelab.evals.core import MASSIVE
    from saelab.sae import SAEConfig, create_sae

    recipe_study = _script("recipe_study")
    torch.manual_seed(0)
    x = torch.randn(600, 16, dtype=torch.float64) * torch.linspace(0.5, 2, 16, dtype=torch.float64)
    x[5] *= 40 * MASSIVE  # one massive token: in "all", not in "typical"
    contexts = torch.arange(600) // 20
    sae = create_sae(SAEConfig(arch="topk", d_in=16, width=64, k=4))
    values = recipe_study.score(sae, x, contexts)
    with torch.no_grad():
        codes = sae.encode(x.float())
        x_hat = sae.decode(codes).double()
    typical = torch.ones(600, dtype=torch.bool)
    typical[5] = False
    for name, rows in (("FVU all", slice(None)), ("FVU typical", typical)):
        xs, err = x[rows], (x[rows] - x_hat[rows]).square().sum()
        direct = float(err / (xs - xs.mean(0)).square().sum())
        assert abs(values[name].estimate - direct) < 1e-9 * max(1.0, direct)
        assert values[name].low <= values[name].estimate <= values[name].high
    assert values["L0"].estimate == float((codes > 0).sum(-1).double().mean())
    for arch, k in (("topk", 32), ("jumprelu", 32)):
        base = recipe_study.spec(arch, k, 4608, 1.0, {})
        doubled = recipe_study.spec(arch, k, 4608, 2.0, {"jumprelu_bandwidth": 0.01})
        assert doubled.lr == 2 * base.lr
        assert doubled.options.get("jumprelu_bandwidth") == (0.01 if arch == "jumprelu" else None)
    assert recipe_study.run_name(528, 0.5, (0.0, 0.99), {"a": 1}) == "steps528-lr0.5-b1-0-a1"


def test_transcoder_study_trains_three_dictionaries_per_layer_and_labels_them_back():
    from types import SimpleNamespace

    from saelab.sae import SAEConfig, create_sae

    study = _script("transcoder_study")
    specs = study.dictionary_specs([3, 12], width=64, k=4)
    assert [(s.hook, s.target_hook, s.options.get("skip", False)) for s in specs[:3]] == [
        ("blocks.3.mlp.hook_in", "blocks.3.hook_mlp_out", False),
        ("blocks.3.mlp.hook_in", "blocks.3.hook_mlp_out", True), ("blocks.3.hook_mlp_out", None, False)]
    assert len(specs) == 6 and {(s.width, s.k) for s in specs} == {(64, 4)}
    transcoder = create_sae(SAEConfig(arch="topk", d_in=8, width=16, k=2, hook_name="blocks.12.mlp.hook_in",
                                      target_hook="blocks.12.hook_mlp_out", d_out=8, skip=True))
    sae = create_sae(SAEConfig(arch="topk", d_in=8, width=16, k=2, hook_name="blocks.3.hook_mlp_out"))
    assert study.kind_of(transcoder) == (12, "skip transcoder") and study.kind_of(sae) == (3, "SAE on MLP out")
    spliced = SimpleNamespace(ce_clean=3.0, ce_sae=3.1, ce_zero=3.5, ce_loss_recovered=0.8, kl_sae=0.05, kl_zero=0.4)
    line = study.row("3", "transcoder", spliced, fvu=0.5, l0=32.0)
    assert line == "| 3 | transcoder | 0.500 | 32.0 | 3.000 | 3.100 | 0.100 | 0.500 | 0.800 | 0.050 | 0.400 |"
    assert line.count("|") == study.HEADER.splitlines()[0].count("|")
