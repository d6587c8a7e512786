"""saelab.explore against brute-force references (the dense codes of the whole tiny cache, read in one batch); a
dashboard replaces only what a dashboard wrote, one writer at a time; non-Latin text reads as text."""

import json
import math
import re

import pytest
import torch

from helpers import make_sae
from saelab.activations import ActivationStore, ModelStream, cache_activations
from saelab.data import TextConfig
from saelab.errors import HookError, SaelabError
from saelab.explore import explore, fires_on, most_active_on
from saelab.explore.directions import logit_effects, nearest_latents, unembedding
from saelab.explore.features import FeatureSet
from saelab.files import FolderBusyError, FolderLock

HOOK = "blocks.1.hook_resid_post"
TEXT = TextConfig(context_len=32)
TOP, SAMPLE, BEFORE, AFTER = 6, 24, 5, 3


def spread_densities(sae, x):
    """Set the encoder biases so the latents fire on 80 % down to 0.3 % of the tokens x (all kinds of latents)."""
    with torch.no_grad():
        pre = (x * sae.cfg.input_scale) @ sae.W_enc
        levels = 1 - torch.logspace(math.log10(0.8), math.log10(0.003), sae.cfg.width)
        sae.b_enc.copy_(-torch.stack([pre[:, i].quantile(q) for i, q in enumerate(levels)]))


@pytest.fixture(scope="module")
def reference(tiny_cache, tiny_model):
    """Dense codes [tokens, width] of the whole cache in text order, and each row's context and token."""
    sae = make_sae("relu", width=48, seed=1, input_scale=0.5, model_name=tiny_model.name, hook_name=HOOK)
    (batch,) = ActivationStore(tiny_cache, HOOK, batch_size=10**6, shuffle=False, drop_last=False)
    spread_densities(sae, batch.acts[HOOK])
    with torch.no_grad():
        dense = sae.fold_input_scale().encode(batch.acts[HOOK])
    return sae, dense, batch


@pytest.fixture(scope="module")
def features(tiny_cache, tiny_model, reference):
    # small chunks, so examples merge across many chunks and windows cross chunk edges
    return explore(reference[0], tiny_cache, tiny_model, top=TOP, sample=SAMPLE, before=BEFORE, after=AFTER,
                   batch_size=97)


def window(batch, dense, row: int, latent: int) -> tuple[list[int], list[float]]:
    """Brute force: the tokens and activations around `row`, within its context."""
    rows = [r for r in range(row - BEFORE, row + AFTER + 1)
            if 0 <= r < len(dense) and batch.contexts[r] == batch.contexts[row]]
    return [int(batch.token_ids[r]) for r in rows], [float(dense[r, latent]) for r in rows]


def test_counts_density_mean_max_and_histogram(features, reference):
    _, dense, _ = reference
    stats = features.stats
    fired = dense > 0
    assert stats.n_tokens == len(dense)
    assert torch.equal(stats.count, fired.sum(0))
    torch.testing.assert_close(stats.max, dense.max(0).values)
    torch.testing.assert_close(stats.mean, (dense.sum(0) / fired.sum(0).clamp(min=1)).float())
    assert torch.equal(stats.hist.sum(1), stats.count)
    for latent in range(0, stats.width, 7):
        values = dense[fired[:, latent], latent]
        inner = torch.histogram(values.clamp(stats.edges[0], stats.edges[-1] * 0.999999), stats.edges).hist.long()
        assert torch.equal(stats.hist[latent], inner)


def test_top_contexts_are_the_top_activations_with_the_right_windows(features, reference, tiny_model):
    _, dense, batch = reference
    assert int((features.stats.count > TOP).sum()) > 10  # the test means something
    for latent in range(features.width):
        card = features[latent]
        expected = dense[:, latent].topk(min(TOP, int((dense[:, latent] > 0).sum())))
        assert [e.value for e in card.top] == pytest.approx(expected.values.tolist(), abs=1e-6)
        for example in card.top:  # (the text repeats itself, so equal activations at other rows may tie)
            row = int(((batch.contexts == example.context) & (batch.positions == example.position)).nonzero())
            assert float(dense[row, latent]) == pytest.approx(example.value, abs=1e-6)
            tokens, acts = window(batch, dense, row, latent)
            assert example.tokens == features.window_texts(tokens)  # decoded whole, as cards are
            assert example.acts == pytest.approx(acts, abs=1e-6)
            # the highlighted token is the one that fired, with the example's activation
            assert tokens[example.at] == int(batch.token_ids[row])
            assert example.acts[example.at] == pytest.approx(example.value)
            assert (example.context, example.position) == (int(batch.contexts[row]), int(batch.positions[row]))


