"""Feature cards as HTML: rendered here in Python, so a card needs no JavaScript and looks the same in Jupyter, in
GitHub's notebook viewer and in the static dashboard. Hand-written CSS scoped under .saelab-card; no CDN, no fonts,
no images (the histogram is inline SVG). It reads the records (records.py) by their fields and imports nothing of
this package, so that a record can render itself (Feature._repr_html_)."""

from __future__ import annotations

import html
import math
from typing import Callable, Sequence

LEVELS = 9
STYLE = """
.saelab-card{font:13px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;color:#1d1d1f;max-width:1100px}
.saelab-card h2{font-size:17px;margin:4px 0}.saelab-card h3{font-size:13px;margin:12px 0 4px;color:#444}
.saelab-card .meta{color:#555;margin-bottom:6px}.saelab-card .cols{display:flex;gap:22px;flex-wrap:wrap}
.saelab-card .side{flex:0 0 290px}.saelab-card .main{flex:1 1 560px;min-width:0}
.saelab-card table{border-collapse:collapse}.saelab-card td{padding:1px 6px 1px 0;vertical-align:top}
.saelab-card td.n{text-align:right;font-variant-numeric:tabular-nums;color:#555;white-space:nowrap}
.saelab-card .ex{font:12px/1.7 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre-wrap;
 word-break:break-all;border-bottom:1px solid #eee;padding:1px 0}
.saelab-card .ex .v{display:inline-block;width:4.2em;color:#777;text-align:right;margin-right:8px}
.saelab-card .tok{border-radius:2px}.saelab-card .hit{outline:1.5px solid #c04000;font-weight:600}
.saelab-card .s1{background:#fff3e6}.saelab-card .s2{background:#ffe6cc}.saelab-card .s3{background:#ffd9b3}
.saelab-card .s4{background:#ffc999}.saelab-card .s5{background:#ffb980}.saelab-card .s6{background:#ffa866}
.saelab-card .s7{background:#ff974d}.saelab-card .s8{background:#ff8533}.saelab-card .s9{background:#ff7014}
.saelab-card .q{color:#555;margin:8px 0 2px}.saelab-card .dead{color:#a00}
.saelab-card svg rect{fill:#e07b39}.saelab-card svg.logits rect{fill:#5b7fb5}.saelab-card svg text{font-size:10px;fill:#555}
"""


MASSIVE_NOTE = "massive tokens only"
MASSIVE_FLAG = (f'<div class="meta massive" style="color:#a00"><b>&#9888; {MASSIVE_NOTE}</b>: every top example is at a '
                "token whose activation norm is far above the median token's (a massive activation, such as an "
                "attention sink); the latent rebuilds those few tokens rather than a feature of the text</div>")
"""Shown under the head of a latent whose top examples all sit at massive-norm tokens (an inline colour, so the
shared STYLE, and every other card, stay as they were)."""


def esc(text: str) -> str:
    return html.escape(text, quote=True)


def shown(token: str) -> str:
    """A token as it should read in a context line: newlines and tabs made visible."""
    return token.replace("\n", "\u21b5").replace("\t", "\u2192").replace("\r", "")


def number(x: float) -> str:
    """A number as every page and the index show it, short and without a break point: three significant digits,
    thousands grouped (2930 -> "2,930", never "2.93e+03"), and a compact exponent only for the very small
    (1.2e-05 -> "1.2e-5")."""
    if not x or not math.isfinite(x):
        return "0" if x == 0 else str(x)
    size = abs(x)
    if size >= 999.5:
        return f"{x:,.0f}"
    if size >= 1e-3:
        return f"{float(f'{x:.3g}'):g}"
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def percent(share: float) -> str:
    """A share (0..1) as a percentage, in number()'s format."""
    return f"{number(100 * share)}%"


