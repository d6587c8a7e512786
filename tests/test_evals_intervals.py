"""Error bars and SAEBench's layout: coverage of the bootstrap, the seed interval against scipy's t interval, the
recipe comparison, and a record that round-trips with SAEBench's field names."""

import json
import math

import pytest
import torch
from scipy import stats

from saelab.evals.intervals import Interval, bootstrap_interval, compare, mean_interval, over_seeds
from saelab.evals.saebench import read_intervals, read_outputs, saebench_output, write_output
from tests.helpers import make_sae

SAEBENCH_FIELDS = {"eval_type_id", "eval_config", "eval_id", "datetime_epoch_millis", "eval_result_metrics",
                   "eval_result_details", "eval_result_unstructured", "sae_bench_commit_hash", "sae_lens_id",
                   "sae_lens_release_id", "sae_lens_version", "sae_cfg_dict"}


def test_bootstrap_interval_covers_the_true_mean_about_as_often_as_its_level():
    generator = torch.Generator().manual_seed(0)
    hits = 0
    for trial in range(200):
        sample = torch.randn(40, generator=generator, dtype=torch.float64) * 2 + 3
        hits += mean_interval(sample, resamples=300, seed=trial).contains(3.0)
    assert 0.86 <= hits / 200 <= 0.99


def test_bootstrap_of_a_ratio_of_sums_estimates_the_pooled_ratio():
    units = torch.tensor([[1.0, 4.0], [3.0, 4.0], [2.0, 2.0], [0.0, 10.0]], dtype=torch.float64)
    interval = bootstrap_interval(units, lambda u: u[:, 0].sum() / u[:, 1].sum(), resamples=200)
    assert interval.estimate == pytest.approx(6 / 20)  # not the mean of per-unit ratios (0.4375)
    assert interval.low <= 0.3 <= interval.high and interval.method == "bootstrap" and interval.n == 4


def test_bootstrap_refuses_a_single_unit():
    with pytest.raises(ValueError, match="at least 2 units"):
        mean_interval([1.0])


def test_seed_interval_is_students_t_interval():
    values = [0.151, 0.149, 0.156]
    interval = over_seeds(values)
    low, high = stats.t.interval(0.95, 2, loc=sum(values) / 3, scale=stats.sem(values))
    assert (interval.low, interval.high) == pytest.approx((low, high))
    assert interval.min == 0.149 and interval.max == 0.156 and interval.std == pytest.approx(stats.tstd(values))
    assert math.isnan(over_seeds([0.2]).low)


def test_compare_says_whether_a_difference_exceeds_the_seed_spread():
    topk, batchtopk = over_seeds([0.150, 0.152, 0.151]), over_seeds([0.175, 0.177, 0.176])
    assert compare(topk, batchtopk).differs is True
    assert compare(topk, over_seeds([0.149, 0.154, 0.150])).differs is False
    assert compare(over_seeds([0.1]), over_seeds([0.2])).differs is None
    welch = stats.ttest_ind([0.175, 0.177, 0.176], [0.150, 0.152, 0.151], equal_var=False)
    assert welch.pvalue < 0.05  # the same verdict as scipy's Welch test
    assert "beyond the seed spread" in str(compare(topk, batchtopk))


def test_saebench_record_has_saebench_fields_and_round_trips_its_intervals(tmp_path):
    sae = make_sae("topk", d_in=8, width=16, k=2)
    interval = Interval(0.25, 0.2, 0.3, 26, "bootstrap", resamples=100)
    record = saebench_output("absorption_first_letter", {"k_sparse_probe_l1_decay": 0.01},
                             {"mean": {"mean_absorption_fraction_score": 0.25, "mean_num_split_features": math.nan}},
                             sae, details=[{"first_letter": "a", "absorption_rate": 0.1}],
                             intervals={"mean.mean_absorption_fraction_score": interval})
    assert set(record) == SAEBENCH_FIELDS
    assert record["eval_result_metrics"]["mean"]["mean_num_split_features"] is None
    assert record["sae_cfg_dict"]["d_in"] == 8
    path = write_output(record, tmp_path)
    assert path == tmp_path / "evals" / "absorption_first_letter.json"
    again = read_outputs(tmp_path)["absorption_first_letter"]
    assert again == json.loads(path.read_text()) and read_intervals(again)["mean.mean_absorption_fraction_score"] == interval
    with pytest.raises(KeyError, match="not among the metrics"):
        saebench_output("core", {}, {"sparsity": {"l0": 3.0}}, sae, intervals={"sparsity.l1": interval})
