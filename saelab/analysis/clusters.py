"""Find multi-dimensional features in an SAE: cluster its latents, rebuild each cluster's part of the activations
over a cache, and rank the clusters by how irreducible (circle-like) their top PCA planes are, beside random
clusters of the same size.

    clusters = spectral_clusters(sae.W_dec, n_clusters=500, seed=0)       # or graph_clusters(sae.W_dec)
    clusters = coactivation_clusters(iter_codes(sae, "runs/acts"), n_clusters=500)   # by where latents fire
    search = search_clusters(sae, "runs/acts", clusters, tokenizer=model.tokenizer)
    search.save("runs/circles")                       # clusters.json, clusters.md, cluster_<id>.png for the top ones

Two ways to group latents: by their decoder directions (spectral, graph), and by where they fire (coactivation:
latents that fire in the same stretches of text). An SAE can give each day of the week its own latent with
near-orthogonal decoder rows; the decoder search cannot group those, co-activation can.

Engels et al. 2024, with what their code gets wrong done differently: the spectral clustering is seeded (ARPACK's
start vector and k-means++ both come from `seed`), works on a sparse k-nearest-neighbour graph so 16k+ latents need
no dense eigen-solve, the reconstruction runs over sparse codes a batch at a time (never a tokens x latents
matrix), the indices have one implementation (saelab.analysis.irreducibility), and every point is labelled by the
token at its own position.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Iterable, Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from saelab.analysis.irreducibility import PCA, irreducibility_score, pair_indices
from saelab.analysis.study import SCHEMA_VERSION, Similarity, StudyResult
from saelab.errors import DataError
from saelab.figures import pyplot, save_figure
from saelab.options import NonNegativeInt, PositiveInt, Range, check_fields

if TYPE_CHECKING:
    from saelab.codes import Codes
    from saelab.sae import SAE

RESULTS_FILE = "clusters.json"
ClusterSize = Annotated[int, Range(at_least=2)]


# ---------------------------------------------------------------------------------------------------- clustering
@dataclass
class Clusters:
    """labels [width]: each latent's cluster (-1: in none). method and settings say how they were found."""

    labels: Tensor
    method: str
    settings: dict[str, Any] = field(default_factory=dict)

    def groups(self, min_size: int = 2) -> dict[int, Tensor]:
        """{cluster id: its latents (ascending)} for clusters with at least min_size latents."""
        labels = self.labels
        order = torch.argsort(labels, stable=True)
        ids, counts = torch.unique_consecutive(labels[order], return_counts=True)
        out, start = {}, 0
        for cluster, count in zip(ids.tolist(), counts.tolist()):
            if cluster >= 0 and count >= min_size:
                out[cluster] = order[start : start + count].sort().values
            start += count
        return out


def unit_rows(W_dec: Tensor) -> Tensor:
    """Decoder rows scaled to unit norm (float32, CPU, detached); an all-zero row is an error."""
    W = torch.as_tensor(W_dec).detach().float().cpu()
    if W.ndim != 2 or len(W) < 2:
        raise ValueError(f"need decoder directions [width >= 2, d], got shape {tuple(W.shape)}")
    norms = W.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError(f"decoder row {int((norms[:, 0] == 0).nonzero()[0])} is all zeros; it has no direction")
    return W / norms


def nearest_neighbours(W: Tensor, k: int, block: int = 2048) -> tuple[Tensor, Tensor]:
    """Each unit row's k most similar other rows by cosine: (indices [n, k], cosines [n, k]), in row blocks."""
    n = len(W)
    k = min(k, n - 1)
    indices, cosines = [], []
    for start in range(0, n, block):
        sims = W[start : start + block] @ W.T
        sims[torch.arange(len(sims)), torch.arange(start, start + len(sims))] = -math.inf
        top = sims.topk(k, dim=1)
        indices.append(top.indices)
        cosines.append(top.values)
    return torch.cat(indices), torch.cat(cosines)


def angular_similarity(cos: Tensor) -> Tensor:
    """1 - arccos(cos) / pi, in [0, 1]: the affinity Engels et al. cluster on."""
    return 1 - torch.arccos(cos.clamp(-1, 1)) / math.pi


def spectral_clusters(W_dec: Tensor, n_clusters: int, *, neighbors: int | None = 32, components: int | None = None,
                      seed: int = 0, kmeans_restarts: int = 2) -> Clusters:
    """Spectral clustering of decoder directions on angular similarity (Ng-Jordan-Weiss), seeded.

    neighbors: keep each latent's `neighbors` most similar latents (a sparse, symmetrised graph solved with ARPACK:
    fast for 16k+ latents); None uses the dense all-pairs affinity (a dense eigen-solve: small SAEs only).
    components: eigenvectors to embed in (default min(n_clusters, 64): on 16k latents ARPACK takes about a minute
    for 64 on two CPU cores and four times that for 128; more can be asked for).
    """
    W = unit_rows(W_dec)
    n = len(W)
    if not 2 <= n_clusters <= n:
        raise ValueError(f"n_clusters must be between 2 and the number of latents ({n}), got {n_clusters}")
    dim = min(components or min(n_clusters, 64), n - 1)
    if neighbors is None or neighbors >= n - 1:
        A = angular_similarity(W @ W.T).double().numpy()
    else:
        idx, cos = nearest_neighbours(W, neighbors)
        A = neighbour_graph(idx, angular_similarity(cos), n)
    labels = spectral_labels(A, n_clusters, dim, seed=seed, kmeans_restarts=kmeans_restarts)
    return Clusters(labels, "spectral", dict(n_clusters=n_clusters, neighbors=neighbors, components=dim, seed=seed))


