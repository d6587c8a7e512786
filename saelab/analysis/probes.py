"""Linear probes on a model's activations: residual dimensions, MLP neurons and SAE latents, side by side.

    features = [Features("blocks.9.hook_resid_post"), Features(neuron_hook(model, 9)), Features(sae=sae)]
    X = extract(model, data.texts, features, positions="mean")        # {features.name: [n, d]}
    fitted = fit_probes(X[name][rows["train"]], y_train, X[name][rows["val"]], y_val, ks=(1, 4, 16))
    scores = [p.score(X[name][rows["test"]], y_test) for p in fitted]

Fitting and scoring are separate on purpose: `fit_probes` never sees the test split, so nothing about the test
examples (feature ranking, standardisation, the L2 strength C, the L1 path) can leak into a probe; the test split
is scored once, at the end (SAEBench's dense probe early-stops on test accuracy; this does not).
Methods (Gurnee et al. 2023; Marks & Tegmark 2023): difference of means (optionally whitened by the pooled
within-class covariance), logistic regression (L2, C chosen on validation accuracy), and k-sparse logistic
regression on the top-k features by |mean difference| on the training split or by entry order on an L1 path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from saelab.activations.joined import hooks_read, input_of
from saelab.errors import DataError, HookError
from saelab.interventions import in_call_order, select
from saelab.threads import one_thread

if TYPE_CHECKING:
    from saelab.sae import SAE

C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
"""L2 strengths tried (sklearn's convention: C weighs the summed log-loss against ||w||^2 / 2, standardised inputs)."""
METHODS = ("logistic", "diff_of_means", "diff_of_means_whitened", "sparse_mean_diff", "sparse_l1")


# ---------------------------------------------------------------------------------------------------- features
@dataclass(eq=False)
class Features:
    """What a probe reads: the activation at `hook` (residual dims, MLP neurons, any hook), or an SAE's latents
    at the hook it was trained on (hook defaults to the SAE's cfg.hook_name)."""

    hook: str = ""
    sae: "SAE | None" = None
    label: str = ""

    def __post_init__(self):
        if self.sae is not None:
            trained = self.sae.cfg.hook_name
            if not self.hook and not trained:
                raise ValueError("Features: the SAE's cfg.hook_name is empty; pass hook= (the hook point it reads)")
            self.sae.check_hook(self.hook)
            self.hook = self.hook or trained
        if not self.hook:
            raise ValueError("Features needs a hook or an SAE")

    @property
    def reads(self) -> list[str]:
        """The model's hooks this feature set needs: a crosscoder's parts, else its hook."""
        return hooks_read(self.sae, self.hook)

    def read(self, acts: dict[str, Tensor]) -> Tensor:
        """This feature set's input from the activations at `reads`."""
        return input_of(self.sae, self.hook, acts)

    @property
    def kind(self) -> str:
        if self.sae is not None:
            return "sae"
        if self.hook.endswith("mlp.hook_post"):
            return "neurons"
        return "resid" if "resid" in self.hook else "hook"

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        if self.sae is not None:
            cfg = self.sae.cfg
            return f"sae {cfg.arch}-{cfg.width}" + (f"-k{cfg.k}" if cfg.k else "") + f" @ {self.hook}"
        return f"{self.kind} @ {self.hook}"


def neuron_hook(model, layer: int) -> str:
    """The hook holding block `layer`'s MLP neurons (the hidden activation fed to the down projection;
    hook_mlp_out is the block's output in the residual basis, not neurons)."""
    name = f"blocks.{layer}.mlp.hook_post"
    if name not in model.hook_names:
        mlp = [h for h in model.hook_names if h.startswith(f"blocks.{layer}.mlp.")]
        raise HookError(f"{model.name} has no {name}; its MLP hooks in block {layer}: {', '.join(mlp) or 'none'}")
    return name


def _check(model, features: Sequence[Features]) -> None:
    for f in features:
        if f.sae is not None and f.sae.cfg.is_crosscoder:
            models = {part["model"] for part in f.sae.cfg.parts} - {"", model.name}
            if models:
                raise ValueError(f"the crosscoder reads {', '.join(sorted(models))} too; probe it on one model's "
                                 f"parts only ({model.name} is loaded)")
        for hook in f.reads:
            if model.resolve_hooks(hook) != [hook]:  # unknown names: HookError with suggestions
                raise HookError(f"Features: name one hook exactly, got the pattern {hook!r}")
        if f.sae is not None and f.sae.cfg.d_in != sum(model.hook_dim(hook) for hook in f.reads):
            widths = " + ".join(str(model.hook_dim(hook)) for hook in f.reads)
            raise ValueError(f"SAE expects d_in={f.sae.cfg.d_in} but hook {f.hook} gives {widths}")


@torch.no_grad()
def extract(model, texts: Sequence[str], features: Sequence[Features], positions="mean", *,
            batch_size: int | None = None, names=None) -> dict[str, Tensor]:
    """{features.name: float32 [n_texts, d]} at `positions` ("mean" over real tokens without BOS, "last", an int,
    one int per text). One forward per batch serves every hook; SAE latents are encoded per token and then pooled,
    so a "mean" over latents is the mean of each token's codes (as SAEBench pools). Batches hold at most the
    model's max_batch_tokens (and batch_size texts), so memory stays bounded whatever the lengths; names(i) names
    text i in errors (e.g. its file and line)."""
    features = list(features)
    labels = [f.name for f in features]
    if len(set(labels)) != len(labels):
        raise ValueError(f"two feature sets share a name: {labels}; give them distinct labels")
    _check(model, features)
    hooks = sorted({hook for f in features for hook in f.reads})
    saes = {id(f.sae): (f.sae.fold_input_scale() if f.sae.cfg.input_scale != 1 else f.sae).eval()
            for f in features if f.sae is not None}
    per_text = isinstance(positions, (list, tuple, Tensor))
    if per_text and len(positions) != len(texts):
        raise ValueError(f"positions gives {len(positions)} indices for {len(texts)} texts; give one per text")
    out: dict[str, list[tuple]] = {label: [] for label in labels}
    for batch in model.batches(list(texts), max_texts=batch_size, names=names):
        acts = model.activations_at(batch, hooks, positions=None)
        for f in features:
            x = f.read(acts)
            if f.sae is not None:
                sae = saes[id(f.sae)]
                x = sae.encode(x.to(sae.device, sae.dtype)).float().cpu()
            out[f.name].append((batch, select(x, positions, batch)))
    return {label: in_call_order(parts, positions) for label, parts in out.items()}


# ---------------------------------------------------------------------------------------------------- probes
@dataclass
class Probe:
    """A fitted linear probe: decision = x @ weight + bias in the raw feature space; `features` are the indices of
    the features it reads (None: all)."""

    method: str
    weight: Tensor
    bias: float
    features: list[int] | None = None
    k: int | None = None
    C: float | None = None
    val_accuracy: float | None = None

    def decision(self, X: Tensor) -> Tensor:
        X = X.double()
        if self.features is not None:
            X = X[:, self.features]
        return X @ self.weight + self.bias

    def direction(self, d: int | None = None) -> Tensor:
        """The unit weight vector over all d features (zeros off the selected ones)."""
        w = self.weight
        if self.features is not None:
            w = torch.zeros(d or (max(self.features) + 1), dtype=w.dtype).index_put_(
                (torch.tensor(self.features),), self.weight)
        return (w / w.norm().clamp_min(1e-12)).float()

    def score(self, X: Tensor, y: Tensor) -> dict[str, float]:
        s, y = self.decision(X), torch.as_tensor(y)
        return {"accuracy": float(((s > 0).long() == y.long()).double().mean()), "auc": auc(s, y)}


def auc(scores: Tensor, y: Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half)."""
    from scipy.stats import rankdata

    y = torch.as_tensor(y).bool()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise DataError("AUC needs both classes among the scored examples")
    ranks = torch.as_tensor(rankdata(scores.double().numpy()))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student's t interval for the mean of scores from independent splits. It measures how
    much a score moves when other documents land in the test split, which one split's accuracy cannot show."""
    from scipy.stats import t

    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_interval needs at least one value")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, mean, mean
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    half = float(t.ppf((1 + level) / 2, len(values) - 1)) * sd / len(values) ** 0.5
    return mean, mean - half, mean + half


def _labels(y) -> Tensor:
    y = torch.as_tensor(y).double().reshape(-1)
    values = set(y.unique().tolist())
    if not values <= {0.0, 1.0}:
        raise DataError(f"labels must be 0 / 1, got values {sorted(values)[:5]}")
    if len(values) < 2:
        raise DataError(f"every training label is {int(y[0]) if len(y) else '?'}; a probe needs both classes")
    return y


def _standardise(X: Tensor) -> tuple[Tensor, Tensor]:
    """Training-split mean and std (a floor keeps never-active latents from dividing by zero)."""
    mean, std = X.mean(0), X.std(0)
    return mean, torch.where(std > 1e-6 * std.max().clamp_min(1e-12), std, torch.ones_like(std))


def fit_logistic(X: Tensor, y: Tensor, C: float, init: Tensor | None = None) -> tuple[Tensor, float]:
    """L2 logistic regression: minimise C * sum log-loss + ||w||^2 / 2 (bias not penalised), torch's L-BFGS on
    float64; `init` ([d + 1], weights then bias) warm-starts it. (scipy's L-BFGS-B was 100x slower on a busy 2-core
    machine: its BLAS threads spin.)"""
    X, y = X.double(), y.double()
    n, d = X.shape
    w = (init.clone().double() if init is not None else torch.zeros(d + 1, dtype=torch.float64)).requires_grad_()
    opt = torch.optim.LBFGS([w], lr=1, max_iter=300, tolerance_grad=1e-8, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = X @ w[:d] + w[d]
        loss = (C * torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum") +
                (w[:d] @ w[:d]) / 2) / n
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w = w.detach()
    return w[:d], float(w[d])


def logistic_probe(Xtr: Tensor, ytr: Tensor, Xva: Tensor, yva: Tensor, Cs: Sequence[float] = C_GRID, *,
                   method: str = "logistic", features: list[int] | None = None) -> Probe:
    """Standardise on train, fit one L2 probe per C on train, keep the C with the best validation accuracy
    (ties: the smaller validation log-loss, then the smaller C); returned in raw units."""
    ytr, yva = _labels(ytr), torch.as_tensor(yva).double()
    mean, std = _standardise(Xtr.double())
    Ztr, Zva = (Xtr.double() - mean) / std, (Xva.double() - mean) / std
    basis = None
    if Ztr.shape[1] > Ztr.shape[0]:  # the L2 solution lies in the span of the training rows: fit in n dims
        basis, _ = torch.linalg.qr(Ztr.T)
        Ztr, Zva = Ztr @ basis, Zva @ basis
    best, init = None, None
    for C in sorted(Cs):  # weaker penalties warm-start from the stronger one's solution
        w, b = fit_logistic(Ztr, ytr, C, init)
        init = torch.cat([w, torch.tensor([b], dtype=w.dtype)])
        logits = Zva @ w + b
        acc = float(((logits > 0).double() == yva).double().mean())
        loss = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, yva))
        if best is None or (acc, -loss) > (best[0], -best[1]):
            best = (acc, loss, C, w, b)
    acc, _, C, w, b = best
    raw = (basis @ w if basis is not None else w) / std
    return Probe(method, raw, b - float(raw @ mean), features, len(features) if features else None, C, acc)