def test_quantile_groups_are_true_quantiles(features, reference):
    _, dense, batch = reference
    counts = features.stats.count
    few = [i for i in range(features.width) if 5 * 2 <= counts[i] <= SAMPLE]  # all firings sampled: exact
    many = [i for i in range(features.width) if counts[i] > 3 * SAMPLE]
    assert few and many
    for latent in few:
        values = dense[dense[:, latent] > 0, latent].sort().values
        m = len(values)
        groups = features[latent].quantiles[::-1]  # lowest first
        assert len(groups) == 5
        for j, group in enumerate(groups):
            part = values[j * m // 5 : (j + 1) * m // 5]
            assert (group.lo_q, group.hi_q) == (j / 5, (j + 1) / 5)
            assert group.lo == pytest.approx(float(part[0])) and group.hi == pytest.approx(float(part[-1]))
            assert all(group.lo - 1e-6 <= e.value <= group.hi + 1e-6 for e in group.examples)
    sample = features.stats.sample
    for latent in many:  # a sample of distinct real firings, with their own windows
        rows = sample.row[latent][sample.filled[latent]]
        assert len(rows) == SAMPLE and len(set(rows.tolist())) == SAMPLE
        torch.testing.assert_close(sample.value[latent][sample.filled[latent]], dense[rows, latent])
        for group in features[latent].quantiles:
            for example in group.examples:
                row = int(((batch.contexts == example.context) & (batch.positions == example.position)).nonzero())
                assert example.acts == pytest.approx(window(batch, dense, row, latent)[1], abs=1e-6)


def test_the_sample_is_uniform_over_firings():
    """Keeping the n largest random priorities per latent samples each firing equally often, whatever the chunking."""
    from saelab.explore.examples import ExampleTable

    generator = torch.Generator().manual_seed(0)
    firings, n, trials = 40, 10, 200
    hits = torch.zeros(2, firings)
    for _ in range(trials):
        table = ExampleTable(2, n, 0, 0)
        latents = torch.tensor([0, 1] * firings)
        rows = torch.arange(2 * firings)
        for chunk in rows.split(13):
            table.offer(latents[chunk], torch.rand(len(chunk), generator=generator), torch.ones(len(chunk)),
                        rows[chunk], rows[chunk], rows[chunk])
        for latent in (0, 1):
            hits[latent, table.row[latent] // 2] += 1
    p = n / firings
    assert hits.sum().item() == 2 * trials * n
    assert (hits - trials * p).abs().max() < 5 * (trials * p * (1 - p)) ** 0.5  # 5 binomial sd


def test_logit_effects_and_nearest_latents_match_brute_force(features, reference, tiny_model):
    sae = reference[0]
    norm = tiny_model.bridge.original_model.model.norm
    saved = norm.weight.detach().clone()
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, len(saved)))
    try:
        W_U = unembedding(tiny_model)
        gain = torch.linspace(0.5, 2.0, len(saved)) / (1 + norm.variance_epsilon) ** 0.5
        torch.testing.assert_close(W_U, tiny_model.bridge.W_U.detach() * gain[:, None])
    finally:
        with torch.no_grad():
            norm.weight.copy_(saved)
    W_U = unembedding(tiny_model)
    logits = sae.W_dec.detach() @ W_U
    up_v, up_i, down_v, down_i = logit_effects(sae.W_dec.detach(), W_U, 5, chunk=7)
    torch.testing.assert_close(up_v, logits.topk(5, dim=1).values)
    torch.testing.assert_close(down_v, -(-logits).topk(5, dim=1).values)
    card = features[3]
    assert [t for t, _ in card.promoted[:5]] == features.token_texts(logits[3].topk(5).indices.tolist())
    W = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)
    cosine = (W @ W.T).fill_diagonal_(-2)
    values, latents = nearest_latents(sae.W_dec.detach(), 4, chunk=5)
    torch.testing.assert_close(values, cosine.topk(4, dim=1).values)
    assert card.nearest[0][0] == int(cosine[3].argmax())


