"""The dashboard's first impression: which latents it exports (a sample across firing-density bands, not the densest
only), how its index search ranks, how numbers read, that no neighbour link is dead, the logit-weight histogram, the
label slot, and the probe report's links into it."""

import json
import math
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import make_sae
from saelab.errors import SaelabError
from saelab.explore import explore
from saelab.explore.html import number, percent
from saelab.explore.ranking import SCORE_SCRIPT, rank, score
from saelab.explore.selection import density_bands, describe, sample_latents

HOOK = "blocks.1.hook_resid_post"


def fake_stats(densities, massive=None, n_tokens=10**7):
    """What selection reads of a pass: firing counts (and so densities) and the massive-token flags."""
    count = (torch.tensor(densities, dtype=torch.float64) * n_tokens).round().long()
    return SimpleNamespace(count=count, n_tokens=n_tokens, density=count.double() / n_tokens,
                           massive_only=None if massive is None else torch.tensor(massive))


def spread_stats():
    """400 latents log-uniform over 1e-6..0.3, then 50 dead and 50 dense massive-token-only latents."""
    live = torch.logspace(-6, math.log10(0.3), 400, dtype=torch.float64).tolist()
    densities = live + [0.0] * 50 + [0.5] * 50
    return fake_stats(densities, [False] * 450 + [True] * 50)


# ------------------------------------------------------------------------------------------------- selection
def test_a_sample_spreads_evenly_over_density_bands_without_dead_or_massive_latents():
    stats = spread_stats()
    bands = density_bands(stats)
    assert len(bands) == 6  # one a decade over 1e-6..0.3
    assert sum(len(b.latents) for b in bands) == 400  # the dead and the massive-only latents in none
    latents = sample_latents(stats, 60, seed=0)
    assert len(latents) == len(set(latents)) == 60
    assert all(i < 400 for i in latents)  # live, not massive-only
    per_band = [sum(i in set(latents) for i in b.latents) for b in bands]
    assert per_band == [10] * 6  # equal shares, the densest band one of them
    assert max(stats.density[latents]) >= float(stats.density[:400].max()) / 10  # the densest decade is in
    assert sample_latents(stats, 60, seed=0) == latents and sample_latents(stats, 60, seed=1) != latents
    assert describe(stats, latents).startswith("60 latents sampled across 6 firing-density bands from 30% down to")


def test_a_small_band_gives_its_share_to_the_others():
    stats = fake_stats([1e-5, 2e-5] + [0.01 + i * 1e-5 for i in range(100)])
    latents = sample_latents(stats, 20, bands=2)
    assert {0, 1} <= set(latents) and len(latents) == 20  # the rare band gave both, the dense one the other 18
    assert sorted(sample_latents(stats, 1000)) == list(range(102))  # more than live: every live latent
    with pytest.raises(ValueError, match="at least one latent"):
        sample_latents(stats, 0)
    assert sample_latents(fake_stats([0.0, 0.0]), 5) == []


# ------------------------------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("value, text", [(2930, "2,930"), (2930.4, "2,930"), (1.2e-05, "1.2e-5"), (0.0123456, "0.0123"),
                                         (12.345, "12.3"), (0, "0"), (-3.5e-7, "-3.5e-7"), (123456.7, "123,457"),
                                         (0.5, "0.5"), (999.4, "999")])
def test_numbers_read_short_and_never_break(value, text):
    assert number(value) == text
    assert "+" not in number(value) and " " not in number(value)


def test_percent():
    assert percent(0.31) == "31%" and percent(1.2e-7) == "1.2e-5%"


# ------------------------------------------------------------------------------------------------- ranking
ROWS = [
    {"latent": 1, "terms": [["the", 60], [",", 10]], "total": 70, "label": "", "promoted": ["war"]},
    {"latent": 2, "terms": [["war", 20], ["battle", 30]], "total": 70, "label": "", "promoted": []},
    {"latent": 3, "terms": [["war", 60], ["wars", 5]], "total": 70, "label": "", "promoted": []},
    {"latent": 4, "terms": [["warm", 65]], "total": 70, "label": "", "promoted": []},
    {"latent": 5, "terms": [["peace", 70]], "total": 70, "label": "war and peace", "promoted": []},
    {"latent": 6, "terms": [["award", 10]], "total": 70, "label": "", "promoted": []},
    {"latent": 7, "terms": [["\n", 70]], "total": 70, "label": "", "promoted": []},
]


