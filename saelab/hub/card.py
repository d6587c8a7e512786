"""The model card (README.md) of a Hub repo of saelab SAEs: YAML front matter, a metrics table, plots, a snippet."""
from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from saelab.eval import MASSIVE
from saelab.sae import SAEConfig, available_architectures, sae_class

# saelab's offline model names -> their Hub ids (the card's base_model)
BASE_MODELS = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gemma-3-270m": "google/gemma-3-270m",
}
TAGS = ["sparse-autoencoder", "saelab", "mechanistic-interpretability", "interpretability", "sae"]

# (column title, metric keys accepted, format)
METRIC_COLUMNS = [
    ("FVU (all)", ("fvu",), ".4f"),
    ("FVU (typical)", ("fvu_typical",), ".4f"),
    ("Explained var.", ("explained_variance", "frac_variance_explained"), ".4f"),
    ("MSE", ("mse",), ".4g"),
    ("L0", ("l0",), ".1f"),
    ("Dead", ("frac_dead", "dead_frac"), ".2%"),
    ("CE loss recovered", ("ce_loss_recovered", "ce_loss_score"), ".4f"),
    ("KL", ("kl", "kl_sae", "kl_div"), ".4g"),
]


@dataclass
class CardEntry:
    """One SAE of the repo: where it lives, what it is, how it scored."""

    subfolder: str
    cfg: SAEConfig
    metrics: dict[str, Any] = field(default_factory=dict)
    density_plot: str | None = None
    """Path of a density plot, relative to the repo root."""
    folded_input_scale: float = 1.0


def base_model_of(model_name: str) -> str | None:
    """The Hub id of the language model, when known (a saelab offline name, or a name that is already a Hub id)."""
    if model_name in BASE_MODELS:
        return BASE_MODELS[model_name]
    if model_name.count("/") == 1 and " " not in model_name:
        return model_name
    return None


def flat_metrics(metrics: dict[str, Any] | None) -> dict[str, float]:
    """Scalar metrics from a metrics.json: top-level numbers, then numbers one level down (saelab.eval nests them
    under 'reconstruction' and 'spliced'); anything else is ignored."""
    out: dict[str, float] = {}
    if not isinstance(metrics, dict):
        return out

    def take(d: dict[str, Any]):
        for key, value in d.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in out:
                if math.isfinite(float(value)):
                    out[key] = float(value)

    take(metrics)
    for value in metrics.values():
        if isinstance(value, dict):
            take(value)
    return out


def _text(value: Any) -> str:
    """Text from a config or a file name as Markdown that shows exactly that text: a hook name such as
    `<script>...` must not become HTML, a link, a table cell or a line of the card."""
    text = html.escape(" ".join(str(value).split()), quote=False)
    return re.sub(r"([\\`|\[\]])", r"\\\1", text)


def _code(value: Any) -> str:
    """`_text` in code style (HTML's <code>: inside Markdown's backticks an escaped `&lt;` would show as is)."""
    return f"<code>{_text(value)}</code>"


def _literal(value: Any) -> str:
    """A Python string literal of `value` for the card's code snippets: on one line (no name can end the code block)
    and with no raw '<', '>' or '&' (the card holds no tag but its own)."""
    return json.dumps(str(value)).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _metric(metrics: dict[str, float], keys: tuple[str, ...], fmt: str) -> str:
    for key in keys:
        if key in metrics:
            return format(metrics[key], fmt)
    return "–"


def front_matter(entries: list[CardEntry], license: str | None) -> dict[str, Any]:
    models = sorted({e.cfg.model_name for e in entries if e.cfg.model_name})
    bases = sorted({b for b in (base_model_of(m) for m in models) if b})
    archs = sorted({e.cfg.arch for e in entries})
    meta: dict[str, Any] = {"library_name": "saelab"}
    if bases:
        meta["base_model"] = bases[0] if len(bases) == 1 else bases
    meta["tags"] = TAGS + [a for a in archs if a not in TAGS]
    if license is None:
        license = "gemma" if any("gemma" in b.lower() for b in bases) else "apache-2.0"
    meta["license"] = license
    return meta


