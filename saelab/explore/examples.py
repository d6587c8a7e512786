"""Per-latent tables of examples kept while codes stream past: the n best entries of each latent by some score.

One table with score = activation keeps each latent's top activating examples; one with score = a random number
keeps a uniform sample of each latent's firings (bottom-k / priority sampling), whose order statistics are the
latent's quantiles. Both merge a chunk at a time with one sort and one `topk` over [width, 2n], never a Python
heap per token, so a pass over millions of tokens stays fast and its memory stays at [width, n] entries.

Each kept example also remembers a window of tokens around it and this latent's activation on each of them, so
cards can shade the whole context; the windows are filled from the chunks that hold those rows (see `Window`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

EMPTY = -1
"""token id / row of a slot or window cell that holds nothing (outside the context, or no example yet)."""


@dataclass
class Window:
    """Rows [start, start + len) of the pass (one to three consecutive chunks), for looking up the tokens and the
    codes around an example. keys = row * width + latent of every nonzero, ascending (CSR order), so a latent's
    value at any row is one `searchsorted` away."""

    start: int
    token_ids: Tensor
    contexts: Tensor
    keys: Tensor
    values: Tensor

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)

    @classmethod
    def join(cls, parts: list["Window"]) -> "Window":
        return cls(parts[0].start, *(torch.cat([getattr(p, name) for p in parts])
                                     for name in ("token_ids", "contexts", "keys", "values")))

    def around(self, latents: Tensor, rows: Tensor, contexts: Tensor, before: int, after: int,
               width: int) -> tuple[Tensor, Tensor]:
        """(token ids [q, W], activations of each query's latent [q, W]) at rows - before .. rows + after, cut at
        the query's own context (EMPTY tokens and 0 beyond it)."""
        at = rows[:, None] + torch.arange(-before, after + 1)[None, :]
        inside = (at >= self.start) & (at < self.end)
        local = (at - self.start).clamp(0, len(self.token_ids) - 1)
        inside &= self.contexts[local] == contexts[:, None]
        tokens = torch.where(inside, self.token_ids[local], EMPTY)
        wanted = at * width + latents[:, None]
        found = torch.searchsorted(self.keys, wanted).clamp(max=max(len(self.keys) - 1, 0))
        hit = inside & (self.keys[found] == wanted) if len(self.keys) else torch.zeros_like(inside)
        values = torch.where(hit, self.values[found] if len(self.keys) else 0.0, 0.0)
        return tokens.int(), values.float()


def sort_key(latents: Tensor, scores: Tensor) -> Tensor:
    """int64 keys that sort by latent ascending, then score descending: one argsort instead of two stable ones.
    Non-negative float32 scores order like their bit patterns, so the score fills the low 32 bits."""
    bits = scores.float().clamp(min=0).view(torch.int32).long()
    return latents.long() * (1 << 32) + ((1 << 31) - 1 - bits)


class ExampleTable:
    """For each of `width` latents, the (up to) n entries with the largest score seen so far, each with its
    activation, row of the pass, context, position and a window of tokens and activations.

    While the pass runs, entries stay in the slot they were written to (a newcomer overwrites the worst one), so a
    merge touches only the slots that change, never the windows of the others; `sort()` orders them at the end.
    """

    def __init__(self, width: int, n: int, before: int, after: int):
        self.width, self.n, self.before, self.after = width, n, before, after
        self.score = torch.full((width, n), float("-inf"))
        self.floor = torch.full((width,), float("-inf"))
        """Each latent's n-th best score: what a newcomer has to beat."""
        self.value = torch.zeros(width, n)
        self.row = torch.full((width, n), EMPTY, dtype=torch.long)
        self.context = torch.full((width, n), EMPTY, dtype=torch.long)
        self.position = torch.full((width, n), EMPTY, dtype=torch.long)
        self.tokens = torch.full((width, n, before + after + 1), EMPTY, dtype=torch.int32)
        self.acts = torch.zeros(width, n, before + after + 1)

    @property
    def filled(self) -> Tensor:
        """bool [width, n]: which slots hold an example."""
        return self.row >= 0

    def offer(self, latents: Tensor, scores: Tensor, values: Tensor, rows: Tensor, contexts: Tensor,
              positions: Tensor) -> None:
        """Merge one chunk's nonzeros (one entry each: its latent, score, value, row, context, position)."""
        entrants = (scores > self.floor[latents]).nonzero().squeeze(1)  # can beat the latent's n-th best
        if not len(entrants):
            return
        n = self.n
        order = entrants[torch.argsort(sort_key(latents[entrants], scores[entrants]))]
        sorted_latents = latents[order]
        counts = torch.bincount(sorted_latents, minlength=self.width)
        rank = torch.arange(len(order)) - (counts.cumsum(0) - counts)[sorted_latents]
        keep = rank < n
        entry, entry_latent, entry_rank = order[keep], sorted_latents[keep], rank[keep]
        # the i-th best newcomer of a latent enters if it beats the i-th worst entry there (a prefix of newcomers)
        worst_first = self.score.argsort(dim=1)
        beaten = self.score.gather(1, worst_first)[entry_latent, entry_rank]
        enters = scores[entry] > beaten
        entry, latent = entry[enters], entry_latent[enters]
        slot = worst_first[latent, entry_rank[enters]]
        self.score[latent, slot] = scores[entry]
        self.value[latent, slot] = values[entry].to(self.value.dtype)
        self.row[latent, slot] = rows[entry]
        self.context[latent, slot] = contexts[entry]
        self.position[latent, slot] = positions[entry]
        self.tokens[latent, slot] = EMPTY  # filled by `fill` once the chunks around the row are in
        self.acts[latent, slot] = 0.0
        self.floor = self.score.amin(1)

    def sort(self) -> None:
        """Order each latent's entries best first (empty slots last)."""
        order = self.score.argsort(dim=1, descending=True, stable=True)
        for name in ("score", "value", "row", "context", "position"):
            setattr(self, name, getattr(self, name).gather(1, order))
        for name in ("tokens", "acts"):
            table = getattr(self, name)
            setattr(self, name, table.gather(1, order[..., None].expand(-1, -1, table.shape[2])))

    def fill(self, window: Window, first: int, end: int) -> None:
        """Fill the windows of the slots whose rows lie in [first, end) from `window` (which must cover them with
        `before` rows to spare on the left and `after` on the right, or reach the start / end of the pass)."""
        where = ((self.row >= first) & (self.row < end)).nonzero()
        if not len(where):
            return
        latents, slots = where[:, 0], where[:, 1]
        tokens, acts = window.around(latents, self.row[latents, slots], self.context[latents, slots],
                                     self.before, self.after, self.width)
        self.tokens[latents, slots] = tokens
        self.acts[latents, slots] = acts
