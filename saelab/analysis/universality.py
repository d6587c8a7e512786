"""Feature universality end to end: stream two models over the same documents, correlate every feature pair,
match, filter, score the matched decoder directions against both nulls and per semantic group, and keep it all as
a typed, versioned record (matching.json), a Markdown table and figures, like eval's metrics.json.

    sides_a = [Side(smol, "blocks.10.hook_resid_post", sae_s10), Side(smol, "blocks.10.mlp.hook_post")]
    sides_b = [Side(gemma, "blocks.6.hook_resid_post", sae_g6), Side(gemma, "blocks.6.mlp.hook_post")]
    results = match_models(sides_a, sides_b, read_documents("wiki.test.raw"), max_tokens=40_000)
    results.save("runs/match")       # matching.json, matching.md, similarity.png, correlation.png, layers.png

Only same-kind comparisons are made (SAE with SAE, units with units), so MLP neurons give the neuron-level
baseline over exactly the same aligned tokens.

Every observed number has its chance level beside it: the token-shuffle null (B's rows at other tokens) and, for
SAEs, A's SAE against an untrained twin of B's (match_baselines: picking partners by activation aligns directions
even without shared features); every geometry score (SVCCA on a fixed number of directions, CKA, RSA, mutual
k-NN) its random-direction baseline (similarity); two SAEs of one space the share of latents with a twin above
0.9 decoder cosine, the ceiling a cross-model number is read against.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Literal, Sequence

import numpy as np

from saelab.analysis.alignment import AlignedChunk, Side, aligned_chunks, read_documents
from saelab.analysis.correlation import Correlation, RunningCorrelation, TopActivations
from saelab.analysis.match_baselines import TokenShuffle, UntrainedSide, with_untrained_twins
from saelab.analysis.matching import GROUPS, FilterStep, Pairs, filter_pairs, group_members, many_to_one, \
    mutual_best, non_concept, one_to_one, twin_share
from saelab.analysis.similarity import MEASURES, SVCCA_DIRECTIONS, Paired, random_direction_baseline, \
    random_subset_null, shuffled_pairing_null
from saelab.analysis.study import SCHEMA_VERSION, Similarity, StudyResult
from saelab.errors import DataError
from saelab.figures import GRID_ALPHA, pyplot, save_figure
from saelab.options import NonNegativeInt, PositiveInt, check_fields

RESULTS_FILE = "matching.json"
THRESHOLDS = (0.3, 0.5, 0.7)
MATCHING_SCHEMA_VERSION = 2
"""2: each comparison's token-shuffle and untrained-twin baselines, random-direction baselines beside every
geometry score, SVCCA on a fixed number of directions, the decoder twin share. Version 1 records still load."""


@dataclass
class MatchConfig:
    """How pairs are formed, filtered and tested."""

    min_corr: Similarity = 0.1
    """Pairs below this activation correlation are dropped (methods.md: < 0.1)."""
    top_k: PositiveInt = 5
    """Top words per feature read by the non-concept filter, the shared-word rule and the semantic groups."""
    shared_top_word: bool = False
    """Also require the two features to share a top-k word."""
    candidates: PositiveInt = 8
    """Per-feature candidates for the sparse 1:1 assignment on large matrices."""
    null_draws: PositiveInt = 1000
    """Draws of each null (shuffled pairing, random subsets)."""
    subset_draws: PositiveInt | None = None
    """Draws of the random-subset null (default: null_draws)."""
    max_pairs: PositiveInt = 1000
    """Similarity is scored on at most this many pairs (the most correlated); the nulls use the same count."""
    knn: PositiveInt = 10
    """Neighbours per point of the mutual k-nearest-neighbour measure."""
    svcca_dims: PositiveInt = SVCCA_DIRECTIONS
    """Singular directions SVCCA keeps per side (a fixed few, scored on many more pairs: keeping 99 % of the
    variance of near-orthogonal rows keeps nearly all of them and scores near 1 on random directions)."""
    direction_draws: PositiveInt = 5
    """Draws of independent random unit vectors behind each geometry score's random-direction baseline."""
    token_shuffle: bool = True
    """Also correlate A with B's rows at other tokens (the token-shuffle null) and match that."""
    untrained: bool = True
    """Also match each SAE of A against an untrained twin of B's SAE (same architecture, width and k, at B's
    hook, initialised as saelab initialises)."""
    seed: NonNegativeInt = 0
    """Seeds the nulls and the untrained twins."""
    min_tokens: PositiveInt = 1000
    """Fewer aligned tokens than this is an error: correlations would be noise."""
    group_min_pairs: PositiveInt = 3
    """A semantic group is scored against its nulls only with at least this many pairs (and 3)."""

    def __post_init__(self):
        check_fields(self)


@dataclass
class GroupRecord:
    """One semantic group: its members on each side, re-matched inside the group, against its own nulls."""

    name: str
    members_a: int
    members_b: int
    pairs: int
    mean_corr: float | None = None
    similarity: dict[str, dict[str, Any]] | None = None
    """measure -> {observed, shuffled: NullTest, subsets: NullTest}; None with fewer than group_min_pairs pairs."""


@dataclass
class Baseline:
    """The observed comparison's statistics on a pairing that shares no features: the token-shuffle null or an
    untrained twin of B's SAE."""

    mean_best_corr_a: float
    frac_best_above: dict[str, float]
    n_pairs: int
    """1:1 pairs kept by the same filters."""
    mean_pair_corr: float | None = None
    similarity: dict[str, float] | None = None
    """Each geometry measure on its own most correlated kept pairs' decoder rows (SAEs only; None with at most
    twice svcca_dims pairs, too few to set beside the observed score)."""
    label: str = ""
    """The side A was matched against (the untrained twin's label; for the token shuffle, B's)."""