def neighbour_graph(idx: Tensor, weights: Tensor, n: int, mutual: bool = False):
    """The symmetrised sparse graph (scipy CSR [n, n]) linking each row i to idx[i] with weights[i]; mutual: only
    the links both ends make."""
    import scipy.sparse as sp

    rows = torch.arange(len(idx)).repeat_interleave(idx.shape[1])
    A = sp.coo_matrix((weights.flatten().double().numpy(), (rows.numpy(), idx.flatten().numpy())),
                      shape=(n, n)).tocsr()
    return A.minimum(A.T) if mutual else A.maximum(A.T)


def spectral_labels(A, n_clusters: int, dim: int, *, seed: int = 0, kmeans_restarts: int = 2) -> Tensor:
    """Ng-Jordan-Weiss on an affinity (a dense numpy [n, n], its diagonal ignored, or a scipy sparse graph):
    k-means of the row-normalised top `dim` eigenvectors of D^-1/2 A D^-1/2, seeded."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import eigsh

    n = A.shape[0]
    if not sp.issparse(A):
        A = np.array(A, dtype=np.float64)
        np.fill_diagonal(A, 0.0)
        scale = 1 / np.sqrt(np.maximum(A.sum(1), 1e-12))
        values, vectors = np.linalg.eigh(A * scale[:, None] * scale[None, :])
        embedding = vectors[:, -dim:]
    else:
        degree = np.asarray(A.sum(1)).ravel()
        scale = sp.diags(1 / np.sqrt(np.maximum(degree, 1e-12)))
        start = np.random.default_rng(seed).standard_normal(n)
        values, vectors = eigsh(scale @ A @ scale, k=dim, which="LA", v0=start, tol=1e-6)
        embedding = vectors[:, np.argsort(values)]
    embedding = torch.from_numpy(np.ascontiguousarray(embedding)).float()
    embedding = embedding / embedding.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return kmeans(embedding, n_clusters, seed=seed, restarts=kmeans_restarts)


def kmeans(x: Tensor, k: int, *, seed: int = 0, restarts: int = 4, iterations: int = 100) -> Tensor:
    """Seeded k-means++ then Lloyd iterations; the restart with the least inertia wins. Labels [n]."""
    generator = torch.Generator().manual_seed(seed)
    best, best_inertia = None, math.inf
    for _ in range(restarts):
        centres = x[torch.randint(len(x), (1,), generator=generator)]
        nearest = torch.cdist(x, centres).squeeze(1).square()
        for _ in range(1, k):  # k-means++: each new centre drawn in proportion to the squared distance
            weights = nearest / nearest.sum() if float(nearest.sum()) > 0 else torch.ones(len(x)) / len(x)
            pick = torch.multinomial(weights, 1, generator=generator)
            centres = torch.cat([centres, x[pick]])
            nearest = torch.minimum(nearest, (x - x[pick]).square().sum(1))
        labels = None
        for _ in range(iterations):
            new = torch.cdist(x, centres).argmin(1)
            if labels is not None and bool((new == labels).all()):
                break
            labels = new
            sums = torch.zeros_like(centres).index_add_(0, labels, x)
            counts = torch.bincount(labels, minlength=k).unsqueeze(1)
            centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
        inertia = float((x - centres[labels]).square().sum())
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return canonical_labels(best)


def canonical_labels(labels: Tensor) -> Tensor:
    """Renumber clusters by their smallest latent (keeping -1), so equal partitions get equal labels."""
    out = torch.full_like(labels, -1)
    keep = labels >= 0
    if not bool(keep.any()):
        return out
    order = torch.argsort(labels[keep], stable=True)  # within a label, latents ascending
    first = {}
    for latent in keep.nonzero().squeeze(1)[order].tolist():
        first.setdefault(int(labels[latent]), latent)
    rank = {label: i for i, (label, _) in enumerate(sorted(first.items(), key=lambda item: item[1]))}
    out[keep] = torch.tensor([rank[int(v)] for v in labels[keep].tolist()], dtype=labels.dtype)
    return out


def graph_clusters(W_dec: Tensor, *, top: int = 2, min_cosine: float = 0.5) -> Clusters:
    """Link each latent to its `top` nearest latents whose cosine exceeds min_cosine; clusters are the connected
    components of that (undirected) graph, singletons dropped (label -1)."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    W = unit_rows(W_dec)
    n = len(W)
    idx, cos = nearest_neighbours(W, top)
    keep = cos > min_cosine
    rows = torch.arange(n).unsqueeze(1).expand_as(idx)[keep].numpy()
    graph = sp.coo_matrix((np.ones(len(rows)), (rows, idx[keep].numpy())), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    labels = torch.from_numpy(labels).long()
    sizes = torch.bincount(labels)
    labels = torch.where(sizes[labels] > 1, labels, -1)
    return Clusters(canonical_labels(labels), "graph", dict(top=top, min_cosine=min_cosine))


# ---------------------------------------------------------------------------------------------------- co-activation
def window_cooccurrence(codes: Iterable["Codes"], window: int = 32) -> tuple[Tensor, int]:
    """How often each pair of latents fires in the same window: counts [width, width] (the diagonal: windows
    each latent fires in) and the number of windows. A window is `window` consecutive tokens of one context
    (window=1: the same token); codes come in text order, so a window cut by a batch edge is joined up again.

    Each batch's windows x latents indicator is a product of its own (a batch's windows, never tokens x width);
    the counts are dense, width^2 floats (85 MB for 4,608 latents, 1 GB for 16k).
    """
    if window < 1:
        raise ValueError(f"window must be 1 or more tokens, got {window}")
    counts, windows, width = None, 0, None
    held = (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))  # the last, maybe unfinished, window

    def add(keys: Tensor, latents: Tensor) -> None:
        nonlocal counts, windows
        ids, which = torch.unique(keys, return_inverse=True)
        fired = torch.zeros(len(ids), width)
        fired[which, latents] = 1.0
        counts.addmm_(fired.T, fired)  # exact: integer counts below 2^24 windows
        windows += len(ids)

    for batch in codes:
        if counts is None:
            width = batch.width
            counts = torch.zeros(width, width)
        rows = batch.row_ids()
        keys = batch.contexts.long()[rows] * (1 << 32) + batch.positions.long()[rows] // window
        keys, latents = torch.cat([held[0], keys]), torch.cat([held[1], batch.latents.long()])
        if len(keys) == 0:
            continue
        last = keys == keys.max()
        if bool((~last).any()):
            add(keys[~last], latents[~last])
        held = (keys[last], latents[last])
    if counts is None:
        raise DataError("no codes to count co-activations over (an empty cache?)")
    if len(held[0]):
        add(*held)
    return counts, windows