def test_a_model_stream_gives_the_same_features(tiny_cache, tiny_model, reference, features):
    stream = ModelStream(tiny_model, HOOK, TEXT, model_batch_size=8)
    live = explore(reference[0], stream, tiny_model, top=TOP, sample=SAMPLE, before=BEFORE, after=AFTER,
                   max_tokens=features.stats.n_tokens)
    assert live.stats.n_tokens == features.stats.n_tokens
    torch.testing.assert_close(live.stats.max, features.stats.max, atol=1e-3, rtol=1e-3)
    latent = int(features.stats.count.argmax())
    assert live[latent].top[0].tokens == features[latent].top[0].tokens


def test_search_finds_the_latents_that_fire_on_a_word(features, reference, tiny_model):
    _, dense, batch = reference
    texts = features.token_texts(batch.token_ids.tolist())
    word = max({t.strip() for t in texts if len(t.strip()) > 3}, key=lambda w: sum(t.strip() == w for t in texts))
    # brute force: for each firing, decode its whole context and ask whether an occurrence of the word covers it
    contexts = {}
    for row in range(len(dense)):
        contexts.setdefault(int(batch.contexts[row]), []).append(row)
    on_word = torch.zeros(len(dense), dtype=torch.bool)
    for rows in contexts.values():
        pieces = [texts[r] for r in rows]
        text, starts = "".join(pieces).lower(), [sum(map(len, pieces[:i])) for i in range(len(pieces))]
        spans = [(m.start(), m.end()) for m in re.finditer(re.escape(word.lower()), text)]
        for r, start, piece in zip(rows, starts, pieces):
            on_word[r] = any(s < start + len(piece) and e > start for s, e in spans)
    fired = dense > 0
    share = (fired & on_word[:, None]).sum(0) / fired.sum(0).clamp(min=1)
    result = features.search(word, n=features.width)
    exact = [i for i in range(features.width) if 0 < features.stats.count[i] <= SAMPLE]
    for latent, row_share in zip(result.latents, (row[1] for row in result.rows)):
        if latent in exact:
            assert row_share == pytest.approx(float(share[latent]), abs=1e-3)
    best = [i for i in exact if share[i] > 0]
    assert set(best) <= set(result.latents)
    assert str(result).startswith(f"latents firing on {word!r}")


def test_most_active_and_fires_on_a_text_follow_the_model(tiny_model, reference):
    sae = reference[0]
    text = "The function returns the value of the expression."
    table = most_active_on(tiny_model, sae, text, n=5)
    tokens = tiny_model.tokenize([text])
    acts = tiny_model.activations(tokens.ids, [HOOK])[HOOK][0, 1:]  # another path to the activations; no BOS
    codes = sae.fold_input_scale().encode(acts)
    peak = codes.max(0).values
    assert table.latents == peak.topk(5).indices.tolist()
    assert [row[1] for row in table.rows] == pytest.approx(peak.topk(5).values.tolist(), abs=1e-5)
    hits = fires_on(tiny_model, sae, "function", [text, "a function of two arguments"], n=3)
    latent = hits.latents[0]
    ids = tokens.ids[0, 1:].tolist()
    inside = [i for i, piece in enumerate(tiny_model.tokenizer.batch_decode([[t] for t in ids])) if piece.strip()
              and piece.strip() in "function"]
    assert codes[inside, latent].max() > 0 and hits.rows[0][1] > hits.rows[0][3]
    with pytest.raises(ValueError, match="does not contain"):
        fires_on(tiny_model, sae, "zebra", [text])