@dataclass
class Comparison:
    """Side A's features against side B's over the same aligned tokens."""

    a: str
    b: str
    kind: str
    """sae (decoder rows compared too) or units (neurons: activations only)."""
    width_a: int
    width_b: int
    n_tokens: int
    constant_a: int
    """Features of A constant over these tokens (never fired): correlation undefined, reported as 0, never paired."""
    constant_b: int
    mean_best_corr_a: float
    """Mean over non-constant A features of the correlation with their best B feature."""
    frac_best_above: dict[str, float]
    """Share of non-constant A features whose best B correlation exceeds each threshold."""
    n_many_to_one: int
    n_mutual: int
    n_one_to_one: int
    filters: list[dict[str, Any]]
    n_pairs: int
    mean_pair_corr: float | None
    similarity: dict[str, dict[str, Any]] | None = None
    """measure -> {observed, shuffled: NullTest, subsets: NullTest, random_directions: the measure on random unit
    vectors of the same shape}."""
    svcca_kept: list[int] | None = None
    """Singular directions SVCCA kept on each side (svcca_dims, fewer where the rank is lower)."""
    scored_pairs: int = 0
    groups: list[GroupRecord] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)
    """The most correlated kept pairs with their top words."""
    best_corr_histogram: list[int] = field(default_factory=list)
    """Counts of A features' best correlation in 20 bins over [0, 1] (non-constant features)."""
    decoder: dict[str, Any] | None = None
    """Two SAEs of one space only: matching by decoder cosine alone, its agreement with the activations, and the
    share of A's latents with a twin in B above 0.9 decoder cosine."""
    token_shuffle: Baseline | None = None
    """The same statistics with B's rows at other tokens."""
    untrained: Baseline | None = None
    """The same statistics for A's SAE against an untrained twin of B's SAE."""

    @property
    def excess_over_untrained(self) -> float | None:
        """Mean best correlation above what an untrained twin of B's SAE gives."""
        return None if self.untrained is None else self.mean_best_corr_a - self.untrained.mean_best_corr_a

    @property
    def layers(self) -> tuple[int | None, int | None]:
        return _layer(self.a), _layer(self.b)


def _layer(label: str) -> int | None:
    found = re.search(r"blocks\.(\d+)\.", label)
    return int(found.group(1)) if found else None


