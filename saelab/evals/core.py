"""Evaluate an SAE: reconstruction and sparsity over activations, and the language model's loss with the SAE spliced in.

    result = evaluate(sae, model=model, text=TextConfig(source="held_out.txt"), tokens=20_000, out="runs/sae/eval")
    result.reconstruction.fvu, result.spliced.ce_loss_recovered, result.metrics()   # flat {name: float}

Units. An SAE trained on x * cfg.input_scale is evaluated through `sae.fold_input_scale()`, on raw activations, so
MSE is in the model's own units; FVU, explained variance, cosine similarity and the norm ratio do not depend on it.

Definitions (N = evaluated token positions, x_hat = sae(x), active = code != 0):
    mse                 sum_t ||x_t - x_hat_t||^2 / N            (squared error summed over d, mean over tokens)
    fvu                 sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean(x)||^2      (a ratio of sums, not a mean of
                        per-token ratios; the denominator is sum ||x||^2 - N ||mean||^2 from running float64 sums)
    explained_variance  1 - fvu
    fvu_typical         the same ratio over the typical tokens only, with their own mean: tokens whose activation
                        norm is at most MASSIVE (10) x the median norm of the evaluated tokens. The few "massive
                        activation" tokens above it (attention sinks, norms of thousands where the median is ~170)
                        can hold most of the variance, so fvu alone mostly measures how well the SAE rebuilds them.
                        massive_tokens counts the tokens left out, massive_norm is the cutoff (raw units). None
                        when more than MAX_MASSIVE_ROWS tokens are massive (the rows needed are no longer kept).
    l0                  mean over tokens of the number of active latents
    frac_dead           fraction of latents active on no evaluated token
    frac_dense          fraction of latents active on more than `dense_threshold` (1 %) of evaluated tokens
    cos_sim             mean over tokens of cos(x_t, x_hat_t)
    l2_ratio            mean over tokens of ||x_hat_t|| / ||x_t||   (relative reconstruction norm; < 1 = shrinkage)

Spliced metrics (contexts of L tokens; position i predicts token i + 1, so every context gives L - 1 predictions,
the BOS token is never a target, and targets that are padding are skipped; means are over all predictions):
    ce_clean            cross-entropy of the unmodified model
    ce_sae              cross-entropy with the hook's activation replaced by sae(x)
    ce_zero / ce_mean   cross-entropy with the activation replaced by 0 / by the mean activation
    ce_loss_recovered   (ce_zero - ce_sae) / (ce_zero - ce_clean): 1 = as good as clean, 0 = as bad as ablation
    kl_sae / kl_zero    mean over predictions of KL(p_clean || p_spliced), in nats
With splice_bos=False (the default) a context's first position is left clean when it holds the BOS token: SAEs are
trained without it (ModelStream drops it) and its huge-norm "attention sink" activation would dominate the result.
The same positions are left clean by the ablations, so ce_loss_recovered compares like with like. The prediction
made at the BOS position (of token 1) is still counted; with BOS left clean it equals the clean one for every
variant, which shrinks all the CE gaps by the same factor (L - 2) / (L - 1) and leaves ce_loss_recovered unchanged.
ce_loss_recovered is not clipped: it exceeds 1 when the SAE beats the clean model, and is None when ce_zero == ce_clean.

A transcoder (cfg.target_hook) is evaluated on its target: x is read at cfg.hook_name, every reconstruction metric
compares tc(x) with the target (massive tokens judged by the target's norm), and the splice replaces the target by
tc(x) computed from the same forward's input (saelab.evals.transcoder); the ablations are of the target too.

Error bars (`run(sae, model, CoreConfig(...))`, result.intervals). Tokens of one context are not independent, so the
bootstrap resamples whole contexts: the pass keeps each context's sums (ReconstructionStats(keep_blocks=True): tokens,
squared error, ||x||^2, active latents, cosine, norm ratio and sum x; the losses: predictions, CE and KL sums), and
every resample recomputes each metric from its contexts' summed sums, a ratio of sums as the metric itself is
(saelab.evals.intervals.bootstrap_interval, percentile intervals; the estimate is the metric as reported).
Activations without their contexts (a tensor, a cache) are cut into blocks of BLOCK_ROWS consecutive tokens instead.
fvu_typical keeps the massive cutoff of all the tokens in every resample. frac_dead and frac_dense get no interval.

SAEBench's core record (`result.saebench(sae)`, names in SAEBENCH_METRICS) differs from SAEBench's own numbers in
three ways: explained_variance is 1 - fvu, one ratio of sums over all tokens (SAEBench averages per-token or
per-batch ratios); mse is the mean over tokens of ||x - x_hat||^2 summed over d (SAEBench's core code scales it
otherwise); and the BOS position is left clean unless splice_bos, where SAEBench replaces it too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.activations.source import open_source
from saelab.activations.store import ActivationBatch
from saelab.data import TextConfig, token_batches
from saelab.errors import DataError, HookError
from saelab.evals.intervals import LEVEL, RESAMPLES, Interval, bootstrap_interval
from saelab.evals.transcoder import paired_tensors, resolve_target, splice_patches
from saelab.files import check_schema_version, without_local_paths
from saelab.interventions import Replace, Tokens, plan_batches
from saelab.threads import one_thread
from saelab.version import __version__

if TYPE_CHECKING:
    from saelab.models import LanguageModel
    from saelab.sae import SAE

SCHEMA_VERSION = 1
METRICS_FILE = "metrics.json"
DENSITY_PLOT_FILE = "feature_density.png"
FIRING_COUNTS_FILE = "firing_counts.safetensors"
DENSE_THRESHOLD = 0.01
DEAD_TOKENS_PER_LATENT = 10
"""A dead share is measured on at least this many tokens per latent: then a live latent that fires on only one token
in `width` (far rarer than a k-sparse SAE's mean, k in width) goes unseen with probability e^-10 < 1e-4, so the
latents counted dead never fire at that rate. On fewer tokens, "never fired" says more about the sample."""
DENSITY_BIN_EDGES = [round(-8 + 0.1 * i, 1) for i in range(81)]
"""Fixed log10-frequency bins (1e-8 .. 1), so histograms of different runs line up; lower values go in the first bin."""
EVAL_TOKENS = 20_000
"""Held-out tokens an evaluation reads unless told otherwise."""
CHUNK_TOKENS = 1024
"""Token positions encoded at once: bounds the dense [chunk, width] codes whatever the batch size."""
MASSIVE = 10.0
"""A token is "massive" when its activation norm exceeds this many times the median norm of the evaluated tokens
(the rule docs/quality.md and scripts/reference_train.py use); fvu_typical leaves such tokens out."""
MAX_MASSIVE_ROWS = 4096
"""Largest-norm rows ReconstructionStats keeps (x, error) to take the massive tokens back out of its sums."""
EVAL_TYPE_ID = "core"
"""SAEBench's id for this eval."""
SAEBENCH_METRICS = {
    "kl_div_score": "model_behavior_preservation.kl_div_score",
    "kl_zero": "model_behavior_preservation.kl_div_with_ablation",
    "kl_sae": "model_behavior_preservation.kl_div_with_sae",
    "ce_loss_recovered": "model_performance_preservation.ce_loss_score",
    "ce_zero": "model_performance_preservation.ce_loss_with_ablation",
    "ce_sae": "model_performance_preservation.ce_loss_with_sae",
    "ce_clean": "model_performance_preservation.ce_loss_without_sae",
    "explained_variance": "reconstruction_quality.explained_variance",
    "mse": "reconstruction_quality.mse",
    "cos_sim": "reconstruction_quality.cossim",
    "l2_ratio": "shrinkage.l2_ratio",
    "l0": "sparsity.l0",
    "n_predictions": "token_stats.total_tokens_eval_reconstruction",
    "n_tokens": "token_stats.total_tokens_eval_sparsity_variance",
    "frac_alive": "misc_metrics.frac_alive",
    "frac_dense": "misc_metrics.freq_over_1_percent",
}
"""saelab's metric -> SAEBench's "category.metric" in its core record. SAEBench's l1, l2_norm_in, l2_norm_out,
relative_reconstruction_bias, freq_over_10_percent, normalized_freq_over_*_percent and
average_max_{encoder,decoder}_cosine_sim are not measured and are left out of the record."""
BLOCK_ROWS = 128
"""Tokens per bootstrap block when the activations come without their contexts (a tensor, a cache): about one
context's worth, consecutive, so a block keeps most of one context's tokens together."""
BLOCK_COLUMNS = ("tokens", "sq_err", "sq_x", "active", "cos", "l2_ratio")
"""The sums ReconstructionStats keeps per block (token count, sum ||x - x_hat||^2, sum ||x||^2, active latents,
cosine, norm ratio); sum x, d_in columns, follows them."""
BLOCK_X = len(BLOCK_COLUMNS)


# ---------------------------------------------------------------------------------------------------- records
@dataclass
class SAESummary:
    """What was evaluated."""

    arch: str
    d_in: int
    width: int
    k: int | None
    hook_name: str
    model_name: str
    input_scale: float
    dtype: str
    target_hook: str | None = None
    """A transcoder's target (what the reconstruction metrics and the splice are of); None for an SAE, and then
    absent from metrics.json."""

    @classmethod
    def of(cls, sae: SAE, hook: str | None = None) -> "SAESummary":
        cfg = sae.cfg
        return cls(arch=cfg.arch, d_in=cfg.d_in, width=cfg.width, k=cfg.k, hook_name=hook or cfg.hook_name,
                   model_name=cfg.model_name, input_scale=float(cfg.input_scale), dtype=cfg.dtype,
                   target_hook=cfg.target_hook)


@dataclass
class ReconstructionMetrics:
    """Reconstruction and sparsity over N token positions (definitions in the module docstring)."""

    n_tokens: int
    mse: float
    fvu: float
    explained_variance: float
    l0: float
    frac_dead: float
    frac_dense: float
    cos_sim: float
    l2_ratio: float
    n_dead: int
    n_dense: int
    mean_sq_norm: float
    """sum_t ||x_t||^2 / N, for putting mse in context."""
    fvu_typical: float | None = None
    """FVU over the tokens whose norm is at most MASSIVE x the median norm (None: not measured)."""
    massive_tokens: int | None = None
    """Tokens left out of fvu_typical (norm above massive_norm)."""
    massive_norm: float | None = None
    """The cutoff: MASSIVE x the median activation norm of the evaluated tokens (in the units of x)."""


@dataclass
class SplicedMetrics:
    """The language model's next-token loss with the SAE (or an ablation) substituted at the hook."""

    n_contexts: int
    n_predictions: int
    ce_clean: float
    ce_sae: float
    ce_zero: float
    ce_loss_recovered: float | None
    """None when ce_zero == ce_clean (the hook does not matter to the loss)."""
    kl_sae: float
    kl_zero: float
    ce_mean: float | None = None
    ce_loss_recovered_mean: float | None = None
    """(ce_mean - ce_sae) / (ce_mean - ce_clean), when mean ablation was run."""
    kl_mean: float | None = None
    splice_bos: bool = False


@dataclass
class FeatureDensity:
    """Histogram of log10(firing frequency) over the live latents; dead latents (frequency 0) are counted apart."""

    bin_edges: list[float]
    counts: list[int]
    n_dead: int
    n_latents: int
    n_tokens: int
    dense_threshold: float = DENSE_THRESHOLD


@dataclass
class EvalResult:
    """Everything one evaluation produced; `save(folder)` writes metrics.json (+ the density plot and counts)."""

    sae: SAESummary
    n_tokens: int
    """Token positions behind the reconstruction metrics (0 when only spliced metrics ran)."""
    reconstruction: ReconstructionMetrics | None = None
    spliced: SplicedMetrics | None = None
    density: FeatureDensity | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    """How the evaluation was run: token budget, text fingerprint, splice_bos, ..."""
    l0_target: dict[str, Any] | None = None
    """Set by training: the L0 the SAE was asked for and where it landed, in training and here
    (saelab.training.landing); left out of metrics.json when None."""
    firing_counts: list[int] | None = None
    """Per-latent count of tokens it was active on. Kept out of metrics.json (it has `width` entries);
    save() writes it to firing_counts.safetensors and load() reads it back."""
    intervals: dict[str, Interval] = field(default_factory=dict)
    """Bootstrap intervals by metric name (fvu, l0, ce_loss_recovered, kl_sae, ..., and kl_div_score, SAEBench's
    normalised KL), set by run(); left out of metrics.json when empty."""
    schema_version: int = SCHEMA_VERSION
    saelab_version: str = __version__

    def metrics(self) -> dict[str, float]:
        """Flat {name: float} of every scalar metric (for loggers and tables); None values are left out."""
        flat: dict[str, float] = {}
        for record in (self.reconstruction, self.spliced):
            for name, value in (dataclasses.asdict(record) if record is not None else {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    flat[name] = float(value)
        return flat

    def table(self) -> str:
        """Markdown: every metric, with its bootstrap interval where run() measured one."""
        lines = ["| metric | value | interval |", "|---|---|---|"]
        for name, value in self.metrics().items():
            interval = self.intervals.get(name)
            where = f"[{interval.low:.4g}, {interval.high:.4g}]" if interval is not None else ""
            lines.append(f"| {name} | {value:.4g} | {where} |")
        if "kl_div_score" in self.intervals:
            score = self.intervals["kl_div_score"]
            lines.append(f"| kl_div_score | {score.estimate:.4g} | [{score.low:.4g}, {score.high:.4g}] |")
        return "\n".join(lines)

    def notes(self) -> dict[str, str]:
        """Metrics that the evaluation's token count is too small for, each with why ({} when none)."""
        if self.reconstruction is None:
            return {}
        note = dead_share_note(self.n_tokens, self.sae.width)
        return {"frac_dead": note} if note else {}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("firing_counts")
        if d["sae"].get("target_hook") is None:
            d["sae"].pop("target_hook", None)
        if d["l0_target"] is None:
            d.pop("l0_target")
        if not d["intervals"]:
            d.pop("intervals")
        head = {"schema_version": d.pop("schema_version"), "saelab_version": d.pop("saelab_version")}
        notes = {"notes": self.notes()} if self.notes() else {}  # derived: from_dict leaves it out
        return _json_safe({**head, **d, **notes})

    def to_json(self, indent: int | None = 2) -> str:
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        # keep lists of numbers (the histogram) on one line each
        return re.sub(r"\[\s+([-+0-9.eE,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvalResult":
        check_schema_version(d, SCHEMA_VERSION, "metrics")
        sub = {"sae": SAESummary, "reconstruction": ReconstructionMetrics, "spliced": SplicedMetrics,
               "density": FeatureDensity}
        kwargs = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}}
        for key, record in sub.items():
            if kwargs.get(key) is not None:
                kwargs[key] = record(**kwargs[key])
        if kwargs.get("intervals"):
            kwargs["intervals"] = {name: _interval(fields) for name, fields in kwargs["intervals"].items()}
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> "EvalResult":
        return cls.from_dict(json.loads(text))

    def save(self, folder: str | Path) -> Path:
        """Write metrics.json, feature_density.png and firing_counts.safetensors (the last two when available)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / METRICS_FILE).write_text(self.to_json() + "\n")
        if self.density is not None:
            plot_feature_density(self.density, folder / DENSITY_PLOT_FILE, title=_title(self.sae))
        if self.firing_counts is not None:
            from safetensors.torch import save_file

            save_file({"firing_counts": torch.tensor(self.firing_counts, dtype=torch.int64)},
                      str(folder / FIRING_COUNTS_FILE))
        return folder / METRICS_FILE

    @classmethod
    def load(cls, folder: str | Path) -> "EvalResult":
        folder = Path(folder)
        result = cls.from_json((folder / METRICS_FILE).read_text())
        if (folder / FIRING_COUNTS_FILE).exists():
            from safetensors.torch import load_file

            result.firing_counts = load_file(str(folder / FIRING_COUNTS_FILE))["firing_counts"].tolist()
        return result

    def saebench(self, sae: SAE) -> dict:
        """This evaluation as SAEBench's core record (saelab.evals.saebench.write_output writes it): the metrics
        saelab measures under SAEBench's names (SAEBENCH_METRICS), their intervals as "category.metric", and fvu,
        fvu_typical and their intervals, which SAEBench has no field for, in eval_result_unstructured."""
        from saelab.evals.saebench import saebench_output

        values = self._saebench_values()
        metrics: dict[str, dict[str, Any]] = {}
        for name, where in SAEBENCH_METRICS.items():
            if values.get(name) is not None:
                category, _, metric = where.partition(".")
                metrics.setdefault(category, {})[metric] = values[name]
        intervals = {SAEBENCH_METRICS[name]: interval for name, interval in self.intervals.items()
                     if name in SAEBENCH_METRICS and values.get(name) is not None}
        recon = self.reconstruction
        extra = {name: getattr(recon, name) if recon else None
                 for name in ("fvu", "fvu_typical", "massive_tokens", "massive_norm")}
        extra["fvu_intervals"] = {name: interval for name, interval in self.intervals.items()
                                  if name in ("fvu", "fvu_typical")}
        extra["bootstrap_unit"] = self.settings.get("bootstrap_unit")
        return saebench_output(EVAL_TYPE_ID, _saebench_config(self.settings), metrics, sae, intervals=intervals,
                               extra=extra)

    def _saebench_values(self) -> dict[str, Any]:
        """saelab's metrics plus the three SAEBench derives from them (frac_alive, kl_div_score, freq_over_1_percent
        when the dense threshold is SAEBench's 1 %), token counts as ints."""
        values: dict[str, Any] = self.metrics()
        if self.reconstruction is not None:
            values["frac_alive"] = 1 - self.reconstruction.frac_dead
            values["n_tokens"] = self.reconstruction.n_tokens
            if self.settings.get("dense_threshold", DENSE_THRESHOLD) != 0.01:
                values.pop("frac_dense")
        if self.spliced is not None:
            values["kl_div_score"] = kl_div_score(self.spliced.kl_sae, self.spliced.kl_zero)
            values["n_predictions"] = self.spliced.n_predictions
        return values


def dead_share_note(n_tokens: int, width: int) -> str | None:
    """Why a dead share over `n_tokens` tokens is no dead share (fewer than DEAD_TOKENS_PER_LATENT x width), or None."""
    needed = DEAD_TOKENS_PER_LATENT * width
    if n_tokens >= needed:
        return None
    return (f"not measured on fewer than {needed:,} tokens ({DEAD_TOKENS_PER_LATENT} x width {width:,}); "
            f"{n_tokens:,} evaluated")


def _interval(fields: dict[str, Any]) -> Interval:
    """An Interval back from JSON, where a NaN estimate or bound was written as null."""
    return Interval(**{k: math.nan if v is None and k in ("estimate", "low", "high") else v for k, v in fields.items()})


def _json_safe(value):
    """Non-finite floats become None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _title(summary: SAESummary) -> str:
    """The density plot's title; a model folder by its name only, as the plot is published with the SAE."""
    k = f" k={summary.k}" if summary.k is not None else ""
    where = " ".join(p for p in (without_local_paths(summary.model_name), summary.hook_name) if p)
    return f"{summary.arch} width={summary.width}{k}" + (f" · {where}" if where else "")


# ---------------------------------------------------------------------------------------------------- streaming sums
class ReconstructionStats:
    """Exact reconstruction/sparsity metrics from running sums: feed it chunks, never holds the tokens.

    `update(x, x_hat, codes)` takes [N, d_in], [N, d_in], [N, width] (any units, as long as x and x_hat agree).
    For fvu_typical it keeps every token's norm (8 bytes a token, for the median) and the x and squared error of
    the `max_massive_rows` largest-norm tokens, which are subtracted from the sums once the median is known.
    With keep_blocks it also keeps the sums per block of tokens (`blocks`), from which `intervals()` bootstraps
    the metrics over blocks: tokens of one context are not independent, so a resample draws whole contexts.
    """

    def __init__(self, d_in: int, width: int, dense_threshold: float = DENSE_THRESHOLD,
                 max_massive_rows: int = MAX_MASSIVE_ROWS, keep_blocks: bool = False):
        self.d_in, self.width, self.dense_threshold = d_in, width, dense_threshold
        self.max_massive_rows = max_massive_rows
        self.blocks = torch.zeros(0, BLOCK_X + d_in, dtype=torch.float64) if keep_blocks else None
        """Per-block sums for a bootstrap ([n_blocks, BLOCK_X + d_in], columns BLOCK_COLUMNS then sum x); None
        unless keep_blocks. A block is one context when update() is told each row's context, else BLOCK_ROWS rows."""
        self.n_blocks = 0
        self.block_unit: str | None = None
        self.norms: list[Tensor] = []
        self.largest = _LargestRows(max_massive_rows, d_in)
        self.n_tokens = 0
        self.sum_sq_err = 0.0
        self.sum_sq_x = 0.0
        self.sum_x = torch.zeros(d_in, dtype=torch.float64)
        self.sum_active = 0
        self.firing_counts = torch.zeros(width, dtype=torch.int64)
        self.sum_cos = 0.0
        self.sum_l2_ratio = 0.0

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, codes: Tensor, contexts: Tensor | None = None) -> None:
        """Add N rows. contexts: [N] each row's context number (0, 1, ... over the whole pass), making the blocks
        contexts; without it a block is BLOCK_ROWS consecutive rows."""
        x = x.reshape(-1, self.d_in).to("cpu", torch.float64)
        x_hat = x_hat.reshape(-1, self.d_in).to("cpu", torch.float64)
        active = codes.reshape(-1, self.width) != 0
        if len(x) == 0:
            return
        x_norm, x_hat_norm = x.norm(dim=-1), x_hat.norm(dim=-1)
        sq_err = (x - x_hat).pow(2).sum(-1)
        cos = F.cosine_similarity(x, x_hat, dim=-1, eps=1e-12)
        l2_ratio = x_hat_norm / x_norm.clamp_min(1e-12)
        block = self._block_ids(len(x), contexts)
        self.n_tokens += len(x)
        self.sum_sq_err += float(sq_err.sum())
        self.norms.append(x_norm)
        self.largest.offer(x, x_norm, sq_err, block)
        self.sum_sq_x += float(x_norm.pow(2).sum())
        self.sum_x += x.sum(0)
        active_per_row = active.sum(-1).cpu()
        self.sum_active += int(active_per_row.sum())
        self.firing_counts += active.sum(0).cpu()
        self.sum_cos += float(cos.sum())
        self.sum_l2_ratio += float(l2_ratio.sum())
        if self.blocks is not None:
            columns = (torch.ones_like(x_norm), sq_err, x_norm.pow(2), active_per_row.double(), cos, l2_ratio)
            self._add_to_blocks(block, torch.cat([torch.stack(columns, 1), x], 1))

    def _block_ids(self, n: int, contexts: Tensor | None) -> Tensor:
        """[n] the block of each new row: its context, or its place in the stream // BLOCK_ROWS."""
        unit = "context" if contexts is not None else f"{BLOCK_ROWS} consecutive tokens"
        if self.block_unit not in (None, unit):
            raise ValueError(f"a block here is one {self.block_unit}: pass contexts= to every update or to none")
        self.block_unit = unit
        if contexts is None:
            return torch.arange(self.n_tokens, self.n_tokens + n) // BLOCK_ROWS
        return contexts.reshape(-1).to("cpu", torch.int64)

    def _add_to_blocks(self, block: Tensor, rows: Tensor) -> None:
        needed = int(block.max()) + 1
        if needed > len(self.blocks):  # grown by doubling, so a long pass copies each block a few times at most
            grown = torch.zeros(max(needed, 2 * len(self.blocks)), self.blocks.shape[1], dtype=torch.float64)
            grown[: len(self.blocks)] = self.blocks
            self.blocks = grown
        self.blocks.index_add_(0, block, rows)
        self.n_blocks = max(self.n_blocks, needed)

    @property
    def mean(self) -> Tensor:
        """Mean activation [d_in] (float64) over the tokens seen."""
        return self.sum_x / max(self.n_tokens, 1)

    def metrics(self) -> ReconstructionMetrics:
        n = self.n_tokens
        if n == 0:
            raise DataError("no activations to evaluate: the input yielded 0 tokens")
        total_var = self.sum_sq_x - n * float(self.mean.pow(2).sum())
        fvu = self.sum_sq_err / total_var if total_var > 0 else float("nan")
        n_dead = int((self.firing_counts == 0).sum())
        n_dense = int((self.firing_counts.double() / n > self.dense_threshold).sum())
        return ReconstructionMetrics(
            n_tokens=n, mse=self.sum_sq_err / n, fvu=fvu, explained_variance=1 - fvu, l0=self.sum_active / n,
            frac_dead=n_dead / self.width, frac_dense=n_dense / self.width, cos_sim=self.sum_cos / n,
            l2_ratio=self.sum_l2_ratio / n, n_dead=n_dead, n_dense=n_dense, mean_sq_norm=self.sum_sq_x / n,
            **self._typical(),
        )

    def _massive(self) -> tuple[Tensor | None, float]:
        """Which of the largest rows kept are massive (None: more are than were kept), and the cutoff norm."""
        cutoff = MASSIVE * float(torch.cat(self.norms).median())
        massive = self.largest.norm > cutoff
        count = int(massive.sum())
        found_all = count < len(self.largest.norm) or count == self.n_tokens or len(self.largest.norm) < self.largest.n
        return (massive if found_all else None), cutoff

    def _typical(self) -> dict[str, Any]:
        """fvu_typical, massive_tokens and massive_norm: the sums with the massive tokens' share taken back out."""
        massive, cutoff = self._massive()
        if massive is None:  # more massive tokens than rows kept: the ones not kept cannot be taken out
            return {"fvu_typical": None, "massive_tokens": None, "massive_norm": cutoff}
        count = int(massive.sum())
        n = self.n_tokens - count
        sum_x = self.sum_x - self.largest.x[massive].sum(0)
        sum_sq_x = self.sum_sq_x - float(self.largest.norm[massive].pow(2).sum())
        sum_sq_err = self.sum_sq_err - float(self.largest.sq_err[massive].sum())
        variance = sum_sq_x - float(sum_x.pow(2).sum()) / n if n else 0.0
        fvu = sum_sq_err / variance if variance > 0 else float("nan")
        return {"fvu_typical": fvu, "massive_tokens": count, "massive_norm": cutoff}

    def density(self, bin_edges: list[float] | None = None) -> FeatureDensity:
        return feature_density(self.firing_counts, self.n_tokens, bin_edges, dense_threshold=self.dense_threshold)

    def block_sums(self, typical: bool = False) -> Tensor | None:
        """[n_blocks, BLOCK_X + d_in] float64: the sums of each block (columns BLOCK_COLUMNS, then sum x).
        typical: of the typical tokens only (the massive rows taken out of the tokens, sq_err, sq_x and x columns;
        the other columns are left as they are); None when fvu_typical is None."""
        if self.blocks is None:
            raise ValueError("these stats kept no blocks: make them with keep_blocks=True")
        blocks = self.blocks[: self.n_blocks]
        if not typical:
            return blocks
        massive, _ = self._massive()
        if massive is None:
            return None
        rows = torch.zeros(int(massive.sum()), blocks.shape[1], dtype=torch.float64)
        rows[:, BLOCK_COLUMNS.index("tokens")] = 1
        rows[:, BLOCK_COLUMNS.index("sq_err")] = self.largest.sq_err[massive]
        rows[:, BLOCK_COLUMNS.index("sq_x")] = self.largest.norm[massive].pow(2)
        rows[:, BLOCK_X:] = self.largest.x[massive]
        return blocks.index_add(0, self.largest.block[massive], rows, alpha=-1)

    def intervals(self, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> dict[str, Interval]:
        """Bootstrap intervals over the blocks for fvu, explained_variance, mse, l0, cos_sim, l2_ratio and
        fvu_typical (when measured): each resample recomputes the metric from its blocks' summed sums (a ratio of
        sums, as the metric itself is), and each interval's estimate is the metric as metrics() reports it."""
        blocks = self.block_sums()
        if self.n_blocks < 2:
            raise DataError(f"a bootstrap needs at least 2 blocks ({self.block_unit}); these sums hold "
                            f"{self.n_blocks}: evaluate on more tokens")
        reported = dataclasses.asdict(self.metrics())
        units = {"fvu": (blocks, block_fvu)}
        for name, column in PER_TOKEN_COLUMNS.items():
            units[name] = (blocks[:, [0, BLOCK_COLUMNS.index(column)]], _ratio_of_sums)
        if reported["fvu_typical"] is not None:
            units["fvu_typical"] = (self.block_sums(typical=True), block_fvu)
        with one_thread():
            found = {name: dataclasses.replace(bootstrap_interval(unit, statistic, resamples=resamples, level=level,
                                                                  seed=seed), estimate=float(reported[name]))
                     for name, (unit, statistic) in units.items()}
        fvu = found["fvu"]  # explained_variance = 1 - fvu on every resample: the same interval, mirrored
        found["explained_variance"] = dataclasses.replace(fvu, estimate=reported["explained_variance"],
                                                          low=1 - fvu.high, high=1 - fvu.low)
        return found


def block_fvu(blocks: Tensor) -> float:
    """FVU from the summed sums of some blocks: sum sq_err / (sum ||x||^2 - ||sum x||^2 / n), as metrics() has it."""
    total = blocks.sum(0)
    variance = float(total[BLOCK_COLUMNS.index("sq_x")] - total[BLOCK_X:].pow(2).sum() / total[0])
    return float(total[BLOCK_COLUMNS.index("sq_err")]) / variance if variance > 0 else math.nan


def _ratio_of_sums(units: Tensor) -> float:
    """sum of column 1 / sum of column 0: a per-token mean over the tokens of the blocks drawn."""
    total = units.sum(0)
    return float(total[1] / total[0])


PER_TOKEN_COLUMNS = {"mse": "sq_err", "l0": "active", "cos_sim": "cos", "l2_ratio": "l2_ratio"}
"""The metrics that are per-token means, and the block column each is the mean of."""


class _LargestRows:
    """The n rows of largest norm seen so far (x, norm, squared error, block), merged a chunk at a time."""

    def __init__(self, n: int, d_in: int):
        self.n = n
        self.x = torch.zeros(0, d_in, dtype=torch.float64)
        self.norm = torch.zeros(0, dtype=torch.float64)
        self.sq_err = torch.zeros(0, dtype=torch.float64)
        self.block = torch.zeros(0, dtype=torch.int64)

    def offer(self, x: Tensor, norm: Tensor, sq_err: Tensor, block: Tensor) -> None:
        if self.n <= 0:
            return
        best = norm.topk(min(self.n, len(norm))).indices  # only these can enter
        x, norm, sq_err, block = (torch.cat([mine, theirs[best]]) for mine, theirs in
                                  ((self.x, x), (self.norm, norm), (self.sq_err, sq_err), (self.block, block)))
        keep = norm.topk(min(self.n, len(norm))).indices
        self.x, self.norm, self.sq_err, self.block = x[keep], norm[keep], sq_err[keep], block[keep]


def feature_density(firing_counts: Tensor, n_tokens: int, bin_edges: list[float] | None = None, *,
                    dense_threshold: float = DENSE_THRESHOLD) -> FeatureDensity:
    """Histogram of log10(count / n_tokens) over latents with count > 0; values below the first edge go in bin 0."""
    edges = list(DENSITY_BIN_EDGES if bin_edges is None else bin_edges)
    counts = torch.as_tensor(firing_counts).to(torch.int64).flatten()
    if n_tokens <= 0:
        raise DataError("cannot build a feature density histogram from 0 tokens")
    live = counts[counts > 0].double() / n_tokens
    log_freq = live.log10().clamp(min=edges[0], max=edges[-1])
    hist = torch.histogram(log_freq, bins=torch.tensor(edges, dtype=torch.float64)).hist
    return FeatureDensity(bin_edges=edges, counts=[int(c) for c in hist.tolist()], n_dead=int((counts == 0).sum()),
                          n_latents=len(counts), n_tokens=int(n_tokens), dense_threshold=dense_threshold)


def plot_feature_density(density: FeatureDensity, path: str | Path, title: str = "") -> Path:
    """Save the histogram as a PNG (matplotlib's Agg canvas; the global pyplot backend is left alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    edges = density.bin_edges
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    ax.bar(edges[:-1], density.counts, width=widths, align="edge", color="#4c72b0", edgecolor="none")
    ax.axvline(math.log10(density.dense_threshold), color="#c44e52", linestyle="--", linewidth=1,
               label=f"dense (> {density.dense_threshold:g})")
    ax.axvline(math.log10(1 / density.n_tokens), color="grey", linestyle=":", linewidth=1, label="1 / tokens")
    live = [i for i, c in enumerate(density.counts) if c]
    lo = edges[live[0]] if live else math.log10(1 / density.n_tokens)
    ax.set_xlim(min(lo, math.log10(1 / density.n_tokens)) - 0.3, edges[-1] + 0.1)
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    dead = density.n_dead / max(density.n_latents, 1)
    ax.set_title((title + "\n" if title else "") +
                 f"{density.n_dead} of {density.n_latents} latents dead ({dead:.1%}) over {density.n_tokens:,} tokens",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# ---------------------------------------------------------------------------------------------------- reconstruction
def _raw_sae(sae):
    """The SAE on raw activations (input_scale folded in), in eval mode."""
    folded = sae.fold_input_scale() if sae.cfg.input_scale != 1 else sae
    return folded.eval()


def _hook_label(sae, hook: str | None) -> str:
    return hook or sae.cfg.hook_name or "<activations>"


def _check_width(sae, width: int, hook: str) -> None:
    if width != sae.cfg.d_in:
        raise ValueError(f"SAE expects d_in={sae.cfg.d_in} but hook {hook} gives {width}")


def _check_finite(x: Tensor, hook: str) -> None:
    bad = ~torch.isfinite(x)
    if bad.any():
        tokens = int(bad.reshape(-1, x.shape[-1]).any(-1).sum()) if x.ndim else 1
        raise ValueError(f"activations at hook {hook} contain {int(bad.sum())} NaN/Inf values "
                         f"(in {tokens} of {x.reshape(-1, x.shape[-1]).shape[0]} token positions of this batch)")


def _tensors(activations, hook: str | None) -> Iterator[Tensor]:
    """Tensors [N, d] from a tensor, or an iterable of tensors or ActivationBatches."""
    if isinstance(activations, Tensor):
        activations = [activations]
    for item in activations:
        if isinstance(item, ActivationBatch):
            if hook is not None and hook in item.acts:
                x = item.acts[hook]
            elif hook is None and len(item.acts) == 1:
                x = next(iter(item.acts.values()))
            elif hook is None:
                raise HookError(f"activation batch holds {', '.join(item.acts)}; pass hook= to pick one")
            else:
                raise HookError(f"activation batch has no hook {hook!r}; it holds {', '.join(item.acts)}")
        elif isinstance(item, Tensor):
            x = item
        else:
            raise TypeError(f"activations must be tensors or ActivationBatches, got {type(item).__name__}")
        yield x.reshape(-1, x.shape[-1]) if x.ndim != 2 else x


@torch.no_grad()
def reconstruction_stats(sae: SAE, activations: Tensor | Iterable, *, hook: str | None = None,
                         max_tokens: int | None = None, dense_threshold: float = DENSE_THRESHOLD,
                         progress: bool = True, keep_blocks: bool = False) -> ReconstructionStats:
    """Stream `activations` (raw, unscaled) through the SAE and accumulate the reconstruction/sparsity sums.

    activations: a tensor [..., d], an iterable of tensors [N, d] or of ActivationBatches (for which `hook`, default
    sae.cfg.hook_name, picks the tensor), e.g. an ActivationStore or a ModelStream. max_tokens: stop after that many.
    progress: a bar over the tokens (on stderr). keep_blocks: keep the sums of every BLOCK_ROWS consecutive tokens
    too, for `stats.intervals()`.
    """
    from tqdm.auto import tqdm

    hook = hook or sae.cfg.hook_name or None
    sae.check_hook(hook)
    label = _hook_label(sae, hook)
    raw = _raw_sae(sae)
    stats = ReconstructionStats(sae.cfg.output_dim, sae.cfg.width, dense_threshold, keep_blocks=keep_blocks)
    bar = tqdm(total=_known_tokens(activations, max_tokens), desc=f"reconstructing {label}", unit="tok",
               unit_scale=True, disable=not progress, leave=False)
    if sae.cfg.is_transcoder:  # its target is another hook of the same batches
        if isinstance(activations, Tensor):
            raise TypeError("a transcoder's reconstruction needs its input and its target: pass ActivationBatches "
                            f"(or a cache) holding {hook} and {sae.cfg.target_hook}, not one tensor")
        pairs = paired_tensors(activations, hook, sae.cfg.target_hook)
    else:
        pairs = ((x, x) for x in _tensors(activations, hook))
    for x, y in pairs:
        _check_width(sae, x.shape[-1], label)
        if max_tokens is not None:
            x, y = x[: max_tokens - stats.n_tokens], y[: max_tokens - stats.n_tokens]
        _check_finite(x, label)
        for chunk, target in zip(x.split(CHUNK_TOKENS), y.split(CHUNK_TOKENS)):
            chunk = chunk.to(raw.device)
            codes = raw.encode(chunk)
            stats.update(target.to(raw.device), raw.add_skip(raw.decode(codes), chunk), codes)
            bar.update(len(chunk))
        if max_tokens is not None and stats.n_tokens >= max_tokens:
            break
    bar.close()
    if stats.n_tokens == 0:
        raise DataError(f"no activations to evaluate at hook {label}: the input yielded 0 tokens")
    return stats


def _known_tokens(activations, max_tokens: int | None) -> int | None:
    """How many tokens a reconstruction pass will read, where the input says (a tensor, a cache), for the bar."""
    held = (activations.reshape(-1, activations.shape[-1]).shape[0] if isinstance(activations, Tensor)
            else getattr(activations, "n_tokens", None))
    if held is None or max_tokens is None:
        return max_tokens if held is None else held
    return min(held, max_tokens)


# ---------------------------------------------------------------------------------------------------- spliced model
def _describe_text(text) -> dict[str, Any]:
    if isinstance(text, Tensor):
        return {"text": "tensor", "context_len": int(text.shape[-1])}
    config = text if isinstance(text, TextConfig) else TextConfig(source=str(text))
    return {"text": config.fingerprint(), "context_len": config.context_len}


def _context_batches(model, text, tokens: int | None, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """Token batches ([b, L] ids, [b, L] real-token mask) from a TextConfig / source path / token tensor."""
    if isinstance(text, Tensor):
        ids = text.unsqueeze(0) if text.ndim == 1 else text
        if ids.ndim != 2 or ids.shape[1] < 2 or ids.dtype in (torch.float16, torch.float32, torch.float64):
            raise DataError(f"tokens must be an integer tensor [contexts, pos] with pos >= 2, got "
                            f"{ids.dtype} {tuple(ids.shape)}")
        if ids.shape[0] == 0:
            raise DataError("no contexts to evaluate: the token tensor has 0 rows")
        if tokens is not None:
            ids = ids[: max(1, -(-tokens // ids.shape[1]))]
        ids = ids.long()
        per_forward = _contexts_per_forward(model, ids.shape[1], batch_size)
        return [(chunk, torch.ones_like(chunk, dtype=torch.bool)) for chunk in ids.split(per_forward)]
    config = text if isinstance(text, TextConfig) else TextConfig(source=str(text))
    if config.context_len > model.n_ctx:
        raise ValueError(f"context_len {config.context_len} is longer than {model.name} allows ({model.n_ctx})")
    contexts = config.contexts(model.tokenizer)
    if tokens is not None:
        contexts = islice(contexts, max(1, -(-tokens // config.context_len)))
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    per_forward = _contexts_per_forward(model, config.context_len, batch_size)
    batches = [(b.tokens, b.mask) for b in token_batches(contexts, per_forward, config.context_len, pad_id=pad_id)]
    if not batches:
        raise DataError(f"text {config.source!r} yielded no contexts of {config.context_len} tokens")
    return batches


def _contexts_per_forward(model, context_len: int, batch_size: int) -> int:
    """batch_size, lowered so that one forward holds at most the model's max_batch_tokens (each batch is then one
    forward, which the splice's per-batch positions need); a context longer than the budget is an error."""
    plan_batches([context_len], model.max_batch_tokens, batch_size, names=lambda _: "a context (--context-len)")
    return max(1, min(batch_size, model.max_batch_tokens // context_len))


def _resolve_hook(model, sae, hook: str | None) -> str:
    hook = hook or sae.cfg.hook_name
    if not hook:
        raise ValueError("the SAE's cfg.hook_name is empty; pass hook= (the hook point it reads)")
    found = model.resolve_hooks(hook)
    if len(found) != 1:
        raise HookError(f"hook {hook!r} matches {len(found)} hook points ({', '.join(found[:5])}); name exactly one")
    sae.check_hook(found[0])
    _check_width(sae, model.hook_dim(found[0]), found[0])
    return found[0]


def splice_target(model, sae, hook: str) -> str:
    """The hook point a splice replaces (and the ablations too): `hook` for an SAE, the target for a transcoder."""
    return resolve_target(model, sae) if sae.cfg.is_transcoder else hook


def _replaced_positions(tokens: Tokens, splice_bos: bool) -> Tensor:
    """bool [b, L]: positions whose activation is substituted (real tokens, minus a leading BOS unless splice_bos)."""
    return tokens.mask if splice_bos else tokens.text_mask


class _Loss:
    """Running sums of CE and KL(clean || this) over the predicted positions, in all and per context (for a
    bootstrap over contexts)."""

    def __init__(self):
        self.ce = 0.0
        self.kl = 0.0
        self.contexts: list[Tensor] = []
        """Per batch, [b, 3] float64: each context's predictions, sum of CE and sum of KL."""

    def add(self, logp: Tensor, clean_logp: Tensor, targets: Tensor, valid: Tensor):
        nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        kl = F.kl_div(logp, clean_logp, log_target=True, reduction="none").sum(-1)
        self.ce += float(nll[valid].double().sum())
        self.kl += float(kl[valid].double().sum())
        per_context = [valid.sum(-1).double()] + [value.double().where(valid, 0).sum(-1) for value in (nll, kl)]
        self.contexts.append(torch.stack(per_context, 1).cpu())

    def per_context(self) -> Tensor:
        """[n_contexts, 3] float64: predictions, sum of CE, sum of KL of each context, in text order."""
        return torch.cat(self.contexts) if self.contexts else torch.zeros(0, 3, dtype=torch.float64)


@dataclass
class Baselines:
    """The unmodified and ablated model's losses on one held-out text at one hook: the same for every SAE read there,
    so a run that evaluates several SAEs computes them once (`Baselines.compute`) and passes them to each
    `evaluate(..., baselines=)` / `spliced_metrics(..., baselines=)`, which then run only the SAE's own forwards.

    clean_logp: the clean model's log-probabilities per batch (CPU, float32), kept when they fit in
    CLEAN_LOGP_BYTES, so the SAE's KL needs no clean forward; None: each evaluation reruns the clean forward."""

    key: dict[str, Any]
    """What they were computed on (hook, text, tokens, batch_size, splice_bos, mean_ablation): an evaluation on
    anything else is refused."""
    n_contexts: int
    n_predictions: int
    clean: _Loss
    zero: _Loss
    mean: _Loss | None = None
    clean_logp: list[Tensor] | None = None

    @classmethod
    @torch.no_grad()
    def compute(cls, model: LanguageModel, text: TextConfig | str | Path | Tensor, hook: str, *,
                tokens: int | None = EVAL_TOKENS, batch_size: int = 8, splice_bos: bool = False,
                mean_ablation: bool = False, mean_activation: Tensor | None = None,
                progress: bool = True) -> "Baselines":
        """One clean and one zero-ablated (and mean-ablated) pass over `text`, with spliced_metrics' arguments."""
        found = model.resolve_hooks(hook)
        if len(found) != 1:
            raise HookError(f"hook {hook!r} matches {len(found)} hook points ({', '.join(found[:5])}); name exactly one")
        hook = found[0]
        batches = _context_batches(model, text, tokens, batch_size)
        if mean_ablation and mean_activation is None:
            mean_activation = _mean_activation(model, batches, hook, model.hook_dim(hook), splice_bos)
        key = _baseline_key(hook, text, tokens, batch_size, splice_bos, mean_ablation)
        clean, zero, mean = _Loss(), _Loss(), _Loss()
        kept: list[Tensor] | None = []
        n_predictions = n_contexts = 0
        for ids, mask in _progress(progress, batches, f"baselines at {hook}"):
            view = _BatchView(model, ids, mask, splice_bos)
            clean_logp = view.logp()
            clean.add(clean_logp, clean_logp, view.targets, view.valid)
            ablations = [(zero, torch.zeros_like)] + ([(mean, mean_activation.reshape(-1))] if mean_ablation else [])
            for loss, value in ablations:
                loss.add(view.logp(Replace(hook, value, positions=view.where)), clean_logp, view.targets, view.valid)
            if kept is not None:  # dropped whole once they outgrow the budget
                fits = (sum(t.numel() for t in kept) + clean_logp.numel()) * 4 <= CLEAN_LOGP_BYTES
                kept = [*kept, clean_logp.to("cpu")] if fits else None
            n_predictions += int(view.valid.sum())
            n_contexts += len(ids)
        return cls(key=key, n_contexts=n_contexts, n_predictions=n_predictions, clean=clean, zero=zero,
                   mean=mean if mean_ablation else None, clean_logp=kept)

    def check(self, key: dict[str, Any]) -> None:
        if key != self.key:
            differ = ", ".join(name for name in key if key[name] != self.key.get(name))
            raise ValueError(f"these baselines were computed on other settings (differ in: {differ}); compute "
                             "them with the evaluation's hook, text, tokens, batch_size, splice_bos and mean_ablation")


CLEAN_LOGP_BYTES = 1 << 30
"""Baselines keep the clean log-probabilities (float32) up to this size; beyond it each SAE reruns the clean forward."""


def _baseline_key(hook: str, text, tokens: int | None, batch_size: int, splice_bos: bool,
                  mean_ablation: bool) -> dict[str, Any]:
    described = _describe_text(text)
    if isinstance(text, Tensor):
        described["text"] = "tensor " + hashlib.sha256(text.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    return {"hook": hook, **described, "tokens": tokens, "batch_size": batch_size, "splice_bos": splice_bos,
            "mean_ablation": mean_ablation}


class _BatchView:
    """One batch of contexts as the spliced pass reads it: which positions are replaced, which are predicted."""

    def __init__(self, model, ids: Tensor, mask: Tensor, splice_bos: bool):
        self.model = model
        self.tokens = Tokens(ids, mask, model.bos_token_id)
        self.where = _replaced_positions(self.tokens, splice_bos)
        self.targets, self.valid = ids[:, 1:].to(model.device), mask[:, 1:].to(model.device)

    def logp(self, *patches: Replace) -> Tensor:
        return self.model.logits(self.tokens, patches=list(patches))[:, :-1].float().log_softmax(-1)


def _progress(enabled: bool, batches: list[tuple[Tensor, Tensor]], desc: str):
    """A bar over the batches that counts contexts (the unit that moves), on stderr."""
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(len(ids) for ids, _ in batches), desc=desc, unit="ctx", disable=not enabled, leave=False)
    for batch in batches:
        yield batch
        bar.update(len(batch[0]))
    bar.close()


@torch.no_grad()
def spliced_metrics(sae: SAE, model: LanguageModel, text: TextConfig | str | Path | Tensor, *,
                    hook: str | None = None, tokens: int | None = EVAL_TOKENS, batch_size: int = 8,
                    splice_bos: bool = False, mean_ablation: bool = False, mean_activation: Tensor | None = None,
                    stats: ReconstructionStats | None = None, baselines: Baselines | None = None,
                    progress: bool = True) -> SplicedMetrics:
    """CE clean / with sae(x) spliced in / zero-ablated (and mean-ablated), CE loss recovered, KL, on `text`.

    text: a TextConfig, a text source (path; contexts of 128 tokens), or token ids [contexts, pos].
    tokens: read whole contexts until at least this many positions (None: all of the text).
    mean_activation: [d] mean for mean ablation; when None and mean_ablation, it is the mean over the replaced
    positions of these same contexts (one extra forward pass that stops at the hook's layer).
    stats: when given, the (x, sae(x), codes) of every replaced position is added to it, so one pass also yields
    the reconstruction metrics on the held-out text.
    baselines: the clean and ablated losses computed once for these same settings (Baselines.compute); then only
    the SAE's forward runs here (and the clean one, when the baselines could not keep its log-probabilities).
    """
    return _spliced_losses(sae, model, text, hook=hook, tokens=tokens, batch_size=batch_size, splice_bos=splice_bos,
                           mean_ablation=mean_ablation, mean_activation=mean_activation, stats=stats,
                           baselines=baselines, progress=progress).metrics()


@dataclass
class _SplicedLosses:
    """The loss sums of one spliced pass: the metrics, and the per-context sums a bootstrap resamples."""

    clean: _Loss
    spliced: _Loss
    zero: _Loss
    mean: _Loss | None
    n_contexts: int
    n_predictions: int
    splice_bos: bool

    def metrics(self) -> SplicedMetrics:
        return _spliced_result(self.clean, self.spliced, self.zero, self.mean, self.n_contexts, self.n_predictions,
                               self.splice_bos)

    def per_context(self) -> Tensor:
        """[n_contexts, 6 or 8] float64: each context's predictions and loss sums (CONTEXT_COLUMNS; the last two,
        of the mean ablation, only when it ran)."""
        clean, spliced, zero = (loss.per_context() for loss in (self.clean, self.spliced, self.zero))
        columns = [spliced[:, 0], clean[:, 1], spliced[:, 1], zero[:, 1], spliced[:, 2], zero[:, 2]]
        if self.mean is not None:
            mean = self.mean.per_context()
            columns += [mean[:, 1], mean[:, 2]]
        return torch.stack(columns, 1)

    def intervals(self, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> dict[str, Interval]:
        """Bootstrap intervals over the contexts for ce_loss_recovered, kl_sae, kl_div_score (SAEBench's
        (kl_zero - kl_sae) / kl_zero) and ce_loss_recovered_mean (with mean ablation), each recomputed from the
        resampled contexts' summed losses; the estimates are the metrics as reported."""
        contexts = self.per_context()
        if len(contexts) < 2:
            raise DataError(f"a bootstrap needs at least 2 contexts; this pass read {len(contexts)}: evaluate on "
                            "more tokens")
        reported = self.metrics()
        estimates = {"ce_loss_recovered": reported.ce_loss_recovered, "kl_sae": reported.kl_sae,
                     "kl_div_score": kl_div_score(reported.kl_sae, reported.kl_zero)}
        if self.mean is not None:
            estimates["ce_loss_recovered_mean"] = reported.ce_loss_recovered_mean
        with one_thread():
            return {name: dataclasses.replace(bootstrap_interval(contexts, CONTEXT_STATISTICS[name], level=level,
                                                                 resamples=resamples, seed=seed),
                                              estimate=math.nan if estimate is None else float(estimate))
                    for name, estimate in estimates.items()}


CONTEXT_COLUMNS = ("predictions", "ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero", "ce_mean", "kl_mean")
"""The per-context sums of a spliced pass that a bootstrap resamples."""


def kl_div_score(kl_sae: float, kl_zero: float) -> float | None:
    """SAEBench's normalised KL: (kl_zero - kl_sae) / kl_zero (1 = the SAE changes nothing, 0 = as bad as zero
    ablation); None when kl_zero == 0."""
    return (kl_zero - kl_sae) / kl_zero if kl_zero != 0 else None


def _context_statistic(formula):
    """A statistic over per-context rows: `formula` applied to the summed columns, by name."""
    def statistic(contexts: Tensor) -> float:
        total = dict(zip(CONTEXT_COLUMNS, contexts.sum(0).tolist()))
        value = formula(total)
        return math.nan if value is None else float(value)

    return statistic


CONTEXT_STATISTICS = {
    "ce_loss_recovered": _context_statistic(lambda t: _recovered(t["ce_clean"], t["ce_sae"], t["ce_zero"])),
    "kl_sae": _context_statistic(lambda t: t["kl_sae"] / t["predictions"]),
    "kl_div_score": _context_statistic(lambda t: kl_div_score(t["kl_sae"], t["kl_zero"])),
    "ce_loss_recovered_mean": _context_statistic(lambda t: _recovered(t["ce_clean"], t["ce_sae"], t["ce_mean"])),
}


def _spliced_losses(sae: SAE, model: LanguageModel, text, *, hook: str | None, tokens: int | None, batch_size: int,
                    splice_bos: bool, mean_ablation: bool, mean_activation: Tensor | None,
                    stats: ReconstructionStats | None, baselines: Baselines | None, progress: bool) -> _SplicedLosses:
    """spliced_metrics' pass, returning the loss sums (in all and per context) rather than the metrics."""
    hook = _resolve_hook(model, sae, hook)
    target = splice_target(model, sae, hook)  # the hook replaced: the SAE's own, a transcoder's target
    raw = _raw_sae(sae)
    batches = _context_batches(model, text, tokens, batch_size)
    if baselines is not None:
        baselines.check(_baseline_key(target, text, tokens, batch_size, splice_bos, mean_ablation))
    elif mean_ablation and mean_activation is None:
        mean_activation = _mean_activation(model, batches, target, sae.cfg.output_dim, splice_bos)

    def splice(where: Tensor, contexts: Tensor) -> list[Replace]:
        if target == hook:
            return [Replace(hook, lambda x: sae_replace(x, where, contexts), positions=where)]
        def record(y: Tensor, y_hat: Tensor, codes: Tensor, mask: Tensor) -> None:
            if stats is not None:
                stats.update(y, y_hat, codes, contexts=contexts[mask.cpu()])
        return splice_patches(raw, hook, target, where, record)

    def sae_replace(x: Tensor, where: Tensor, contexts: Tensor) -> Tensor:
        _check_finite(x[where.to(x.device)], hook)
        codes = raw.encode(x.to(raw.device))
        x_hat = raw.decode(codes)
        if stats is not None:
            keep = where.to(raw.device)
            stats.update(x.to(raw.device)[keep], x_hat[keep], codes[keep], contexts=contexts[where])
        return x_hat.to(x.device)

    clean, spliced, zero, mean = _Loss(), _Loss(), _Loss(), _Loss()
    n_predictions = n_contexts = 0
    label = f"evaluating {sae.cfg.arch}-{sae.cfg.width}" + (f"-k{sae.cfg.k}" if sae.cfg.k is not None else "")
    for number, (ids, mask) in enumerate(_progress(progress, batches, f"{label} at {hook}")):
        view = _BatchView(model, ids, mask, splice_bos)
        if baselines is not None and baselines.clean_logp is not None:
            clean_logp = baselines.clean_logp[number].to(model.device)
        else:
            clean_logp = view.logp()
        contexts = (n_contexts + torch.arange(len(ids))).unsqueeze(1).expand(ids.shape)
        variants = [(spliced, splice(view.where, contexts))]
        if baselines is None:
            clean.add(clean_logp, clean_logp, view.targets, view.valid)
            variants.append((zero, [Replace(target, torch.zeros_like, positions=view.where)]))
            if mean_ablation:
                variants.append((mean, [Replace(target, mean_activation.reshape(-1), positions=view.where)]))
        for loss, patches in variants:
            loss.add(view.logp(*patches), clean_logp, view.targets, view.valid)
        n_predictions += int(view.valid.sum())
        n_contexts += len(ids)
    if n_predictions == 0:
        raise DataError("no next-token predictions to evaluate: every context is shorter than 2 tokens")
    if baselines is not None:
        clean, zero, mean = baselines.clean, baselines.zero, baselines.mean or mean
    return _SplicedLosses(clean, spliced, zero, mean if mean_ablation else None, n_contexts, n_predictions,
                          splice_bos)


def _mean_activation(model, batches: list[tuple[Tensor, Tensor]], hook: str, d_in: int, splice_bos: bool) -> Tensor:
    """The mean activation over the positions a splice replaces (a pass that stops at the hook's layer)."""
    total, count = torch.zeros(d_in, dtype=torch.float64), 0
    for ids, mask in batches:
        x = model.activations(ids, [hook], flatten=True)[hook].to("cpu", torch.float64)
        where = _replaced_positions(Tokens(ids, mask, model.bos_token_id), splice_bos)
        total += x[where].sum(0)
        count += int(where.sum())
    return total / max(count, 1)


def _spliced_result(clean: _Loss, spliced: _Loss, zero: _Loss, mean: _Loss | None, n_contexts: int, n: int,
                    splice_bos: bool) -> SplicedMetrics:
    ce_clean, ce_sae, ce_zero = clean.ce / n, spliced.ce / n, zero.ce / n
    result = SplicedMetrics(n_contexts=n_contexts, n_predictions=n, ce_clean=ce_clean, ce_sae=ce_sae,
                            ce_zero=ce_zero, ce_loss_recovered=_recovered(ce_clean, ce_sae, ce_zero),
                            kl_sae=spliced.kl / n, kl_zero=zero.kl / n, splice_bos=splice_bos)
    if mean is not None:
        result.ce_mean = mean.ce / n
        result.kl_mean = mean.kl / n
        result.ce_loss_recovered_mean = _recovered(ce_clean, ce_sae, result.ce_mean)
    return result


def _recovered(clean: float, spliced: float, ablated: float) -> float | None:
    gap = ablated - clean
    return (ablated - spliced) / gap if gap != 0 else None


# ---------------------------------------------------------------------------------------------------- evaluate
def evaluate(sae: SAE, *, activations: Tensor | Iterable | str | Path | None = None,
             model: LanguageModel | None = None, text: TextConfig | str | Path | Tensor | None = None,
             tokens: int | None = 20_000, activation_tokens: int | None = None, batch_size: int = 8,
             hook: str | None = None, splice_bos: bool = False, mean_ablation: bool = False,
             dense_threshold: float = DENSE_THRESHOLD, baselines: Baselines | None = None,
             out: str | Path | None = None, progress: bool = True) -> EvalResult:
    """Evaluate `sae` with whatever inputs are given; write metrics.json + feature_density.png to `out` if given.

    activations: raw activations for the reconstruction metrics: a tensor, an iterable of tensors or
        ActivationBatches (ActivationStore, ModelStream, a list), or the path of an activation cache.
        activation_tokens caps how many are read (None: all).
    model + text: spliced-model metrics on `text` (a TextConfig, a source path, or token ids [contexts, pos]),
        reading whole contexts until `tokens` positions (None: all of it), `batch_size` contexts per forward.
        Without `activations`, the reconstruction metrics come from the same pass: every position whose activation
        the SAE replaced (all but padding and, with splice_bos=False, the leading BOS), so no second model run.
    hook: defaults to sae.cfg.hook_name.
    baselines: the clean and ablated losses on this text, computed once for several SAEs (Baselines.compute with
        the same hook, text, tokens, batch_size, splice_bos and mean_ablation; a transcoder's at its target hook);
        the metrics are the same as without.
    progress: bars (on stderr) for the passes over activations and contexts.
    """
    if activations is None and model is None:
        raise ValueError("evaluate needs activations= (for reconstruction) and/or model= with text= (for both)")
    if model is not None and text is None:
        raise ValueError("evaluate(model=...) needs text=: held-out text (a TextConfig, a text file or folder, "
                         "or token ids [contexts, pos])")
    hook = hook or sae.cfg.hook_name or None
    if model is not None:
        hook = _resolve_hook(model, sae, hook)  # fail fast on a bad hook or width, before any long pass
    if baselines is not None and mean_ablation and activations is not None:
        raise ValueError("baselines hold the mean ablation over the text; with activations= the mean would come "
                         "from them instead: evaluate without baselines=, or without activations=")
    settings: dict[str, Any] = {"dense_threshold": dense_threshold}
    stats = None
    if activations is not None:
        stats = _activation_stats(sae, activations, hook, activation_tokens, dense_threshold, settings, progress)
    spliced = None
    if model is not None:
        losses, stats = _spliced_pass(sae, model, text, hook, stats, settings, baselines, progress, tokens=tokens,
                                      batch_size=batch_size, splice_bos=splice_bos, mean_ablation=mean_ablation)
        spliced = losses.metrics()
    result = _result(sae, hook, stats, spliced, settings)
    if out is not None:
        result.save(out)
    return result


def _activation_stats(sae: SAE, activations, hook: str | None, max_tokens: int | None, dense_threshold: float,
                      settings: dict[str, Any], progress: bool = True) -> ReconstructionStats:
    """Reconstruction sums over the activations given (a cache folder is read whole, in order)."""
    if isinstance(activations, (str, Path)):
        if hook is None:
            raise ValueError("reading an activation cache needs the hook: pass hook= or set sae.cfg.hook_name")
        settings["activations"] = str(activations)
        hooks = [hook, sae.cfg.target_hook] if sae.cfg.is_transcoder else [hook]
        activations = open_source(activations, hooks=hooks, batch_size=4096).in_order()
    settings["reconstruction_source"] = "activations"
    return reconstruction_stats(sae, activations, hook=hook, max_tokens=max_tokens, dense_threshold=dense_threshold,
                                progress=progress)


def _spliced_pass(sae: SAE, model: LanguageModel, text, hook: str, stats: ReconstructionStats | None,
                  settings: dict[str, Any], baselines: Baselines | None, progress: bool, keep_blocks: bool = False,
                  **options) -> tuple[_SplicedLosses, ReconstructionStats]:
    """The spliced losses on `text`; without reconstruction sums from activations, the same pass gathers them
    (with per-context sums when keep_blocks)."""
    own_stats = None
    if stats is None:
        own_stats = ReconstructionStats(sae.cfg.output_dim, sae.cfg.width, settings["dense_threshold"],
                                        keep_blocks=keep_blocks)
        settings["reconstruction_source"] = "spliced pass"
    mean = stats.mean if (options["mean_ablation"] and stats is not None) else None
    losses = _spliced_losses(sae, model, text, hook=hook, mean_activation=mean, stats=own_stats,
                             baselines=baselines, progress=progress, **options)
    settings.update(model=model.name, **options, **_describe_text(text))
    if options["mean_ablation"]:
        settings["mean_source"] = "activations" if mean is not None else "text"
    return losses, stats if stats is not None else own_stats


def _result(sae: SAE, hook: str | None, stats: ReconstructionStats | None, spliced: SplicedMetrics | None,
            settings: dict[str, Any]) -> EvalResult:
    reconstruction = stats.metrics() if stats is not None and stats.n_tokens else None
    return EvalResult(
        sae=SAESummary.of(sae, hook), n_tokens=stats.n_tokens if stats is not None else 0,
        reconstruction=reconstruction, spliced=spliced,
        density=stats.density() if reconstruction is not None else None, settings=settings,
        firing_counts=stats.firing_counts.tolist() if reconstruction is not None else None,
    )


# ---------------------------------------------------------------------------------------------------- the eval suite
@dataclass
class CoreConfig:
    """What run() evaluates on. Pass held-out text (`TextConfig(start=...)`, a cache's `held_out_text`): on the
    SAE's own training contexts every metric looks better than it is."""

    text: TextConfig = field(default_factory=TextConfig)
    """the text and its contexts (source, context_len, start); SAEBench's dataset and context_size"""
    tokens: int | None = EVAL_TOKENS
    """token positions to read, in whole contexts (None: all of the text)"""
    batch_size_prompts: int = 8
    """contexts per forward pass"""
    resamples: int = RESAMPLES
    """bootstrap resamples per interval"""
    seed: int = 0
    """seed of the bootstrap's draws"""


CONFIG = CoreConfig
"""The config class the suite builds for this eval."""


def run(sae: SAE, model: LanguageModel, config: CoreConfig | None = None, *, progress: bool = True) -> EvalResult:
    """The core metrics of `sae` at its hook with bootstrap intervals over contexts: the spliced pass of
    `evaluate(sae, model=model, text=config.text, ...)` (so the same numbers), keeping each context's sums, then
    `config.resamples` resamples of the contexts (result.intervals; settings say the unit and the resamples)."""
    config = config or CoreConfig()
    if not isinstance(config, CoreConfig):
        raise TypeError(f"config must be a CoreConfig, got {type(config).__name__}")
    hook = _resolve_hook(model, sae, None)
    settings: dict[str, Any] = {"dense_threshold": DENSE_THRESHOLD}
    losses, stats = _spliced_pass(sae, model, config.text, hook, None, settings, None, progress, keep_blocks=True,
                                  tokens=config.tokens, batch_size=config.batch_size_prompts, splice_bos=False,
                                  mean_ablation=False)
    result = _result(sae, hook, stats, losses.metrics(), settings)
    result.intervals = {**stats.intervals(config.resamples, config.seed),
                        **losses.intervals(config.resamples, config.seed)}
    settings.update(bootstrap_unit=stats.block_unit, resamples=config.resamples, seed=config.seed, level=LEVEL)
    return result


SAEBENCH_CONFIG_NAMES = {"model": "model_name", "batch_size": "batch_size_prompts", "context_len": "context_size",
                         "text": "dataset"}
"""evaluate's settings that SAEBench's core eval_config has under another name."""


def _saebench_config(settings: dict[str, Any]) -> dict[str, Any]:
    """The evaluation's settings as SAEBench's eval_config, renamed where SAEBench has the same field (the text's
    source as its dataset, the full text description kept as `text`)."""
    config = {SAEBENCH_CONFIG_NAMES.get(key, key): value for key, value in settings.items()}
    if isinstance(settings.get("text"), dict):
        config["dataset"] = settings["text"].get("source")
        config["text"] = settings["text"]
    return config


__all__ = [
    "BLOCK_COLUMNS", "BLOCK_ROWS", "Baselines", "CONTEXT_COLUMNS", "CoreConfig", "DEAD_TOKENS_PER_LATENT",
    "DENSE_THRESHOLD", "DENSITY_BIN_EDGES", "DENSITY_PLOT_FILE", "EVAL_TYPE_ID", "EvalResult", "FIRING_COUNTS_FILE",
    "FeatureDensity", "METRICS_FILE", "ReconstructionMetrics", "ReconstructionStats", "SAEBENCH_METRICS", "SAESummary",
    "SCHEMA_VERSION", "SplicedMetrics", "block_fvu", "dead_share_note", "evaluate", "feature_density", "kl_div_score",
    "plot_feature_density", "reconstruction_stats", "run", "spliced_metrics",
]
