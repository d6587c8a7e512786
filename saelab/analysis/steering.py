"""Steering: push along a concept direction (or clamp an SAE latent) and measure what it does, and what it breaks.

    steer = Steer.direction(model, "blocks.9.hook_resid_post", theta, separation=gap)  # alpha in units of gap
    result = sweep(model, steer, [0, 0.25, 0.5, 1], LogitDiff(prompts, up=[" Monday"], down=[" London"]), side_text)
    result.plot("steering.png")

Every alpha reports the target effect *and* the side effects on unrelated text: KL(clean || steered) of the
next-token distributions and the steered cross-entropy next to the clean one. The point where KL and CE climb
while the target has stopped moving is where steering starts to break the model.

What one alpha is matters for comparing models. The concept's own separation, the distance between its class
means at the hook (`concept_separation`), transfers; the mean activation norm does not, because a few massive
dimensions and BOS can hold most of it (Gemma 3's residual stream). A direction is never added at BOS.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import torch
from torch import Tensor

from saelab.analysis.study import SCHEMA_VERSION, StudyResult
from saelab.errors import DataError
from saelab.figures import GRID_ALPHA, pyplot, save_figure
from saelab.interventions import Add, Splice
from saelab.options import FiniteFloat, NonNegativeInt, PositiveInt, check_fields

if TYPE_CHECKING:
    from saelab.analysis.probes import Probe
    from saelab.sae import SAE


UNITS = ("separation", "norm", "raw")
"""What one alpha of a direction counts in: the concept's separation at the hook, the hook's mean activation norm
(BOS left out), or the model's raw units."""


@dataclass(eq=False)
class Steer:
    """alpha -> a patch: alpha * unit * norm added at `hook` (never at BOS), or an SAE latent clamped to alpha
    (error term kept)."""

    hook: str
    unit: Tensor | None = None
    norm: float = 1.0
    """Size of one alpha for a direction in the model's units at the hook (what `scale` names)."""
    sae: "SAE | None" = None
    latent: int | None = None
    scale: str = "raw"
    """What one alpha counts in: separation, norm or raw (UNITS); latent for a clamp (alpha is the latent's value)."""

    @classmethod
    def direction(cls, model, hook: str, vector: Tensor, reference: Sequence[str] | None = None, *,
                  separation: float | None = None) -> "Steer":
        """Steer along `vector` (made unit). alpha counts in `separation` where given (the distance between the
        concept's class means at the hook, `concept_separation`), else with `reference` texts in mean activation
        norms at the hook there (BOS left out), else in raw units."""
        vector = torch.as_tensor(vector).float()
        if vector.ndim != 1 or not float(vector.norm()) > 0:
            raise ValueError("a steering direction must be a non-zero vector [d]")
        if separation is not None:
            if not separation > 0 or separation == float("inf"):
                raise ValueError(f"the separation must be a positive finite distance, got {separation}")
            return cls(hook, vector / vector.norm(), float(separation), scale="separation")
        if reference is None:
            return cls(hook, vector / vector.norm())
        return cls(hook, vector / vector.norm(), mean_norm(model, hook, reference), scale="norm")

    @classmethod
    def decoder_row(cls, sae: "SAE", latent: int, model=None, reference: Sequence[str] | None = None) -> "Steer":
        """Steer along an SAE latent's decoder row W_dec[latent] (added, not clamped)."""
        if not 0 <= latent < sae.cfg.width:
            raise ValueError(f"latent {latent} is out of range for an SAE of width {sae.cfg.width}")
        row = sae.W_dec[latent].detach().float().cpu()
        if model is None:
            return cls(sae.cfg.hook_name, row / row.norm())
        return cls.direction(model, sae.cfg.hook_name, row, reference)

    @classmethod
    def clamp(cls, sae: "SAE", latent: int) -> "Steer":
        """Clamp latent `latent` of `sae` to alpha at every token but BOS (Splice with the error term kept)."""
        if not 0 <= latent < sae.cfg.width:
            raise ValueError(f"latent {latent} is out of range for an SAE of width {sae.cfg.width}")
        return cls(sae.cfg.hook_name, sae=sae, latent=latent, scale="latent")

    def patch(self, alpha: float):
        if self.sae is not None:
            return Splice(self.sae, error_term=True, clamp={self.latent: float(alpha)})
        return Add(self.hook, self.unit, scale=float(alpha) * self.norm, bos=False)

    def describe(self) -> str:
        if self.sae is not None:
            return f"clamp latent {self.latent} at {self.hook}"
        return f"add alpha x {self.norm:.3g} ({self.scale}) x unit direction at {self.hook}"