def coactivation(counts: Tensor, windows: int) -> Tensor:
    """The phi coefficient (Pearson correlation of fires / does not fire, per window) of every pair of latents,
    from window_cooccurrence; 0 for a latent that fires in no window or in every one."""
    n = counts.diagonal().double()
    N = float(windows)
    spread = (n * (N - n)).clamp_min(0).sqrt()
    phi = (N * counts.double() - n[:, None] * n[None, :]) / (spread[:, None] * spread[None, :]).clamp_min(1e-30)
    return torch.where((spread[:, None] > 0) & (spread[None, :] > 0), phi, 0.0).float()


def coactivation_clusters(codes: Iterable["Codes"], *, window: int = 32, n_clusters: int | None = None,
                          mutual: int = 3, min_correlation: float = 0.1, neighbors: int | None = 32,
                          significance: float = 5.0, min_windows: int = 5, seed: int = 0,
                          kmeans_restarts: int = 2) -> Clusters:
    """Cluster latents by where they fire: two latents are alike when their firing over windows of `window`
    tokens is correlated (coactivation), whatever their decoder directions.

    Only correlations above significance / sqrt(windows) count (independent latents give about N(0, 1 / windows)):
    the rest are chance, and would tie every latent to every other.
    n_clusters None ("coactivation-graph"): link two latents when each is among the other's `mutual` most
        correlated latents above min_correlation, and take the connected components (links made by one end only
        chain most latents into one component: latents that fire often are many latents' best partners).
    n_clusters given ("coactivation-spectral"): spectral clustering on each latent's `neighbors` most correlated
        latents (None: all pairs).
    Latents firing in fewer than min_windows windows, or linked to none, are in no cluster (-1).
    """
    from scipy.sparse.csgraph import connected_components

    counts, windows = window_cooccurrence(codes, window)
    width = len(counts)
    floor = significance / math.sqrt(windows)
    active = (counts.diagonal() >= min_windows).nonzero().squeeze(1)
    phi = coactivation(counts[active][:, active], windows)
    phi = torch.where(phi > (floor if n_clusters else max(floor, min_correlation)), phi, 0.0)
    phi.fill_diagonal_(0)
    linked = (phi > 0).any(1)
    active, phi = active[linked], phi[linked][:, linked]
    n = len(active)
    labels = torch.full((width,), -1, dtype=torch.long)
    settings = dict(window=window, significance=significance, min_windows=min_windows, windows=windows, linked=n)
    if n < 2:
        raise DataError(f"no two latents fire together in the {windows} windows more than chance allows; nothing to "
                        "cluster by co-activation (read more tokens, a wider window or a lower min_correlation)")
    if n_clusters is None:
        best = phi.topk(min(mutual, n - 1), dim=1)
        graph = neighbour_graph(best.indices, best.values, n, mutual=True)
        graph.eliminate_zeros()
        _, found = connected_components(graph, directed=False)
        found = torch.from_numpy(found).long()
        labels[active] = torch.where(torch.bincount(found)[found] > 1, found, -1)
        return Clusters(canonical_labels(labels), "coactivation-graph",
                        dict(settings, mutual=mutual, min_correlation=min_correlation))
    k = min(n_clusters, n)
    dim = min(k, 64, n - 1)
    if neighbors is None or neighbors >= n - 1:
        A = phi.double().numpy()
    else:
        best = phi.topk(neighbors, dim=1)
        A = neighbour_graph(best.indices, best.values, n)
        A.eliminate_zeros()
    labels[active] = spectral_labels(A, k, dim, seed=seed, kmeans_restarts=kmeans_restarts)
    return Clusters(canonical_labels(labels), "coactivation-spectral",
                    dict(settings, n_clusters=n_clusters, neighbors=neighbors, components=dim, seed=seed))


