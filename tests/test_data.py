import json
from itertools import islice

import pytest
from transformers import AutoTokenizer

from saelab import data
from saelab.data import TextConfig, iter_documents, pack_contexts, shared_data, shuffled, text_source, token_batches
from saelab.errors import DataError


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_default_text_is_real_prose_available_offline():
    documents = list(iter_documents(None))
    assert len(documents) > 50
    assert sum(map(len, documents)) > 300_000
    assert any("assignment statement" in d.lower() for d in documents)
    assert documents == list(iter_documents("default"))


def test_text_file_folder_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first file\n\nsecond paragraph\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"body": "row one"}) + "\n\n" + json.dumps({"body": "row two"}) + "\n")
    assert list(iter_documents(tmp_path / "a.txt")) == ["first file\n\nsecond paragraph\n"]
    assert list(iter_documents(tmp_path / "sub" / "b.jsonl", field="body")) == ["row one", "row two"]
    (tmp_path / "sub" / "b.jsonl").rename(tmp_path / "sub" / "b.txt.jsonl")
    assert list(iter_documents(tmp_path, field="body")) == ["first file\n\nsecond paragraph\n", "row one", "row two"]


def test_large_text_file_is_cut_at_blank_lines(tmp_path, monkeypatch):
    import saelab.data

    monkeypatch.setattr(saelab.data, "CHUNK_CHARS", 20)
    text = "".join(f"paragraph number {i}\n\n" for i in range(10))
    path = tmp_path / "big.txt"
    path.write_text(text)
    documents = list(iter_documents(path))
    assert len(documents) > 1 and "".join(documents) == text
    assert all(d.endswith("\n\n") for d in documents[:-1])


def test_bad_sources_say_what_is_wrong(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list(iter_documents(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="does not exist"):
        list(iter_documents("./nowhere"))
    for mistyped in ("missing file.txt", "data/wiki/test", "notes.txt", "corpus.csv"):  # no dataset is named so
        with pytest.raises(DataError, match=f"text source '{mistyped}' does not exist"):
            list(iter_documents(mistyped))
    assert text_source("someone/corpus") == "someone/corpus" and text_source("wikitext") == "wikitext"  # Hub ids
    assert text_source(str(tmp_path)) == tmp_path and text_source(None) == text_source("default") == "default"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"other": 1}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2 has no field 'text' \(it has: other\)"):
        list(iter_documents(bad))
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match="bad.jsonl:1 is not valid JSON"):
        list(iter_documents(bad))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no text files"):
        list(iter_documents(tmp_path / "empty"))


def test_packing_joins_documents_with_separator_and_prepends_bos(tokenizer):
    documents = ["alpha beta gamma delta", "epsilon zeta eta theta iota kappa", "lambda mu"]
    stream = []
    for d in documents:
        stream += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    contexts = list(pack_contexts(documents, tokenizer, 8, prepend_bos=True))
    assert all(len(c) == 8 and c[0] == tokenizer.bos_token_id for c in contexts)
    body = [t for c in contexts for t in c[1:]]
    assert body == stream[: len(body)] and len(stream) - len(body) < 7  # only the final partial context is dropped
    plain = list(pack_contexts(documents, tokenizer, 8, prepend_bos=False))
    assert [t for c in plain for t in c] == stream[: 8 * len(plain)]


def test_unpacked_contexts_are_truncated_documents_and_padding_is_masked(tokenizer):
    contexts = list(pack_contexts(["a b c d e f g h i j k", "short"], tokenizer, 6, pack=False))
    assert len(contexts[0]) == 6 and len(contexts[1]) < 6
    batch = next(token_batches(contexts, 4, 6, pad_id=tokenizer.pad_token_id, drop_bos=True))
    n_short = len(contexts[1])
    assert batch.tokens.shape == (2, 6)
    assert batch.tokens[1, n_short:].eq(tokenizer.pad_token_id).all()
    assert batch.mask.sum(1).tolist() == [5, n_short - 1]
    assert not batch.mask[:, 0].any()