@dataclass
class MatchResults(StudyResult):
    """Every comparison of one matching run; saved as matching.json, matching.md and the figures."""

    NAME: ClassVar[str] = "matching"
    WHAT: ClassVar[str] = "matching results"
    SCHEMA: ClassVar[int] = MATCHING_SCHEMA_VERSION

    alignment: dict[str, Any]
    """Text, mode, documents and aligned tokens."""
    comparisons: list[Comparison] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    schema_version: int = field(default=MATCHING_SCHEMA_VERSION, kw_only=True)

    def table(self) -> str:
        """Markdown: one row per comparison, each activation number beside what an untrained twin of B's SAE and
        the token shuffle give (excess: observed minus untrained)."""
        head = ["A", "B", "tokens", "mean best corr", "vs untrained", "excess", "token shuffle", "best > 0.5",
                "vs untrained", "token shuffle", "1:1 pairs kept", "mean corr"]
        lines = _rows_head(head)
        for c in self.comparisons:
            untrained, shuffled = c.untrained, c.token_shuffle
            excess = c.excess_over_untrained
            cells = [_short(c.a), _short(c.b), str(c.n_tokens), f"{c.mean_best_corr_a:.3f}",
                     _number(untrained and untrained.mean_best_corr_a), _number(excess, "+.3f"),
                     _number(shuffled and shuffled.mean_best_corr_a), f"{c.frac_best_above.get('0.5', 0):.3f}",
                     _number(untrained and untrained.frac_best_above.get("0.5")),
                     _number(shuffled and shuffled.frac_best_above.get("0.5")), f"{c.n_pairs}/{c.n_one_to_one}",
                     _number(c.mean_pair_corr)]
            lines.append(_row(cells))
        return "\n".join(lines) + "\n"

    def geometry_table(self) -> str:
        """Markdown: each geometry measure of the matched decoder rows beside its random-direction baseline, its
        two nulls (mean, p) and the same measure on the untrained twin's and the token shuffle's own pairs."""
        head = ["A", "B", "pairs", "SVCCA directions", "measure", "observed", "random directions",
                "shuffled pairing (mean, p)", "random subsets (mean, p)", "vs untrained", "token shuffle"]
        lines = _rows_head(head)
        for c in self.comparisons:
            for m in MEASURES if c.similarity else ():
                s = c.similarity[m]
                directions = "" if c.svcca_kept is None else f"{c.svcca_kept[0]}/{c.svcca_kept[1]}"
                cells = [_short(c.a), _short(c.b), str(c.scored_pairs), directions, m, f"{s['observed']:.3f}",
                         _number(s.get("random_directions")), _null(s["shuffled"]), _null(s["subsets"]),
                         _number(((c.untrained and c.untrained.similarity) or {}).get(m)),
                         _number(((c.token_shuffle and c.token_shuffle.similarity) or {}).get(m))]
                lines.append(_row(cells))
        return "\n".join(lines) + "\n"

    def twin_table(self) -> str:
        """Markdown: two SAEs of one space matched by decoder direction alone."""
        head = ["A", "B", "twin share (best cosine > 0.9)", "1:1 pairs", "1:1 mean cosine", "1:1 cosine > 0.9",
                "agreement with activation pairs"]
        lines = _rows_head(head)
        for c in self.comparisons:
            if c.decoder:
                d = c.decoder
                lines.append(_row([_short(c.a), _short(c.b), _number(d.get("twin_share_0.9")), str(d["pairs"]),
                                   f"{d['mean_cosine']:.3f}", f"{d['frac_cosine_above_0.9']:.3f}",
                                   f"{d['agreement_with_activation_pairs']:.3f}"]))
        return "\n".join(lines) + "\n"

    def group_table(self) -> str:
        head = ["A", "B", "group", "members A/B", "pairs", "mean corr", "CKA (random directions; shuffled p; subset p)",
                "RSA (random directions; shuffled p; subset p)"]
        lines = _rows_head(head)
        for c in self.comparisons:
            for g in c.groups:
                sim = g.similarity or {}
                cells = [_short(c.a), _short(c.b), g.name, f"{g.members_a}/{g.members_b}", str(g.pairs),
                         _number(g.mean_corr)]
                for m in ("cka", "rsa"):
                    s = sim.get(m)
                    cells.append("" if s is None else f"{s['observed']:.3f} ({_number(s.get('random_directions'))}; "
                                                      f"p={s['shuffled']['p_value']:.3g}; "
                                                      f"p={s['subsets']['p_value']:.3g})")
                lines.append(_row(cells))
        return "\n".join(lines) + "\n"

    def plot_similarity(self, path: str | Path) -> Path:
        """Each measure per comparison (SAE kinds): observed vs the 95th percentile of both nulls and the
        random-direction baseline."""
        plt = pyplot()
        rows = [c for c in self.comparisons if c.similarity]
        fig, axes = plt.subplots(1, len(MEASURES), figsize=(3.2 * len(MEASURES), 3.6), sharey=False)
        x = np.arange(len(rows))
        for ax, m in zip(np.atleast_1d(axes), MEASURES):
            observed = [c.similarity[m]["observed"] for c in rows]
            for offset, (null, colour) in enumerate((("shuffled", "tab:grey"), ("subsets", "tab:orange"))):
                mean = np.array([c.similarity[m][null]["null_mean"] for c in rows])
                q95 = np.array([c.similarity[m][null]["null_q95"] for c in rows])
                ax.errorbar(x + 0.15 * (offset * 2 - 1), mean, yerr=[np.zeros_like(mean), q95 - mean], fmt="_",
                            color=colour, capsize=3, label=f"{null} null (mean, 95th pct)")
            chance = [c.similarity[m].get("random_directions", np.nan) for c in rows]
            ax.plot(x, chance, "x", color="tab:red", label="random directions (mean)")
            ax.plot(x, observed, "o", color="tab:blue", label="matched")
            ax.set_xticks(x, [f"L{c.layers[0]}-L{c.layers[1]}" for c in rows], rotation=45, fontsize=7)
            ax.set_title(m)
            ax.grid(alpha=GRID_ALPHA)
        np.atleast_1d(axes)[0].legend(fontsize=6)
        return save_figure(fig, path)

    def plot_correlations(self, path: str | Path) -> Path:
        """Histogram of each A feature's best correlation, per comparison (SAE latents solid, neurons dashed)."""
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6.5, 4))
        edges = np.linspace(0, 1, 21)
        for c in self.comparisons:
            counts = np.asarray(c.best_corr_histogram, dtype=float)
            if counts.sum() == 0:
                continue
            ax.step(edges[:-1], counts / counts.sum(), where="post", ls="-" if c.kind == "sae" else "--",
                    label=f"{c.kind} L{c.layers[0]}-L{c.layers[1]}")
        ax.set_xlabel("correlation of each A feature with its best B feature")
        ax.set_ylabel("share of A features")
        ax.grid(alpha=GRID_ALPHA)
        ax.legend(fontsize=7)
        return save_figure(fig, path)

    def plot_layers(self, path: str | Path, value: str = "mean_best_corr_a", kind: str = "sae") -> Path:
        """Layer x layer heat map of one number (default: mean best correlation) for one kind of comparison."""
        plt = pyplot()
        rows = [c for c in self.comparisons if c.kind == kind and c.decoder is None]  # across models only
        la = sorted({c.layers[0] for c in rows})
        lb = sorted({c.layers[1] for c in rows})
        grid = np.full((len(la), len(lb)), np.nan)
        for c in rows:
            grid[la.index(c.layers[0]), lb.index(c.layers[1])] = getattr(c, value)
        fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(lb), 1.2 + 1.1 * len(la)))
        image = ax.imshow(grid, cmap="viridis")
        for i in range(len(la)):
            for j in range(len(lb)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", color="w", fontsize=9)
        ax.set_xticks(range(len(lb)), [f"B L{x}" for x in lb])
        ax.set_yticks(range(len(la)), [f"A L{x}" for x in la])
        ax.set_title(f"{value} ({kind})", fontsize=9)
        fig.colorbar(image, ax=ax)
        return save_figure(fig, path)

    def report(self) -> str:
        parts = [self.table()]
        if any(c.similarity for c in self.comparisons):
            parts.append(self.geometry_table())
        if any(c.decoder for c in self.comparisons):
            parts.append(self.twin_table())
        return "\n".join(parts + [self.group_table()])

    def save_figures(self, folder: Path, name: str) -> None:
        if any(c.similarity for c in self.comparisons):
            self.plot_similarity(folder / "similarity.png")
        self.plot_correlations(folder / "correlation.png")
        if any(c.kind == "sae" and c.decoder is None for c in self.comparisons):  # across models
            self.plot_layers(folder / "layers.png")


def _short(label: str) -> str:
    return label.replace(".hook_resid_post", "").replace(".mlp.hook_post", " mlp")


def _rows_head(head: list[str]) -> list[str]:
    return [_row(head), "|" + "---|" * len(head)]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _number(value: float | None, spec: str = ".3f") -> str:
    return "" if value is None else format(value, spec)


def _null(test: dict[str, Any]) -> str:
    return f"{test['null_mean']:.3f}, p={test['p_value']:.3g}"


# ------------------------------------------------------------------------------------------------- one pair
def _similarity(x: np.ndarray, y: np.ndarray, pool_x: np.ndarray, pool_y: np.ndarray, config: MatchConfig,
                seed: int) -> tuple[dict[str, dict[str, Any]], Paired]:
    paired = Paired(x, y, config.knn, dims=config.svcca_dims)
    shuffled = shuffled_pairing_null(x, y, config.null_draws, seed, config.knn, paired=paired)
    observed = {m: t.observed for m, t in shuffled.items()}
    subsets = random_subset_null(observed, pool_x, pool_y, len(x), config.subset_draws or config.null_draws,
                                 seed + 1, config.knn, dims=config.svcca_dims)
    chance = random_direction_baseline(len(x), x.shape[1], y.shape[1], draws=config.direction_draws, seed=seed + 2,
                                       k=config.knn, dims=config.svcca_dims)
    return {m: {"observed": observed[m], "shuffled": dataclasses.asdict(shuffled[m]),
                "subsets": dataclasses.asdict(subsets[m]), "random_directions": chance[m]} for m in MEASURES}, paired


@dataclass
class Matched:
    """One correlation matrix matched and filtered: what a comparison and each of its baselines report."""

    best: np.ndarray
    """Each non-constant A feature's best correlation."""
    pairs: Pairs
    """The 1:1 assignment."""
    kept: Pairs
    """The 1:1 pairs the filters kept, most correlated first."""
    steps: list[FilterStep]

    @property
    def mean_best(self) -> float:
        return float(self.best.mean()) if len(self.best) else 0.0

    def frac_above(self) -> dict[str, float]:
        return {f"{t:g}": float((self.best > t).mean()) if len(self.best) else 0.0 for t in THRESHOLDS}

    @property
    def mean_pair_corr(self) -> float | None:
        return float(self.kept.corr.mean()) if len(self.kept) else None


def match_and_filter(corr: Correlation, top_words_a: Sequence[Sequence[str]], top_words_b: Sequence[Sequence[str]],
                     config: MatchConfig) -> Matched:
    matrix = corr.matrix
    live_a = ~corr.constant_a
    best = matrix.max(1)[live_a] if matrix.shape[1] else np.zeros(int(live_a.sum()))
    pairs = one_to_one(matrix, candidates=config.candidates)
    special = set()
    kept, steps = filter_pairs(pairs, min_corr=config.min_corr, junk_a=non_concept(top_words_a, config.top_k, special),
                               junk_b=non_concept(top_words_b, config.top_k, special), top_words_a=top_words_a,
                               top_words_b=top_words_b, shared_top_word=config.shared_top_word, k=config.top_k)
    return Matched(best, pairs, kept.take(np.argsort(-kept.corr, kind="stable")), steps)


def baseline(corr: Correlation, *, top_words_a: Sequence[Sequence[str]], top_words_b: Sequence[Sequence[str]],
             directions_a: np.ndarray | None = None, directions_b: np.ndarray | None = None,
             config: MatchConfig | None = None, label: str = "") -> Baseline:
    """A comparison's statistics (and, for SAEs, its geometry measures, without nulls) on a baseline pairing."""
    config = config or MatchConfig()
    matched = match_and_filter(corr, top_words_a, top_words_b, config)
    result = Baseline(matched.mean_best, matched.frac_above(), len(matched.kept), matched.mean_pair_corr, label=label)
    if directions_a is not None and directions_b is not None and len(matched.kept) > max(2 * config.svcca_dims, 3):
        top = matched.kept.take(np.arange(min(len(matched.kept), config.max_pairs)))
        result.similarity = Paired(directions_a[top.a], directions_b[top.b], config.knn,
                                   dims=config.svcca_dims).scores()
    return result


def compare(corr: Correlation, *, a: str, b: str, top_words_a: Sequence[Sequence[str]],
            top_words_b: Sequence[Sequence[str]], directions_a: np.ndarray | None = None,
            directions_b: np.ndarray | None = None, config: MatchConfig | None = None,
            shuffled: Correlation | None = None, untrained: Correlation | None = None,
            untrained_directions: np.ndarray | None = None, untrained_top_words: Sequence[Sequence[str]] | None = None,
            untrained_label: str = "") -> Comparison:
    """Match, filter and score one correlation matrix (directions: decoder rows [width, d], or None for units).
    shuffled: the token-shuffle correlation of the same features; untrained: A against an untrained twin of B's
    SAE (its decoder rows and top words beside it). Each becomes a Baseline of the comparison."""
    config = config or MatchConfig()
    if corr.n_tokens < config.min_tokens:
        raise DataError(f"only {corr.n_tokens} aligned tokens overlap between {a} and {b}; at least "
                        f"{config.min_tokens} are needed for meaningful correlations (more text, or min_tokens=)")
    matrix = corr.matrix
    matched = match_and_filter(corr, top_words_a, top_words_b, config)
    kept = matched.kept
    result = Comparison(
        a=a, b=b, kind="sae" if directions_a is not None else "units", width_a=matrix.shape[0],
        width_b=matrix.shape[1], n_tokens=corr.n_tokens, constant_a=int(corr.constant_a.sum()),
        constant_b=int(corr.constant_b.sum()), mean_best_corr_a=matched.mean_best,
        frac_best_above=matched.frac_above(), n_many_to_one=len(many_to_one(matrix)),
        n_mutual=len(mutual_best(matrix)), n_one_to_one=len(matched.pairs),
        filters=[dataclasses.asdict(s) for s in matched.steps], n_pairs=len(kept), mean_pair_corr=matched.mean_pair_corr,
        best_corr_histogram=np.histogram(np.clip(matched.best, 0, 1), bins=20, range=(0, 1))[0].tolist())
    result.examples = [{"a": int(kept.a[i]), "b": int(kept.b[i]), "corr": float(kept.corr[i]),
                        "words_a": list(top_words_a[kept.a[i]][:config.top_k]),
                        "words_b": list(top_words_b[kept.b[i]][:config.top_k])} for i in range(min(len(kept), 12))]
    if shuffled is not None:
        result.token_shuffle = baseline(shuffled, top_words_a=top_words_a, top_words_b=top_words_b,
                                        directions_a=directions_a, directions_b=directions_b, config=config, label=b)
    if untrained is not None:
        result.untrained = baseline(untrained, top_words_a=top_words_a, top_words_b=untrained_top_words or
                                    [[]] * untrained.shape[1], directions_a=directions_a,
                                    directions_b=untrained_directions, config=config, label=untrained_label)
    if directions_a is None or directions_b is None or len(kept) < 3:
        return result
    top = kept.take(np.arange(min(len(kept), config.max_pairs)))
    x, y = directions_a[top.a], directions_b[top.b]
    result.similarity, paired = _similarity(x, y, directions_a[~corr.constant_a], directions_b[~corr.constant_b],
                                            config, config.seed)
    result.svcca_kept = [paired.svcca.kept_x, paired.svcca.kept_y]
    result.scored_pairs = len(top)
    for g, (name, keywords) in enumerate(GROUPS.items()):
        result.groups.append(_group(name, keywords, corr, top_words_a, top_words_b, directions_a, directions_b,
                                    config, config.seed + 10 * (g + 1)))
    return result


def _group(name: str, keywords, corr: Correlation, top_words_a, top_words_b, directions_a, directions_b,
           config: MatchConfig, seed: int) -> GroupRecord:
    """Members on each side, 1:1 re-matched inside the group, scored against the group's own nulls."""
    in_a = group_members(top_words_a, keywords, config.top_k) & ~corr.constant_a
    in_b = group_members(top_words_b, keywords, config.top_k) & ~corr.constant_b
    index_a, index_b = np.flatnonzero(in_a), np.flatnonzero(in_b)
    record = GroupRecord(name, len(index_a), len(index_b), 0)
    if not len(index_a) or not len(index_b):
        return record
    inner = one_to_one(corr.matrix[np.ix_(index_a, index_b)])
    inner = inner.take(inner.corr >= config.min_corr)
    record.pairs = len(inner)
    if len(inner):
        record.mean_corr = float(inner.corr.mean())
    if len(inner) >= max(config.group_min_pairs, 3):
        x, y = directions_a[index_a[inner.a]], directions_b[index_b[inner.b]]
        record.similarity, _ = _similarity(x, y, directions_a[~corr.constant_a], directions_b[~corr.constant_b],
                                           config, seed)
    return record


def compare_decoders(directions_a: np.ndarray, directions_b: np.ndarray, corr: Correlation,
                     config: MatchConfig) -> dict[str, Any]:
    """Two SAEs of one space matched by decoder cosine alone (Hungarian), how often that agrees with the
    activation matching (kept pairs of the 1:1 assignment on correlation), and the twin share (each A latent's
    best cosine in B above 0.9)."""
    unit_a = directions_a / np.linalg.norm(directions_a, axis=1, keepdims=True).clip(1e-12)
    unit_b = directions_b / np.linalg.norm(directions_b, axis=1, keepdims=True).clip(1e-12)
    cosine = (unit_a @ unit_b.T).astype(np.float32)
    by_decoder = one_to_one(cosine, candidates=config.candidates)
    by_activation = one_to_one(corr.matrix, candidates=config.candidates)
    by_activation = by_activation.take(by_activation.corr >= config.min_corr)
    partner = dict(zip(by_decoder.a.tolist(), by_decoder.b.tolist()))
    agree = [partner.get(a) == b for a, b in zip(by_activation.a.tolist(), by_activation.b.tolist())]
    return {"pairs": len(by_decoder), "mean_cosine": float(by_decoder.corr.mean()) if len(by_decoder) else 0.0,
            "frac_cosine_above_0.9": float((by_decoder.corr > 0.9).sum() / max(len(unit_a), 1)),
            "agreement_with_activation_pairs": float(np.mean(agree)) if agree else 0.0,
            "cosine_of_activation_pairs": float(np.mean(cosine[by_activation.a, by_activation.b]))
            if len(by_activation) else 0.0,
            "twin_share_0.9": twin_share(directions_a, directions_b)}


# --------------------------------------------------------------------------------------------- end to end
@dataclass
class Accumulated:
    """What one pass over the aligned text leaves: correlations per (A side, B side) and top words per side."""

    correlations: dict[tuple[str, str], Correlation]
    top_words: dict[str, list[list[str]]]
    n_tokens: int
    n_documents: int
    shuffled: dict[tuple[str, str], Correlation] = field(default_factory=dict)
    """The token-shuffle correlation of the pairs that have one."""


def kinds_match(a: Side, b: Side) -> bool:
    return (a.sae is None) == (b.sae is None)


def accumulate(chunks: Iterable[AlignedChunk], sides_a: Sequence[Side], sides_b: Sequence[Side], *,
               pairs: Sequence[tuple[Side, Side]] | None = None, top_n: int = 8,
               shuffled: Sequence[tuple[Side, Side]] = (), seed: int = 0) -> Accumulated:
    """One pass: running correlation for every same-kind (A, B) side pair (or the given `pairs`, whose sides may
    both come from A, e.g. two SAEs of one model), top activations for every side, and the token-shuffle
    correlation of the `shuffled` pairs (seeded)."""
    if pairs is None:
        pairs = [(sa, sb) for sa in sides_a for sb in sides_b if kinds_match(sa, sb)]
    labels = [s.label for s in [*sides_a, *sides_b]]
    if len(set(labels)) != len(labels):
        raise ValueError(f"side labels must be unique, got {labels}")
    running = {(sa.label, sb.label): RunningCorrelation(sa.width, sb.width) for sa, sb in pairs}
    token_shuffle = TokenShuffle([(sa.label, sb.label) for sa, sb in shuffled],
                                 {s.label: s.width for s in [*sides_a, *sides_b]}, seed)
    tops = {s.label: TopActivations(s.width, top_n) for s in [*sides_a, *sides_b]}
    words: list[str] = []
    documents: set[int] = set()
    for chunk in chunks:
        features = {**chunk.a, **chunk.b}
        for (la, lb), acc in running.items():
            acc.update(features[la], features[lb])
        token_shuffle.update(features)
        for side in sides_a:
            tops[side.label].update(chunk.a[side.label], chunk.token_a, len(words))
        for side in sides_b:
            tops[side.label].update(chunk.b[side.label], chunk.token_b, len(words))
        words += chunk.words or [str(int(t)) for t in chunk.token_a]
        documents.update(chunk.document.tolist())
    top_words = {label: [[words[r] for r in row if r >= 0] for row in top.rows.tolist()]
                 for label, top in tops.items()}
    return Accumulated({key: acc.correlation(in_place=True) for key, acc in running.items()}, top_words,
                       len(words), len(documents), token_shuffle.correlations())


def decoder_rows(side: Side) -> np.ndarray | None:
    return None if side.sae is None else side.sae.W_dec.detach().float().cpu().numpy().astype(np.float64)


def match_models(sides_a: Sequence[Side], sides_b: Sequence[Side], documents: Sequence[str], *, mode: str = "word",
                 max_tokens: int | None = None, batch_size: int = 8, config: MatchConfig | None = None,
                 pairs: Sequence[tuple[Side, Side]] | None = None, text: str = "", log=None,
                 progress: bool = True) -> MatchResults:
    """Stream both models over `documents`, then compare every same-kind pair of sides (or `pairs`; see
    `accumulate`). Two sides of one model in one space also get a decoder-only matching (`Comparison.decoder`).
    progress: a bar (on stderr) over the aligned tokens, moving a batch of documents at a time; without it, `log`
    hears the count after each batch."""
    started = time.perf_counter()
    config = config or MatchConfig()
    sides_a, sides_b, pairs, shuffled = with_baselines(sides_a, sides_b, pairs, config)
    quiet_log = (lambda n: log(f"  {n} aligned tokens")) if log and not progress else None
    chunks = aligned_chunks(sides_a, sides_b, documents, mode=mode, batch_size=batch_size, max_tokens=max_tokens,
                            progress=quiet_log)
    acc = accumulate(_counted(chunks, progress, max_tokens, "aligning A and B"), sides_a, sides_b, pairs=pairs,
                     shuffled=shuffled, seed=config.seed)
    if log:
        log(f"{acc.n_tokens} aligned tokens from {acc.n_documents} documents in {time.perf_counter() - started:.0f} s")
    results = compare_all(acc, [*sides_a, *sides_b], config,
                          alignment={"text": text, "mode": mode, "model_a": sides_a[0].model.name,
                                     "model_b": sides_b[0].model.name}, log=log)
    results.seconds = time.perf_counter() - started
    return results


def with_baselines(sides_a: Sequence[Side], sides_b: Sequence[Side], pairs: Sequence[tuple[Side, Side]] | None,
                   config: MatchConfig) -> tuple[list[Side], list[Side], list[tuple[Side, Side]], list[tuple[Side, Side]]]:
    """(sides A, sides B, pairs, token-shuffled pairs) with the baselines `config` asks for: each pair of SAEs also
    gets A against an untrained twin of B's SAE, and every observed pair a token-shuffle null."""
    if pairs is None:
        pairs = [(sa, sb) for sa in sides_a for sb in sides_b if kinds_match(sa, sb)]
    shuffled = list(pairs) if config.token_shuffle else []
    if config.untrained:
        return (*with_untrained_twins(sides_a, sides_b, pairs, config.seed), shuffled)
    return list(sides_a), list(sides_b), list(pairs), shuffled


def _counted(chunks: Iterable[AlignedChunk], progress: bool, total: int | None, desc: str) -> Iterator[AlignedChunk]:
    """The chunks, with a bar over their aligned tokens (the unit a budget is given in)."""
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit="tok", unit_scale=True, disable=not progress) as bar:
        for chunk in chunks:
            bar.update(len(chunk))
            yield chunk


