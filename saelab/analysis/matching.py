"""Pair features of A with features of B from their correlation matrix, and filter the pairs.

Three pairings, each keeping only positive correlations (a feature constant over the text, e.g. a latent that never
fired, has correlation 0 with everything and is never paired):
- `many_to_one`: each A feature's best B feature (several A's may share one B);
- `mutual_best`: pairs where each is the other's best;
- `one_to_one`: the assignment with the largest total correlation (Hungarian; Lan et al.'s code keeps the first
  partner seen instead of the best). Small matrices use scipy's dense `linear_sum_assignment`; large ones a sparse
  min-weight full bipartite matching on each feature's top candidates (rows and columns) plus a private "leave
  unmatched" option per row, which always has a solution and equals the dense optimum whenever the optimal partners
  are among the candidates (tests check both against each other).

Filters (`filter_pairs`) report how many pairs each one removed, so a filter that silently does nothing (as in
the refactored Lan et al. code) shows up as 0: correlation threshold; non-concept latents (top words all
punctuation, digits-free symbols or special tokens); optionally a shared top word.

Semantic groups: keyword lists matched on whole words of each latent's top words.

Twins: two SAEs of one space (two seeds) compared by decoder direction alone; the share of latents whose best match
by decoder cosine exceeds 0.9 is how reproducible a latent is within one model, the ceiling a cross-model share is
read against.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

DENSE_LIMIT = 4096 * 4096
"""Above this many entries, one_to_one works on top candidates."""


@dataclass
class Pairs:
    """Paired feature indices and their correlation."""

    a: np.ndarray
    b: np.ndarray
    corr: np.ndarray

    def __len__(self) -> int:
        return len(self.a)

    def take(self, keep: np.ndarray) -> "Pairs":
        return Pairs(self.a[keep], self.b[keep], self.corr[keep])

    @classmethod
    def empty(cls) -> "Pairs":
        return cls(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))


def _positive(a: np.ndarray, b: np.ndarray, corr: np.ndarray) -> Pairs:
    keep = corr > 0
    order = np.argsort(a[keep], kind="stable")
    return Pairs(a[keep][order].astype(np.int64), b[keep][order].astype(np.int64), corr[keep][order])


def many_to_one(corr: np.ndarray) -> Pairs:
    """Each A feature (row) with its most correlated B feature (column)."""
    b = corr.argmax(1)
    a = np.arange(len(corr))
    return _positive(a, b, corr[a, b])


def mutual_best(corr: np.ndarray) -> Pairs:
    """Pairs (a, b) where b is a's best and a is b's best."""
    best_b, best_a = corr.argmax(1), corr.argmax(0)
    a = np.arange(len(corr))
    mutual = best_a[best_b] == a
    return _positive(a[mutual], best_b[mutual], corr[a[mutual], best_b[mutual]])


def one_to_one(corr: np.ndarray, *, candidates: int = 8, dense_limit: int = DENSE_LIMIT) -> Pairs:
    """The 1:1 pairing with the largest total positive correlation (pairs at <= 0 left unmatched)."""
    if corr.size == 0:
        return Pairs.empty()
    if corr.size <= dense_limit:
        weights = np.maximum(corr, 0.0)
        rows, cols = linear_sum_assignment(weights, maximize=True)
        return _positive(rows, cols, corr[rows, cols])
    return _one_to_one_candidates(corr, candidates)


def candidate_edges(corr: np.ndarray, candidates: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of each row's and each column's top `candidates` entries, positive ones only, deduplicated."""
    wa, wb = corr.shape
    k_row, k_col = min(candidates, wb), min(candidates, wa)
    rows, cols = [], []
    for start in range(0, wa, 2048):  # row blocks: no full-size temporaries
        block = corr[start:start + 2048]
        top = np.argpartition(-block, k_row - 1, axis=1)[:, :k_row]
        rows.append(np.repeat(np.arange(start, start + len(block)), k_row))
        cols.append(top.ravel())
    for start in range(0, wb, 2048):
        block = corr[:, start:start + 2048]
        top = np.argpartition(-block, k_col - 1, axis=0)[:k_col]
        rows.append(top.T.ravel())
        cols.append(np.repeat(np.arange(start, start + block.shape[1]), k_col))
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    keep = corr[rows, cols] > 0
    key = np.unique(rows[keep].astype(np.int64) * wb + cols[keep])
    return key // wb, key % wb


def _one_to_one_candidates(corr: np.ndarray, candidates: int) -> Pairs:
    wa, wb = corr.shape
    rows, cols = candidate_edges(corr, candidates)
    # cost 1 - corr on candidate edges (in (0, 1]); each row may instead take its own "unmatched" column at cost 1
    cost = 1.0 - corr[rows, cols].astype(np.float64) + 1e-12
    all_rows = np.concatenate([rows, np.arange(wa)])
    all_cols = np.concatenate([cols, wb + np.arange(wa)])
    all_cost = np.concatenate([cost, np.ones(wa)])
    graph = csr_matrix((all_cost, (all_rows, all_cols)), shape=(wa, wb + wa))
    matched_rows, matched_cols = min_weight_full_bipartite_matching(graph)
    real = matched_cols < wb
    return _positive(matched_rows[real], matched_cols[real], corr[matched_rows[real], matched_cols[real]])


TWIN_COSINE = 0.9
"""Decoder cosine above which a latent has a twin in the other SAE."""


def unit_rows(directions: np.ndarray) -> np.ndarray:
    directions = np.asarray(directions, dtype=np.float64)
    return directions / np.linalg.norm(directions, axis=1, keepdims=True).clip(1e-12)