def test_packing_is_deterministic_and_seeded_shuffle_is_a_permutation(tokenizer):
    config = TextConfig(context_len=16)
    first = list(config.contexts(tokenizer))
    assert first == list(config.contexts(tokenizer))
    shuffled_a = list(TextConfig(context_len=16, seed=3, shuffle_window=64).contexts(tokenizer))
    shuffled_b = list(TextConfig(context_len=16, seed=3, shuffle_window=64).contexts(tokenizer))
    shuffled_c = list(TextConfig(context_len=16, seed=4, shuffle_window=64).contexts(tokenizer))
    assert shuffled_a == shuffled_b != shuffled_c
    assert sorted(map(tuple, shuffled_a)) == sorted(map(tuple, first))
    # windows bound how far an item moves
    assert sorted(map(tuple, shuffled_a[:64])) == sorted(map(tuple, first[:64]))
    items = list(shuffled(range(100), 10, seed=0))
    assert items != list(range(100))
    assert all(sorted(items[i : i + 10]) == list(range(i, i + 10)) for i in range(0, 100, 10))


def test_context_len_and_bos_validation(tokenizer):
    with pytest.raises(DataError, match="at least 2"):
        list(pack_contexts(["x"], tokenizer, 1))


def test_held_out_text_starts_after_the_used_contexts(tokenizer):
    config = TextConfig(context_len=16)
    everything = list(islice(config.contexts(tokenizer), 30))
    assert list(islice(config.after(10).contexts(tokenizer), 20)) == everything[10:30]
    assert config.after(10).after(5).start == 15
    assert config.after(10).fingerprint() != config.fingerprint()


def test_a_manifests_text_fingerprint_gives_back_the_text(tokenizer, tmp_path):
    """`saelab train --acts` reads held-out text from the cache's manifest: a file's fingerprint carries its hash."""
    path = tmp_path / "notes.txt"
    path.write_text("The cat sat on the mat. " * 200)
    config = TextConfig(source=str(path), context_len=16, seed=3)
    fingerprint = config.fingerprint()
    assert "sha256" in fingerprint
    again = TextConfig.from_fingerprint(fingerprint)
    assert again.fingerprint() == fingerprint
    assert list(islice(again.after(2).contexts(tokenizer), 5)) == list(islice(config.contexts(tokenizer), 2, 7))


def test_hub_dataset_source_streams_rows_and_checks_the_field(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": "first row"}, {"text": "second row"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert list(iter_documents("someone/corpus", split="validation")) == ["first row", "second row"]
    assert calls == [("someone/corpus", None, "validation", True)]
    with pytest.raises(DataError, match="has no field 'body' \\(it has: text\\)"):
        list(iter_documents("someone/corpus", field="body"))

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="neither a local path nor a loadable Hub dataset"):
        list(iter_documents("someone/corpus"))


def test_shared_data_is_the_environment_variable_else_beside_the_checkout(tmp_path, monkeypatch):
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text("text")
    monkeypatch.setenv("SAELAB_DATA", str(tmp_path))
    assert shared_data("wikitext-2-raw/wiki.test.raw") == tmp_path / "wikitext-2-raw" / "wiki.test.raw"
    assert shared_data() == tmp_path
    monkeypatch.delenv("SAELAB_DATA")
    checkout = tmp_path / "checkout"
    (checkout / "saelab").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("")
    (tmp_path / "shared" / "data" / "tinyshakespeare").mkdir(parents=True)
    monkeypatch.setattr(data, "CHECKOUT", checkout)
    assert shared_data("tinyshakespeare") == tmp_path / "shared" / "data" / "tinyshakespeare"


def test_shared_data_outside_a_checkout_asks_for_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("SAELAB_DATA", raising=False)
    monkeypatch.setattr(data, "CHECKOUT", tmp_path / "site-packages")  # no pyproject.toml: an installed saelab
    with pytest.raises(DataError, match="not a source checkout.*set SAELAB_DATA"):
        shared_data("wikitext-2-raw/wiki.test.raw")
    monkeypatch.setenv("SAELAB_DATA", str(tmp_path))
    with pytest.raises(DataError, match=r"wiki\.test\.raw is missing from the shared data \(SAELAB_DATA="):
        shared_data("wikitext-2-raw/wiki.test.raw")