def test_search_ranks_labels_then_whole_tokens_then_parts_then_promoted():
    assert rank("war", ROWS) == [5, 3, 2, 4, 6, 1]  # label; whole token by share; substring by share; promoted
    assert rank("  WAR ", ROWS) == rank("war", ROWS)
    assert rank("\n", ROWS) == [7]  # a whitespace token is searched as it is
    assert rank("zebra", ROWS) == [] and score("", ROWS[0]["terms"], 70) == 0
    assert score("war", ROWS[2]["terms"], 70) > score("war", ROWS[1]["terms"], 70) > score("war", ROWS[3]["terms"], 70)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_index_scores_in_javascript_as_in_python(tmp_path):
    queries = ["war", "WAR", "peace", "ar", "\n", ",", "zebra", "the"]
    script = tmp_path / "score.js"
    script.write_text(SCORE_SCRIPT + f"var rows = {json.dumps(ROWS)}, queries = {json.dumps(queries)};\n"
                      "console.log(JSON.stringify(queries.map(function (q) { return rows.map(function (r) {"
                      " return score(q, r.terms, r.total, r.label, r.promoted); }); })));\n")
    found = json.loads(subprocess.run(["node", str(script)], capture_output=True, text=True, check=True).stdout)
    for query, scores in zip(queries, found):
        assert scores == pytest.approx([score(query, r["terms"], r["total"], r["label"], r["promoted"]) for r in ROWS])


# ------------------------------------------------------------------------------------------------- the folder
@pytest.fixture(scope="module")
def features(tiny_cache, tiny_model):
    sae = make_sae("topk", width=32, k=4, seed=3, bias_std=0, model_name=tiny_model.name, hook_name=HOOK)
    return explore(sae, tiny_cache, tiny_model, top=4, sample=8)


def index_rows(index: Path) -> list[list]:
    return json.loads(index.read_text(encoding="utf-8").split('id="data">')[1].split("</script>")[0])


def test_every_link_leads_to_a_page_and_neighbours_are_marked(features, tmp_path):
    chosen = [3, 10]
    index = features.dashboard(tmp_path / "dash", chosen)
    pages = {int(p.stem): p.read_text() for p in (tmp_path / "dash" / "latents").glob("*.html")}
    nearest = {int(j) for i in chosen for j in features.nearest[1][i]}
    assert set(pages) == set(chosen) | nearest
    for latent, page in pages.items():
        for href in re.findall(r'href="([^"]+)"', page):
            assert (tmp_path / "dash" / "latents" / href).resolve().is_file(), (latent, href)
        assert "(not exported)" in page or latent in chosen  # a neighbour's own neighbours may have no page
    assert "(not exported)" not in pages[3] + pages[10]
    rows = index_rows(index)
    assert {row[0]: row[7] for row in rows} == {i: int(i not in chosen) for i in pages}
    assert "list the" in index.read_text() and "neighbour pages too" in index.read_text()
    alone = features.dashboard(tmp_path / "alone", chosen, neighbours=False)
    assert [row[0] for row in index_rows(alone)] == chosen
    page = (tmp_path / "alone" / "latents" / "3.html").read_text()
    assert page.count("(not exported)") == len(features[3].nearest)


def test_the_logit_weight_histogram_covers_the_vocabulary(features, tiny_model, tmp_path):
    from saelab.explore.directions import unembedding

    card = features[5]
    logits = features._W_dec[5].float() @ unembedding(tiny_model)
    assert sum(card.logit_counts) == logits.numel() == len(tiny_model.tokenizer)
    assert card.logit_edges[0] == pytest.approx(float(logits.min())) and card.logit_edges[-1] == pytest.approx(
        float(logits.max()))
    assert card.logit_edges[-1] == pytest.approx(card.promoted[0][1], abs=1e-4)  # where the promoted tokens sit
    html = card.html()
    assert 'aria-label="logit weight histogram"' in html and html.count("<rect") > 10
    assert "http" not in html


def test_labels_show_on_pages_and_in_the_index_and_search_finds_them(features, tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"3": "dates in a list <b>"}))
    index = features.dashboard(tmp_path / "dash", [3, 10], labels=labels, neighbours=False)
    page = (tmp_path / "dash" / "latents" / "3.html").read_text()
    assert "<b>Label:</b> dates in a list &lt;b&gt;" in page
    empty = (tmp_path / "dash" / "latents" / "10.html").read_text()
    assert "No label yet" in empty and '"10": "what it reads"' in empty and "labels.json" in empty
    rows = {row[0]: row for row in index_rows(index)}
    assert rows[3][8] == "dates in a list <b>" and rows[10][8] == ""
    plain = [{"latent": r[0], "terms": r[9], "total": r[10], "label": r[8], "promoted": r[5]} for r in rows.values()]
    assert rank("dates", plain) == [3]
    for bad, message in (("[1, 2]", "one JSON object"), ('{"x": "y"}', "latent number"), ("{", "not JSON")):
        labels.write_text(bad)
        with pytest.raises(SaelabError, match=message):
            features.dashboard(tmp_path / "bad", [3], labels=labels)
    with pytest.raises(SaelabError, match="cannot read the labels file"):
        features.dashboard(tmp_path / "bad", [3], labels=tmp_path / "missing.json")