def compare_all(acc: Accumulated, sides: Sequence[Side], config: MatchConfig | None = None, *,
                alignment: dict[str, Any] | None = None, log=None) -> MatchResults:
    """Match, filter and score every correlation of one pass (`accumulate`)."""
    config = config or MatchConfig()
    started = time.perf_counter()
    results = MatchResults(alignment={**(alignment or {}), "documents": acc.n_documents, "tokens": acc.n_tokens},
                           config={f.name: getattr(config, f.name) for f in dataclasses.fields(MatchConfig)})
    by_label = {s.label: s for s in sides}
    twins = {s.twin_of: s.label for s in sides if isinstance(s, UntrainedSide)}
    for (la, lb), corr in acc.correlations.items():
        if isinstance(by_label[lb], UntrainedSide):
            continue  # a baseline, reported with the pair it stands beside
        t0 = time.perf_counter()
        dirs_a, dirs_b = decoder_rows(by_label[la]), decoder_rows(by_label[lb])
        twin = twins.get(lb)
        untrained = acc.correlations.get((la, twin)) if twin else None
        results.comparisons.append(compare(
            corr, a=la, b=lb, top_words_a=acc.top_words[la], top_words_b=acc.top_words[lb], directions_a=dirs_a,
            directions_b=dirs_b, config=config, shuffled=acc.shuffled.get((la, lb)), untrained=untrained,
            untrained_directions=decoder_rows(by_label[twin]) if untrained is not None else None,
            untrained_top_words=acc.top_words.get(twin), untrained_label=twin or ""))
        same_space = by_label[la].model is by_label[lb].model and by_label[la].hook == by_label[lb].hook
        if same_space and dirs_a is not None and dirs_b is not None:
            results.comparisons[-1].decoder = compare_decoders(dirs_a, dirs_b, corr, config)
        if log:
            c = results.comparisons[-1]
            versus = "".join(f", {name} {b.mean_best_corr_a:.3f}" for name, b in
                             (("untrained twin", c.untrained), ("token shuffle", c.token_shuffle)) if b is not None)
            log(f"{_short(la)} vs {_short(lb)}: mean best corr {c.mean_best_corr_a:.3f}{versus}, {c.n_pairs} pairs "
                f"kept ({time.perf_counter() - t0:.0f} s)")
    results.seconds = time.perf_counter() - started
    return results