def best_cosines(directions_a: np.ndarray, directions_b: np.ndarray, block_rows: int = 4096) -> np.ndarray:
    """float [width_a]: each A row's largest cosine with any B row (blocked: no full [wa, wb] float64 matrix)."""
    if np.shape(directions_a)[1] != np.shape(directions_b)[1]:
        raise ValueError(f"decoder rows of one space are needed, got widths {np.shape(directions_a)[1]} and "
                         f"{np.shape(directions_b)[1]}")
    unit_a, unit_b = unit_rows(directions_a), unit_rows(directions_b).astype(np.float32)
    if not len(unit_b):
        return np.zeros(len(unit_a))
    return np.concatenate([(unit_a[i:i + block_rows].astype(np.float32) @ unit_b.T).max(1)
                           for i in range(0, len(unit_a), block_rows)] or [np.zeros(0)]).astype(np.float64)


def twin_share(directions_a: np.ndarray, directions_b: np.ndarray, threshold: float = TWIN_COSINE) -> float:
    """Share of A's latents (all of them, dead ones included) whose best match by decoder cosine in B exceeds
    `threshold`: for two seeds of one SAE, how many latents training reproduces."""
    best = best_cosines(directions_a, directions_b)
    return float((best > threshold).mean()) if len(best) else 0.0


# ------------------------------------------------------------------------------------------------- filters
@dataclass
class FilterStep:
    name: str
    kept: int
    removed: int


def is_concept_word(word: str, special: set[str] = frozenset()) -> bool:
    """A top word that names something: has a letter or digit and is not a special token."""
    word = word.strip()
    return bool(word) and word not in special and any(ch.isalnum() for ch in word)


def non_concept(top_words: Sequence[Sequence[str]], k: int = 5, special: set[str] = frozenset()) -> np.ndarray:
    """bool [width]: features whose top-k words are all punctuation / special / empty (or that have none)."""
    return np.array([not any(is_concept_word(w, special) for w in words[:k]) for words in top_words], dtype=bool)


def _normalised(words: Sequence[str], k: int) -> set[str]:
    return {w.strip().lower() for w in words[:k] if w.strip()}


def filter_pairs(pairs: Pairs, *, min_corr: float = 0.1, junk_a: np.ndarray | None = None,
                 junk_b: np.ndarray | None = None, top_words_a: Sequence[Sequence[str]] | None = None,
                 top_words_b: Sequence[Sequence[str]] | None = None, shared_top_word: bool = False,
                 k: int = 5) -> tuple[Pairs, list[FilterStep]]:
    """Apply the filters in order; each step records how many pairs it removed."""
    steps: list[FilterStep] = []

    def apply(name: str, keep: np.ndarray) -> None:
        nonlocal pairs
        steps.append(FilterStep(name, int(keep.sum()), int((~keep).sum())))
        pairs = pairs.take(keep)

    apply(f"correlation >= {min_corr:g}", pairs.corr >= min_corr)
    if junk_a is not None or junk_b is not None:
        keep = np.ones(len(pairs), dtype=bool)
        if junk_a is not None:
            keep &= ~junk_a[pairs.a]
        if junk_b is not None:
            keep &= ~junk_b[pairs.b]
        apply("top words name a concept (not only punctuation / special)", keep)
    if shared_top_word:
        if top_words_a is None or top_words_b is None:
            raise ValueError("shared_top_word needs top_words_a and top_words_b")
        keep = np.array([bool(_normalised(top_words_a[a], k) & _normalised(top_words_b[b], k))
                         for a, b in zip(pairs.a, pairs.b)], dtype=bool)
        apply(f"a shared top-{k} word", keep)
    return pairs, steps


# ------------------------------------------------------------------------------------------- semantic groups
_DAYS = "monday tuesday wednesday thursday friday saturday sunday"
_MONTHS = "january february march april may june july august september october november december"
GROUPS: dict[str, frozenset[str]] = {name: frozenset(words.split()) for name, words in {
    "calendar": f"{_DAYS} {_MONTHS} week weeks weekend month months",
    "time": "year years decade decades century centuries day days hour hours minute minutes season seasons "
            "morning evening night today yesterday tomorrow era period",
    "numbers": "one two three four five six seven eight nine ten eleven twelve twenty thirty forty fifty hundred "
               "thousand million billion first second third fourth fifth dozen half",
    "countries": "england france germany italy spain china japan india russia canada australia brazil mexico "
                 "ireland scotland wales egypt greece turkey poland sweden norway denmark netherlands belgium "
                 "austria switzerland portugal israel iran iraq korea vietnam argentina chile peru africa europe "
                 "america asia britain",
    "people": "king queen president minister prince princess emperor general captain lord bishop pope father "
              "mother son daughter brother sister wife husband man woman men women children child player "
              "actor singer writer author soldier officer",
    "emotions": "love hate fear joy anger sad happy angry afraid proud grief sorrow hope despair pleasure pain",
    "nature": "river rivers mountain mountains sea ocean lake island islands forest tree trees water rain snow wind "
              "storm hurricane fire sun moon star stars earth sky",
    "biology": "species animal animals bird birds fish plant plants cell cells gene genes protein blood bone "
               "disease body brain",
}.items()}


def words_of(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def group_members(top_words: Sequence[Sequence[str]], keywords: frozenset[str], k: int = 5) -> np.ndarray:
    """bool [width]: features one of whose top-k words is a keyword (whole words, case-insensitive)."""
    return np.array([any(w in keywords for word in words[:k] for w in words_of(word)) for words in top_words],
                    dtype=bool)


__all__ = ["DENSE_LIMIT", "FilterStep", "GROUPS", "Pairs", "TWIN_COSINE", "best_cosines", "candidate_edges",
           "filter_pairs", "group_members", "is_concept_word", "many_to_one", "mutual_best", "non_concept", "one_to_one",
           "twin_share", "unit_rows"]