def test_pages_and_index_carry_formatted_numbers(features, tmp_path):
    index = features.dashboard(tmp_path / "dash", [3])
    rows = index_rows(index)
    for row in rows:
        assert row[6] == [percent(row[1]), number(row[2]), number(row[3])]
    for page in [index, *(tmp_path / "dash" / "latents").glob("*.html")]:
        assert not re.search(r"\de[+-]0", page.read_text())  # no 2.93e+03, no 1.2e-05
    assert "td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}" in index.read_text()


def test_cli_dashboard_exports_a_spread_sample_with_the_saes_labels(features, tiny_cache, tiny_model_dir, tmp_path,
                                                                       capsys):
    from saelab.cli import main
    from saelab.hub import load_sae

    sae = make_sae("topk", width=32, k=4, seed=3, bias_std=0, model_name="tiny", hook_name=HOOK)
    folder = tmp_path / "sae"
    sae.save(folder)
    (folder / "labels.json").write_text('{"0": "the first latent"}')
    assert load_sae(folder).cfg.width == 32
    args = ["dashboard", str(folder), "--acts", str(tiny_cache), "--model", str(tiny_model_dir), "--top", "3"]
    assert main([*args, "--out", str(tmp_path / "dash"), "--spread", "6"]) == 0
    out = capsys.readouterr().out
    assert "6 latents sampled across" in out and "firing-density bands" in out and "neighbour" in out
    rows = index_rows(tmp_path / "dash" / "index.html")
    assert sum(not row[7] for row in rows) == 6
    assert "sampled across" in (tmp_path / "dash" / "index.html").read_text()
    assert main([*args, "--out", str(tmp_path / "all"), "--latents", "0", "--labels", str(folder / "labels.json")]) == 0
    assert "the first latent" in (tmp_path / "all" / "latents" / "0.html").read_text()


# ------------------------------------------------------------------------------------------------- probe reports
def test_the_probe_report_links_the_latents_it_chose_to_their_pages(features, tmp_path):
    from saelab.analysis.report import ProbeRecord, ProbeResults

    dashboard = tmp_path / "dash"
    features.dashboard(dashboard, [3, 10], neighbours=False)
    sae, resid = "sae topk @ " + HOOK, "resid @ " + HOOK
    record = lambda features_, kind, method, k, selected: ProbeRecord(
        "days", features_, kind, HOOK, method, k, None, 0.9, 0.875, 0.9, 10, 4, 4, selected)
    results = ProbeResults(model="m", data={"name": "d"}, records=[
        record(sae, "sae", "sparse_mean_diff", 1, [10]), record(sae, "sae", "sparse_mean_diff", 2, [10, 3]),
        record(sae, "sae", "sparse_l1", 2, [3, 7]), record(resid, "resid", "sparse_mean_diff", 2, [5, 6]),
        record(sae, "sae", "logistic", None, None)], dashboards={sae: str(dashboard)})
    folder = results.save(tmp_path / "probe")
    text = (folder / "probes.md").read_text()
    links = re.findall(r"\[(\d+)\]\(([^)]+)\)", text)
    assert links == [("10", "../dash/latents/10.html"), ("3", "../dash/latents/3.html"),
                     ("3", "../dash/latents/3.html")]  # the largest k of each method, in rank order
    assert all((folder / href).resolve().is_file() for _, href in links)
    assert "| days | sae topk @ blocks.1.hook_resid_post | l1 k=2 | 0.875 | [3](../dash/latents/3.html), 7 |" in text
    assert "Latents 7 of sae topk" in text and "--latents 7" in text  # the one with no page, and how to make one
    assert "5, 6" not in text  # residual dimensions are not latents
    assert ProbeResults.load(folder) == results
    plain = ProbeResults(model="m", data={"name": "d"}, records=results.records[:2]).save(tmp_path / "plain")
    assert "| days | sae topk @ blocks.1.hook_resid_post | mean_diff k=2 | 0.875 | 10, 3 |" in (
        plain / "probes.md").read_text()