# ---------------------------------------------------------------------------------------------------- points
@dataclass
class ClusterPoints:
    """A cluster's part of the activations on the tokens where any of its latents fires.

    x_t = sum over f in the cluster of a_f(t) W_dec[f] (no bias), kept as codes [n, |F|] with the decoder rows
    [|F|, d], so no [n, d] matrix is built until asked for.
    """

    latents: Tensor
    codes: Tensor
    W: Tensor
    rows: Tensor
    token_ids: Tensor

    def points(self) -> Tensor:
        return self.codes @ self.W

    def pca(self, k: int = 5) -> tuple[PCA, Tensor]:
        """PCA of the points to k components and the points' coordinates [n, k], computed in the span of the
        cluster's decoder rows (|F| dimensions), which holds every point."""
        n, size = self.codes.shape
        k = min(k, size, n - 1)
        if k < 2:
            raise ValueError(f"cluster of latents {self.latents.tolist()} fires on {n} token(s): too few for a plane")
        Q, R = torch.linalg.qr(self.W.T.double())  # W^T = Q R: x = a W = (a R^T) Q^T, an isometry onto span(W)
        y = self.codes.double() @ R.T
        mean = y.mean(0)
        _, s, vh = torch.linalg.svd(y - mean, full_matrices=False)
        variance = s.square() / max(n - 1, 1)
        signs = torch.where(vh[:k].sum(1) < 0, -1.0, 1.0).double()
        basis = vh[:k] * signs[:, None]
        coords = (y - mean) @ basis.T
        fitted = PCA((mean @ Q.T).float(), (basis @ Q.T).float(), variance[:k].float(),
                     (variance[:k] / variance.sum().clamp_min(1e-30)).float())
        return fitted, coords.float()


def check_pairing(sae: "SAE", manifest, hook: str) -> None:
    """Refuse an SAE and a cache that belong to different models, hooks or widths."""
    cache_model = manifest.run.get("model", "")
    if sae.cfg.model_name and cache_model and sae.cfg.model_name != cache_model:
        raise DataError(f"the SAE was trained on {sae.cfg.model_name} but the cache holds {cache_model}; use a cache "
                        "of the SAE's own model")
    if hook not in manifest.hooks:
        raise DataError(f"the cache has no hook {hook!r} (it holds {', '.join(manifest.hooks)}); cache the SAE's hook")
    sae.check_hook(hook)
    d = manifest.hooks[hook]["d"]
    if d != sae.cfg.d_in:
        raise DataError(f"the SAE expects d_in={sae.cfg.d_in} but the cache's {hook} has d={d}")


def cluster_points(sae: "SAE", source, groups: dict[int, Tensor], *, hook: str | None = None,
                   batch_size: int = 4096, max_tokens: int | None = None,
                   progress: bool = True) -> tuple[dict[int, ClusterPoints], int]:
    """Every cluster's codes over the cache (or ActivationStore) `source`, in one pass of sparse codes, and the
    number of tokens read.

    Only the nonzeros of latents in `groups` are kept, so memory is about their count, never tokens x width.
    """
    from saelab.activations import ActivationStore, open_source
    from saelab.codes import iter_codes

    for cluster, latents in groups.items():
        if len(latents) < 2:
            raise ValueError(f"cluster {cluster} has one latent ({int(latents[0])}): a single direction has no "
                             "plane to score; keep clusters of 2 or more latents")
    store = open_source(source, batch_size=batch_size)
    if not isinstance(store, ActivationStore):
        raise TypeError(f"cluster points are read from an activation cache, not a {type(store).__name__}")
    hook = hook or sae.cfg.hook_name or next(iter(store.manifest.hooks))
    check_pairing(sae, store.manifest, hook)
    cluster_of = torch.full((sae.cfg.width,), -1, dtype=torch.long)
    slot = torch.zeros(sae.cfg.width, dtype=torch.long)
    for cluster, latents in groups.items():
        cluster_of[latents] = cluster
        slot[latents] = torch.arange(len(latents))
    parts: dict[str, list[Tensor]] = {"cluster": [], "row": [], "slot": [], "value": []}
    token_ids, seen = [], 0
    bar = _progress(progress, total=min(store.n_tokens, max_tokens or store.n_tokens), desc="codes", unit="tok")
    for codes in iter_codes(sae, store, hook=hook, batch_size=batch_size, max_tokens=max_tokens):
        which = cluster_of[codes.latents]
        keep = which >= 0
        parts["cluster"].append(which[keep])
        parts["row"].append(codes.row_ids()[keep] + seen)
        parts["slot"].append(slot[codes.latents[keep]])
        parts["value"].append(codes.values[keep].float())
        token_ids.append(codes.token_ids)
        seen += len(codes)
        bar.update(len(codes))
    bar.close()
    flat = {key: torch.cat(value) if value else torch.zeros(0, dtype=torch.long) for key, value in parts.items()}
    all_tokens = torch.cat(token_ids) if token_ids else torch.zeros(0, dtype=torch.long)
    order = torch.argsort(flat["cluster"] * max(seen, 1) + flat["row"], stable=True)
    flat = {key: value[order] for key, value in flat.items()}
    W = sae.W_dec.detach().float().cpu()  # codes come in raw units; folding the input scale keeps W_dec as is
    ids, counts = torch.unique_consecutive(flat["cluster"], return_counts=True)
    out, start = {}, 0
    for cluster, count in zip(ids.tolist(), counts.tolist()):
        part = slice(start, start + count)
        start += count
        rows, local = torch.unique_consecutive(flat["row"][part], return_inverse=True)
        latents = groups[cluster]
        codes = torch.zeros(len(rows), len(latents))
        codes[local, flat["slot"][part]] = flat["value"][part]
        out[cluster] = ClusterPoints(latents, codes, W[latents], rows, all_tokens[rows])
    return out, seen