@dataclass
class MatchStudyConfig(MatchConfig):
    """One matching study: the sides to compare and the text both read (or two caches of one text), and how pairs
    are formed, filtered and tested (the MatchConfig fields)."""

    a: list[str] = field(default_factory=list)
    """Side A: MODEL:HOOK[:SAE_FOLDER] each (one model); no SAE: the hook's own units. In cache mode: one SAE
    folder."""
    b: list[str] = field(default_factory=list)
    """Side B, as a."""
    text: str | None = None
    """Text file (cut into documents of whole paragraphs) both models read; None: WikiText-2's test split in the
    shared data."""
    start_char: NonNegativeInt = 0
    """Skip the text before this character (held out)."""
    tokens: PositiveInt = 20_000
    """Aligned tokens to read."""
    mode: Literal["word", "end"] = "word"
    """Align tokens ending a word in both tokenizers, or any shared token end."""
    neurons: bool = False
    """Also match the MLP neurons of each side's layers."""
    cache_a: str | None = None
    """Same-tokenizer mode: a cache folder for a's SAE (rows align one to one)."""
    cache_b: str | None = None
    """The cache for b's SAE (same text and tokenizer as cache_a)."""
    batch_size: PositiveInt = 8
    """Documents per forward."""


def match_text(text: str | None) -> Path:
    """The one local text file both sides read, resolved like every text source."""
    from saelab.data import shared_data, text_source

    source = text_source(text or shared_data("wikitext-2-raw/wiki.test.raw"))
    if not (isinstance(source, Path) and source.is_file()):
        raise DataError(f"text {str(source)!r} is not a text file: matching reads one local text file (cut into "
                        "documents of whole paragraphs); give its path")
    return source