def test_dashboard_is_offline_and_shows_the_latents_contexts(features, tmp_path):
    latents = features.most_active(5)
    index = features.dashboard(tmp_path / "dash", latents + [0])
    pages = sorted((tmp_path / "dash" / "latents").glob("*.html"))
    neighbours = {int(j) for i in latents + [0] for j in features.nearest[1][i]}
    assert {int(p.stem) for p in pages} == set(latents) | {0} | neighbours  # every neighbour link leads somewhere
    external = re.compile(r"""(?:src|href|action)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?(?:https?:)?//|@import""",
                          re.I)
    for page in [index, *pages]:
        text = page.read_text()
        assert not external.search(text), page
        assert "<script src" not in text and "<link" not in text
    card = features[latents[0]]
    html = (tmp_path / "dash" / "latents" / f"{latents[0]}.html").read_text()
    assert html.count('class="tok s') + html.count('class="tok hit') >= 1
    assert html.count(" hit\"") == len(card.top) + sum(len(g.examples) for g in card.quantiles)
    from saelab.explore.html import esc, shown

    assert esc(shown("".join(card.top[0].tokens[card.top[0].at :]))) in re.sub(r"<[^>]+>", "", html)
    assert f"[{latents[0]}," in index.read_text()
    # a second export of fewer latents leaves no stale pages behind
    features.dashboard(tmp_path / "dash", [latents[0]], neighbours=False)
    assert [p.stem for p in (tmp_path / "dash" / "latents").glob("*.html")] == [str(latents[0])]
    assert not external.search(features[latents[0]]._repr_html_())
    assert features.browse(latents[:3])._repr_html_().count("<details>") == 3


def test_plots_write_files(features, tmp_path):
    from saelab.explore import plot_densities

    assert features[features.most_active(1)[0]].plot(tmp_path / "f.png").stat().st_size > 1000
    assert plot_densities(features, tmp_path / "d.png").stat().st_size > 1000


def test_bad_input_gives_clear_errors(features, tiny_cache, tiny_model, reference):
    with pytest.raises(IndexError, match="latent 48 is out of range: this SAE has 48 latents"):
        features[48]
    with pytest.raises(IndexError, match="out of range"):
        features[-1]
    with pytest.raises(TypeError):
        features["3"]
    with pytest.raises(ValueError, match="d_in=32"):
        explore(make_sae("relu", d_in=32, width=48, model_name=tiny_model.name, hook_name=HOOK), tiny_cache,
                tokenizer=tiny_model.tokenizer)
    wrong_model = make_sae("relu", width=48, model_name=tiny_model.name, hook_name=HOOK)
    wrong_model.cfg.model_name = "gemma-3-270m"
    with pytest.raises(ValueError, match="gemma-3-270m"):
        explore(wrong_model, tiny_cache, tiny_model)
    wrong_hook = make_sae("relu", width=48, model_name=tiny_model.name, hook_name=HOOK)
    wrong_hook.cfg.hook_name = "blocks.0.hook_mlp_out"  # a hook of the model that the cache does not hold
    with pytest.raises(HookError, match="blocks.0.hook_mlp_out"):
        explore(wrong_hook, tiny_cache, tiny_model)
    with pytest.raises(ValueError, match="needs the model"):
        explore(reference[0], tiny_cache)

    class SmallTokenizer:
        def __len__(self):
            return 10

    with pytest.raises(ValueError, match="another model's tokenizer"):
        explore(reference[0], tiny_cache, tokenizer=SmallTokenizer())
    with pytest.raises(ValueError, match="no latents"):
        features.dashboard("unused", [])


def features_of(dashboard) -> list[list]:
    """The rows a dashboard's index embeds."""
    index = (dashboard / "index.html").read_text(encoding="utf-8")
    return json.loads(index.split('id="data">')[1].split("</script>")[0])


def test_cli_dashboard(tiny_cache, tiny_model, tiny_model_dir, reference, tmp_path, capsys):
    from saelab.cli import main

    sae_dir = tmp_path / "sae"
    reference[0].save(sae_dir)
    code = main(["dashboard", str(sae_dir), "--acts", str(tiny_cache), "--model", str(tiny_model_dir), "--out",
                 str(tmp_path / "dash"), "--most-active", "4", "--top", "5"])
    assert code == 0
    assert "index.html" in capsys.readouterr().out
    pages = {int(p.stem) for p in (tmp_path / "dash" / "latents").glob("*.html")}
    shown = features_of(tmp_path / "dash")
    assert len(pages) == len(shown) and sum(not row[7] for row in shown) == 4  # and their neighbours, marked
    assert main(["dashboard", str(sae_dir), "--acts", str(tiny_cache), "--model", str(tiny_model_dir), "--out",
                 str(tmp_path / "dash"), "--latents", "99"]) == 2
    assert "out of range" in capsys.readouterr().err