def _progress(enabled: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, **kwargs)


# ---------------------------------------------------------------------------------------------------- scores
@dataclass
class ClusterScore:
    """One cluster's geometry: its PCA, the indices of each consecutive PCA pair and the ranking score."""

    cluster: int
    latents: list[int]
    n_tokens: int
    mean_cosine: float
    """Mean pairwise cosine of the cluster's decoder rows."""
    explained: list[float]
    """Fraction of the cluster reconstruction's variance along each PCA component."""
    mixture: list[float]
    separability: list[float]
    score: float
    """Mean over PCA pairs of (1 - mixture) * separability: high for irreducible features."""
    top_tokens: list[list]
    """[[token text, count], ...] of the tokens the cluster fires on most."""
    random_score: float | None = None
    """The same score of random clusters of as many latents (mean over random_scored of them): what the indices
    give latents grouped by nothing. None: no baseline was drawn."""
    random_mixture: list[float] | None = None
    random_separability: list[float] | None = None
    random_scored: int = 0
    """Random clusters of this size that fired on min_tokens tokens and were scored."""


def score_cluster(cluster: int, points: ClusterPoints, *, components: int = 5, seed: int = 0,
                  tokenizer=None, top_tokens: int = 10) -> tuple[ClusterScore, Tensor]:
    """Score one cluster; also returns its PCA coordinates [n, k] for plotting."""
    fitted, coords = points.pca(components)
    pairs = pair_indices(coords, seed=seed)
    W = points.W / points.W.norm(dim=1, keepdim=True)
    sims = W @ W.T
    size = len(W)
    mean_cosine = float((sims.sum() - sims.diagonal().sum()) / (size * (size - 1)))
    ids, counts = torch.unique(points.token_ids, return_counts=True)
    top = counts.argsort(descending=True)[:top_tokens]
    tokens = [[token_text(tokenizer, int(ids[i])), int(counts[i])] for i in top]
    return ClusterScore(cluster, points.latents.tolist(), len(points.rows), mean_cosine, fitted.explained.tolist(),
                        [p.mixture for p in pairs], [p.separability for p in pairs], irreducibility_score(pairs),
                        tokens), coords


def live_latents(sae: "SAE", source, *, hook: str | None = None, batch_size: int = 4096,
                 max_tokens: int | None = None) -> Tensor:
    """The latents that fire at least once over the source (ascending)."""
    from saelab.codes import iter_codes

    fired = torch.zeros(sae.cfg.width, dtype=torch.long)
    for codes in iter_codes(sae, source, hook=hook, batch_size=batch_size, max_tokens=max_tokens):
        fired += torch.bincount(codes.latents, minlength=sae.cfg.width)
    return (fired > 0).nonzero().squeeze(1)


def random_groups(sizes: dict[int, int], pool: Tensor, draws: int, seed: int = 0) -> list[dict[int, Tensor]]:
    """`draws` random clusters of each size in `sizes` ({cluster: number of latents}), drawn from `pool`, packed
    into rounds of disjoint groups (cluster_points reads one round per pass) keyed draw * (max cluster + 1) +
    cluster. A size larger than the pool gets none."""
    generator = torch.Generator().manual_seed(seed)
    stride = max(sizes, default=0) + 1
    rounds, current, free = [], {}, pool[torch.randperm(len(pool), generator=generator)]
    for draw in range(draws):
        for cluster, size in sizes.items():
            if size > len(pool):
                continue
            if size > len(free):
                rounds.append(current)
                current, free = {}, pool[torch.randperm(len(pool), generator=generator)]
            current[draw * stride + cluster], free = free[:size].sort().values, free[size:]
    return [r for r in rounds + [current] if r]