def match_side(spec: str, models: dict, label: str = "", **load_options) -> Side:
    """A side from MODEL:HOOK[:SAE_FOLDER]; models loaded once each into `models`; label: its name in the results
    (default: model, hook and SAE width)."""
    from saelab.hub import load_sae
    from saelab.models import load_model

    parts = _spec_parts(spec)
    if parts[0] not in models:
        models[parts[0]] = load_model(parts[0], **load_options)
    return Side(models[parts[0]], parts[1], load_sae(parts[2]) if len(parts) == 3 and parts[2] else None,
                label=label)


def _spec_parts(spec: str) -> list[str]:
    parts = spec.split(":", 2)
    if len(parts) < 2:
        raise ValueError(f"a side is MODEL:HOOK[:SAE_FOLDER], got {spec!r}")
    return parts


def side_labels(specs: Sequence[str]) -> list[str]:
    """A label per side spec, "" (the default label) where the default is unique; SAE sides that would share one
    (two SAEs of one width at one hook, e.g. two seeds) are named MODEL:HOOK:FOLDER by as much of the SAE folder's
    path as tells them apart, and the same spec given twice by its position."""
    folders = [_spec_parts(spec)[2] if len(_spec_parts(spec)) == 3 else "" for spec in specs]
    keys = [(*_spec_parts(spec)[:2], bool(folder)) for spec, folder in zip(specs, folders)]
    labels = [""] * len(specs)
    for key in set(keys):
        same = [i for i, k in enumerate(keys) if k == key]
        if len(same) < 2 or not key[2]:
            continue
        paths = [Path(folders[i]).resolve().parts[1:] for i in same]
        distinct = set(paths)
        depth = 1
        while depth < max(len(p) for p in paths) and len({p[-depth:] for p in distinct}) < len(distinct):
            depth += 1
        names = ["/".join(p[-depth:]) for p in paths]
        for n, i in enumerate(same):
            name = names[n] if names.count(names[n]) == 1 else f"{names[n]}#{names[:n + 1].count(names[n])}"
            labels[i] = f"{key[0]}:{key[1]}:{name}"
    return labels


