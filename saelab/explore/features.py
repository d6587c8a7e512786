"""What a user holds after a pass: a FeatureSet reads each latent's card (top contexts, quantile samples, histogram,
density, logit effects, neighbours) out of the pass's `LatentStats` and offers the views of them in one place.

    features = explore(sae, "runs/acts", model)      # one pass over the cache
    features[123]                                    # a card in Jupyter (_repr_html_)
    features.browse(features.most_active(20))        # a small browser over latents
    features.dashboard("runs/dash")                  # static HTML folder that opens from disk
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from saelab.activations.joined import split
from saelab.codes import Source
from saelab.explore.dashboard import write_dashboard
from saelab.explore.directions import logit_effects, logit_histogram, nearest_latents, unembedding
from saelab.explore.examples import EMPTY, ExampleTable
from saelab.explore.html import Browser
from saelab.explore.records import Example, Feature, QuantileGroup
from saelab.explore.search import LatentTable, search_examples
from saelab.explore.selection import sample_latents
from saelab.explore.stats import LatentStats, collect
from saelab.explore.texts import TokenTexts

TOP_EXAMPLES = 20
"""Top activating examples kept per latent."""
SAMPLED_FIRINGS = 50
"""Firings sampled per latent for its quantile groups."""


class LatentError(IndexError, ValueError):
    """A latent number that is not an int in [0, width): an IndexError for `features[i]`, a ValueError for callers
    (such as the CLI) that report bad input."""


class FeatureSet:
    """All latents of one SAE over one pass of codes; `features[i]` is latent i's card data (a `Feature`)."""

    def __init__(self, stats: LatentStats, tokenizer, W_dec: Tensor, W_U: Tensor | None = None, *, name: str = "",
                 groups: int = 5, per_group: int = 4, n_logits: int = 10, n_nearest: int = 8):
        if W_dec.shape[0] != stats.width:
            raise ValueError(f"the decoder has {W_dec.shape[0]} latents but the codes have {stats.width}")
        self.stats, self.tokenizer, self.name = stats, tokenizer, name
        self.groups, self.per_group = groups, per_group
        self.logits = logit_effects(W_dec, W_U, n_logits) if W_U is not None else None
        self._W_dec, self._W_U = W_dec, W_U  # for each card's histogram of logit weights
        self.nearest = nearest_latents(W_dec, n_nearest)
        self._texts = TokenTexts(tokenizer)
        vocab = len(tokenizer)
        seen = int(max(stats.top.tokens.max(), stats.sample.tokens.max() if stats.sample.n else -1))
        if seen >= vocab:
            raise ValueError(f"the codes hold token id {seen} but the tokenizer has {vocab} tokens: the cache was "
                             f"made with another model's tokenizer")

    @property
    def width(self) -> int:
        return self.stats.width

    def __len__(self) -> int:
        return self.width

    def check(self, latent) -> int:
        if isinstance(latent, Tensor):
            latent = latent.item()
        if isinstance(latent, bool) or not isinstance(latent, int):
            raise TypeError(f"a latent is an int, got {latent!r}")
        if not 0 <= latent < self.width:
            raise LatentError(f"latent {latent} is out of range: this SAE has {self.width} latents (0..{self.width - 1})")
        return latent

    def __getitem__(self, latent: int) -> Feature:
        latent = self.check(latent)
        stats = self.stats
        top = self._examples(stats.top, latent, list(range(stats.top.n)))
        counts = stats.hist[latent]
        nonzero = counts.nonzero().squeeze(1)
        first, last = (int(nonzero[0]), int(nonzero[-1]) + 1) if len(nonzero) else (0, 0)
        promoted = suppressed = []
        logit_edges, logit_counts = [], []
        if self.logits is not None:
            up_v, up_i, down_v, down_i = (t[latent] for t in self.logits)
            promoted = list(zip(self.token_texts(up_i.tolist()), up_v.tolist()))
            suppressed = list(zip(self.token_texts(down_i.tolist()), down_v.tolist()))
            logit_edges, logit_counts = logit_histogram(self._W_dec[latent], self._W_U)
        cos, near = self.nearest[0][latent], self.nearest[1][latent]
        count = int(stats.count[latent])
        return Feature(latent, self.width, stats.n_tokens, count, float(stats.total[latent]) / max(count, 1),
                       float(stats.max[latent]), top, self._quantiles(latent),
                       stats.edges[first : last + 1].tolist() if last else [], counts[first:last].tolist(),
                       promoted, suppressed, list(zip(near.tolist(), cos.tolist())), self.name,
                       massive_only=stats.massive_only is not None and bool(stats.massive_only[latent]),
                       logit_edges=logit_edges, logit_counts=logit_counts)

    def _quantiles(self, latent: int) -> list[QuantileGroup]:
        """Split the latent's sampled firings, sorted by activation, into `groups` equal-count groups."""
        table = self.stats.sample
        if not table.n:
            return []
        filled = (table.row[latent] >= 0).nonzero().squeeze(1)
        slots = filled[torch.argsort(table.value[latent, filled])].tolist()
        m, out = len(slots), []
        for j in range(self.groups if m else 0):
            begin, end = j * m // self.groups, (j + 1) * m // self.groups
            if end <= begin:
                continue
            group = slots[begin:end]
            spread = sorted({round(i * (len(group) - 1) / max(self.per_group - 1, 1))
                             for i in range(min(self.per_group, len(group)))})  # evenly through the group
            picks = [group[i] for i in spread]
            values = table.value[latent, group]
            out.append(QuantileGroup(j / self.groups, (j + 1) / self.groups, float(values.min()), float(values.max()),
                                     self._examples(table, latent, picks[::-1])))
        return out[::-1]  # highest quantiles first, like the top examples

    def _examples(self, table: ExampleTable, latent: int, slots: list[int]) -> list[Example]:
        rows, values = table.row[latent].tolist(), table.value[latent].tolist()
        contexts, positions = table.context[latent].tolist(), table.position[latent].tolist()
        tokens, acts = table.tokens[latent].tolist(), table.acts[latent].tolist()
        out = []
        for slot in slots:
            if rows[slot] == EMPTY:
                continue
            keep = [i for i, token in enumerate(tokens[slot]) if token != EMPTY]
            at = sum(1 for i in keep if i < table.before)
            out.append(Example(self.window_texts([tokens[slot][i] for i in keep]), [acts[slot][i] for i in keep], at,
                               values[slot], contexts[slot], positions[slot]))
        return out

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each token id decoded on its own (cached)."""
        return self._texts.alone(ids)

    def window_texts(self, ids: Sequence[int]) -> list[str]:
        """Each token's piece of the text of consecutive tokens `ids` (see TokenTexts.window): "".join(pieces) reads
        as the tokens decoded together, a character split across tokens going to the token that completes it."""
        return self._texts.window(ids)

    def most_active(self, n: int = 20, by: str = "count") -> list[int]:
        """The n latents that fire most often (by="count") or most strongly (by="max")."""
        if by not in ("count", "max"):
            raise ValueError(f"by must be 'count' or 'max', got {by!r}")
        score = self.stats.count.double() if by == "count" else self.stats.max.double()
        return score.topk(min(n, self.width)).indices.tolist()

    def sample_latents(self, n: int = 50, seed: int = 0, bands: int | None = None) -> list[int]:
        """n latents that show the whole SAE: equal shares of log-spaced firing-density bands (the densest latents
        one band among them), dead and massive-token-only latents left out (see saelab.explore.selection)."""
        return sample_latents(self.stats, n, seed, bands)

    def search(self, phrase: str, n: int = 10) -> LatentTable:
        """Latents that fire on `phrase` in the pass: the share of their top examples and of their sampled firings
        whose firing token lies inside an occurrence of the phrase (case-insensitive)."""
        return search_examples(self, phrase, n)

    def browse(self, latents: Sequence[int] | None = None) -> Browser:
        """A small browser over latents for Jupyter: one line each, unfolding into its card."""
        return Browser([self[latent] for latent in (self.most_active(20) if latents is None else latents)])

    def dashboard(self, out: str | Path, latents: Sequence[int] | None = None, *, title: str = "",
                  neighbours: bool = True, labels: dict[int, str] | str | Path | None = None, about: str = "") -> Path:
        """Write a static dashboard (index.html + latents/<i>.html, inline CSS/JS, no network) for `latents`
        (default: all) and, with `neighbours`, their nearest latents; `labels` ({latent: text} or a JSON file) are
        shown and searched. Returns the index page's path."""
        return write_dashboard(self, out, range(self.width) if latents is None else latents, title=title,
                               neighbours=neighbours, labels=labels, about=about)

    def __repr__(self) -> str:
        alive = int((self.stats.count > 0).sum())
        return (f"FeatureSet({self.name or 'SAE'}: {self.width} latents, {alive} fired, over "
                f"{self.stats.n_tokens:,} tokens)")


