"""iter_codes: sparse codes in text order equal the dense encoding, and each row knows its token and context."""

from functools import partial

import pytest
import torch

from helpers import make_sae
from saelab.activations import ActivationStore, ModelStream
from saelab.codes import encode_sparse, iter_codes, sparse_rows
from saelab.data import TextConfig
from saelab.errors import HookError

HOOK = "blocks.1.hook_resid_post"
TEXT = TextConfig(context_len=32)


make = partial(make_sae, k=5, hook_name=HOOK, threshold_range=(0.2, 0.2))
"""The SAEs of these tests: 64 -> 96 with random encoder biases; JumpReLU's thresholds all 0.2."""


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu", "batchtopk"])
def test_codes_equal_the_dense_encoding_in_cache_order(tiny_cache, arch):
    sae = make(arch, input_scale=0.37)
    reference_sae = sae.fold_input_scale()
    store = ActivationStore(tiny_cache, HOOK, batch_size=100, shuffle=False, drop_last=False)
    expected_rows = torch.cat([b.rows for b in store])
    chunks = list(iter_codes(sae, tiny_cache, batch_size=100, check_model=False))
    assert torch.equal(torch.cat([c.rows for c in chunks]), expected_rows)  # every row once, in order
    assert expected_rows.tolist() == list(range(store.n_tokens))
    for codes, batch in zip(chunks, store):
        dense = reference_sae.encode(batch.acts[HOOK])
        torch.testing.assert_close(codes.dense(), dense)
        torch.testing.assert_close(codes.csr().to_dense(), dense)
        assert codes.nnz == int((dense != 0).sum())
        # latents ascend within each row (a CSR invariant that sparse products rely on)
        rows = codes.row_ids()
        assert bool(((codes.latents.diff() > 0) | (rows.diff() != 0)).all())


def test_each_row_knows_its_token_and_context(tiny_cache, tiny_model):
    store = ActivationStore(tiny_cache, HOOK, shuffle=False, drop_last=False)
    codes = next(iter_codes(make("topk"), tiny_cache, batch_size=500, check_model=False))
    contexts = list(TEXT.contexts(tiny_model.tokenizer))
    for i in [0, 1, 30, 31, 250, 499]:
        context, position = int(codes.contexts[i]), int(codes.positions[i])
        assert contexts[context][position] == int(codes.token_ids[i])
        assert store.context(context).tolist() == contexts[context]
        located, where = store.locate(int(codes.rows[i]))
        assert located.tolist() == contexts[context] and where == position
    assert codes.positions[:2].tolist() == [1, 2] and codes.contexts[31].item() == 1  # BOS is not cached
    assert codes.texts(tiny_model.tokenizer)[3] == tiny_model.tokenizer.decode([int(codes.token_ids[3])])


def test_a_model_stream_gives_the_codes_of_the_cache(tiny_cache, tiny_model):
    sae = make("topk")
    stream = ModelStream(tiny_model, HOOK, TEXT, model_batch_size=4)
    from_stream = next(iter_codes(sae, stream, check_model=False))
    from_cache = next(iter_codes(sae, tiny_cache, batch_size=len(from_stream), check_model=False))
    assert torch.equal(from_stream.token_ids, from_cache.token_ids)
    assert torch.equal(from_stream.contexts, from_cache.contexts)
    torch.testing.assert_close(from_stream.dense(), from_cache.dense(), atol=1e-4, rtol=1e-4)


def test_the_caller_keeps_its_grad_mode_between_chunks(tiny_cache):
    chunks = iter_codes(make("topk"), tiny_cache, batch_size=64, check_model=False)
    next(chunks)
    assert torch.is_grad_enabled()  # an unfinished iterator must not leak no_grad into the caller
    assert not next(chunks).values.requires_grad


def test_max_tokens_and_sparse_rows(tiny_cache):
    chunks = list(iter_codes(make("relu"), tiny_cache, batch_size=64, max_tokens=150, check_model=False))
    assert [len(c) for c in chunks] == [64, 64, 22]
    dense = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 3.0]])
    crow, latents, values = sparse_rows(dense)
    assert crow.tolist() == [0, 1, 1, 3] and latents.tolist() == [1, 0, 2] and values.tolist() == [2.0, 1.0, 3.0]


def test_bad_sources_are_refused(tiny_cache):
    sae = make("topk")
    with pytest.raises(ValueError, match="trained on 'tiny' activations"):
        next(iter_codes(sae, tiny_cache))
    other = make("topk")
    other.cfg.hook_name = "blocks.5.hook_resid_post"
    with pytest.raises(HookError, match="holds blocks.0.hook_resid_post, blocks.1.hook_resid_post"):
        next(iter_codes(other, tiny_cache, check_model=False))
    narrow = make("topk", d_in=48, model_name="")  # no model named: the width is what is checked
    with pytest.raises(ValueError, match="d_in=48 but blocks.1.hook_resid_post has width 64"):
        next(iter_codes(narrow, tiny_cache))
    shuffled = next(iter_codes(sae, ActivationStore(tiny_cache, HOOK, batch_size=4096), check_model=False))
    assert torch.equal(shuffled.rows, next(iter_codes(sae, tiny_cache, check_model=False)).rows)  # read in order anyway
    with pytest.raises(ValueError, match="fold_input_scale"):
        encode_sparse(make("topk", input_scale=2.0), torch.zeros(2, 64))