def match_caches(config: MatchStudyConfig, log=None, progress: bool = True) -> MatchResults:
    """Two SAEs of one model over two caches of the same text and tokenizer (rows align one to one), with the
    token-shuffle null and an untrained twin of b's SAE over cache b's rows."""
    from saelab.activations.manifest import Manifest
    from saelab.analysis.alignment import aligned_cache_chunks
    from saelab.hub import load_sae
    from saelab.models import load_model

    if not (config.cache_a and config.cache_b and len(config.a) == len(config.b) == 1):
        raise ValueError("cache mode takes cache_a, cache_b and one SAE folder each as a and b")
    sae_a, sae_b = load_sae(config.a[0]), load_sae(config.b[0])
    model = load_model(Manifest.read(Path(config.cache_a)).run.get("model", ""))
    side_a = Side(model, sae_a.cfg.hook_name, sae_a, label=f"a:{sae_a.cfg.hook_name}:sae")
    side_b = Side(model, sae_b.cfg.hook_name, sae_b, label=f"b:{sae_b.cfg.hook_name}:sae")
    twin = _cache_twin(side_b, config) if config.untrained else None
    twin_codes = _twin_codes(twin, config)

    def relabel(chunk):
        chunk.a, chunk.b = {side_a.label: chunk.a["a"]}, {side_b.label: chunk.b["b"]}
        if twin is not None:
            chunk.b[twin.label] = next(twin_codes)
        chunk.words = model.tokenizer.batch_decode(chunk.token_a.unsqueeze(1).tolist())
        return chunk

    chunks = aligned_cache_chunks(sae_a, config.cache_a, sae_b, config.cache_b, max_tokens=config.tokens,
                                  batch_size=CACHE_BATCH)
    sides_b = [side_b] + ([twin] if twin is not None else [])
    acc = accumulate((relabel(c) for c in _counted(chunks, progress, config.tokens, "reading both caches")),
                     [side_a], sides_b, pairs=[(side_a, s) for s in sides_b],
                     shuffled=[(side_a, side_b)] if config.token_shuffle else (), seed=config.seed)
    return compare_all(acc, [side_a, *sides_b], config, log=log, alignment={
        "mode": "cache rows", "cache_a": str(config.cache_a), "cache_b": str(config.cache_b)})