@pytest.fixture(scope="module")
def sae(tiny_model):
    return make_sae("topk", width=24, k=4, seed=1, bias_std=0, model_name=tiny_model.name, hook_name=HOOK)


@pytest.fixture(scope="module")
def topk_features(sae, tiny_cache, tiny_model):
    return explore(sae, tiny_cache, tiny_model, top=3, sample=6)


def files_under(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_dashboard_replaces_only_what_a_dashboard_wrote(topk_features, sae, tiny_cache, tiny_model_dir, tmp_path, capsys):
    from saelab.cli import main

    users = tmp_path / "site"
    (users / "latents").mkdir(parents=True)
    (users / "index.html").write_text("<h1>my own index</h1>")
    (users / "latents" / "7.html").write_text("<p>my notes on latent 7</p>")
    before = files_under(users)
    with pytest.raises(SaelabError, match=r"site holds index.html \(and 1 more\), which is not in the record of a saelab "
                                          "dashboard there"):
        topk_features.dashboard(users, [1, 2])
    sae_dir = tmp_path / "sae"
    sae.save(sae_dir)
    assert main(["dashboard", str(sae_dir), "--acts", str(tiny_cache), "--model", str(tiny_model_dir), "--out",
                 str(users)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "index.html" in err and "--out" in err and "remove it" in err
    assert files_under(users) == before  # nothing overwritten, nothing deleted

    ours = tmp_path / "dash"
    topk_features.dashboard(ours, [1, 2, 3])
    topk_features.dashboard(ours, [2], neighbours=False)  # a dashboard's own pages are replaced, the stale ones removed
    assert sorted(p.name for p in (ours / "latents").iterdir()) == ["2.html"]
    for intruder, named in (("latents/notes.txt", "latents/notes.txt"), ("extra/page.html", "extra")):
        (ours / intruder).parent.mkdir(exist_ok=True)  # a user's file in a dashboard's folder is kept
        (ours / intruder).write_text("mine")
        before = files_under(ours)
        with pytest.raises(SaelabError, match=f"holds {named},"):
            topk_features.dashboard(ours, [1])
        assert files_under(ours) == before
        (ours / intruder).unlink()
    (ours / "extra").rmdir()
    (ours / "latents" / "2.html").unlink()
    (ours / "latents" / "2.html").symlink_to(users / "index.html")  # a page swapped for a link is not written through
    with pytest.raises(SaelabError, match="holds latents/2.html"):
        topk_features.dashboard(ours, [2])
    assert (users / "index.html").read_text() == "<h1>my own index</h1>"


def test_an_interrupted_dashboard_is_finished_by_the_next_one(topk_features, tmp_path, monkeypatch):
    """The record lists every page before it is written, so pages left by a crash are the next dashboard's to
    replace."""
    out = tmp_path / "dash"
    real, calls = FeatureSet.__getitem__, []

    def crash_on_the_third_page(self, latent):
        calls.append(latent)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, latent)

    monkeypatch.setattr(FeatureSet, "__getitem__", crash_on_the_third_page)
    with pytest.raises(KeyboardInterrupt):
        topk_features.dashboard(out, [0, 1, 2, 3, 4], neighbours=False)
    monkeypatch.setattr(FeatureSet, "__getitem__", real)
    assert len(list((out / "latents").iterdir())) == 2
    topk_features.dashboard(out, [5, 6], neighbours=False)
    assert sorted(p.name for p in (out / "latents").iterdir()) == ["5.html", "6.html"]
    assert json.loads((out / ".saelab-dashboard.json").read_text())["files"] == ["index.html", "latents/5.html",
                                                                                   "latents/6.html"]


def test_a_second_dashboard_writer_is_refused_naming_the_first(topk_features, tmp_path):
    out = tmp_path / "dash"
    with FolderLock(out, "dashboard"):  # flock: a second lock in this same process conflicts too
        with pytest.raises(FolderBusyError, match=r"another saelab process \(pid \d+\) is writing the dashboard"):
            topk_features.dashboard(out, [1, 2])
        assert not (out / "latents").exists()
    topk_features.dashboard(out, [1, 2], neighbours=False)
    assert len(list((out / "latents").iterdir())) == 2


NON_LATIN = "Die Größe von 東京 und München, ünd Zürich. "


@pytest.fixture(scope="module")
def non_latin(tiny_model, tmp_path_factory):
    """Features over text whose characters the tiny model's byte-level tokenizer splits into several tokens."""
    folder = tmp_path_factory.mktemp("non-latin")
    (folder / "text.txt").write_text(NON_LATIN * 60, encoding="utf-8")
    cache_activations(tiny_model, HOOK, folder / "acts", text=TextConfig(source=str(folder / "text.txt"),
                      context_len=32), tokens=640, batch_size=4, shard_tokens=256, progress=False)
    sae = make_sae("topk", width=24, k=6, seed=2, bias_std=0, model_name=tiny_model.name, hook_name=HOOK)
    return explore(sae, folder / "acts", tiny_model, top=8, sample=8, before=6, after=3)


def test_window_texts_decode_characters_split_across_tokens_whole(topk_features, tiny_model):
    tokenizer = tiny_model.tokenizer
    ids = tokenizer("Größe 東京 ünd", add_special_tokens=False).input_ids
    alone = topk_features.token_texts(ids)
    assert "\ufffd" in "".join(alone)  # the tokenizer does split these characters into bytes
    pieces = topk_features.window_texts(ids)
    assert len(pieces) == len(ids) and "".join(pieces) == "Größe 東京 ünd"
    assert all(piece == text for piece, text in zip(pieces, alone) if "\ufffd" not in text)  # whole tokens keep theirs
    cut = ids[1:-1]  # a window may start or end inside a character: only there does "\ufffd" stay
    assert "".join(topk_features.window_texts(cut)) == tokenizer.decode(cut)


def test_non_latin_text_reads_whole_in_cards_and_the_dashboard(non_latin, tiny_model, tmp_path):
    tokenizer = tiny_model.tokenizer
    stats, seen = non_latin.stats, ""
    for latent in range(non_latin.width):
        card = non_latin[latent]
        for example, slot in zip(card.top, range(stats.top.n)):
            ids = [t for t in stats.top.tokens[latent, slot].tolist() if t >= 0]
            text = "".join(example.tokens)
            assert text == tokenizer.decode(ids) and "\ufffd" not in text.strip("\ufffd")
            assert len(example.tokens) == len(example.acts) == len(ids)
            span = example.span_of(example.at)  # the firing token's character: "\ufffd" only where the context
            if "\ufffd" in example.firing_text:  # itself starts or ends inside it
                assert span.start == 0 or span.stop == len(ids)
            seen += text
        html = card.html()
        assert html.count(' hit"') == len(card.top) + sum(len(g.examples) for g in card.quantiles)
    assert "東京" in seen and "Größe" in seen and "ünd" in seen
    non_latin.dashboard(tmp_path / "dash")
    pages = "".join(p.read_text(encoding="utf-8") for p in (tmp_path / "dash" / "latents").iterdir())
    assert "東京" in re.sub(r"<[^>]+>", "", pages) and "Größe" in re.sub(r"<[^>]+>", "", pages)
    index = (tmp_path / "dash" / "index.html").read_text(encoding="utf-8")
    chips = json.loads(index.split('id="data">')[1].split("</script>")[0])
    assert any(char in token for row in chips for token in row[4] for char in "東京ößü")  # "fires on": whole


def test_search_finds_a_phrase_of_split_characters(non_latin, tiny_model):
    """Reference from token ids alone: a top example fires on 東京 when its firing token is one of the tokens of
    " 東京" (bar the space) and the whole run of those tokens is in its window."""
    phrase = tiny_model.tokenizer(" 東京", add_special_tokens=False).input_ids
    phrase = phrase[1:] if tiny_model.tokenizer.decode(phrase[:1]) == " " else phrase
    top = non_latin.stats.top
    expected = {}
    for latent in range(non_latin.width):
        for slot in range(top.n):
            ids = top.tokens[latent, slot].tolist()
            starts = [i for i in range(len(ids) - len(phrase) + 1) if ids[i : i + len(phrase)] == phrase]
            if top.row[latent, slot] >= 0 and any(s <= top.before < s + len(phrase) for s in starts):
                expected[latent] = expected.get(latent, 0) + 1
    assert expected  # the random SAE's top examples do fire inside 東京
    result = non_latin.search("東京", n=non_latin.width)
    found = {row[0]: int(row[2].split("/")[0]) for row in result.rows}
    assert {latent: hits for latent, hits in found.items() if hits} == expected


def test_most_active_on_names_the_characters_of_its_peak_tokens(sae, tiny_model):
    table = most_active_on(tiny_model, sae, "Größe 東京 ünd", n=sae.cfg.width)
    assert table.rows and all(row[2] and row[2] in "Größe 東京 ünd" for row in table.rows)


class MassiveSource:
    """64 tokens in 4 contexts of 16; the token at position 1 of three contexts is massive (1000 along dimension 0,
    nothing else), the rest are standard normal (norm about 2.8)."""

    hooks, d, batch_size = [HOOK], {HOOK: 8}, 16

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 8, generator=g)
        self.massive = torch.tensor([1, 17, 33])
        self.x[self.massive] = 0.0
        self.x[self.massive, 0] = 1000.0
        self.token_ids = torch.randint(4, 100, (64,), generator=g)

    def __iter__(self):
        from saelab.activations.store import ActivationBatch

        for rows in torch.arange(64).split(self.batch_size):
            yield ActivationBatch({HOOK: self.x[rows]}, self.token_ids[rows], rows, rows // 16, rows % 16)


def test_latents_that_fire_only_on_massive_tokens_are_flagged(tiny_model, tmp_path):
    from saelab.sae import SAEConfig, create_sae

    source = MassiveSource()
    sae = create_sae(SAEConfig(arch="relu", d_in=8, width=3, hook_name=HOOK))
    with torch.no_grad():  # 0: dimension 0 above 100 (the massive tokens only); 1: dimension 1 (typical tokens
        sae.W_enc.zero_()  # only); 2: dimension 0 (the massive tokens first, then typical ones)
        sae.W_enc[0, 0] = sae.W_enc[1, 1] = sae.W_enc[0, 2] = 1.0
        sae.b_enc.copy_(torch.tensor([-100.0, 0, 0]))
        sae.W_dec.copy_(torch.eye(3, 8))
    features = explore(sae, source, tokenizer=tiny_model.tokenizer, top=5, sample=4, before=2, after=1)
    stats = features.stats
    assert stats.massive_only.tolist() == [True, False, False]
    assert stats.massive_norm == pytest.approx(10 * float(source.x.norm(dim=-1).median()))
    assert sorted(e.position for e in features[0].top) == [1, 1, 1]
    assert [e.position for e in features[2].top[:3]] == [1, 1, 1] and len(features[2].top) == 5
    assert [features[i].massive_only for i in range(3)] == [True, False, False]
    assert "massive tokens only" in features[0]._repr_html_()
    assert "massive" not in features[1]._repr_html_() + features[2]._repr_html_()
    assert features.browse([0, 1])._repr_html_().count("massive tokens only") == 2  # the line and the card

    flagged = features.dashboard(tmp_path / "flagged").read_text()
    assert "<th>note</th>" in flagged and 'id="legend"' in flagged and ',"massive tokens only"]' in flagged
    assert "every top example is at a token whose activation norm is above 10&times; the median" in flagged
    stats.massive_only = None  # as a pass whose codes carry no norms: nothing flagged
    plain = features.dashboard(tmp_path / "plain").read_text()
    assert "<th>note</th>" not in plain and "legend\"" not in plain and "massive tokens only" not in plain
    page = lambda folder, i: (tmp_path / folder / "latents" / f"{i}.html").read_bytes()
    assert page("flagged", 1) == page("plain", 1) and page("flagged", 2) == page("plain", 2)
    assert page("flagged", 0) != page("plain", 0)
