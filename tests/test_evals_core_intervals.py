"""saelab.evals.core's error bars and eval contract: per-block sums that recompute the reported metrics, bootstrap
intervals over contexts, CoreConfig / run, and the SAEBench core record."""

import json
import math

import pytest
import torch

from saelab.data import TextConfig
from saelab.errors import DataError
from saelab.evals.core import (BLOCK_COLUMNS, BLOCK_ROWS, EVAL_TYPE_ID, METRICS_FILE, CoreConfig, EvalResult,
                               ReconstructionStats, block_fvu, evaluate, reconstruction_stats, run)
from saelab.evals.intervals import Interval
from saelab.evals.saebench import read_intervals, write_output
from saelab.sae import SAEConfig, create_sae

HOOK = "blocks.0.hook_resid_post"


def topk_sae(d_in, width=64, k=4, seed=0):
    torch.manual_seed(seed)
    sae = create_sae(SAEConfig(arch="topk", d_in=d_in, width=width, k=k, hook_name=HOOK, model_name="tiny"))
    with torch.no_grad():
        sae.b_dec.normal_()
    return sae


def held_out(tmp_path, chars=3000, context_len=16):
    from pydoc_data.topics import topics

    source = tmp_path / "held_out.txt"
    source.write_text(" ".join(topics[name] for name in sorted(topics)[5:40])[:chars])
    return TextConfig(source=str(source), context_len=context_len)


def direct_fvu(x, x_hat):
    """FVU straight from the activations: sum ||x - x_hat||^2 / sum ||x - mean x||^2."""
    x, x_hat = x.double(), x_hat.double()
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


# ------------------------------------------------------------------------------------------- per-block sums
def test_block_sums_recompute_the_pooled_fvu_and_l0_from_the_activations():
    torch.manual_seed(0)
    x = torch.randn(1000, 8) * torch.linspace(0.5, 3, 8) + 2  # 1000 rows: 7 full blocks of 128 and one of 104
    sae = create_sae(SAEConfig(arch="topk", d_in=8, width=32, k=3))
    stats = reconstruction_stats(sae, x.split(300), keep_blocks=True, progress=False)
    blocks = stats.block_sums()
    assert blocks.shape == (math.ceil(1000 / BLOCK_ROWS), len(BLOCK_COLUMNS) + 8)
    assert stats.block_unit == f"{BLOCK_ROWS} consecutive tokens"
    assert blocks[:, 0].tolist() == [128.0] * 7 + [104.0]
    with torch.no_grad():
        codes = sae.encode(x)
        reference = direct_fvu(x, sae.decode(codes))
    assert block_fvu(blocks) == pytest.approx(reference, rel=1e-9)
    assert stats.metrics().fvu == pytest.approx(reference, rel=1e-9)
    l0 = float((codes != 0).sum(-1).double().mean())
    assert float(blocks[:, BLOCK_COLUMNS.index("active")].sum() / 1000) == pytest.approx(l0)
    first = x[:128]  # one block on its own is that block's FVU
    with torch.no_grad():
        assert block_fvu(blocks[:1]) == pytest.approx(direct_fvu(first, sae.decode(sae.encode(first))), rel=1e-9)


def test_typical_block_sums_leave_out_the_massive_rows():
    torch.manual_seed(1)
    x = torch.randn(600, 4)
    x[[3, 200, 450]] *= 1000  # three massive tokens, in three blocks
    x_hat = x + 0.1 * torch.randn_like(x)
    stats = ReconstructionStats(4, 2, keep_blocks=True)
    stats.update(x, x_hat, torch.ones(600, 2))
    typical = ~torch.isin(torch.arange(600), torch.tensor([3, 200, 450]))
    reference = direct_fvu(x[typical], x_hat[typical])
    assert stats.metrics().fvu_typical == pytest.approx(reference, rel=1e-9)
    assert block_fvu(stats.block_sums(typical=True)) == pytest.approx(reference, rel=1e-9)
    assert stats.block_sums(typical=True)[:, 0].sum() == 597


def test_blocks_are_contexts_when_the_rows_say_which():
    stats = ReconstructionStats(2, 1, keep_blocks=True)
    x = torch.arange(10.0).reshape(5, 2)
    stats.update(x, x, torch.ones(5, 1), contexts=torch.tensor([0, 0, 1, 1, 1]))
    stats.update(x[:2], x[:2], torch.ones(2, 1), contexts=torch.tensor([2, 2]))
    assert stats.block_unit == "context" and stats.block_sums()[:, 0].tolist() == [2.0, 3.0, 2.0]
    with pytest.raises(ValueError, match="contexts="):
        stats.update(x, x, torch.ones(5, 1))


