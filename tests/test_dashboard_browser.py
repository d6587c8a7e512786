"""Slow tier: the exported dashboard in a real headless Chromium (Debian's `chromium`, installed by .ci/run). It must
render offline from file://, show the expected latent's contexts, log no JavaScript error and paint a non-blank page.

JavaScript errors are read from Chromium's own log (--enable-logging=stderr), where every console message and
uncaught exception appears as a CONSOLE line; a page with a deliberate error proves the check can fail.
"""

import html
import re
import shutil
import subprocess

import pytest
import torch

from saelab.activations import cache_activations
from saelab.data import TextConfig

pytestmark = pytest.mark.slow
HOOK = "blocks.1.hook_resid_post"
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(tmp_path, url: str, *flags: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "profile"
    return subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-extensions", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
                           "--window-size=1200,900", *flags, url],
                          capture_output=True, text=True, timeout=120)


def js_errors(run: subprocess.CompletedProcess) -> list[str]:
    return [line for line in run.stderr.splitlines() if "CONSOLE" in line and re.search(r"Uncaught|Error", line)]


@pytest.fixture(scope="module")
def dashboard(tiny_model, tmp_path_factory):
    if BROWSER is None:
        pytest.skip("chromium is not installed (.ci/run installs it: apt-get install chromium)")
    from saelab.explore import explore
    from saelab.sae import SAEConfig, create_sae

    folder = tmp_path_factory.mktemp("browser")
    cache_activations(tiny_model, HOOK, folder / "acts", text=TextConfig(context_len=32), tokens=1200, batch_size=4,
                      progress=False)
    torch.manual_seed(0)
    sae = create_sae(SAEConfig(arch="topk", d_in=64, width=64, k=4, model_name=tiny_model.name, hook_name=HOOK))
    features = explore(sae, folder / "acts", tiny_model)
    latents = features.most_active(6)
    return features, latents, features.dashboard(folder / "dash", latents)


def test_the_detector_sees_javascript_errors(tmp_path):
    if BROWSER is None:
        pytest.skip("chromium is not installed")
    page = tmp_path / "broken.html"
    page.write_text("<!doctype html><p>x</p><script>undefinedFunction();</script>")
    assert js_errors(chromium(tmp_path, page.as_uri(), "--dump-dom"))


def test_latent_page_renders_its_contexts(dashboard, tmp_path):
    features, latents, index = dashboard
    latent = latents[0]
    page = index.parent / "latents" / f"{latent}.html"
    run = chromium(tmp_path, page.as_uri(), "--dump-dom")
    assert run.returncode == 0, run.stderr[-2000:]
    assert not js_errors(run)
    text = html.unescape(re.sub(r"<[^>]+>", "", run.stdout))
    card = features[latent]
    assert f"Latent {latent}" in text
    for example in card.top[:5]:  # the top contexts, token for token (as the card shows them)
        shown = "".join(t.replace("\n", "\u21b5").replace("\t", "\u2192").replace("\r", "") for t in example.tokens)
        assert shown in text
    assert run.stdout.count(' hit"') == len(card.top) + sum(len(g.examples) for g in card.quantiles)


def test_index_lists_and_searches_latents(dashboard, tmp_path):
    features, latents, index = dashboard
    run = chromium(tmp_path, index.as_uri(), "--dump-dom")
    assert not js_errors(run), js_errors(run)
    listed = [int(i) for i in re.findall(r'<a href="latents/(\d+)\.html">', run.stdout)]
    assert sorted(listed) == sorted(latents)  # the script ran and rendered every row
    latent = latents[1]
    run = chromium(tmp_path, f"{index.as_uri()}?q={latent}", "--dump-dom")
    assert re.findall(r'<a href="latents/(\d+)\.html">', run.stdout) == [str(latent)]
    assert not js_errors(run)



def test_index_search_ranks_as_the_python_mirror_does(dashboard, tmp_path):
    import json

    from saelab.explore.ranking import rank

    _, _, index = dashboard
    rows = json.loads(index.read_text(encoding="utf-8").split('id="data">')[1].split("</script>")[0])
    plain = [{"latent": r[0], "terms": r[9], "total": r[10], "label": r[8], "promoted": r[5]} for r in rows if not r[7]]
    query = max((t for r in plain for t, _ in r["terms"] if t.strip().isalpha()), key=len)  # a word fired on
    run = chromium(tmp_path, f"{index.as_uri()}?q={query}", "--dump-dom")
    assert not js_errors(run)
    listed = [int(i) for i in re.findall(r'<a href="latents/(\d+)\.html">', run.stdout)]
    assert listed == rank(query, plain) and listed  # best match first, the neighbours' rows hidden by default


def test_screenshot_is_not_blank(dashboard, tmp_path):
    import numpy as np
    from PIL import Image

    _, latents, index = dashboard
    shot = tmp_path / "latent.png"
    run = chromium(tmp_path, (index.parent / "latents" / f"{latents[0]}.html").as_uri(), f"--screenshot={shot}")
    assert shot.exists(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=float)
    assert pixels.shape[:2] == (900, 1200)
    assert pixels.std() > 20  # text, shading and the histogram, not a blank page
    assert (pixels.sum(2) < 600).mean() > 0.02  # a fair share of painted (non-white) pixels
    assert not js_errors(run)