def random_baseline(sae: "SAE", source, sizes: dict[int, int], *, draws: int = 3, hook: str | None = None,
                    components: int = 5, min_tokens: int = 100, max_tokens: int | None = None,
                    batch_size: int = 4096, seed: int = 0, progress: bool = True) -> dict[int, list[ClusterScore]]:
    """Scores of `draws` random clusters of the size of each cluster in `sizes`, drawn from the latents that fire
    over the source and scored by the rule the found clusters are (those firing on min_tokens tokens)."""
    pool = live_latents(sae, source, hook=hook, batch_size=batch_size, max_tokens=max_tokens)
    stride = max(sizes, default=0) + 1
    out: dict[int, list[ClusterScore]] = {cluster: [] for cluster in sizes}
    for groups in random_groups(sizes, pool, draws, seed):
        points, _ = cluster_points(sae, source, groups, hook=hook, batch_size=batch_size, max_tokens=max_tokens,
                                   progress=False)
        scored = [(key, p) for key, p in points.items() if len(p.rows) >= min_tokens]
        for key, p in _progress(progress, iterable=scored, desc="scoring random clusters", unit="cluster"):
            out[key % stride].append(score_cluster(key, p, components=components, seed=seed)[0])
    return out


def with_baseline(score: ClusterScore, randoms: Sequence[ClusterScore]) -> ClusterScore:
    """score with the means of its random same-size clusters' indices beside it (per PCA pair)."""
    if not randoms:
        return dataclasses.replace(score, random_scored=0)
    pairs = min(len(r.mixture) for r in randoms)
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return dataclasses.replace(score, random_score=mean([r.score for r in randoms]),
                               random_mixture=[mean([r.mixture[i] for r in randoms]) for i in range(pairs)],
                               random_separability=[mean([r.separability[i] for r in randoms]) for i in range(pairs)],
                               random_scored=len(randoms))


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)


@dataclass
class ClusterSearch(StudyResult):
    """Ranked clusters of one SAE over one cache (best first), with how they were found; saved as clusters.json,
    clusters.md, clusters.safetensors (each scored cluster's PCA coordinates and token ids, which the plots read)
    and the top clusters' plots."""

    NAME: ClassVar[str] = "clusters"
    WHAT: ClassVar[str] = "cluster search"

    sae: dict[str, Any]
    cache: str
    clustering: dict[str, Any]
    clusters: list[ClusterScore] = field(default_factory=list)
    n_tokens: int = 0
    coords: dict[int, Tensor] = field(default_factory=dict, repr=False, compare=False)
    token_ids: dict[int, Tensor] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def tensor_fields(cls) -> tuple[str, ...]:
        return ("coords", "token_ids")

    def tensors(self) -> dict[str, Tensor]:
        return {f"{kind}.{cluster}": value for kind in self.tensor_fields()
                for cluster, value in getattr(self, kind).items()}

    def restore_tensors(self, tensors: dict[str, Tensor]) -> None:
        for key, value in tensors.items():
            kind, cluster = key.split(".")
            getattr(self, kind)[int(cluster)] = value

    def find(self, words: Sequence[str], tokenizer=None) -> list[ClusterScore]:
        """Clusters whose top tokens include any of `words` (stripped, case-insensitive)."""
        wanted = {w.strip().lower() for w in words}
        return [c for c in self.clusters if any(str(t).strip().lower() in wanted for t, _ in c.top_tokens)]

    def table(self, top: int = 10) -> str:
        lines = ["| rank | cluster | latents | tokens | mean cos | PC1-2 var | M (pairs) | S bits (pairs) | score | "
                 "random same size: score, M, S | top tokens |", "|" + "---|" * 11]
        for rank, c in enumerate(self.clusters[:top], 1):
            words = ", ".join(f"`{str(t).strip() or repr(t)}` {n}" for t, n in c.top_tokens[:5])
            lines.append(f"| {rank} | {c.cluster} | {len(c.latents)} | {c.n_tokens} | {c.mean_cosine:.2f} | "
                         f"{sum(c.explained[:2]):.2f} | {' '.join(f'{m:.2f}' for m in c.mixture)} | "
                         f"{' '.join(f'{s:.2f}' for s in c.separability)} | {c.score:.3f} | {random_cell(c)} | "
                         f"{words} |")
        return "\n".join(lines) + "\n"

    def plot(self, rank: int, path: str | Path, tokenizer=None, labels: int = 40, seed: int = 0) -> Path:
        """The rank-th cluster (1 = best) in its PC1-PC2 and PC2-PC3 planes, points coloured by their own token
        (the 8 commonest get a legend) and a seeded sample of `labels` points annotated with it."""
        plt = pyplot()
        c = self.clusters[rank - 1]
        coords, ids = self.coords[c.cluster], self.token_ids[c.cluster]
        planes = [(0, 1)] + ([(1, 2)] if coords.shape[1] > 2 else [])
        fig, axes = plt.subplots(1, len(planes), figsize=(5.2 * len(planes), 4.6), squeeze=False)
        values, counts = torch.unique(ids, return_counts=True)
        common = values[counts.argsort(descending=True)[:8]].tolist()
        generator = torch.Generator().manual_seed(seed)
        sample = torch.randperm(len(ids), generator=generator)[:labels]
        for ax, (i, j) in zip(axes[0], planes):
            rest = ~torch.isin(ids, torch.tensor(common))
            ax.scatter(coords[rest, i], coords[rest, j], s=4, c="lightgrey", label="other")
            for n, token in enumerate(common):
                here = ids == token
                ax.scatter(coords[here, i], coords[here, j], s=6, color=plt.cm.tab10(n % 10),
                           label=repr(token_text(tokenizer, token)))
            for k in sample.tolist():
                ax.annotate(token_text(tokenizer, int(ids[k])).strip(), (float(coords[k, i]), float(coords[k, j])),
                            fontsize=6, alpha=0.8)
            ax.set_xlabel(f"PC{i + 1} ({c.explained[i]:.0%})")
            ax.set_ylabel(f"PC{j + 1} ({c.explained[j]:.0%})")
            ax.set_title(f"M={c.mixture[i]:.2f}  S={c.separability[i]:.2f} bits", fontsize=9)
        axes[0][0].legend(fontsize=6, markerscale=2, loc="best")
        fig.suptitle(f"cluster {c.cluster} (rank {rank}): {len(c.latents)} latents, {c.n_tokens} tokens, "
                     f"score {c.score:.3f}", fontsize=10)
        return save_figure(fig, path)

    def save(self, folder: str | Path, tokenizer=None, plots: int = 5) -> Path:
        """The record and cluster_rank<r>.png for the top `plots` clusters (points labelled with `tokenizer`)."""
        self.write(folder)
        self.save_figures(Path(folder), self.name(), tokenizer, plots)
        return Path(folder)

    def save_figures(self, folder: Path, name: str, tokenizer=None, plots: int = 5) -> None:
        for rank in range(1, min(plots, len(self.clusters)) + 1):
            self.plot(rank, folder / f"cluster_rank{rank}.png", tokenizer)