CACHE_BATCH = 4096
"""Rows per chunk in cache mode (b's SAE and its untrained twin read cache b in the same chunks)."""


def _cache_twin(side_b: Side, config: MatchStudyConfig) -> UntrainedSide:
    """An untrained twin of b's SAE, initialised on cache b's first rows."""
    from saelab.activations.source import open_source
    from saelab.analysis.match_baselines import initialise_on, untrained_side

    twin = untrained_side(side_b, config.seed)
    first = next(iter(open_source(config.cache_b, batch_size=CACHE_BATCH).in_order(hooks=[side_b.hook])))
    twin.sae, twin.started = initialise_on(twin.sae, first.acts[side_b.hook]), True
    return twin


def _twin_codes(twin: UntrainedSide | None, config: MatchStudyConfig) -> Iterator:
    from saelab.codes import iter_codes

    if twin is None:
        return iter(())
    return iter_codes(twin.sae, config.cache_b, hook=twin.hook, batch_size=CACHE_BATCH, max_tokens=config.tokens)


def run_match(config: MatchStudyConfig, *, log=None, trust_remote_code: bool = False,
              max_batch_tokens: int | None = None, progress: bool = True) -> MatchResults:
    """The matching study a config describes (what `saelab match` runs): two caches, or models over a text."""
    from saelab.analysis.probes import neuron_hook

    if config.cache_a or config.cache_b:
        return match_caches(config, log, progress)
    if not config.a or not config.b:
        raise ValueError("matching needs at least one side each in a and b (MODEL:HOOK[:SAE_FOLDER])")
    text = match_text(config.text)  # before any model loads
    options = {"trust_remote_code": trust_remote_code}
    if max_batch_tokens is not None:
        options["max_batch_tokens"] = max_batch_tokens
    models: dict[str, object] = {}
    labels = iter(side_labels([*config.a, *config.b]))
    sides = [[match_side(spec, models, next(labels), **options) for spec in specs] for specs in (config.a, config.b)]
    for group in sides if config.neurons else []:
        for layer in sorted({int(s.hook.split(".")[1]) for s in group if s.hook.startswith("blocks.")}):
            group.append(Side(group[0].model, neuron_hook(group[0].model, layer)))
    documents = read_documents(text, start_char=config.start_char)
    return match_models(sides[0], sides[1], documents, mode=config.mode, max_tokens=config.tokens,
                        batch_size=config.batch_size, config=config, text=str(text), log=log, progress=progress)


__all__ = ["Accumulated", "Baseline", "Comparison", "GroupRecord", "MATCHING_SCHEMA_VERSION", "MatchConfig",
           "MatchResults", "MatchStudyConfig", "Matched", "RESULTS_FILE", "match_caches", "match_side", "match_text",
           "run_match", "SCHEMA_VERSION", "accumulate", "baseline", "compare", "compare_all", "compare_decoders",
           "decoder_rows", "match_and_filter", "match_models", "side_labels", "with_baselines"]
