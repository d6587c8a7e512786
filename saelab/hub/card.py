"""The model card (README.md) of a Hub repo of saelab SAEs: YAML front matter, a metrics table, plots, a snippet."""
from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from saelab.evals.core import DEAD_TOKENS_PER_LATENT, MASSIVE, dead_share_note
from saelab.models import OFFLINE_MODELS
from saelab.sae import SAEConfig, available_architectures, sae_class

# saelab's offline model names -> their Hub ids (the card's base_model)
BASE_MODELS = {name: model.hub_id for name, model in OFFLINE_MODELS.items() if model.hub_id}
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
    evals: dict[str, dict] = field(default_factory=dict)
    """`saelab evals` records in SAEBench's layout ({eval_type_id: record}), uploaded in <subfolder>/evals/."""
    run: dict[str, Any] = field(default_factory=dict)
    """The SAELens run keys of its cfg.json (model, dataset_path, context_size, ...): what the card says it was
    trained on."""


def base_model_of(model_name: str) -> str | None:
    """The Hub id of the language model, when known (a saelab offline name, or a name that is already a Hub id)."""
    if model_name in BASE_MODELS:
        return BASE_MODELS[model_name]
    if model_name.count("/") == 1 and " " not in model_name:
        return model_name
    return None


def flat_metrics(metrics: dict[str, Any] | None) -> dict[str, float]:
    """Scalar metrics from a metrics.json: top-level numbers, then numbers one level down (saelab.evals.core nests them
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
    lines += _provenance(entries)
    lines += _evals(entries)
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
    unmeasured = [e.subfolder for e in entries if _dead_unmeasured(e)]
    for e in entries:
        m = flat_metrics(e.metrics)
        if e.subfolder in unmeasured:  # "never fired" over too few tokens is no dead share
            m = {key: value for key, value in m.items() if key not in ("frac_dead", "dead_frac")}
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
                    "model, 0 = as bad as zero-ablation; KL: KL(clean || spliced) in nats. – : not measured.", ""
                    ] + ([f"Dead is not measured (–) on an evaluation of fewer than {DEAD_TOKENS_PER_LATENT} x width "
                          "tokens: too few to tell a rare latent from a dead one.", ""] if unmeasured else [])


def _evals(entries: list[CardEntry]) -> list[str]:
    """## Evals: every metric `saelab evals` gave an interval, per SAE, as `estimate [low, high]`."""
    from saelab.evals.saebench import read_intervals

    rows = [(e.subfolder, f"{eval_id}: {name}", str(interval)) for e in entries
            for eval_id, record in sorted(e.evals.items()) for name, interval in read_intervals(record).items()]
    if not rows:
        return []
    lines = ["## Evals", "", "| Subfolder | Metric | Estimate [95% interval] |", "|---|---|---|"]
    lines += [f"| {_code(subfolder)} | {_text(metric)} | {value} |" for subfolder, metric, value in rows]
    return lines + ["", "Computed by `saelab evals`; each record is in `<subfolder>/evals/<eval>.json` in SAEBench's "
                    "output layout, its intervals under `eval_result_unstructured.saelab.intervals` (bootstrap over "
                    "independent units: contexts, words or test examples).", ""]


def _dead_unmeasured(entry: CardEntry) -> bool:
    """Whether the entry's dead share comes from too few tokens to mean anything (saelab.evals.core.dead_share_note)."""
    m = flat_metrics(entry.metrics)
    n = m.get("n_tokens")
    has_dead = "frac_dead" in m or "dead_frac" in m
    return has_dead and n is not None and dead_share_note(int(n), entry.cfg.width) is not None


def _provenance(entries: list[CardEntry]) -> list[str]:
    """## Model and data: the model (and its quantisation), the training text, its token count and context length,
    and the evaluation's text and size; SAEs that share all of them share one list."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for e in entries:
        groups.setdefault(tuple(_provenance_lines(e)), []).append(e.subfolder)
    lines = ["## Model and data", ""]
    for facts, subfolders in groups.items():
        if len(groups) > 1:
            lines += [", ".join(_code(s) for s in subfolders) + ":", ""]
        lines += [f"- {fact}" for fact in facts] + [""]
    return lines


def _provenance_lines(e: CardEntry) -> list[str]:
    run = e.run
    model = _code(e.cfg.model_name) if e.cfg.model_name else "not recorded"
    base = base_model_of(e.cfg.model_name) if e.cfg.model_name else None
    if base and base != e.cfg.model_name:
        model += f": [{_text(base)}](https://huggingface.co/{quote(base)})"
    if run.get("model_weights"):
        model += f", weights {_text(run['model_weights'])}"
    if run.get("model_class_name"):
        model += f", run as a TransformerLens {_text(run['model_class_name'])}"
    training = (f"{e.cfg.training_tokens:,} tokens" if e.cfg.training_tokens else "tokens not recorded")
    if run.get("dataset_path"):
        training += f" of {_text_source(run.get('dataset_path'), run.get('dataset_description'))}"
        if run.get("context_size"):
            bos = ", BOS prepended" if run.get("prepend_bos", True) else ", no BOS"
            if list(run.get("seqpos_slice") or []) == [1, None]:
                bos += " (its position left out)"
            training += f", contexts of {run['context_size']:,} tokens{bos}"
        if run.get("activation_cache_tokens"):
            training += f", read from an activation cache of {run['activation_cache_tokens']:,} tokens"
    else:
        training += " (the text is not recorded)"
    evaluation = _evaluation_text(e.metrics, run.get("dataset_path"))
    return [f"**Model**: {model}", f"**Training**: {training}", f"**Evaluation**: {evaluation}"]


def _text_source(source: Any, description: Any = None) -> str:
    return _code(source) + (f" ({_text(description)})" if description else "")


def _evaluation_text(metrics: dict[str, Any], training_text: Any) -> str:
    """The evaluation's size and text, from metrics.json (its n_tokens and settings)."""
    if not metrics:
        return "none provided"
    settings = metrics.get("settings") if isinstance(metrics.get("settings"), dict) else {}
    n = metrics.get("n_tokens")
    said = f"{n:,} tokens" if isinstance(n, int) and n else "spliced metrics only"
    text = settings.get("text")
    if isinstance(text, dict) and text.get("source"):
        said += f" of {_text_source(text['source'])}"
        if text.get("start"):
            held_out = " (held out: after the contexts training read)" if text["source"] == training_text else ""
            said += f" from context {text['start']:,} on{held_out}"
        if text.get("context_len"):
            said += f", contexts of {text['context_len']:,} tokens"
    elif settings.get("activations"):
        said += f" of the activation cache {_code(settings['activations'])}"
    return said


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