def test_intervals_need_kept_blocks_and_two_of_them():
    stats = ReconstructionStats(2, 1)
    stats.update(torch.randn(10, 2), torch.randn(10, 2), torch.ones(10, 1))
    with pytest.raises(ValueError, match="keep_blocks"):
        stats.intervals()
    one_block = ReconstructionStats(2, 1, keep_blocks=True)
    one_block.update(torch.randn(10, 2), torch.randn(10, 2), torch.ones(10, 1))
    with pytest.raises(DataError, match="at least 2 blocks"):
        one_block.intervals()


# ------------------------------------------------------------------------------------------- run and its intervals
@pytest.fixture(scope="module")
def core_run(tiny_model, tmp_path_factory):
    text = held_out(tmp_path_factory.mktemp("core"))
    sae = topk_sae(tiny_model.d_model)
    config = CoreConfig(text=text, tokens=None, batch_size_prompts=4, resamples=200)
    return sae, text, run(sae, tiny_model, config, progress=False)


def test_run_reports_the_numbers_evaluate_reports(tiny_model, core_run):
    sae, text, result = core_run
    plain = evaluate(sae, model=tiny_model, text=text, tokens=None, batch_size=4, progress=False)
    assert result.reconstruction == plain.reconstruction and result.spliced == plain.spliced
    assert {k: v for k, v in result.settings.items() if k in plain.settings} == plain.settings
    assert result.settings["bootstrap_unit"] == "context" and result.settings["resamples"] == 200


def test_the_bootstrap_estimates_are_the_reported_metrics(core_run):
    _, _, result = core_run
    metrics = result.metrics()
    assert set(result.intervals) == {"fvu", "explained_variance", "mse", "l0", "cos_sim", "l2_ratio", "fvu_typical",
                                     "ce_loss_recovered", "kl_sae", "kl_div_score"}
    for name, interval in result.intervals.items():
        expected = (metrics["kl_zero"] - metrics["kl_sae"]) / metrics["kl_zero"] if name == "kl_div_score" \
            else metrics[name]
        assert interval.estimate == expected, name
        assert interval.low <= interval.estimate <= interval.high, name
        assert interval.method == "bootstrap" and interval.resamples == 200
        n = result.spliced.n_contexts
        assert interval.n == n, name  # blocks and contexts are the same units here
    assert result.intervals["fvu"].high - result.intervals["fvu"].low > 0


def test_the_bootstrap_statistic_on_all_contexts_equals_the_metric(tiny_model, core_run):
    from saelab.evals import core

    sae, text, result = core_run
    settings = {"dense_threshold": core.DENSE_THRESHOLD}
    losses, stats = core._spliced_pass(sae, tiny_model, text, HOOK, None, settings, None, False, keep_blocks=True,
                                       tokens=None, batch_size=4, splice_bos=False, mean_ablation=True)
    assert block_fvu(stats.block_sums()) == pytest.approx(result.reconstruction.fvu, rel=1e-9)
    assert block_fvu(stats.block_sums(typical=True)) == pytest.approx(result.reconstruction.fvu_typical, rel=1e-9)
    contexts = losses.per_context()
    assert contexts.shape == (result.spliced.n_contexts, len(core.CONTEXT_COLUMNS))
    for name in ("ce_loss_recovered", "kl_sae", "kl_div_score"):
        assert core.CONTEXT_STATISTICS[name](contexts) == pytest.approx(result.intervals[name].estimate, rel=1e-9)
    assert int(contexts[:, 0].sum()) == result.spliced.n_predictions
    with_mean = losses.intervals(resamples=50)["ce_loss_recovered_mean"]  # the mean ablation's sums are kept too
    assert with_mean.estimate == losses.metrics().ce_loss_recovered_mean
    assert core.CONTEXT_STATISTICS["ce_loss_recovered_mean"](contexts) == pytest.approx(with_mean.estimate, rel=1e-9)


def test_the_interval_narrows_with_more_contexts(tiny_model, tmp_path):
    text = held_out(tmp_path, chars=20_000)
    sae = topk_sae(tiny_model.d_model)
    widths = []
    for tokens in (8 * 16, 64 * 16):
        result = run(sae, tiny_model, CoreConfig(text=text, tokens=tokens, batch_size_prompts=8, resamples=300),
                     progress=False)
        assert result.spliced.n_contexts == tokens // 16
        widths.append({name: i.high - i.low for name, i in result.intervals.items()})
    for name in ("fvu", "ce_loss_recovered", "kl_sae"):
        assert widths[1][name] < widths[0][name], name
    assert widths[0]["l0"] == widths[1]["l0"] == 0  # a TopK SAE's L0 is k on every token: nothing to vary