def mean_norm(model, hook: str, texts: Sequence[str]) -> float:
    """The mean activation norm at `hook` over the texts' tokens, BOS left out."""
    tokens = model.tokenize(list(texts))
    acts = model.activations_at(tokens, hook, positions=tokens.text_mask)[hook]  # [real tokens, d]
    return float(acts.norm(dim=-1).mean())


# ---------------------------------------------------------------------------------------------------- targets
def _token_ids(model, words: Sequence[str]) -> list[int]:
    ids = []
    for word in words:
        found = model.tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(found) != 1:
            raise DataError(f"target word {word!r} is {len(found)} tokens for {model.name}; give one-token words "
                            "(often with a leading space: ' Monday')")
        ids.append(found[0])
    return ids


@dataclass
class LogitDiff:
    """Mean next-token logit of `up` words minus that of `down` words at the last token of each prompt."""

    prompts: list[str]
    up: list[str]
    down: list[str] = field(default_factory=list)
    name: str = "logit difference"

    def __post_init__(self):
        if not self.prompts or not self.up:
            raise ValueError("LogitDiff needs prompts and at least one `up` word")

    def measure(self, model, patch) -> float:
        last = model.logits(self.prompts, patches=[patch] if patch else [], positions="last").float().cpu()
        value = last[:, _token_ids(model, self.up)].mean(-1)
        if self.down:
            value = value - last[:, _token_ids(model, self.down)].mean(-1)
        return float(value.mean())


@dataclass
class ProbeOutput:
    """Mean decision value of a probe reading `hook` at `positions` on the prompts, while steering."""

    prompts: list[str]
    probe: "Probe"
    hook: str
    positions: Any = "mean"
    name: str = "probe output"

    def measure(self, model, patch) -> float:
        acts = model.activations_at(self.prompts, self.hook, self.positions, patches=[patch] if patch else [])
        return float(self.probe.decision(acts[model.resolve_hooks(self.hook)[0]]).mean())


@dataclass
class WordFrequency:
    """Share of generated words (greedy, n_new tokens per prompt) that are among `words` (case-insensitive)."""

    prompts: list[str]
    words: list[str]
    n_new: int = 12
    name: str = "word frequency"
    samples: list[str] = field(default_factory=list, repr=False)

    def measure(self, model, patch) -> float:
        out = model.generate(self.prompts, self.n_new, patches=[patch] if patch else [])
        self.samples = out.texts
        wanted = {w.strip().lower() for w in self.words}
        said = [w.strip(".,;:!?\"'()").lower() for text in out.texts for w in text.split()]
        return sum(w in wanted for w in said) / max(len(said), 1)


# ---------------------------------------------------------------------------------------------------- the sweep
@dataclass
class SteeringPoint:
    alpha: float
    target: float
    kl: float
    """Mean KL(clean || steered) over next-token predictions on the side text, nats."""
    ce: float
    """Cross-entropy on the side text while steering."""
    samples: list[str] | None = None


