"""SAEConfig validation and serialisation, the registry, input checks, bf16 inference."""
import json

import pytest
import torch

from saelab.sae import SAEConfig, available_architectures, create_sae, create_training, register, SAE, sae_class

K_ARCHS = {a for a in available_architectures() if sae_class(a).takes_k}


def cfg_for(arch, **kw):
    base = dict(arch=arch, d_in=6, width=16, k=3 if arch in K_ARCHS else None)
    base.update(kw)
    return SAEConfig(**base)


def test_all_architectures_registered():
    assert set(available_architectures()) >= {"relu", "topk", "batchtopk", "jumprelu", "matryoshka"}


@pytest.mark.parametrize("field,value", [
    ("width", 0), ("width", -3), ("d_in", 0), ("k", 0), ("k", 17), ("k", 2.5), ("l1_coefficient", -1.0),
    ("l0_coefficient", -0.1), ("auxk_coefficient", -1), ("input_scale", 0.0), ("input_scale", float("nan")),
    ("jumprelu_bandwidth", 0.0), ("dtype", "float8"), ("sparsity_warmup_steps", -1), ("threshold_decay", 1.0),
    ("k_aux", 0), ("group_sizes", [8, 4]), ("group_sizes", [16, 0]), ("arch", ""),
])
def test_config_validation_names_field_and_value(field, value):
    kw = dict(arch="topk", d_in=6, width=16, k=3)
    if field in SAEConfig.common_keys():
        kw[field] = value
    else:  # an option: given to an architecture that reads it
        kw["arch"] = next(a for a in available_architectures() if field in sae_class(a).options_cls.names())
        kw["options"] = {field: value}
    with pytest.raises(ValueError) as err:
        SAEConfig(**kw)
    assert field in str(err.value) and repr(value) in str(err.value)


def test_options_belong_to_their_architecture():
    relu = SAEConfig(arch="relu", d_in=6, width=16, options={"l1_coefficient": 0.5})
    assert relu.options == sae_class("relu").options_cls(l1_coefficient=0.5)
    assert SAEConfig(arch="relu", d_in=6, width=16, options=relu.options) == relu
    with pytest.raises(ValueError, match="no setting 'l1_coefficient'"):
        SAEConfig(arch="topk", d_in=6, width=16, k=3, options={"l1_coefficient": 0.5})
    with pytest.raises(ValueError, match="must be a TopKOptions"):
        SAEConfig(arch="topk", d_in=6, width=16, k=3, options=relu.options)
    # cfg.json stays flat, and one written when every config held every architecture's settings still loads
    flat = relu.to_dict()
    assert flat["l1_coefficient"] == 0.5 and "options" not in flat and "auxk_coefficient" not in flat
    assert SAEConfig.from_dict({**flat, "auxk_coefficient": 1 / 32, "group_sizes": None}) == relu


def test_k_required_for_topk_family():
    for arch in K_ARCHS:
        with pytest.raises(ValueError, match="k is required"):
            create_sae(SAEConfig(arch=arch, d_in=6, width=16))


@pytest.mark.parametrize("arch", available_architectures())
def test_registry_round_trip(arch):
    cfg = cfg_for(arch, model_name="smollm2-135m", hook_name="blocks.3.hook_resid_post", input_scale=0.7,
                  training_tokens=12345)
    sae = create_sae(cfg)
    d = json.loads(json.dumps(sae.cfg.to_dict()))  # JSON-safe
    cfg2 = SAEConfig.from_dict(d)
    assert cfg2 == sae.cfg
    sae2 = create_sae(d)
    assert type(sae2) is type(sae)
    shapes = {k: v.shape for k, v in sae.state_dict().items()}
    assert shapes == {k: v.shape for k, v in sae2.state_dict().items()}
    sae2.load_state_dict(sae.state_dict())
    x = torch.randn(4, 6)
    torch.testing.assert_close(sae2(x), sae(x))
    assert type(create_training(sae)).__name__.endswith("Training")


def test_from_dict_rejects_unknown_keys():
    d = cfg_for("topk").to_dict()
    d["widht"] = 3
    with pytest.raises(ValueError, match="widht"):
        SAEConfig.from_dict(d)


def test_unknown_architecture_lists_known_ones():
    with pytest.raises(ValueError) as err:
        create_sae(SAEConfig(arch="gated2", d_in=6, width=16))
    msg = str(err.value)
    assert "gated2" in msg and "topk" in msg and "jumprelu" in msg


def test_register_refuses_a_second_class_under_a_taken_name():
    with pytest.raises(ValueError, match="already registered"):
        @register("topk")
        class Other(SAE):
            pass


def test_input_shape_errors_speak_plainly():
    sae = create_sae(SAEConfig(arch="topk", d_in=576, width=32, k=4, hook_name="blocks.3.hook_resid_post"))
    with pytest.raises(ValueError, match="SAE expects d_in=576 .* but got input with last dim 640"):
        sae.encode(torch.randn(2, 640))
    with pytest.raises(ValueError, match="width=32"):
        sae.decode(torch.randn(2, 31))
    with pytest.raises(ValueError, match="d_in=576"):
        create_training(sae).loss(torch.randn(2, 640))


@pytest.mark.parametrize("arch", available_architectures())
def test_bf16_inference_matches_fp32(arch):
    # orthonormal decoder and inputs built from exactly k latents each: a selection with no near-ties
    torch.manual_seed(0)
    d_in, width, k, n = 64, 32, 4, 20
    cfg = cfg_for(arch, d_in=d_in, width=width, k=k if arch in K_ARCHS else None)
    sae = create_sae(cfg)
    q, _ = torch.linalg.qr(torch.randn(d_in, width))
    with torch.no_grad():
        sae.W_dec.copy_(q.T)
        sae.W_enc.copy_(q)
        sae.b_dec.copy_(torch.randn(d_in))
    codes = torch.zeros(n, width)
    for row in codes:
        row[torch.randperm(width)[:k]] = 1 + torch.rand(k)
    x = codes @ q.T + sae.b_dec.detach()
    half = create_sae(SAEConfig.from_dict({**sae.cfg.to_dict(), "dtype": "bfloat16"}))
    half.load_state_dict(sae.state_dict())  # copies and casts
    assert half.W_enc.dtype == torch.bfloat16
    torch.testing.assert_close(sae(x), x, atol=1e-5, rtol=1e-5)
    y_half = half(x)  # fp32 input is cast to the parameter dtype
    assert y_half.dtype == torch.bfloat16
    assert (y_half.float() - x).norm() / x.norm() < 1e-2
    assert (half.encode(x).float() - codes).abs().max() < 0.1



def test_a_new_architecture_is_its_own_file(tmp_path):
    """Adding an architecture is its own file (and its tests): dropped into saelab/sae/ of a copy of the package, a
    file registers itself, with no import line anywhere else, and the registry, configs and CLI flags know it."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "kernels", tmp_path / "kernels")
    shutil.copytree(root / "saelab", tmp_path / "saelab", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "saelab" / "sae" / "toy.py").write_text(
        "from .registry import register\nfrom .topk import TopKSAE\n\n\n"
        "@register(\"toy\")\nclass ToySAE(TopKSAE):\n    \"\"\"A TopK SAE under another name.\"\"\"\n")
    code = ("import saelab, saelab.sae as s; assert saelab.__file__.startswith(%r), saelab.__file__; "
            "sae = s.create_sae(s.SAEConfig(arch='toy', d_in=4, width=8, k=2)); "
            "print(type(sae).__name__, s.available_architectures())" % str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ToySAE") and "'toy'" in out.stdout