def diff_of_means(Xtr: Tensor, ytr: Tensor, whiten: bool = False, shrinkage: float = 0.1) -> Probe:
    """theta = mu_pos - mu_neg (whitened: Sigma_w^-1 theta with Sigma_w the pooled within-class covariance, shrunk
    towards its mean variance); the threshold is the midpoint of the two class means' projections."""
    X, y = Xtr.double(), _labels(ytr).bool()
    mu1, mu0 = X[y].mean(0), X[~y].mean(0)
    theta = mu1 - mu0
    if whiten:
        centred = torch.cat([X[y] - mu1, X[~y] - mu0])
        cov = centred.T @ centred / max(len(X) - 2, 1)
        target = cov.diagonal().mean().clamp_min(1e-12)
        cov = (1 - shrinkage) * cov + shrinkage * target * torch.eye(len(cov), dtype=cov.dtype)
        theta = torch.linalg.solve(cov, theta)
    return Probe("diff_of_means_whitened" if whiten else "diff_of_means", theta, -float(theta @ (mu1 + mu0)) / 2)


def rank_mean_diff(Xtr: Tensor, ytr: Tensor) -> list[int]:
    """Features by |mean_pos - mean_neg| on the training split, largest first (ties: lower index)."""
    X, y = Xtr.double(), _labels(ytr).bool()
    gap = (X[y].mean(0) - X[~y].mean(0)).abs()
    return sorted(range(X.shape[1]), key=lambda j: (-float(gap[j]), j))


