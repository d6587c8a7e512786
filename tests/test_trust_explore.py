"""Issue 21, exploring and the dashboard: a dashboard replaces only what a dashboard wrote, one writer at a time, and
non-Latin text reads as text."""

import json
import re

import pytest
import torch

from saelab.activations import cache_activations
from saelab.data import TextConfig
from saelab.errors import SaelabError
from saelab.explore import explore, most_active_on
from saelab.explore.features import FeatureSet
from saelab.files import FolderBusyError, FolderLock
from saelab.sae import SAEConfig, create_sae

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def cache(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("trust-explore-cache")
    cache_activations(tiny_model, HOOK, out, text=TextConfig(context_len=32), tokens=640, batch_size=4,
                      shard_tokens=256, progress=False)
    return out


@pytest.fixture(scope="module")
def sae(tiny_model):
    torch.manual_seed(1)
    return create_sae(SAEConfig(arch="topk", d_in=64, width=24, k=4, model_name=tiny_model.name, hook_name=HOOK))


@pytest.fixture(scope="module")
def features(sae, cache, tiny_model):
    return explore(sae, cache, tiny_model, top=3, sample=6)


def files_under(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_dashboard_replaces_only_what_a_dashboard_wrote(features, sae, cache, tiny_model_dir, tmp_path, capsys):
    from saelab.cli import main

    users = tmp_path / "site"
    (users / "latents").mkdir(parents=True)
    (users / "index.html").write_text("<h1>my own index</h1>")
    (users / "latents" / "7.html").write_text("<p>my notes on latent 7</p>")
    before = files_under(users)
    with pytest.raises(SaelabError, match=r"site holds index.html \(and 1 more\), which is not in the record of a saelab "
                                          "dashboard there"):
        features.dashboard(users, [1, 2])
    sae_dir = tmp_path / "sae"
    sae.save(sae_dir)
    assert main(["dashboard", str(sae_dir), "--acts", str(cache), "--model", str(tiny_model_dir), "--out",
                 str(users)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "index.html" in err and "--out" in err and "remove it" in err
    assert files_under(users) == before  # nothing overwritten, nothing deleted

    ours = tmp_path / "dash"
    features.dashboard(ours, [1, 2, 3])
    features.dashboard(ours, [2])  # a dashboard's own pages are replaced, the stale ones removed
    assert sorted(p.name for p in (ours / "latents").iterdir()) == ["2.html"]
    for intruder, named in (("latents/notes.txt", "latents/notes.txt"), ("extra/page.html", "extra")):
        (ours / intruder).parent.mkdir(exist_ok=True)  # a user's file in a dashboard's folder is kept
        (ours / intruder).write_text("mine")
        before = files_under(ours)
        with pytest.raises(SaelabError, match=f"holds {named},"):
            features.dashboard(ours, [1])
        assert files_under(ours) == before
        (ours / intruder).unlink()
    (ours / "extra").rmdir()
    (ours / "latents" / "2.html").unlink()
    (ours / "latents" / "2.html").symlink_to(users / "index.html")  # a page swapped for a link is not written through
    with pytest.raises(SaelabError, match="holds latents/2.html"):
        features.dashboard(ours, [2])
    assert (users / "index.html").read_text() == "<h1>my own index</h1>"


def test_an_interrupted_dashboard_is_finished_by_the_next_one(features, tmp_path, monkeypatch):
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
        features.dashboard(out, [0, 1, 2, 3, 4])
    monkeypatch.setattr(FeatureSet, "__getitem__", real)
    assert len(list((out / "latents").iterdir())) == 2
    features.dashboard(out, [5, 6])
    assert sorted(p.name for p in (out / "latents").iterdir()) == ["5.html", "6.html"]
    assert json.loads((out / ".saelab-dashboard.json").read_text())["files"] == ["index.html", "latents/5.html",
                                                                                   "latents/6.html"]


def test_a_second_dashboard_writer_is_refused_naming_the_first(features, tmp_path):
    out = tmp_path / "dash"
    with FolderLock(out, "dashboard"):  # flock: a second lock in this same process conflicts too
        with pytest.raises(FolderBusyError, match=r"another saelab process \(pid \d+\) is writing the dashboard"):
            features.dashboard(out, [1, 2])
        assert not (out / "latents").exists()
    features.dashboard(out, [1, 2])
    assert len(list((out / "latents").iterdir())) == 2


NON_LATIN = "Die Größe von 東京 und München, ünd Zürich. "


@pytest.fixture(scope="module")
def non_latin(tiny_model, tmp_path_factory):
    """Features over text whose characters the tiny model's byte-level tokenizer splits into several tokens."""
    folder = tmp_path_factory.mktemp("non-latin")
    (folder / "text.txt").write_text(NON_LATIN * 60, encoding="utf-8")
    cache_activations(tiny_model, HOOK, folder / "acts", text=TextConfig(source=str(folder / "text.txt"),
                      context_len=32), tokens=640, batch_size=4, shard_tokens=256, progress=False)
    torch.manual_seed(2)
    sae = create_sae(SAEConfig(arch="topk", d_in=64, width=24, k=6, model_name=tiny_model.name, hook_name=HOOK))
    return explore(sae, folder / "acts", tiny_model, top=8, sample=8, before=6, after=3)


def test_window_texts_decode_characters_split_across_tokens_whole(features, tiny_model):
    tokenizer = tiny_model.tokenizer
    ids = tokenizer("Größe 東京 ünd", add_special_tokens=False).input_ids
    alone = features.token_texts(ids)
    assert "\ufffd" in "".join(alone)  # the tokenizer does split these characters into bytes
    pieces = features.window_texts(ids)
    assert len(pieces) == len(ids) and "".join(pieces) == "Größe 東京 ünd"
    assert all(piece == text for piece, text in zip(pieces, alone) if "\ufffd" not in text)  # whole tokens keep theirs
    cut = ids[1:-1]  # a window may start or end inside a character: only there does "\ufffd" stay
    assert "".join(features.window_texts(cut)) == tokenizer.decode(cut)


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
