"""Save, load, import and publish SAEs.

    save_sae(sae, "runs/sae-topk", densities=freqs, metrics=result)   # cfg.json + sae_weights.safetensors (+ ...)
    sae = load_sae("runs/sae-topk")                                   # saelab, SAELens, sparsify or Gemma Scope
    sae = from_pretrained("me/smollm2-135m-saes", subfolder="blocks.15.hook_resid_post")
    push_to_hub([sae_a, sae_b], "me/smollm2-135m-saes", dry_run="out/")   # writes the tree, uploads nothing
    export_saelens_transcoder(tc, "out/tc")  /  export_circuit_tracer([tc_0, tc_1], "out/plt")   # transcoders

The saelab folder is SAELens's layout, so SAELens users can load saelab SAEs; see docs/hub-format.md. Importing
this package also gives every SAE its save / load / from_pretrained / push_to_hub methods (`methods`).
"""
from . import methods  # noqa: F401  (attaches the SAE methods)
from .card import BASE_MODELS, CardEntry, build_model_card
from .circuit_tracer import export_circuit_tracer, load_circuit_tracer
from .common import HubError
from .folder import FORMATS, detect_format, load_sae, read_metrics, save_sae
from .gemmascope import load_gemmascope
from .pretrained import download, from_pretrained
from .push import push_to_hub
from .saelens import load_saelens, read_log_densities, saelens_cfg
from .saelens_transcoder import export_saelens_transcoder, load_saelens_transcoder
from .sparsify import load_sparsify

__all__ = [
    "HubError", "save_sae", "load_sae", "detect_format", "read_metrics", "read_log_densities", "from_pretrained",
    "download", "push_to_hub", "build_model_card", "CardEntry", "BASE_MODELS", "FORMATS", "load_saelens",
    "load_sparsify", "load_gemmascope", "saelens_cfg", "export_saelens_transcoder", "load_saelens_transcoder",
    "export_circuit_tracer", "load_circuit_tracer",
]