def example_html(example, scale: float) -> str:
    """One context line of an Example: its activation, then each token shaded by this latent's activation (relative
    to `scale`, the latent's max), the example's own token outlined. The tokens of one character (see Example.spans)
    share a span, shaded by the largest of their activations."""
    parts = [f'<div class="ex"><span class="v">{number(example.value)}</span>']
    for span in example.spans():
        token, act = "".join(example.tokens[i] for i in span), max(example.acts[i] for i in span)
        level = min(LEVELS, math.ceil(LEVELS * act / scale)) if act > 0 and scale > 0 else 0
        classes = "tok" + (f" s{level}" if level else "") + (" hit" if example.at in span else "")
        title = f' title="{" ".join(number(example.acts[i]) for i in span)}"' if act else ""
        parts.append(f'<span class="{classes}"{title}>{esc(shown(token))}</span>')
    parts.append("</div>")
    return "".join(parts)


def histogram_svg(edges: Sequence[float], counts: Sequence[int], width: int = 280, height: int = 90) -> str:
    """Bars of the activation histogram on a log-x axis (the bins are log-spaced), labelled at both ends."""
    if not counts:
        return ""
    top = max(counts)
    step = width / len(counts)
    bars = "".join(f'<rect x="{i * step:.1f}" y="{height - 14 - (height - 16) * c / top:.1f}" width="{max(step - 0.5, 0.5):.1f}" '
                   f'height="{(height - 16) * c / top:.1f}"><title>{number(edges[i])}-{number(edges[i + 1])}: {c}</title></rect>'
                   for i, c in enumerate(counts) if c)
    labels = (f'<text x="0" y="{height - 2}">{number(edges[0])}</text>'
              f'<text x="{width}" y="{height - 2}" text-anchor="end">{number(edges[-1])}</text>')
    return f'<svg width="{width}" height="{height}" role="img" aria-label="activation histogram">{bars}{labels}</svg>'


def logit_histogram_svg(edges: Sequence[float], counts: Sequence[int], width: int = 280, height: int = 90) -> str:
    """Bars of the decoder direction's logit weights over the whole vocabulary (linear bins, log-scaled heights, so
    the few promoted and suppressed tokens in the tails still show), with a tick at zero and both ends labelled."""
    if not counts:
        return ""
    top = math.log1p(max(counts))
    step, plot = width / len(counts), height - 16
    bars = "".join(f'<rect x="{i * step:.1f}" y="{height - 14 - plot * math.log1p(c) / top:.1f}" '
                   f'width="{max(step - 0.5, 0.5):.1f}" height="{plot * math.log1p(c) / top:.1f}"><title>'
                   f"{number(edges[i])} to {number(edges[i + 1])}: {c:,} tokens</title></rect>"
                   for i, c in enumerate(counts) if c)
    zero = ""
    if edges[0] < 0 < edges[-1]:
        x = width * (0 - edges[0]) / (edges[-1] - edges[0])
        zero = (f'<line x1="{x:.1f}" x2="{x:.1f}" y1="0" y2="{height - 14}" stroke="#999" stroke-dasharray="2,2"/>'
                f'<text x="{x:.1f}" y="{height - 2}" text-anchor="middle">0</text>')
    labels = (f'<text x="0" y="{height - 2}">{number(edges[0])}</text><text x="0" y="9">log count</text>'
              f'<text x="{width}" y="{height - 2}" text-anchor="end">{number(edges[-1])}</text>')
    return (f'<svg class="logits" width="{width}" height="{height}" role="img" aria-label="logit weight histogram">'
            f"{bars}{zero}{labels}</svg>")