def rank_l1_path(Xtr: Tensor, ytr: Tensor, wanted: int, steps: int = 60, ratio: float = 0.85,
                 iters: int = 60) -> list[int]:
    """Features in the order they enter an L1-logistic path (standardised inputs, proximal gradient, warm starts)
    from lambda_max down; stops once `wanted` have entered; any still missing follow by |mean difference|."""
    y = _labels(ytr)
    mean, std = _standardise(Xtr.double())
    Z = (Xtr.double() - mean) / std
    n, d = Z.shape
    v = torch.ones(d, dtype=torch.float64) / d**0.5
    for _ in range(30):  # power iteration for ||Z||_2^2, the curvature bound of the log-loss (times 4n)
        v = Z.T @ (Z @ v)
        v /= v.norm().clamp_min(1e-30)
    lipschitz = 1.05 * float((Z @ v).norm() ** 2 / (4 * n)) + 1e-12
    lam = float((Z.T @ (y - y.mean())).abs().max() / n)
    w, b, entered = torch.zeros(d, dtype=torch.float64), float(torch.logit(y.mean())), []
    for _ in range(steps):
        lam *= ratio
        for _ in range(iters):
            p = torch.sigmoid(Z @ w + b)
            grad = Z.T @ (p - y) / n
            step = w - grad / lipschitz
            new_w = torch.sign(step) * (step.abs() - lam / lipschitz).clamp_min(0)
            b -= float((p - y).mean()) / lipschitz
            done = float((new_w - w).abs().max()) < 1e-6
            w = new_w
            if done:
                break
        new = [j for j in (w.abs() > 0).nonzero().flatten().tolist() if j not in entered]
        entered += sorted(new, key=lambda j: -float(w[j].abs()))
        if len(entered) >= wanted:
            break
    return entered + [j for j in rank_mean_diff(Xtr, ytr) if j not in set(entered)]