def build_model_card(entries: list[CardEntry], repo_id: str, *, license: str | None = None) -> str:
    """README.md text for a repo holding `entries` (one per SAE subfolder)."""
    import yaml

    if not entries:
        raise ValueError("a model card needs at least one SAE")
    meta = front_matter(entries, license)
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip("\n"), "---", ""]
    lines += _introduction(entries, meta)
    lines += _table(entries)
    plots = [e for e in entries if e.density_plot]
    if plots:
        lines += ["## Feature density", ""]
        for e in plots:
            lines += [f"![Feature density of {_text(e.subfolder)}]({quote(e.density_plot)})", ""]
    lines += _loading(entries, repo_id)
    return "\n".join(lines)


def _introduction(entries: list[CardEntry], meta: dict[str, Any]) -> list[str]:
    models = sorted({e.cfg.model_name for e in entries if e.cfg.model_name})
    hooks = sorted({e.cfg.hook_name for e in entries if e.cfg.hook_name})
    model_text = ", ".join(_code(m) for m in models) or "a language model"
    if meta.get("base_model"):
        bases = meta["base_model"] if isinstance(meta["base_model"], list) else [meta["base_model"]]
        model_text += " (" + ", ".join(f"[{_text(b)}](https://huggingface.co/{quote(b)})" for b in bases) + ")"
    n = len(entries)
    return [
        f"# Sparse autoencoders for {', '.join(_text(m) for m in models) or 'a language model'}",
        "",
        f"{n} sparse autoencoder{'s (SAEs)' if n != 1 else ' (SAE)'} trained with "
        f"saelab on the activations of {model_text}"
        + (f" at {', '.join(_code(h) for h in hooks)}" if hooks else "") + ". "
        "Each SAE decomposes an activation vector into a sparse combination of learned feature directions "
        "(rows of `W_dec`), for mechanistic interpretability.",
        "",
        "Each subfolder holds one SAE in SAELens's layout (`cfg.json`, `sae_weights.safetensors`, and "
        "`sparsity.safetensors` with log10 feature densities when available). The weights read **raw** activations: "
        "any input normalisation used in training is folded in, so no scaling is needed at load time.",
        "",
        "## SAEs and evaluation",
        "",
    ]


def _table(entries: list[CardEntry]) -> list[str]:
    header = ["Subfolder", "Hook", "Arch", "Width", "k"] + [title for title, _, _ in METRIC_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|"]
    for e in entries:
        m = flat_metrics(e.metrics)
        row = [_code(e.subfolder), _code(e.cfg.hook_name) if e.cfg.hook_name else "–",
               _text(e.cfg.arch), str(e.cfg.width), str(e.cfg.k) if e.cfg.k is not None else "–"]
        row += [_metric(m, keys, fmt) for _, keys, fmt in METRIC_COLUMNS]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if not any(flat_metrics(e.metrics) for e in entries):
        return lines + ["No evaluation metrics were provided with these SAEs.", ""]
    return lines + ["FVU (all): fraction of variance unexplained over every evaluated token; FVU (typical): the same "
                    f"over the tokens whose activation norm is at most {MASSIVE:g}x the median, leaving out the few "
                    "massive-activation tokens that can hold most of the variance; L0: mean active latents per token; "
                    "Dead: latents that "
                    "never fired in evaluation; CE loss recovered: 1 = the spliced-in SAE is as good as the clean "
                    "model, 0 = as bad as zero-ablation; KL: KL(clean || spliced) in nats. – : not measured.", ""]


def _loading(entries: list[CardEntry], repo_id: str) -> list[str]:
    first = entries[0].subfolder
    lines = [
        "## Loading",
        "",
        "With saelab:",
        "",
        "```python",
        "from saelab.sae import SAE",
        "",
        f"sae = SAE.from_pretrained({_literal(repo_id)}, subfolder={_literal(first)})",
        "codes = sae.encode(x)          # x: raw activations [..., d_in]",
        "x_hat = sae.decode(codes)",
        "```",
        "",
        "With SAELens:",
        "",
        "```python",
        "from sae_lens import SAE",
        "",
        f"sae = SAE.from_pretrained({_literal(repo_id)}, {_literal(first)})",
        "```",
        "",
    ]
    if any(not sae_class(e.cfg.arch).per_token for e in entries):  # SAELens names only its training SAEs so
        batchwise = [a for a in available_architectures() if not sae_class(a).per_token]
        lines += [f"Note: the {' / '.join(batchwise)} SAEs here are stored as is (their codes depend on the batch); "
                  "SAELens has no such inference SAE, use saelab to load them.", ""]
    return lines