def random_cell(c: ClusterScore) -> str:
    if c.random_score is None:
        return "–"
    return (f"{c.random_score:.3f}, {sum(c.random_mixture) / len(c.random_mixture):.2f}, "
            f"{sum(c.random_separability) / len(c.random_separability):.2f} (n={c.random_scored})")


def search_clusters(sae: "SAE", source, clusters: Clusters, *, tokenizer=None, hook: str | None = None,
                    components: int = 5, min_size: int = 2, max_size: int | None = None, min_tokens: int = 100,
                    max_tokens: int | None = None, random_draws: int = 3, batch_size: int = 4096, seed: int = 0,
                    progress: bool = True) -> ClusterSearch:
    """Rebuild every cluster (min_size <= latents <= max_size) over the cache, score the ones that fire on at
    least min_tokens tokens (the indices of fewer points are mostly estimator bias), score `random_draws` random
    clusters of each scored cluster's size beside it, and rank them."""
    started = time.perf_counter()
    groups = {c: g for c, g in clusters.groups(min_size).items() if max_size is None or len(g) <= max_size}
    if not groups:
        raise ValueError(f"no cluster has between {min_size} and {max_size or 'any number of'} latents; nothing to "
                         "score (try more clusters, or the graph method with a lower min_cosine)")
    points, seen = cluster_points(sae, source, groups, hook=hook, batch_size=batch_size, max_tokens=max_tokens,
                            progress=progress)
    search = ClusterSearch(sae=dict(arch=sae.cfg.arch, width=sae.cfg.width, k=sae.cfg.k, model=sae.cfg.model_name,
                                    hook=hook or sae.cfg.hook_name),
                           cache=str(getattr(source, "path", source)),
                           clustering=dict(method=clusters.method, **clusters.settings, min_size=min_size,
                                           max_size=max_size, min_tokens=min_tokens, pca_components=components,
                                           random_draws=random_draws, n_clusters_scored=0))
    scored = [c for c in points.items() if len(c[1].rows) >= min_tokens]
    for cluster, p in _progress(progress, iterable=scored, desc="scoring clusters", unit="cluster"):
        score, coords = score_cluster(cluster, p, components=components, seed=seed, tokenizer=tokenizer)
        search.clusters.append(score)
        search.coords[cluster], search.token_ids[cluster] = coords, p.token_ids
    if random_draws and search.clusters:
        randoms = random_baseline(sae, source, {c.cluster: len(c.latents) for c in search.clusters},
                                  draws=random_draws, hook=hook, components=components, min_tokens=min_tokens,
                                  max_tokens=max_tokens, batch_size=batch_size, seed=seed, progress=progress)
        search.clusters = [with_baseline(c, randoms[c.cluster]) for c in search.clusters]
    search.clusters.sort(key=lambda c: (-c.score, c.cluster))
    search.clustering["n_clusters_scored"] = len(search.clusters)
    search.clustering["n_clusters_found"] = len(groups)
    search.n_tokens = seen
    search.seconds = time.perf_counter() - started
    return search