def card(feature, link: Callable[[int], str | None] | None = None, note: str = "") -> str:
    """The card of one latent (a Feature). link(latent) gives the href of another latent's page (or None) for the
    neighbours; `note` (HTML) goes under the head, where the dashboard puts the latent's label."""
    f = feature
    stats = (f"fires on {percent(f.density)} of {f.n_tokens:,} tokens ({f.count:,}&times;) &middot; "
             f"mean {number(f.mean)} &middot; max {number(f.max)}" if f.count
             else f'<span class="dead">never fired in {f.n_tokens:,} tokens</span>')
    head = f'<h2>Latent {f.latent}</h2><div class="meta">{esc(f.name) + " &middot; " if f.name else ""}{stats}</div>'
    if getattr(f, "massive_only", False):
        head += MASSIVE_FLAG
    head += note
    main = []
    if f.top:
        main.append(f"<h3>Top activations</h3>" + "".join(example_html(e, f.max) for e in f.top))
    for group in f.quantiles:
        main.append(f'<div class="q"><b>Quantile {100 * group.lo_q:.0f}&ndash;{100 * group.hi_q:.0f}%</b> '
                    f"(activations {number(group.lo)}&ndash;{number(group.hi)})</div>"
                    + "".join(example_html(e, f.max) for e in group.examples))
    if f.quantiles:
        main.insert(1, "<h3>Samples by quantile of the activation distribution</h3>")
    return (f'<div class="saelab-card">{head}<div class="cols"><div class="side">{_side(f, link)}</div>'
            f'<div class="main">{"".join(main)}</div></div></div>')


def _side(f, link: Callable[[int], str | None] | None) -> str:
    """The card's narrow column: both histograms, the promoted and suppressed tokens, the nearest latents."""
    side = []
    if f.hist_counts:
        side.append("<h3>Activation histogram (log scale, firing tokens)</h3>" + histogram_svg(f.hist_edges, f.hist_counts))
    logit_counts = getattr(f, "logit_counts", None)
    if logit_counts:
        side.append(f"<h3>Logit weights, all {sum(logit_counts):,} tokens</h3>"
                    + logit_histogram_svg(f.logit_edges, logit_counts))
    for title, rows in (("Promoted tokens (W_dec &middot; W_U)", f.promoted), ("Suppressed tokens", f.suppressed)):
        if rows:
            side.append(f"<h3>{title}</h3><table>" + "".join(
                f'<tr><td class="n">{value:+.2f}</td><td><span class="tok s3">{esc(shown(token))}</span></td></tr>'
                for token, value in rows) + "</table>")
    if f.nearest:
        cells = []
        for latent, cosine in f.nearest:
            href = link(latent) if link else None
            name = (f'<a href="{esc(href)}">{latent}</a>' if href
                    else f"{latent} (not exported)" if link else str(latent))  # in a dashboard: say why no link
            cells.append(f'<tr><td class="n">{cosine:.3f}</td><td>latent {name}</td></tr>')
        side.append("<h3>Nearest latents (decoder cosine)</h3><table>" + "".join(cells) + "</table>")
    return "".join(side)


def top_tokens(feature, n: int = 4) -> list[str]:
    """The distinct tokens a Feature's top examples fire on, most frequent first."""
    counts: dict[str, int] = {}
    for example in feature.top:
        token = example.firing_text
        counts[token] = counts.get(token, 0) + 1
    return sorted(counts, key=lambda t: -counts[t])[:n]


class Browser:
    """Latents listed one per line (density, max, top tokens); each line unfolds into its card. Pure HTML
    (<details>), so it works wherever notebook HTML is shown, scripts or not."""

    def __init__(self, features: list):
        self.features = features

    def _repr_html_(self) -> str:
        rows = []
        for f in self.features:
            tokens = " ".join(f'<span class="tok s3">{esc(shown(t))}</span>' for t in top_tokens(f))
            flag = f' &middot; <b style="color:#a00">&#9888; {MASSIVE_NOTE}</b>' if getattr(f, "massive_only", False) else ""
            rows.append(f"<details><summary>latent <b>{f.latent}</b> &middot; {percent(f.density)} &middot; max "
                        f"{number(f.max)} &middot; {tokens}{flag}</summary>{card(f)}</details>")
        return f'<style>{STYLE}</style><div class="saelab-card">{"".join(rows)}</div>'