def test_too_few_contexts_for_a_bootstrap_are_refused(tiny_model, tmp_path):
    sae = topk_sae(tiny_model.d_model)
    with pytest.raises(DataError, match="at least 2"):
        run(sae, tiny_model, CoreConfig(text=held_out(tmp_path), tokens=16), progress=False)
    with pytest.raises(TypeError, match="CoreConfig"):
        run(sae, tiny_model, {"tokens": 16}, progress=False)


# ------------------------------------------------------------------------------------------- the records
def test_metrics_json_carries_the_intervals_and_reads_them_back(core_run, tmp_path):
    _, _, result = core_run
    result.save(tmp_path)
    record = json.loads((tmp_path / METRICS_FILE).read_text())
    assert set(record["intervals"]) == set(result.intervals)
    assert "blocks" not in json.dumps(record["intervals"])
    loaded = EvalResult.load(tmp_path)
    assert loaded.intervals == result.intervals
    assert isinstance(loaded.intervals["fvu"], Interval) and loaded == result


def test_metrics_json_without_intervals_is_as_before(tiny_model, tmp_path):
    result = evaluate(topk_sae(tiny_model.d_model), model=tiny_model, text=held_out(tmp_path), tokens=64,
                      progress=False, out=tmp_path)
    record = json.loads((tmp_path / METRICS_FILE).read_text())
    assert "intervals" not in record and result.intervals == {}
    assert list(record) == ["schema_version", "saelab_version", "sae", "n_tokens", "reconstruction", "spliced",
                            "density", "settings", "notes"]


def test_the_saebench_record_uses_saebench_names(core_run):
    sae, _, result = core_run
    record = result.saebench(sae)
    assert record["eval_type_id"] == EVAL_TYPE_ID == "core"
    metrics = record["eval_result_metrics"]
    assert {category: sorted(values) for category, values in metrics.items()} == {
        "model_behavior_preservation": ["kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"],
        "model_performance_preservation": ["ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae",
                                           "ce_loss_without_sae"],
        "reconstruction_quality": ["cossim", "explained_variance", "mse"],
        "shrinkage": ["l2_ratio"],
        "sparsity": ["l0"],
        "token_stats": ["total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance"],
        "misc_metrics": ["frac_alive", "freq_over_1_percent"],
    }
    assert metrics["model_performance_preservation"]["ce_loss_score"] == result.spliced.ce_loss_recovered
    assert metrics["reconstruction_quality"]["explained_variance"] == result.reconstruction.explained_variance
    assert metrics["sparsity"]["l0"] == result.reconstruction.l0
    assert metrics["misc_metrics"]["frac_alive"] == 1 - result.reconstruction.frac_dead
    assert metrics["token_stats"]["total_tokens_eval_sparsity_variance"] == result.n_tokens
    assert set(read_intervals(record)) == {
        "model_behavior_preservation.kl_div_score", "model_behavior_preservation.kl_div_with_sae",
        "model_performance_preservation.ce_loss_score", "reconstruction_quality.explained_variance",
        "reconstruction_quality.mse", "reconstruction_quality.cossim", "shrinkage.l2_ratio", "sparsity.l0"}
    saelab = record["eval_result_unstructured"]["saelab"]
    assert saelab["fvu"] == result.reconstruction.fvu and saelab["fvu_typical"] == result.reconstruction.fvu_typical
    assert set(saelab["fvu_intervals"]) == {"fvu", "fvu_typical"} and saelab["bootstrap_unit"] == "context"
    config = record["eval_config"]
    assert config["batch_size_prompts"] == 4 and config["context_size"] == 16 and config["resamples"] == 200


def test_the_intervals_round_trip_through_the_saebench_file(core_run, tmp_path):
    sae, _, result = core_run
    path = write_output(result.saebench(sae), tmp_path)
    assert path == tmp_path / "evals" / "core.json"
    again = read_intervals(json.loads(path.read_text()))
    assert again["sparsity.l0"] == result.intervals["l0"]
    assert again["model_performance_preservation.ce_loss_score"] == result.intervals["ce_loss_recovered"]


def test_the_table_shows_each_interval(core_run):
    _, _, result = core_run
    table = result.table()
    fvu = result.intervals["fvu"]
    assert f"| fvu | {fvu.estimate:.4g} | [{fvu.low:.4g}, {fvu.high:.4g}] |" in table
    assert "| kl_div_score |" in table and "| n_tokens |" in table