@dataclass
class ClusterSearchConfig:
    """One cluster search: the SAE and the cache of its hook, how its decoder directions are clustered, which
    clusters are scored, and how many are plotted."""

    sae: str
    """SAE folder (saelab, SAELens, sparsify or Gemma Scope format)."""
    acts: str
    """Activation cache holding the SAE's hook (of the SAE's model)."""
    hook: str | None = None
    """The cache hook to read (default: the SAE's own)."""
    method: Literal["spectral", "graph", "coactivation-graph", "coactivation-spectral"] = "spectral"
    """By decoder direction: spectral clustering on angular similarity, or the top-k-neighbour graph with a cosine
    cut. By where latents fire (finds latents with near-orthogonal decoder rows that fire in the same stretches
    of text, such as one latent per day of the week): the same two on the correlation of their firing over
    windows of the cache."""
    n_clusters: PositiveInt = 500
    """Spectral: number of clusters."""
    neighbors: NonNegativeInt = 32
    """Spectral: neighbours per latent in the sparse graph (0: dense all-pairs affinity)."""
    top: PositiveInt = 2
    """Graph: link each latent to its top nearest latents."""
    min_cosine: Similarity = 0.5
    """Graph: only links above this cosine."""
    window: PositiveInt = 32
    """Co-activation: tokens per window of one context (1: the same token)."""
    mutual: PositiveInt = 3
    """Co-activation graph: link two latents when each is among the other's `mutual` most correlated."""
    min_correlation: Similarity = 0.1
    """Co-activation graph: only links above this correlation of firing."""
    significance: Annotated[float, Range(at_least=0)] = 5.0
    """Co-activation: only correlations this many standard errors above chance (1 / sqrt(windows)) link."""
    random_draws: NonNegativeInt = 3
    """Random clusters of each scored cluster's size, scored beside it (0: none)."""
    min_size: ClusterSize = 2
    """Smallest cluster scored (2 or more latents)."""
    max_size: ClusterSize | None = None
    """Largest cluster scored (None: any)."""
    min_tokens: PositiveInt = 100
    """Score clusters firing on at least this many tokens."""
    tokens: PositiveInt | None = None
    """Read at most this many tokens of the cache (None: all)."""
    plots: NonNegativeInt = 5
    """Plot the top N clusters in their PCA planes."""
    model: str | None = None
    """Tokenizer for labelling points (default: the SAE's model)."""
    no_model: bool = False
    """Label points by token id (load no model)."""
    seed: NonNegativeInt = 0
    """Seeds the spectral clustering and the indices' subsamples."""

    def __post_init__(self):
        check_fields(self)


def cluster_decoder(sae: "SAE", config: ClusterSearchConfig) -> Clusters:
    """The SAE's latents clustered as the config says (by decoder direction, or by co-activation over config.acts)."""
    if config.method == "spectral":
        return spectral_clusters(sae.W_dec, config.n_clusters, neighbors=config.neighbors or None, seed=config.seed)
    if config.method == "graph":
        return graph_clusters(sae.W_dec, top=config.top, min_cosine=config.min_cosine)
    from saelab.codes import iter_codes

    codes = iter_codes(sae, config.acts, hook=config.hook, max_tokens=config.tokens)
    spectral = config.method == "coactivation-spectral"
    return coactivation_clusters(codes, window=config.window, n_clusters=config.n_clusters if spectral else None,
                                 mutual=config.mutual, min_correlation=config.min_correlation,
                                 neighbors=config.neighbors or None, significance=config.significance,
                                 seed=config.seed)


def run_cluster_search(config: ClusterSearchConfig, *, sae: "SAE | None" = None, tokenizer=None,
                       clusters: Clusters | None = None, log=None, progress: bool = True,
                       trust_remote_code: bool = False) -> ClusterSearch:
    """The cluster search a config describes (what `saelab circles clusters` runs); `sae`, `tokenizer` and
    `clusters` (of this SAE's decoder) skip loading or computing them."""
    from saelab.hub import load_sae
    from saelab.models import load_model

    sae = sae if sae is not None else load_sae(config.sae)
    clusters = clusters if clusters is not None else cluster_decoder(sae, config)
    if log:
        log(f"{config.method}: {len(clusters.groups(config.min_size))} clusters of {config.min_size}+ latents")
    name = config.model or sae.cfg.model_name
    if tokenizer is None and name and not config.no_model:
        tokenizer = load_model(name, trust_remote_code=trust_remote_code).tokenizer
    return search_clusters(sae, config.acts, clusters, tokenizer=tokenizer, hook=config.hook,
                           min_size=config.min_size, max_size=config.max_size, min_tokens=config.min_tokens,
                           max_tokens=config.tokens, random_draws=config.random_draws, seed=config.seed,
                           progress=progress)


__all__ = ["ClusterPoints", "ClusterScore", "ClusterSearch", "ClusterSearchConfig", "Clusters", "cluster_decoder",
           "run_cluster_search", "angular_similarity", "check_pairing", "coactivation", "coactivation_clusters",
           "cluster_points", "graph_clusters", "kmeans", "live_latents", "nearest_neighbours", "neighbour_graph",
           "random_baseline", "random_groups", "score_cluster", "search_clusters", "spectral_clusters",
           "spectral_labels", "unit_rows", "window_cooccurrence", "with_baseline"]
