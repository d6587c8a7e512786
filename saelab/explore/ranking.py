"""The dashboard index's search, ranked: which exported latents a query finds, best first.

The idea is search_examples' (search.py): a latent is about a token when a large share of its firings are on it.
Each index row carries the few tokens its top examples and sampled firings fire on, with counts (a dozen pairs, so
the index stays small), and a query is scored against them: a latent whose firings are on the query as a whole token
ranks above any whose firing tokens only contain it, each tier ordered by that share. A label that contains the
query (a person's reading of the latent) ranks above both; a promoted token that contains it, below both.

The index scores in JavaScript (SCORE_SCRIPT); `score` and `rank` here are the same rules in Python, and a test runs
both on the same rows, so the two cannot drift apart.
"""

from __future__ import annotations

from collections import Counter

from saelab.explore.examples import EMPTY

TERMS = 12
"""Distinct firing tokens kept per latent in the index."""
LABEL, WHOLE, PART, PROMOTED = 4.0, 2.0, 1.0, 0.5
"""Score tiers: label contains the query; a firing token is the query; a firing token contains it; a promoted token
contains it. Within the two firing tiers the share of firings (0..1) is added, so tiers never mix."""


def query_key(text: str) -> str:
    """A query or token as it is compared: stripped and lower-cased (a whitespace-only token as it is)."""
    return text.strip().lower() or text.lower()


def firing_terms(features, latent: int, n: int = TERMS) -> tuple[list[list], int]:
    """([[token key, firings], ...] most frequent first, at most `n`; and the number of firings counted): the
    tokens latent `latent` fires on among its top examples and its sampled firings."""
    stats = features.stats
    ids = []
    for table in (stats.top, stats.sample):
        if table.n:
            firing = table.tokens[latent, :, table.before]
            ids += firing[table.row[latent] != EMPTY].tolist()
    counts = Counter(query_key(text) for text in features.token_texts(ids))
    return [[key, count] for key, count in counts.most_common(n)], len(ids)


def score(query: str, terms: list[list], total: int, label: str = "", promoted: list[str] = ()) -> float:
    """How well a latent's row matches `query` (0: not at all); see the module's docstring for the tiers."""
    q = query_key(query)
    if not q:
        return 0.0
    whole = sum(count for key, count in terms if key == q)
    part = sum(count for key, count in terms if key != q and q in key)
    value = LABEL if q in label.lower() else 0.0
    if whole:
        return value + WHOLE + whole / max(total, 1)
    if part:
        return value + PART + part / max(total, 1)
    if any(q in token.lower() for token in promoted):
        return value + PROMOTED
    return value


def rank(query: str, rows: list[dict]) -> list[int]:
    """The latents of index rows (dicts with latent, terms, total, label, promoted) that match `query`, best
    first, ties in latent order."""
    scored = [(score(query, r["terms"], r["total"], r.get("label", ""), r.get("promoted", [])), r["latent"])
              for r in rows]
    return [latent for value, latent in sorted(scored, key=lambda item: (-item[0], item[1])) if value > 0]


SCORE_SCRIPT = """
function queryKey(text) { return text.trim().toLowerCase() || text.toLowerCase(); }
function score(query, terms, total, label, promoted) {
  var q = queryKey(query), whole = 0, part = 0, value = 0;
  if (!q) return 0;
  terms.forEach(function (t) { if (t[0] === q) whole += t[1]; else if (t[0].indexOf(q) >= 0) part += t[1]; });
  if ((label || '').toLowerCase().indexOf(q) >= 0) value = %(LABEL)s;
  if (whole) return value + %(WHOLE)s + whole / Math.max(total, 1);
  if (part) return value + %(PART)s + part / Math.max(total, 1);
  if ((promoted || []).some(function (t) { return t.toLowerCase().indexOf(q) >= 0; })) return value + %(PROMOTED)s;
  return value;
}
""" % {"LABEL": LABEL, "WHOLE": WHOLE, "PART": PART, "PROMOTED": PROMOTED}
"""score() in JavaScript, for the index page."""