def fit_probes(Xtr: Tensor, ytr, Xva: Tensor, yva, *, ks: Sequence[int] = (1, 2, 4, 8, 16),
               methods: Sequence[str] = METHODS, Cs: Sequence[float] = C_GRID) -> list[Probe]:
    """Every probe of `methods` from the training and validation splits only (the test split is never passed)."""
    with one_thread():
        return _fit_probes(Xtr, ytr, Xva, yva, ks, methods, Cs)


def _fit_probes(Xtr, ytr, Xva, yva, ks, methods, Cs) -> list[Probe]:
    d = Xtr.shape[1]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown probe method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    ks = sorted(set(int(k) for k in ks))
    if any(k < 1 for k in ks):
        raise ValueError(f"k must be at least 1, got {ks}")
    sparse = [m for m in methods if m.startswith("sparse")]
    if sparse and ks and ks[-1] > d:
        raise ValueError(f"k={ks[-1]} is larger than the {d} features available; use k <= {d}")
    ytr, yva = _labels(ytr), torch.as_tensor(yva).double()
    if not len(Xva):
        raise DataError("the validation split is empty; C is chosen on it")
    probes = []
    if "logistic" in methods:
        probes.append(logistic_probe(Xtr, ytr, Xva, yva, Cs))
    for whiten in (False, True):
        if ("diff_of_means_whitened" if whiten else "diff_of_means") in methods:
            probes.append(diff_of_means(Xtr, ytr, whiten))
    for method in sparse:
        order = rank_mean_diff(Xtr, ytr) if method == "sparse_mean_diff" else rank_l1_path(Xtr, ytr, ks[-1])
        for k in ks:
            top = order[:k]
            probes.append(logistic_probe(Xtr[:, top], ytr, Xva[:, top], yva, Cs, method=method, features=top))
    return probes


