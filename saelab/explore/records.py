"""The plain records a feature card is made of (one latent's examples, quantile samples and numbers), apart from
FeatureSet, which reads them out of a pass: the renderers and the dashboard take these, and JSON is their dict."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from saelab.explore.html import STYLE, card
from saelab.explore.plots import plot_feature


@dataclass
class Example:
    """A window of text around one firing: the tokens, this latent's activation on each, and which one fired."""

    tokens: list[str]
    acts: list[float]
    at: int
    """Index in `tokens` of the token the example is about."""
    value: float
    context: int
    position: int
    """Where the firing token sits: context number and position in it (as in the cache)."""

    def spans(self) -> list[range]:
        """The tokens as shown, one span each, except that a token with no text of its own (its bytes end inside a
        character the next token completes, see TokenTexts.window) shares the next token's span."""
        spans, start = [], 0
        for i, token in enumerate(self.tokens):
            if token or i == len(self.tokens) - 1:
                spans.append(range(start, i + 1))
                start = i + 1
        return spans

    def span_of(self, i: int) -> range:
        """The span token i is shown in."""
        return next(span for span in self.spans() if i in span)

    @property
    def firing_text(self) -> str:
        """The text of the firing token's span: its own, or the character it is part of."""
        return "".join(self.tokens[i] for i in self.span_of(self.at))


@dataclass
class QuantileGroup:
    """Firings whose activation ranks between quantiles lo_q and hi_q of the latent's activations (exact when the
    latent fired at most `sample` times in the pass, else of a uniform random sample of its firings)."""

    lo_q: float
    hi_q: float
    lo: float
    hi: float
    examples: list[Example]


@dataclass
class Feature:
    """Everything a card shows about one latent."""

    latent: int
    width: int
    n_tokens: int
    count: int
    mean: float
    max: float
    top: list[Example]
    quantiles: list[QuantileGroup]
    hist_edges: list[float]
    hist_counts: list[int]
    promoted: list[tuple[str, float]] = field(default_factory=list)
    suppressed: list[tuple[str, float]] = field(default_factory=list)
    nearest: list[tuple[int, float]] = field(default_factory=list)
    name: str = ""
    massive_only: bool = False
    """Every top example is at a massive-norm token (see saelab.explore.stats): likely an attention-sink latent."""
    logit_edges: list[float] = field(default_factory=list)
    logit_counts: list[int] = field(default_factory=list)
    """Histogram of the decoder direction's logit weights W_dec[i] @ W_U over the whole vocabulary (equal-width
    bins over [min, max]): where the promoted and suppressed tokens sit against all the others."""

    @property
    def density(self) -> float:
        """Fraction of tokens the latent fires on."""
        return self.count / max(self.n_tokens, 1)

    def to_dict(self) -> dict:
        return asdict(self)

    def html(self, link=None, note: str = "") -> str:
        return card(self, link, note)

    def _repr_html_(self) -> str:
        return f"<style>{STYLE}</style>{self.html()}"

    def plot(self, path: str | Path | None = None):
        return plot_feature(self, path)