@dataclass
class SteeringResult(StudyResult):
    """One steering sweep: the target and the side effects at every alpha; saved as steering.json, steering.md and
    steering.png (`save(folder, name)` for another stem)."""

    NAME: ClassVar[str] = "steering"
    WHAT: ClassVar[str] = "steering results"

    model: str
    steer: str
    target: str
    ce_clean: float
    points: list[SteeringPoint]
    side_tokens: int
    unit: str = ""
    """What one alpha counts in: separation, norm, raw, or latent (a clamp: alpha is the latent's value); empty in
    records written before the unit was kept."""
    unit_value: float = 1.0
    """The size of that unit in the model's units at the hook."""

    def save_figures(self, folder: Path, name: str) -> None:
        self.plot(folder / f"{name}.png")

    def table(self) -> str:
        lines = [f"alpha counts in {UNIT_WORDS.get(self.unit, self.unit)}: {self.unit_value:.4g}; KL and CE on "
                 f"{self.side_tokens} tokens of unrelated text\n"] if self.unit else []
        lines += [f"| alpha | {self.target} | KL to clean (nats) | CE (clean {self.ce_clean:.3f}) |", "|---|---|---|---|"]
        lines += [f"| {p.alpha:g} | {p.target:.3f} | {p.kl:.3f} | {p.ce:.3f} |" for p in self.points]
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path, title: str = "") -> Path:
        plt = pyplot()
        alphas = [p.alpha for p in self.points]
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
        top.plot(alphas, [p.target for p in self.points], "o-", color="tab:blue")
        top.set_ylabel(self.target)
        top.set_title(title or f"{self.model}: {self.steer}", fontsize=9)
        bottom.plot(alphas, [p.kl for p in self.points], "o-", color="tab:red", label="KL(clean || steered)")
        bottom.plot(alphas, [p.ce - self.ce_clean for p in self.points], "s--", color="tab:orange",
                    label="CE increase")
        bottom.set_ylabel("nats on unrelated text")
        bottom.set_xlabel("alpha")
        bottom.legend(fontsize=8)
        for ax in (top, bottom):
            ax.grid(alpha=GRID_ALPHA)
        return save_figure(fig, path)


UNIT_WORDS = {"separation": "the concept's separation, the distance between its class means at the hook",
              "norm": "the mean activation norm at the hook, BOS left out", "raw": "raw units",
              "latent": "the clamped latent's value"}


