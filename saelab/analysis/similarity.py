"""How alike two paired sets of directions are (row i of X pairs with row i of Y; e.g. decoder rows of matched
latents of two SAEs), and whether that is more than chance.

Measures: SVCCA (Raghu et al.: keep each side's top singular directions, then CCA; the number kept is reported),
mean squared CCA, linear CKA (Kornblith et al.), RSA (Spearman between the upper triangles of the two cosine
similarity matrices) and mutual k-NN (the share of each row's k nearest neighbours, by cosine, that are the same
on both sides).

Nulls, seeded, >= 1000 draws by default, p = (1 + #{null >= observed}) / (1 + draws), never 0:
- shuffled pairing: the same rows, paired at random (does the matching itself carry the similarity?);
- random subsets: as many rows drawn at random from all of X's and Y's candidates (is it the matched latents, or
  would any latents of these two SAEs look this alike?).
Each measure has a fast path for re-pairing (precomputed Gram, rank or basis matrices), so 1000 shuffles of a few
thousand pairs take seconds.

Chance level: near-orthogonal rows make some measures high on pure noise. On 200 independent random unit vectors
in 576 dimensions per side, SVCCA keeping 99 % of the variance keeps 190 of 190 directions and scores about 0.96,
and linear CKA is about n / (n + n(n-1)/d) = 0.74, because each Gram matrix is dominated by its diagonal. Hence
SVCCA with a fixed small number of directions (`SVCCA_DIRECTIONS`) on many more pairs than directions (Lan et al.'s
code keeps one direction with unit-norm rows; 99 % of the variance keeps almost all of them), and
`random_direction_baseline`: each measure on independent random unit vectors of the same shape, the number every
score is read against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy.stats import rankdata

MEASURES = ("svcca", "cka", "rsa", "mutual_knn")
VARIANCE_KEPT = 0.99
SVCCA_DIRECTIONS = 20
"""Directions per side that matching's SVCCA keeps: few enough that a few hundred random pairs score near 0."""