def explore(sae, source: Source, model=None, *, tokenizer=None, hook: str | None = None, top: int = TOP_EXAMPLES,
            sample: int = SAMPLED_FIRINGS, before: int = 12, after: int = 4, max_tokens: int | None = None,
            batch_size: int = 8192, check_model: bool = True, progress=None) -> FeatureSet:
    """One pass of `sae` over `source` (a cache folder, an ActivationStore or a ModelStream) -> a FeatureSet.

    model: the LanguageModel the activations came from (gives the tokenizer and the unembedding for the logit
    table); or pass just `tokenizer` and go without the logit table.
    """
    if model is None and tokenizer is None:
        raise ValueError("explore needs the model (for its tokenizer and unembedding) or at least tokenizer=")
    if model is not None:
        if check_model and sae.cfg.model_name and model.name and sae.cfg.model_name != model.name:
            raise ValueError(f"the SAE was trained on {sae.cfg.model_name!r} but the model given is {model.name!r}; "
                             "pass check_model=False if they are the same model under two names")
        if model.d_model != sae.cfg.d_in and (sae.cfg.hook_name or "").endswith(("resid_post", "resid_pre")) \
                and not sae.cfg.is_crosscoder:
            raise ValueError(f"the SAE reads d_in={sae.cfg.d_in} but {model.name} has d_model={model.d_model}")
    stats = collect(sae, source, hook=hook, top=top, sample=sample, before=before, after=after,
                    batch_size=batch_size, max_tokens=max_tokens, check_model=check_model, progress=progress)
    stats.meta = {"source": str(getattr(source, "path", source)), "hook": hook or sae.cfg.hook_name,
                  "model": sae.cfg.model_name}
    rows = decoder_rows(sae, model)
    W_U = unembedding(model) if model is not None and model.d_model == rows.shape[1] else None
    name = f"{sae.cfg.arch}-{sae.cfg.width}" + (f"-k{sae.cfg.k}" if sae.cfg.k else "")
    if sae.cfg.hook_name:
        name += f" @ {sae.cfg.hook_name}"
    return FeatureSet(stats, model.tokenizer if model is not None else tokenizer, rows, W_U, name=name)


def decoder_rows(sae, model=None) -> Tensor:
    """The decoder rows the cards read (logit table, nearest latents): the SAE's own, or a crosscoder's last part
    written in `model`'s space (the write nearest its unembedding), in that hook's raw units."""
    rows = sae.W_dec.detach()
    if not sae.cfg.is_crosscoder:
        return rows
    pieces = split(sae.cfg.parts, rows, raw=True)
    mine = [i for i, part in enumerate(sae.cfg.parts) if model is None or part["model"] in ("", model.name)]
    return pieces[mine[-1] if mine else -1]