# ---------------------------------------------------------------------------------------------------- concept directions
@dataclass
class CausalInnerProduct:
    """Park et al. (2024)'s causal inner product <x, y>_C = x^T Cov(gamma)^-1 y, gamma the unembedding rows.

    Under it, concept directions that are causally separable are orthogonal; `embed(g)` maps an unembedding-space
    concept direction g (e.g. a mean of gamma(word1) - gamma(word0)) to the residual direction that moves it.
    Strictly it holds at the final residual stream; at earlier layers it is a heuristic metric.
    """

    cov: Tensor
    """Cov(gamma) [d, d], float64."""

    @classmethod
    def from_model(cls, model, chunk: int = 16384) -> "CausalInnerProduct":
        W_U = model.bridge.W_U.detach()  # [d, vocab]: the bridge's public unembedding
        d, vocab = W_U.shape
        total, outer = torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
        for start in range(0, vocab, chunk):
            g = W_U[:, start : start + chunk].double().cpu()
            total += g.sum(1)
            outer += g @ g.T
        mean = total / vocab
        return cls(outer / vocab - torch.outer(mean, mean))

    def inner(self, x: Tensor, y: Tensor) -> float:
        return float(x.double() @ torch.linalg.solve(self.cov, y.double()))

    def cosine(self, x: Tensor, y: Tensor) -> float:
        return self.inner(x, y) / (self.inner(x, x) * self.inner(y, y)) ** 0.5

    def embed(self, g: Tensor) -> Tensor:
        """Cov(gamma)^-1 g, unit norm: the residual-space vector for an unembedding-space concept direction."""
        v = torch.linalg.solve(self.cov, g.double())
        return (v / v.norm()).float()

    def whiten(self, x: Tensor) -> Tensor:
        """Cov(gamma)^-1/2 x: coordinates in which the causal inner product is the Euclidean one."""
        values, vectors = torch.linalg.eigh(self.cov)
        return (((x.double() @ vectors) / values.clamp_min(1e-12).sqrt()) @ vectors.T).float()


def word_pair_direction(model, pairs: Sequence[tuple[str, str]]) -> Tensor:
    """Mean of gamma(b) - gamma(a) over counterfactual word pairs (a, b) (Park et al.); each word one token."""
    W_U = model.bridge.W_U.detach().double().cpu()
    diffs = [W_U[:, _single_token(model, b)] - W_U[:, _single_token(model, a)] for a, b in pairs]
    if not diffs:
        raise ValueError("word_pair_direction needs at least one pair")
    return torch.stack(diffs).mean(0)


def _single_token(model, word: str) -> int:
    ids = model.tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise DataError(f"{word!r} is {len(ids)} tokens for {model.name}; use words that are one token "
                        "(often with a leading space, ' Monday')")
    return ids[0]


def concept_direction(X: Tensor, y, method: str = "diff_of_means", *, Xva: Tensor | None = None, yva=None,
                      causal: CausalInnerProduct | None = None) -> Tensor:
    """A unit concept direction from labelled activations: the difference of means (best for steering, per Marks &
    Tegmark), its whitened form, or a logistic probe's weights (needs a validation split for C). With `causal`,
    the direction is mapped through Cov(gamma)^-1 (Park et al.'s causal metric)."""
    if method in ("diff_of_means", "diff_of_means_whitened"):
        v = diff_of_means(X, y, whiten=method.endswith("whitened")).direction()
    elif method == "logistic":
        if Xva is None or yva is None:
            raise ValueError("concept_direction(method='logistic') needs Xva and yva to choose C")
        v = logistic_probe(X, y, Xva, yva).direction()
    else:
        raise ValueError(f"unknown direction method {method!r}; choose diff_of_means, diff_of_means_whitened or logistic")
    return causal.embed(v) if causal is not None else v


def concept_separation(X: Tensor, y) -> float:
    """||mean(X | y = 1) - mean(X | y = 0)||: how far apart the concept's classes sit, a steering unit that means
    the same push on any model (unlike the activation norm, which a few massive dimensions can dominate)."""
    X, y = torch.as_tensor(X).double(), _labels(y).bool()
    if len(X) != len(y):
        raise ValueError(f"{len(X)} activations for {len(y)} labels; give one label per row")
    return float((X[y].mean(0) - X[~y].mean(0)).norm())


__all__ = ["C_GRID", "METHODS", "CausalInnerProduct", "Features", "Probe", "auc", "concept_direction",
           "concept_separation", "diff_of_means", "extract", "fit_logistic", "fit_probes", "logistic_probe",
           "mean_interval", "neuron_hook", "rank_l1_path", "rank_mean_diff", "word_pair_direction"]