def _centered(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x - x.mean(0, keepdims=True)


def _orthonormal_basis(x: np.ndarray, tol: float = 1e-10) -> np.ndarray:
    """An orthonormal basis [n, r] of the column space of centred x (rank-revealing through the SVD)."""
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    return u[:, s > tol * max(s[0], 1e-300)] if len(s) else u


def canonical_correlations(x: np.ndarray, y: np.ndarray, center: bool = True) -> np.ndarray:
    """CCA correlations of two views [n, dx], [n, dy] (descending; min of the two ranks of them)."""
    if len(x) != len(y):
        raise ValueError(f"paired views need as many rows, got {len(x)} and {len(y)}")
    prepare = _centered if center else (lambda v: np.asarray(v, dtype=np.float64))
    qx, qy = _orthonormal_basis(prepare(x)), _orthonormal_basis(prepare(y))
    return np.clip(np.linalg.svd(qx.T @ qy, compute_uv=False), 0.0, 1.0)


def mean_squared_cca(x: np.ndarray, y: np.ndarray, center: bool = True) -> float:
    """Mean of the squared canonical correlations (Kornblith et al.'s R^2_CCA). Their demo's 0.54312 is for
    uncentred views (center=False); CCA proper centres (0.54540 on the same pair)."""
    rho = canonical_correlations(x, y, center)
    return float(np.sum(rho**2) / min(np.shape(x)[1], np.shape(y)[1]))


def _left_singular(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(u, s) of centred x, from the eigendecomposition of the smaller Gram matrix (fast for n << d or d << n);
    columns of u with s = 0 are dropped."""
    xc = _centered(x)
    if len(xc) <= xc.shape[1]:
        evals, u = np.linalg.eigh(xc @ xc.T)
        evals, u = evals[::-1], u[:, ::-1]
        s = np.sqrt(np.clip(evals, 0, None))
    else:
        evals, v = np.linalg.eigh(xc.T @ xc)
        evals, v = evals[::-1], v[:, ::-1]
        s = np.sqrt(np.clip(evals, 0, None))
        keep = s > 0
        u = np.zeros((len(xc), len(s)))
        u[:, keep] = xc @ v[:, keep] / s[keep]
    keep = s > 1e-10 * max(float(s[0]) if len(s) else 0.0, 1e-300)
    return u[:, keep], s[keep]


def svcca_basis(x: np.ndarray, keep: float = VARIANCE_KEPT, dims: int | None = None) -> np.ndarray:
    """Orthonormal [n, r]: centred x's top singular directions that together explain `keep` of the variance, or,
    given `dims`, its top `dims` directions (fewer where the rank is lower)."""
    u, s = _left_singular(x)
    if dims is not None:
        if dims < 1:
            raise ValueError(f"SVCCA needs at least 1 direction per side, got dims={dims}")
        return u[:, :dims]
    explained = np.cumsum(s**2) / max(float(np.sum(s**2)), 1e-300)
    kept = min(int(np.searchsorted(explained, keep - 1e-12) + 1), len(s))
    return u[:, :kept]


@dataclass
class SVCCA:
    value: float
    """Mean canonical correlation of the two reduced views."""
    kept_x: int
    kept_y: int
    correlations: np.ndarray = field(repr=False)


def svcca(x: np.ndarray, y: np.ndarray, keep: float = VARIANCE_KEPT, dims: int | None = None) -> SVCCA:
    """SVCCA: per side, keep the singular directions explaining `keep` of the variance (or the top `dims`), then
    CCA; mean rho. Kept directions close to the row count make rho trivially high: compare with
    `random_direction_baseline` (same shape)."""
    qx, qy = svcca_basis(x, keep, dims), svcca_basis(y, keep, dims)
    rho = np.clip(np.linalg.svd(qx.T @ qy, compute_uv=False), 0.0, 1.0)
    return SVCCA(float(np.mean(rho)) if len(rho) else 0.0, qx.shape[1], qy.shape[1], rho)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of [n, dx], [n, dy]: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on centred columns."""
    return _cka_from_grams(_centered_gram(x), _centered_gram(y))


def _centered_gram(x: np.ndarray) -> np.ndarray:
    xc = _centered(x)
    return xc @ xc.T


def _cka_from_grams(kx: np.ndarray, ky: np.ndarray) -> float:
    denominator = np.sqrt(np.sum(kx * kx) * np.sum(ky * ky))
    return float(np.sum(kx * ky) / denominator) if denominator > 0 else 0.0


def cosine_matrix(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = x / np.where(norms > 0, norms, 1.0)
    return unit @ unit.T


def rsa(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman correlation between the upper triangles of the two cosine-similarity matrices."""
    upper = np.triu_indices(len(x), 1)
    return _pearson(rankdata(cosine_matrix(x)[upper]), rankdata(cosine_matrix(y)[upper]))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt(np.dot(a, a) * np.dot(b, b))
    return float(np.dot(a, b) / denominator) if denominator > 0 else 0.0


def knn_sets(x: np.ndarray, k: int) -> np.ndarray:
    """[n, k] indices of each row's k nearest other rows by cosine."""
    similarity = cosine_matrix(x)
    np.fill_diagonal(similarity, -np.inf)
    return np.argpartition(-similarity, k - 1, axis=1)[:, :k]


def mutual_knn(x: np.ndarray, y: np.ndarray, k: int = 10) -> float:
    """Mean over rows of |kNN_X(i) ∩ kNN_Y(i)| / k."""
    k = _knn_k(len(x), k)
    return _knn_overlap(knn_sets(x, k), knn_sets(y, k), k)


def _knn_k(n: int, k: int) -> int:
    if n < 3:
        raise ValueError(f"mutual k-NN needs at least 3 pairs, got {n}")
    return min(k, n - 1)


def _knn_overlap(nx: np.ndarray, ny: np.ndarray, k: int) -> float:
    n = len(nx)
    marks = np.zeros((n, n), dtype=bool)
    marks[np.arange(n)[:, None], nx] = True
    hits = marks[np.arange(n)[:, None], ny].sum(1)
    return float(hits.mean() / k)


# ------------------------------------------------------------------------------------------------- re-pairing
class Paired:
    """Precomputed views of X and Y so a re-pairing (Y's rows permuted) is scored in O(n^2) or less."""

    def __init__(self, x: np.ndarray, y: np.ndarray, k: int = 10, keep: float = VARIANCE_KEPT,
                 dims: int | None = None):
        if len(x) != len(y):
            raise ValueError(f"paired sets need as many rows, got {len(x)} and {len(y)}")
        if len(x) < 3:
            raise ValueError(f"similarity of paired sets needs at least 3 pairs, got {len(x)}")
        self.n = len(x)
        self.kx, self.ky = _centered_gram(x), _centered_gram(y)
        upper = np.triu_indices(self.n, 1)
        self.upper = upper
        rank_x = np.zeros((self.n, self.n))
        rank_x[upper] = rankdata(cosine_matrix(x)[upper])
        self.rank_x_upper = rank_x[upper] - rank_x[upper].mean()
        self.rank_y = np.zeros((self.n, self.n))
        self.rank_y[upper] = rankdata(cosine_matrix(y)[upper])
        self.rank_y = self.rank_y + self.rank_y.T  # symmetric, so a permuted upper triangle reads correctly
        self.knn_k = _knn_k(self.n, k)
        self.nx, self.ny = knn_sets(x, self.knn_k), knn_sets(y, self.knn_k)
        self.qx, self.qy = svcca_basis(x, keep, dims), svcca_basis(y, keep, dims)
        self.svcca = svcca(x, y, keep, dims)

    def scores(self, perm: np.ndarray | None = None) -> dict[str, float]:
        """All measures with Y's row perm[i] paired to X's row i (None: the given pairing)."""
        p = np.arange(self.n) if perm is None else perm
        rho = np.clip(np.linalg.svd(self.qx.T @ self.qy[p], compute_uv=False), 0, 1)
        ky = self.ky[np.ix_(p, p)]
        ranks_y = self.rank_y[np.ix_(p, p)][self.upper]
        inverse = np.empty_like(p)
        inverse[p] = np.arange(self.n)
        ny = inverse[self.ny[p]]  # Y's neighbours of the row now paired with i, in X's numbering
        return {"svcca": float(rho.mean()) if len(rho) else 0.0, "cka": _cka_from_grams(self.kx, ky),
                "rsa": _pearson(self.rank_x_upper, ranks_y - ranks_y.mean()),
                "mutual_knn": _knn_overlap(self.nx, ny, self.knn_k)}


def all_measures(x: np.ndarray, y: np.ndarray, k: int = 10, dims: int | None = None) -> dict[str, float]:
    """Every measure of the given pairing (direct formulas; Paired.scores must agree)."""
    return {"svcca": svcca(x, y, dims=dims).value, "cka": linear_cka(x, y), "rsa": rsa(x, y),
            "mutual_knn": mutual_knn(x, y, k)}


@dataclass
class NullTest:
    """One measure of one pairing against a null distribution."""

    observed: float
    null_mean: float
    null_std: float
    null_q95: float
    p_value: float
    draws: int


def p_value(observed: float, null: np.ndarray) -> float:
    """(1 + #{null >= observed}) / (1 + draws): the permutation p-value, never 0."""
    return float((1 + np.sum(null >= observed - 1e-12)) / (1 + len(null)))


def summarise(observed: float, null: np.ndarray) -> NullTest:
    return NullTest(float(observed), float(np.mean(null)), float(np.std(null)), float(np.quantile(null, 0.95)),
                    p_value(observed, null), len(null))


def shuffled_pairing_null(x: np.ndarray, y: np.ndarray, draws: int = 1000, seed: int = 0, k: int = 10,
                          paired: Paired | None = None, dims: int | None = None) -> dict[str, NullTest]:
    """Each measure of the matched pairing against `draws` random re-pairings of the same rows (dims: SVCCA's
    directions per side; None keeps 99 % of the variance)."""
    paired = paired or Paired(x, y, k, dims=dims)
    observed = paired.scores()
    rng = np.random.default_rng(seed)
    null = {m: np.empty(draws) for m in MEASURES}
    for i in range(draws):
        for m, v in paired.scores(rng.permutation(paired.n)).items():
            null[m][i] = v
    return {m: summarise(observed[m], null[m]) for m in MEASURES}


def random_subset_null(observed: dict[str, float], pool_x: np.ndarray, pool_y: np.ndarray, n: int,
                       draws: int = 1000, seed: int = 0, k: int = 10,
                       measures: tuple[str, ...] = MEASURES, dims: int | None = None) -> dict[str, NullTest]:
    """Each measure against `draws` sets of n rows drawn at random (without replacement) from each side's pool
    (all of its latents), paired in draw order."""
    if n > min(len(pool_x), len(pool_y)):
        raise ValueError(f"cannot draw {n} rows from pools of {len(pool_x)} and {len(pool_y)}")
    rng = np.random.default_rng(seed)
    null = {m: np.empty(draws) for m in measures}
    for i in range(draws):
        sx = rng.choice(len(pool_x), n, replace=False)
        sy = rng.choice(len(pool_y), n, replace=False)
        for m in measures:
            null[m][i] = _measure(m, dims)(pool_x[sx], pool_y[sy], k)
    return {m: summarise(observed[m], null[m]) for m in measures}


def random_unit_rows(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """[n, d] independent directions, uniform on the sphere."""
    rows = rng.normal(size=(n, d))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True).clip(1e-300)


def random_direction_baseline(n: int, d_x: int, d_y: int, *, draws: int = 5, seed: int = 0, k: int = 10,
                              dims: int | None = None) -> dict[str, float]:
    """Each measure on n pairs of independent random unit vectors ([n, d_x] and [n, d_y]), mean over `draws`: the
    score that shape alone gives (e.g. linear CKA about n / (n + n(n-1)/d) for d >> 1), which a score on matched
    directions has to exceed before it says anything about shared structure."""
    if draws < 1:
        raise ValueError(f"the random-direction baseline needs at least 1 draw, got {draws}")
    rng = np.random.default_rng(seed)
    scores = [Paired(random_unit_rows(n, d_x, rng), random_unit_rows(n, d_y, rng), k, dims=dims).scores()
              for _ in range(draws)]
    return {m: float(np.mean([s[m] for s in scores])) for m in MEASURES}


def _measure(name: str, dims: int | None = None) -> Callable[[np.ndarray, np.ndarray, int], float]:
    return {"svcca": lambda x, y, k: svcca(x, y, dims=dims).value, "cka": lambda x, y, k: linear_cka(x, y),
            "rsa": lambda x, y, k: rsa(x, y), "mutual_knn": mutual_knn}[name]


__all__ = ["MEASURES", "NullTest", "Paired", "SVCCA", "SVCCA_DIRECTIONS", "all_measures", "canonical_correlations",
           "cosine_matrix", "linear_cka", "mean_squared_cca", "mutual_knn", "p_value", "random_direction_baseline",
           "random_subset_null", "random_unit_rows", "rsa", "shuffled_pairing_null", "svcca"]
