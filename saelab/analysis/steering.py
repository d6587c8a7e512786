"""Steering: push along a concept direction (or clamp an SAE latent) and measure what it does, and what it breaks.

    steer = Steer.direction(model, "blocks.9.hook_resid_post", theta, side_text)     # alpha in units of ||x||
    result = sweep(model, steer, [0, 0.25, 0.5, 1], LogitDiff(prompts, up=[" Monday"], down=[" London"]), side_text)
    result.plot("steering.png")

Every alpha reports the target effect *and* the side effects on unrelated text: KL(clean || steered) of the
next-token distributions and the steered cross-entropy next to the clean one. The point where KL and CE climb
while the target has stopped moving is where steering starts to break the model.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from saelab import __version__
from saelab.analysis.report import save_figure
from saelab.errors import DataError
from saelab.interventions import Add, Splice

if TYPE_CHECKING:
    from saelab.analysis.probes import Probe
    from saelab.sae import SAE

SCHEMA_VERSION = 1


@dataclass(eq=False)
class Steer:
    """alpha -> a patch: alpha * unit * norm added at `hook`, or an SAE latent clamped to alpha (error term kept)."""

    hook: str
    unit: Tensor | None = None
    norm: float = 1.0
    """Scale of one alpha for a direction: the mean activation norm at the hook (or 1 for raw units)."""
    sae: "SAE | None" = None
    latent: int | None = None

    @classmethod
    def direction(cls, model, hook: str, vector: Tensor, reference: Sequence[str] | None = None) -> "Steer":
        """Steer along `vector` (made unit). With `reference` texts, alpha counts in mean activation norms at the
        hook there (BOS left out), so the same alphas mean the same push on every model and layer."""
        vector = torch.as_tensor(vector).float()
        if vector.ndim != 1 or not float(vector.norm()) > 0:
            raise ValueError("a steering direction must be a non-zero vector [d]")
        norm = 1.0
        if reference is not None:
            tokens = model.tokenize(list(reference))
            acts = model.activations_at(tokens, hook, positions=tokens.text_mask)[hook]  # [real tokens, d]
            norm = float(acts.norm(dim=-1).mean())
        return cls(hook, vector / vector.norm(), norm)

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
        """Clamp latent `latent` of `sae` to alpha at every token (Splice with the error term kept)."""
        if not 0 <= latent < sae.cfg.width:
            raise ValueError(f"latent {latent} is out of range for an SAE of width {sae.cfg.width}")
        return cls(sae.cfg.hook_name, sae=sae, latent=latent)

    def patch(self, alpha: float):
        if self.sae is not None:
            return Splice(self.sae, error_term=True, clamp={self.latent: float(alpha)})
        return Add(self.hook, self.unit, scale=float(alpha) * self.norm)

    def describe(self) -> str:
        if self.sae is not None:
            return f"clamp latent {self.latent} at {self.hook}"
        return f"add alpha x {self.norm:.3g} x unit direction at {self.hook}"


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
class SteeringResult:
    model: str
    steer: str
    target: str
    ce_clean: float
    points: list[SteeringPoint]
    side_tokens: int
    schema_version: int = SCHEMA_VERSION
    saelab_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, folder: str | Path, name: str = "steering") -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")
        self.plot(folder / f"{name}.png")
        return folder

    def table(self) -> str:
        lines = [f"| alpha | {self.target} | KL to clean (nats) | CE (clean {self.ce_clean:.3f}) |", "|---|---|---|---|"]
        lines += [f"| {p.alpha:g} | {p.target:.3f} | {p.kl:.3f} | {p.ce:.3f} |" for p in self.points]
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path, title: str = "") -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

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
            ax.grid(alpha=0.3)
        return save_figure(fig, path)


def side_effects(model, side_text: Sequence[str], patch, batch_size: int | None = None) -> tuple[float, float]:
    """(mean KL(clean || patched), mean patched CE) on the side text. Each batch's clean forward runs next to its
    patched one instead of being kept for every alpha: the side text's log-probs at every position over the whole
    vocabulary would grow without bound, one batch's stay within the model's max_batch_tokens."""
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
          batch_size: int | None = None, log=None) -> SteeringResult:
    """Measure `target` and the side effects at every alpha (0 is added if missing: the clean baseline)."""
    if not side_text:
        raise DataError("sweep needs some unrelated side text to measure KL and CE on")
    alphas = sorted(set(float(a) for a in alphas) | {0.0})
    _, ce_clean = side_effects(model, side_text, None, batch_size=batch_size)
    points = []
    for alpha in alphas:
        patch = steer.patch(alpha) if alpha != 0 else None
        value = target.measure(model, patch)
        kl, ce = side_effects(model, side_text, patch, batch_size)
        samples = list(getattr(target, "samples", []) or []) or None
        points.append(SteeringPoint(alpha, value, kl, ce, samples))
        if log:
            log(f"  alpha {alpha:g}: {target.name} {value:.3f}, KL {kl:.3f}, CE {ce:.3f} (clean {ce_clean:.3f})")
    return SteeringResult(model.name, steer.describe(), target.name, ce_clean, points,
                          int(model.tokenize(list(side_text)).mask[:, 1:].sum()))


__all__ = ["LogitDiff", "ProbeOutput", "Steer", "SteeringPoint", "SteeringResult", "WordFrequency", "side_effects",
           "side_passages", "sweep"]