def side_effects(model, side_text: Sequence[str], patch, batch_size: int | None = None,
                 progress: Callable[[int], None] | None = None) -> tuple[float, float]:
    """(mean KL(clean || patched), mean patched CE) on the side text. Each batch's clean forward runs next to its
    patched one instead of being kept for every alpha: the side text's log-probs at every position over the whole
    vocabulary would grow without bound, one batch's stay within the model's max_batch_tokens.
    progress: called with each batch's number of texts."""
    kl_sum, ce_sum, count = 0.0, 0.0, 0
    for batch in model.batches(list(side_text), max_texts=batch_size):
        mask = batch.mask[:, 1:]
        ref = model.logits(batch)[:, :-1].float().log_softmax(-1).cpu()
        logp = model.logits(batch, patches=[patch])[:, :-1].float().log_softmax(-1).cpu() if patch else ref
        kl = torch.nn.functional.kl_div(logp, ref, reduction="none", log_target=True).sum(-1)
        ce = -logp.gather(-1, batch.ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        kl_sum += float(kl[mask].sum())
        ce_sum += float(ce[mask].sum())
        count += int(mask.sum())
        if progress:
            progress(len(batch.ids))
    if count == 0:
        raise DataError("the side text has no predicted tokens (each text needs at least one token after BOS)")
    return kl_sum / count, ce_sum / count


def side_passages(source: str = "default", n: int = 16, words: int = 48) -> list[str]:
    """Unrelated text for the side effects: the first `words`-word passage of each of the first `n` documents
    (built-in prose by default; a file is cut into blocks of paragraphs)."""
    from saelab.analysis.concepts import documents, passages
    from saelab.data import iter_documents, text_source

    resolved = text_source(source)  # a mistyped path is an error here too, not a dataset name
    docs = documents(resolved) if isinstance(resolved, Path) and resolved.is_file() else iter_documents(resolved)
    found = []
    for doc in docs:
        found += passages(doc, words)[:1]
        if len(found) == n:
            return found
    if not found:
        raise DataError(f"{source}: no passage of {words} words for the side effects")
    return found


def sweep(model, steer: Steer, alphas: Sequence[float], target, side_text: Sequence[str], *,
          batch_size: int | None = None, log=None, progress: bool = True) -> SteeringResult:
    """Measure `target` and the side effects at every alpha (0 is added if missing: the clean baseline).
    progress: a bar (on stderr) over the texts run, prompts and side texts, at every alpha."""
    from tqdm.auto import tqdm

    if not side_text:
        raise DataError("sweep needs some unrelated side text to measure KL and CE on")
    started = time.perf_counter()
    alphas = sorted(set(float(a) for a in alphas) | {0.0})
    prompts = len(getattr(target, "prompts", []))
    bar = tqdm(total=len(side_text) + len(alphas) * (prompts + len(side_text)), desc="steering", unit="text",
               disable=not progress)
    _, ce_clean = side_effects(model, side_text, None, batch_size=batch_size, progress=bar.update)
    points = []
    for alpha in alphas:
        bar.set_postfix_str(f"alpha {alpha:g}")
        patch = steer.patch(alpha) if alpha != 0 else None
        value = target.measure(model, patch)
        bar.update(prompts)
        kl, ce = side_effects(model, side_text, patch, batch_size, progress=bar.update)
        samples = list(getattr(target, "samples", []) or []) or None
        points.append(SteeringPoint(alpha, value, kl, ce, samples))
        if log:
            with tqdm.external_write_mode():  # the line above the bar, not through it
                log(f"  alpha {alpha:g}: {target.name} {value:.3f}, KL {kl:.3f}, CE {ce:.3f} (clean {ce_clean:.3f})")
    bar.close()
    return SteeringResult(model.name, steer.describe(), target.name, ce_clean, points,
                          int(model.tokenize(list(side_text)).mask[:, 1:].sum()), steer.scale, steer.norm,
                          seconds=time.perf_counter() - started)


@dataclass
class SteerConfig:
    """One steering sweep: what to steer along (a class difference of means, an SAE latent's decoder row, or a
    clamped latent), the target measured on the prompts, and the unrelated side text the side effects are read on."""

    model: str
    """Model to steer: smollm2-135m, gemma-3-270m, a Hub id or a local folder."""
    prompts: str
    """Prompts separated by '|'."""
    hook: str | None = None
    """Where to add the direction (with data)."""
    data: str | None = None
    """Labelled data: steer along the difference of means of the positive class vs the rest."""
    positive: str | None = None
    """The class to steer towards (default: the data's own, else the last)."""
    positions: str = "mean"
    """Positions the class means are read at: 'mean', 'last', or a token index."""
    sae: str | None = None
    """SAE folder: steer along the latent's decoder row, or clamp it."""
    latent: NonNegativeInt | None = None
    """The SAE latent to steer along or clamp."""
    clamp: bool = False
    """Clamp the latent to alpha instead of adding its row."""
    alphas: list[FiniteFloat] = field(default_factory=lambda: [0, 0.25, 0.5, 1, 2])
    """Steering strengths; for a direction in `unit`s."""
    unit: str | None = None
    """What one alpha of a direction counts in: separation (the distance between the data's class means at the
    hook; the default with data), norm (the hook's mean activation norm, BOS left out; the default for an SAE's
    decoder row) or raw."""
    up: str | None = None
    """Comma list of one-token words whose logits should rise (target: logit difference)."""
    down: str | None = None
    """Comma list of one-token words to subtract."""
    words: str | None = None
    """Comma list of words to count in greedy generations (target: frequency)."""
    new_tokens: PositiveInt = 12
    """Tokens generated per prompt for the word-frequency target."""
    side_text: str = "default"
    """Unrelated text for KL and CE (file, folder, Hub dataset, default)."""
    side_texts: PositiveInt = 16
    """Passages of side text."""
    side_words: PositiveInt = 48
    """Words per side passage."""
    shared_data: str | None = None
    """Folder holding wikitext-2-raw and tinyshakespeare (for genre); None: ../shared/data."""

    def __post_init__(self):
        from saelab.analysis.report import position_of

        self.positions = str(self.positions)
        check_fields(self)
        position_of(self.positions)
        if self.unit is not None and self.unit not in UNITS:
            raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {self.unit!r}")


def steer_of(model, config: SteerConfig, side: Sequence[str]) -> Steer:
    """The Steer a config names: an SAE latent (clamped or its decoder row) or a class difference of means, with
    alpha in the config's unit."""
    from saelab.hub import load_sae

    if config.sae:
        if config.latent is None:
            raise ValueError("an SAE needs a latent (the latent to clamp or to steer along)")
        sae = load_sae(config.sae)
        if config.clamp:
            if config.unit is not None:
                raise ValueError("a clamp's alpha is the latent's value; unit is for directions (leave it out)")
            return Steer.clamp(sae, config.latent)
        if not 0 <= config.latent < sae.cfg.width:
            raise ValueError(f"latent {config.latent} is out of range for an SAE of width {sae.cfg.width}")
        unit, hook = config.unit or "norm", sae.cfg.hook_name
        row = sae.W_dec[config.latent].detach().float().cpu()
        gap = concept_of(model, config, hook)[1] if unit == "separation" else None
        return Steer.direction(model, hook, row, side if unit == "norm" else None, separation=gap)
    if not config.data:
        raise ValueError("give data (steer along the difference of class means) or an SAE with a latent")
    if not config.hook:
        raise ValueError("data needs a hook (where to read the classes and to add the direction)")
    (hook,) = model.resolve_hooks(config.hook)
    unit = config.unit or "separation"
    theta, gap = concept_of(model, config, hook)
    return Steer.direction(model, hook, theta, side if unit == "norm" else None,
                           separation=gap if unit == "separation" else None)


def concept_of(model, config: SteerConfig, hook: str) -> tuple[Tensor, float]:
    """(unit difference-of-means direction, separation) of the config's labelled data at `hook`."""
    from saelab.analysis.concepts import load_data
    from saelab.analysis.probes import concept_direction, concept_separation
    from saelab.analysis.report import position_of

    if not config.data:
        raise ValueError("unit separation needs data (labelled texts: the separation is between their class means)")
    data = load_data(config.data, config.shared_data)
    positive = config.positive or data.positive or data.classes[-1]
    X = model.activations_at(data.texts, hook, position_of(config.positions), names=data.origin)[hook]
    y = torch.tensor([label == positive for label in data.labels]).long()
    return concept_direction(X, y), concept_separation(X, y)


def target_of(config: SteerConfig):
    """The target a config names: word frequency in generations (words) or a logit difference (up, down)."""
    prompts = config.prompts.split("|")
    if config.words:
        return WordFrequency(prompts, config.words.split(","), n_new=config.new_tokens)
    if config.up:
        return LogitDiff(prompts, config.up.split(","), config.down.split(",") if config.down else [])
    raise ValueError("give a target: up (and down) words for a logit difference, or words to count in generations")


def run_steering(config: SteerConfig, *, model=None, log=None, trust_remote_code: bool = False,
                 max_batch_tokens: int | None = None, progress: bool = True) -> SteeringResult:
    """The steering sweep a config describes (what `saelab steer` runs); `model` skips loading it."""
    from saelab.models import load_model

    target = target_of(config)  # a missing target is refused before the model loads
    if model is None:
        options = {} if max_batch_tokens is None else {"max_batch_tokens": max_batch_tokens}
        model = load_model(config.model, trust_remote_code=trust_remote_code, **options)
    side = side_passages(config.side_text, config.side_texts, config.side_words)
    return sweep(model, steer_of(model, config, side), config.alphas, target, side, log=log, progress=progress)


__all__ = ["LogitDiff", "ProbeOutput", "Steer", "SteerConfig", "SteeringPoint", "SteeringResult", "UNITS",
           "WordFrequency", "concept_of", "mean_norm", "run_steering", "side_effects", "side_passages", "steer_of",
           "sweep", "target_of"]
