"""Find latents: those that fire on a token or phrase ("Monday"), and those most active on a given text.

    features.search("Monday")                     # over the pass's top examples and sampled firings (no model)
    fires_on(model, sae, "Monday")                # live: the phrase in a few sentences, vs the other tokens there
    most_active_on(model, sae, "See you on Monday at the station.")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from saelab.explore.examples import EMPTY, ExampleTable
from saelab.explore.html import esc
from saelab.explore.texts import REPLACEMENT

TEMPLATES = ("{}", "The next word is {}.", "She wrote {} on the board and left.", "We talked about {} yesterday.",
             "In the text, {} appears twice: {} again.")
"""Neutral sentences to read a phrase in, when fires_on is given no texts of its own."""


@dataclass
class LatentTable:
    """A ranked list of latents with a few numbers each; prints as text and shows as a table in Jupyter."""

    title: str
    columns: list[str]
    rows: list[list]

    @property
    def latents(self) -> list[int]:
        return [row[0] for row in self.rows]

    @staticmethod
    def _cell(value) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    def __str__(self) -> str:
        lines = [self.title, "| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(self._cell(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{esc(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{esc(self._cell(v))}</td>" for v in row) + "</tr>" for row in self.rows)
        return f"<div><b>{esc(self.title)}</b><table><tr>{head}</tr>{body}</table></div>"


# ---------------------------------------------------------------------------------------------------- in a pass
def search_examples(features, phrase: str, n: int = 10) -> LatentTable:
    """Latents whose top examples and sampled firings fire on a token inside `phrase` (case-insensitive): ranked by
    the share of their sampled firings that do (what fraction of the latent's activity is about the phrase), then by
    the share of their top examples."""
    if not phrase:
        raise ValueError("search needs a non-empty token or phrase")
    wanted = phrase.strip().lower() or phrase.lower()  # a whitespace token such as "\n" is searched as it is
    stats = features.stats
    shares = []
    for table in (stats.top, stats.sample):
        hits = _hits(features, table, wanted) if table.n else torch.zeros(stats.width, 0, dtype=torch.bool)
        filled = table.filled.sum(1).clamp(min=1)
        best = torch.where(hits, table.value, 0).amax(1) if table.n else torch.zeros(stats.width)
        shares.append((hits.sum(1), hits.sum(1) / filled, best))
    (top_hits, top_share, top_best), (sample_hits, sample_share, sample_best) = shares
    score = sample_share + top_share * 1e-3  # ties (e.g. no sample) broken by the top examples
    found = ((top_hits + sample_hits) > 0).nonzero().squeeze(1)
    order = found[torch.argsort(score[found], descending=True, stable=True)][:n]
    rows = [[int(i), round(float(sample_share[i]), 3), f"{int(top_hits[i])}/{int((stats.top.row[i] >= 0).sum())}",
             float(torch.maximum(top_best[i], sample_best[i])), float(stats.density[i])] for i in order]
    return LatentTable(f"latents firing on {phrase!r} over {stats.n_tokens:,} tokens",
                       ["latent", "share of sampled firings", "top examples", "max on it", "density"], rows)


def _hits(features, table: ExampleTable, wanted: str) -> Tensor:
    """bool [width, n]: the examples whose firing token lies inside an occurrence of `wanted` in their window."""
    firing = table.tokens[:, :, table.before].long()
    ids = sorted(set(firing.unique().tolist()) - {EMPTY})
    keys = [text.strip().lower() or text.lower() for text in features.token_texts(ids)]
    # a token that is part of a character (東 in byte-level tokens) is judged in its window, decoded together
    inside = [i for i, key in zip(ids, keys) if key and (key in wanted or REPLACEMENT in key)]
    hits = torch.isin(firing, torch.tensor(inside, dtype=torch.long)) & table.filled
    for latent, slot in hits.nonzero().tolist():  # the firing token is part of the phrase; is the phrase there?
        ids = table.tokens[latent, slot]
        texts = features.window_texts(ids[ids != EMPTY].tolist())
        at = int((ids[: table.before] != EMPTY).sum())
        start = sum(len(t) for t in texts[:at])
        own = next((t for t in texts[at:] if t), "")  # its text, or that of the token completing its character
        hits[latent, slot] = _overlaps("".join(texts).lower(), wanted, start, start + len(own))
    return hits


def _overlaps(text: str, wanted: str, start: int, end: int) -> bool:
    """Whether some occurrence of `wanted` in `text` overlaps the characters [start, end)."""
    found = text.find(wanted)
    while found >= 0:
        if found < end and found + len(wanted) > start:
            return True
        found = text.find(wanted, found + 1)
    return False


# ---------------------------------------------------------------------------------------------------- live
def encode_texts(model, sae, texts: str | Sequence[str]):
    """(Tokens, codes [n, L, width]) of `texts` read at the SAE's hook; BOS and padding positions are zero."""
    hook = sae.cfg.hook_name
    if not hook:
        raise ValueError("the SAE names no hook (cfg.hook_name), so it is unclear where to read the model")
    tokens = model.tokenize(texts)
    acts = model.activations_at(tokens, hook, positions=None)[hook]
    if acts.shape[-1] != sae.cfg.d_in:
        raise ValueError(f"the SAE reads d_in={sae.cfg.d_in} but {hook} of {model.name} has width {acts.shape[-1]}")
    folded = sae.fold_input_scale() if sae.cfg.input_scale != 1 else sae
    with torch.no_grad():
        codes = folded.encode(acts.reshape(-1, acts.shape[-1]).to(folded.device, folded.dtype)).float().cpu()
    codes = codes.reshape(*acts.shape[:2], -1) * tokens.text_mask[..., None]
    return tokens, codes


def most_active_on(model, sae, text: str, n: int = 10) -> LatentTable:
    """The latents with the largest activation anywhere in `text`, with the token where each peaks and how many
    of the text's tokens it fires on."""
    tokens, codes = encode_texts(model, sae, [text])
    codes = codes[0]
    peak, where = codes.max(0)
    order = peak.topk(min(n, len(peak))).indices
    order = order[peak[order] > 0]
    # the characters each token covers in the text (each byte-level token of 東 reads 東), else each decoded alone
    names = ([text[start:end] for start, end in tokens.spans[0].tolist()] if tokens.spans is not None
             else model.tokenizer.batch_decode(tokens.ids[0].unsqueeze(1).tolist()))
    rows = [[int(i), float(peak[i]), names[int(where[i])], int((codes[:, i] > 0).sum())] for i in order]
    return LatentTable(f"most active latents on {text[:60]!r}", ["latent", "max", "at token", "tokens fired"], rows)


def fires_on(model, sae, phrase: str, texts: Sequence[str] | None = None, n: int = 10) -> LatentTable:
    """Latents that fire on `phrase` inside `texts` (default: a few neutral sentences) more than on the texts' other
    tokens: per occurrence the latent's largest activation over the phrase's tokens, averaged over occurrences,
    minus its mean activation on the other tokens."""
    if not phrase.strip():
        raise ValueError("fires_on needs a non-empty phrase")
    texts = list(texts) if texts is not None else [t.format(*[phrase] * t.count("{}")) for t in TEMPLATES]
    tokens, codes = encode_texts(model, sae, texts)
    on, inside = [], torch.zeros(tokens.ids.shape, dtype=torch.bool)
    for row, text in enumerate(texts):
        starts = [i for i in range(len(text)) if text.startswith(phrase, i)]
        if not starts:
            raise ValueError(f"text {row} does not contain {phrase!r}: {text[:80]!r}")
        for start in starts:
            positions = tokens.covering(row, start, start + len(phrase))
            inside[row, positions] = True
            on.append(codes[row, positions].amax(0))
    on = torch.stack(on)
    others = tokens.text_mask & ~inside
    off = codes[others].mean(0) if others.any() else torch.zeros(codes.shape[-1])
    score = on.mean(0) - off
    order = score.topk(min(n, len(score))).indices
    order = order[score[order] > 0]
    rows = [[int(i), float(on[:, i].mean()), round(float((on[:, i] > 0).float().mean()), 3), float(off[i])]
            for i in order]
    return LatentTable(f"latents firing on {phrase!r} in {len(texts)} texts ({len(on)} occurrences)",
                       ["latent", "mean max on phrase", "share of occurrences", "mean elsewhere"], rows)
