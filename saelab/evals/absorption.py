"""Feature absorption on the first-letter task (SAEBench's `absorption_first_letter`; Chanin et al. 2024, "A is for
Absorption"): where the residual stream knows a word's first letter, do the SAE's latents for that letter fire, or
has another latent swallowed the letter's direction for this word?

    result = run(sae, model)                                   # AbsorptionConfig() defaults: a few CPU minutes
    print(result.table()); write_output(result.saebench(sae), sae_folder)

Steps. (1) The vocabulary: every single token that is a space and at least two ASCII letters (" tartan"), grouped by
first letter, at most `max_words_per_letter` per letter, split into train and test words per letter. (2) Each word
is read at its own token inside in-context examples in `prompt_template` ("<word> has the first letter: T"), at
the SAE's hook. (3) A logistic probe per letter on the residual stream (train words, classes balanced); its
test-word F1 must reach `min_GT_probe_f1` for the letter to be scored. (4) k-sparse probes on the latents for
k = 1 .. max_k_value; k grows while the test F1 improves by more than `f1_jump_threshold` (feature splitting), and
the latents of the last k kept are the letter's main latents. (5) On each test word the probe gets right
(a probe true positive), with p the unit probe direction, a_i the latent codes and c_i = cos(W_dec[i], p):
    main       = sum over main latents of a_i c_i,   total = x . p
    absorbers  = the top `absorption_fraction_max_absorbing_latents` values of a_i c_i over the other latents with
                 c_i >= absorption_fraction_probe_cos_sim_threshold and a_i c_i > 0
    fraction   = 0 if main >= total or absorbers / total < probe_projection_proportion_threshold (or total <= 0);
                 1 if main <= 0; else a / (a + main) with a = min(absorbers, total - main)
    full       = no main latent fires, and the latent with the largest a_i c_i has c_i >=
                 full_absorption_probe_cos_sim_threshold and carries at least the proportion threshold of total.
A letter's mean_absorption_fraction and full_absorption_rate are means over its probe true positives; the headline
metrics are means (and sample standard deviations) over the scored letters, with a bootstrap over letters.

How it differs from SAEBench's, to fit a 2-core CPU: words are packed `words_per_prompt` to a context after
`max_icl_examples` warm-up examples, so each word has 10 or more examples before it instead of exactly 10 (one
forward per 32 words, not per word), and absorption is read from the same forward as the probe's test activations;
at most `max_words_per_letter` words per letter; latents are ranked by their standardised mean difference (the
first latent an L1 path would pick, and close to its order after) instead of SAEBench's L1 probe; the probes are
torch L-BFGS fits with C fixed, classes balanced by repeating the smaller one (saelab.analysis.probes.fit_logistic).
"""

from __future__ import annotations

import math
import random
import statistics
import string
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.analysis.probes import fit_logistic, rank_mean_diff
from saelab.analysis.study import StudyResult
from saelab.errors import DataError
from saelab.evals.intervals import Interval, mean_interval
from saelab.evals.saebench import saebench_output
from saelab.threads import one_thread

if TYPE_CHECKING:
    from saelab.sae import SAE

EVAL_TYPE_ID = "absorption_first_letter"
LETTERS = string.ascii_lowercase
EPS = 1e-8
"""A latent "fires" above this activation (SAEBench's threshold for full absorption)."""
CATEGORY = "mean"
HEADLINE = ("mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features")
METRICS = HEADLINE + ("std_dev_absorption_fraction_score", "std_dev_full_absorption_score",
                      "std_dev_num_split_features")
"""SAEBench's metric names in its one category, "mean": means and sample standard deviations over letters."""


@dataclass
class AbsorptionConfig:
    """How the eval runs; field names follow SAEBench's AbsorptionEvalConfig and FeatureAbsorptionCalculator where
    they mean the same. The defaults take a few minutes on a 2-core CPU for SmolLM2-135M-Instruct."""

    random_seed: int = 42
    f1_jump_threshold: float = 0.03
    max_k_value: int = 10
    prompt_template: str = "{word} has the first letter:"
    max_icl_examples: int = 10
    """Warm-up examples at the start of each context (never read)."""
    words_per_prompt: int = 32
    """Words read per context; each follows the warm-up and the words before it as in-context examples."""
    max_words_per_letter: int = 100
    train_test_fraction: float = 0.8
    min_GT_probe_f1: float = 0.6
    min_feats_for_eval: int = 20
    """Letters whose probe reaches min_GT_probe_f1 needed for a score (fewer: an error, as in SAEBench)."""
    probe_C: float = 1.0
    """L2 strength of the residual probes (sklearn's C, on activations scaled to unit mean square)."""
    k_sparse_probe_C: float = 1.0
    """L2 strength of the k-sparse probes (on standardised latents)."""
    full_absorption_probe_cos_sim_threshold: float = 0.025
    absorption_fraction_probe_cos_sim_threshold: float = 0.1
    probe_projection_proportion_threshold: float = 0.4
    absorption_fraction_max_absorbing_latents: int = 3
    llm_batch_size: int | None = None
    """Contexts per forward at most (None: as many as the model's max_batch_tokens allows)."""
    bootstrap_resamples: int = 1000

    def __post_init__(self):
        if "{word}" not in self.prompt_template:
            raise ValueError(f"AbsorptionConfig: prompt_template needs a {{word}} slot, got {self.prompt_template!r}")
        if not 0 < self.train_test_fraction < 1:
            raise ValueError(f"AbsorptionConfig: train_test_fraction must be in (0, 1), got {self.train_test_fraction}")
        for name in ("max_k_value", "words_per_prompt", "max_words_per_letter", "absorption_fraction_max_absorbing_latents"):
            if getattr(self, name) < 1:
                raise ValueError(f"AbsorptionConfig: {name} must be at least 1, got {getattr(self, name)}")
        if self.max_icl_examples < 0:
            raise ValueError(f"AbsorptionConfig: max_icl_examples must be >= 0, got {self.max_icl_examples}")
        if self.min_feats_for_eval < 2:
            raise ValueError("AbsorptionConfig: min_feats_for_eval must be at least 2 (the metrics include a standard "
                             f"deviation over letters), got {self.min_feats_for_eval}")


CONFIG = AbsorptionConfig
"""The config class the suite builds for this eval."""


# ---------------------------------------------------------------------------------------------------- results
@dataclass
class LetterAbsorption:
    """One letter's result; the first six fields are SAEBench's per-letter detail."""

    first_letter: str
    mean_absorption_fraction: float
    full_absorption_rate: float
    num_full_absorption: int
    num_probe_true_positives: int
    num_split_features: int
    split_features: list[int] = field(default_factory=list)
    """The main latents: the top latents of the last k the feature-splitting rule kept."""
    k_sparse_f1: list[float] = field(default_factory=list)
    """Test F1 of the k-sparse probe for k = 1, 2, ... up to the first k the feature-splitting rule rejected."""
    probe_f1: float = 0.0
    """Test F1 of the residual probe."""
    absorbing_latents: dict[int, int] = field(default_factory=dict)
    """Latent -> test words on which it was the top absorber (words with a fraction above 0), most frequent first."""

    def detail(self) -> dict[str, Any]:
        keys = ("first_letter", "mean_absorption_fraction", "full_absorption_rate", "num_full_absorption",
                "num_probe_true_positives", "num_split_features")
        return {key: getattr(self, key) for key in keys}


@dataclass(kw_only=True)
class AbsorptionResult(StudyResult):
    """Absorption of one SAE: per-letter results, SAEBench's "mean" metrics and their intervals (bootstrap over
    letters), and the letters left out with why."""

    NAME: ClassVar[str] = EVAL_TYPE_ID
    WHAT: ClassVar[str] = "absorption results"

    config: AbsorptionConfig
    hook: str
    sae_name: str
    letters: list[LetterAbsorption]
    metrics: dict[str, dict[str, float]]
    intervals: dict[str, Interval]
    skipped: dict[str, str] = field(default_factory=dict)
    n_words: dict[str, int] = field(default_factory=dict)
    """Words in the train and test splits."""

    def table(self) -> str:
        head = [f"Feature absorption (first letter) of {self.sae_name} at {self.hook}", ""]
        for name in HEADLINE:
            head.append(f"- {name}: {self.intervals[f'{CATEGORY}.{name}']}")
        rows = ["", "| letter | probe F1 | true positives | main latents | absorption fraction | full absorption |"
                " top absorbers |", "|---|---|---|---|---|---|---|"]
        for s in self.letters:
            top = ", ".join(f"{k} ({v})" for k, v in list(s.absorbing_latents.items())[:3])
            rows.append(f"| {s.first_letter} | {s.probe_f1:.2f} | {s.num_probe_true_positives} | "
                        f"{', '.join(map(str, s.split_features))} | {s.mean_absorption_fraction:.3f} | "
                        f"{s.full_absorption_rate:.3f} | {top} |")
        skipped = ["", "Left out: " + "; ".join(f"{k}: {v}" for k, v in self.skipped.items())] if self.skipped else []
        note = ["", "Intervals: 95 % bootstrap over letters."]
        return "\n".join(head + rows + skipped + note) + "\n"

    def saebench(self, sae) -> dict:
        """This result in SAEBench's layout (write it with saelab.evals.saebench.write_output)."""
        extra = {"seconds": self.seconds, "hook": self.hook, "n_words": self.n_words, "skipped_letters": self.skipped,
                 "split_features": {s.first_letter: s.split_features for s in self.letters},
                 "probe_f1": {s.first_letter: s.probe_f1 for s in self.letters}}
        return saebench_output(EVAL_TYPE_ID, self.config, self.metrics, sae,
                               details=[s.detail() for s in self.letters], intervals=self.intervals, extra=extra)


# ---------------------------------------------------------------------------------------------------- words
@dataclass
class Word:
    """A single-token word of the vocabulary: its token id, its text (" tartan") and its first letter."""

    token: int
    text: str
    letter: int
    """Index of its first letter in LETTERS."""


def first_letter_vocab(tokenizer) -> dict[str, list[Word]]:
    """Single-token words of the vocabulary: a leading space then at least two ASCII letters, by first letter."""
    ids = list(range(len(tokenizer)))
    texts = tokenizer.batch_decode([[i] for i in ids])
    found: dict[str, list[Word]] = {letter: [] for letter in LETTERS}
    seen: set[str] = set()
    for token, text in zip(ids, texts):
        body = text[1:]
        if text[:1] == " " and len(body) >= 2 and all(c in string.ascii_letters for c in body) and text not in seen:
            seen.add(text)
            letter = body[0].lower()
            found[letter].append(Word(token, text, LETTERS.index(letter)))
    return found


def split_words(vocab: dict[str, list[Word]], config: AbsorptionConfig) -> tuple[list[Word], list[Word]]:
    """At most max_words_per_letter per letter (seeded), split per letter into train and test (each shuffled)."""
    rng = random.Random(config.random_seed)
    train, test = [], []
    for letter in LETTERS:
        words = rng.sample(vocab.get(letter, []), min(len(vocab.get(letter, [])), config.max_words_per_letter))
        cut = round(len(words) * config.train_test_fraction)
        if len(words) >= 2:
            cut = min(max(cut, 1), len(words) - 1)
        train += words[:cut]
        test += words[cut:]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


# ---------------------------------------------------------------------------------------------------- activations
def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def icl_contexts(tokenizer, words: Sequence[Word], config: AbsorptionConfig, seed: int) -> tuple[list[list[int]],
                                                                                                list[list[int]]]:
    """Token rows of the contexts and, per context, the positions of its read words (in the order of `words`).

    A line is the template around the word then its answer (" T"), lines joined by a newline, BOS first; each
    context opens with max_icl_examples warm-up lines of other words of the same split."""
    before, after = config.prompt_template.split("{word}", 1)
    prefix, suffix, sep = _ids(tokenizer, before), _ids(tokenizer, after), _ids(tokenizer, "\n")
    answers = [_ids(tokenizer, " " + letter.upper()) for letter in LETTERS]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rng = random.Random(seed)
    rows, positions = [], []
    for start in range(0, len(words), config.words_per_prompt):
        stop = min(len(words), start + config.words_per_prompt)
        row, where = list(bos), []
        outside = len(words) - (stop - start)
        for _ in range(config.max_icl_examples):  # warm-up words from outside the context's own, where there are any
            j = rng.randrange(outside) if outside else rng.randrange(start, stop)
            word = words[j + (stop - start) if outside and j >= start else j]
            row += prefix + [word.token] + suffix + answers[word.letter] + sep
        for word in words[start:stop]:
            where.append(len(row) + len(prefix))
            row += prefix + [word.token] + suffix + answers[word.letter] + sep
        rows.append(row)
        positions.append(where)
    return rows, positions


def word_activations(model, hook: str, words: Sequence[Word], config: AbsorptionConfig, *, seed: int,
                     progress: bool = False, desc: str = "words") -> Tensor:
    """The activation at `hook` on each word's token, [len(words), d] in the order of `words` (CPU float32)."""
    from saelab.interventions import pad_id, padded
    from saelab.progress_bars import tqdm

    rows, positions = icl_contexts(model.tokenizer, words, config, seed)
    if max(map(len, rows)) > model.n_ctx:
        raise DataError(f"a context of {max(map(len, rows))} tokens is longer than {model.name} allows "
                        f"({model.n_ctx}); lower words_per_prompt or max_icl_examples")
    per_call = max(1, model.max_batch_tokens // max(map(len, rows)))
    parts = []
    for start in tqdm(range(0, len(rows), per_call), desc=f"absorption: {desc}", disable=not progress, leave=False):
        chunk_rows, chunk_pos = rows[start:start + per_call], positions[start:start + per_call]
        tokens = padded(chunk_rows, None, pad_id(model.tokenizer), model.tokenizer.bos_token_id)
        mask = torch.zeros(tokens.ids.shape, dtype=torch.bool)
        for i, where in enumerate(chunk_pos):
            mask[i, where] = True
        parts.append(model.activations_at(tokens, hook, positions=mask, batch_size=config.llm_batch_size)[hook])
    return torch.cat(parts).float()


def encode(sae: "SAE", X: Tensor, chunk: int = 1024) -> Tensor:
    """Latent codes [n, width] on CPU float32 (the SAE already folded to raw units)."""
    with torch.no_grad():
        return torch.cat([sae.encode(X[i:i + chunk].to(sae.device, sae.dtype)).float().cpu()
                          for i in range(0, len(X), chunk)])


# ---------------------------------------------------------------------------------------------------- probes
def balanced(X: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The rows of the smaller class repeated (a whole number of times) until the classes weigh about the same:
    class-balanced logistic regression, as SAEBench fits both its probes."""
    y = y.bool()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    minority = y if n_pos <= n_neg else ~y
    times = max(1, round(max(n_pos, n_neg) / max(1, min(n_pos, n_neg))))
    X_extra, y_extra = X[minority].repeat(times - 1, 1), y[minority].repeat(times - 1)
    return torch.cat([X, X_extra]), torch.cat([y, y_extra]).double()


def fit_balanced(X: Tensor, y: Tensor, C: float) -> tuple[Tensor, float]:
    """A class-balanced L2 logistic probe (fit_logistic) on X as given; weight [d] and bias."""
    Xb, yb = balanced(X.double(), y)
    with one_thread():  # many small fits: a thread pool made them ~40x slower on a busy 2-core machine
        return fit_logistic(Xb, yb, C)


def letter_probes(X: Tensor, letters: Tensor, C: float) -> tuple[Tensor, Tensor]:
    """One-vs-rest probes for every letter on the residual stream: weights [26, d] and biases [26] in raw units
    (zeros for a letter without training words). The activations are scaled to unit mean square for the fit, which
    keeps the probe directions those of the raw space."""
    scale = float(X.double().pow(2).mean().sqrt().clamp_min(1e-12))
    W, b = torch.zeros(len(LETTERS), X.shape[1], dtype=torch.float64), torch.zeros(len(LETTERS), dtype=torch.float64)
    for i in range(len(LETTERS)):
        y = letters == i
        if 0 < int(y.sum()) < len(y):
            w, bias = fit_balanced(X / scale, y, C)
            W[i], b[i] = w / scale, bias
    return W, b


def f1_score(predicted: Tensor, y: Tensor) -> float:
    """F1 of boolean predictions (0 when nothing is predicted or nothing is positive)."""
    predicted, y = predicted.bool(), y.bool()
    tp = int((predicted & y).sum())
    denominator = int(predicted.sum()) + int(y.sum())
    return 2 * tp / denominator if denominator else 0.0


def k_sparse_f1s(Z_train: Tensor, y_train: Tensor, Z_test: Tensor, y_test: Tensor, max_k: int, C: float,
                 f1_jump_threshold: float | None = None) -> tuple[list[int], list[float]]:
    """The latents that separate the letter's words best (standardised mean difference on train, positive only,
    largest first, at most max_k: the order in which latents would enter an L1-penalised probe, to first order) and
    the test F1 of a class-balanced probe on the top k of them for k = 1, 2, ...; with `f1_jump_threshold`, k stops
    at the first k the feature-splitting rule rejects (the later ones cannot change the main latents)."""
    y = y_train.bool()
    std = Z_train.std(0)
    live = ((Z_train[y].mean(0) - Z_train[~y].mean(0) > 0) & (std > 0)).nonzero().flatten()
    if not len(live):
        return [], []
    order = [int(live[j]) for j in rank_mean_diff(Z_train[:, live] / std[live], y_train)[:max_k]]
    f1s: list[float] = []
    for k in range(1, len(order) + 1):
        top = order[:k]
        mean, scale = Z_train[:, top].mean(0), std[top]
        w, b = fit_balanced((Z_train[:, top] - mean) / scale, y, C)
        f1s.append(f1_score(((Z_test[:, top] - mean) / scale).double() @ w + b > 0, y_test))
        if f1_jump_threshold is not None and len(split_features(order, f1s, f1_jump_threshold)) < k:
            break
    return order, f1s


def split_features(order: Sequence[int], f1s: Sequence[float], f1_jump_threshold: float) -> list[int]:
    """SAEBench's feature-splitting rule: k grows while the k-sparse F1 beats the best so far by more than the
    threshold; the main latents are the top k of the last k kept (k = 1 is always kept)."""
    best, kept = -math.inf, 0
    for k, f1 in enumerate(f1s, start=1):
        if not f1 > best + f1_jump_threshold:
            break
        best, kept = f1, k
    return list(order[:kept])


# ---------------------------------------------------------------------------------------------------- absorption
@dataclass
class WordScores:
    """Per test word: its absorption fraction, whether it is fully absorbed, and its top absorbing latent (-1:
    none)."""

    fraction: Tensor
    full: Tensor
    top_absorber: Tensor


def absorption_scores(X: Tensor, codes: Tensor, direction: Tensor, W_dec: Tensor, main: Sequence[int],
                      config: AbsorptionConfig) -> WordScores:
    """The absorption fraction and full absorption of each row (module docstring) for one letter: X [n, d] the
    residual activations, codes [n, width] the SAE's, direction [d] the letter's probe, W_dec [width, d]."""
    p = direction.double() / direction.double().norm().clamp_min(1e-12)
    cos = F.normalize(W_dec.double(), dim=1) @ p
    total = X.double() @ p
    proj = codes.double() * cos
    is_main = torch.zeros(len(cos), dtype=torch.bool)
    is_main[list(main)] = True
    main_proj = proj[:, is_main].sum(1)
    candidate = (~is_main & (cos >= config.absorption_fraction_probe_cos_sim_threshold)) & (proj > 0)
    top = torch.where(candidate, proj, 0.0).topk(min(config.absorption_fraction_max_absorbing_latents, len(cos)), 1)
    absorbers = top.values.sum(1)
    safe = torch.where(total > 0, total, 1.0)
    absorbed = torch.minimum(absorbers, total - main_proj)
    fraction = (absorbed / (absorbed + main_proj).where(absorbed + main_proj > 0, 1.0)).clamp(0, 1)
    fraction = torch.where(main_proj <= 0, 1.0, fraction)
    none = (total <= 0) | (main_proj >= total) | (absorbers / safe < config.probe_projection_proportion_threshold)
    fraction = torch.where(none, 0.0, fraction)
    silent = (codes[:, is_main] < EPS).all(1)
    best = proj.max(1)
    full = (silent & (cos[best.indices] >= config.full_absorption_probe_cos_sim_threshold) & (total > 0)
            & (best.values / safe >= config.probe_projection_proportion_threshold))
    top_absorber = torch.where(fraction > 0, top.indices[:, 0], -1)
    return WordScores(fraction.float(), full, top_absorber)


def score_letter(letter: int, data: "LetterData", config: AbsorptionConfig) -> LetterAbsorption | str:
    """One letter's result, or why it is left out."""
    y_test = data.test_letters == letter
    probe_f1 = f1_score(data.test_scores[:, letter] > 0, y_test)
    if probe_f1 < config.min_GT_probe_f1:
        return f"probe F1 {probe_f1:.2f} < {config.min_GT_probe_f1}"
    order, f1s = k_sparse_f1s(data.train_codes, data.train_letters == letter, data.test_codes, y_test,
                              config.max_k_value, config.k_sparse_probe_C, config.f1_jump_threshold)
    if not order:
        return "no latent is more active on its words"
    main = split_features(order, f1s, config.f1_jump_threshold)
    positives = y_test & (data.test_scores[:, letter] > 0)
    if not bool(positives.any()):
        return "the probe finds none of its test words"
    scores = absorption_scores(data.test_acts[positives], data.test_codes[positives], data.probe_weights[letter],
                               data.W_dec, main, config)
    n = int(positives.sum())
    absorbers = Counter(int(i) for i in scores.top_absorber if int(i) >= 0)
    return LetterAbsorption(LETTERS[letter], float(scores.fraction.sum()) / n, float(scores.full.sum()) / n,
                            int(scores.full.sum()), n, len(main), main, [round(f, 4) for f in f1s],
                            round(probe_f1, 4), dict(absorbers.most_common(10)))


@dataclass
class LetterData:
    """What scoring the letters needs: activations, codes, letters and probe scores of both splits."""

    train_codes: Tensor
    train_letters: Tensor
    test_acts: Tensor
    test_codes: Tensor
    test_letters: Tensor
    test_scores: Tensor
    """Residual probe decisions [n_test, 26]."""
    probe_weights: Tensor
    W_dec: Tensor


def summarise(letters: Sequence[LetterAbsorption], config: AbsorptionConfig
              ) -> tuple[dict[str, dict[str, float]], dict[str, Interval]]:
    """SAEBench's "mean" metrics over letters and a bootstrap interval (over letters) for each mean."""
    columns = {"absorption_fraction_score": [s.mean_absorption_fraction for s in letters],
               "full_absorption_score": [s.full_absorption_rate for s in letters],
               "num_split_features": [float(s.num_split_features) for s in letters]}
    metrics, intervals = {}, {}
    for name, values in columns.items():
        interval = mean_interval(values, resamples=config.bootstrap_resamples, seed=config.random_seed)
        metrics[f"mean_{name}"] = interval.estimate
        metrics[f"std_dev_{name}"] = statistics.stdev(values)
        intervals[f"{CATEGORY}.mean_{name}"] = interval
    return {CATEGORY: {name: metrics[name] for name in METRICS}}, intervals


# ---------------------------------------------------------------------------------------------------- run
def prepare(sae: "SAE", model, config: AbsorptionConfig, progress: bool) -> tuple[LetterData, dict[str, int]]:
    """Words, their activations and codes, and the residual probes."""
    hook = sae.cfg.hook_name
    train, test = split_words(first_letter_vocab(model.tokenizer), config)
    if not train or not test:
        raise DataError(f"{model.name}'s vocabulary has too few single-token words for the first-letter task")
    X_train = word_activations(model, hook, train, config, seed=config.random_seed, progress=progress, desc="train")
    X_test = word_activations(model, hook, test, config, seed=config.random_seed + 1, progress=progress, desc="test")
    folded = (sae.fold_input_scale() if sae.cfg.input_scale != 1 else sae).eval()
    train_letters = torch.tensor([w.letter for w in train])
    test_letters = torch.tensor([w.letter for w in test])
    W, b = letter_probes(X_train, train_letters, config.probe_C)
    data = LetterData(encode(folded, X_train), train_letters, X_test, encode(folded, X_test), test_letters,
                      X_test.double() @ W.T + b, W, folded.W_dec.detach().float().cpu())
    return data, {"train": len(train), "test": len(test)}


def run(sae: "SAE", model, config: AbsorptionConfig | None = None, *, progress: bool = True) -> AbsorptionResult:
    """The first-letter absorption eval of `sae` at its hook (sae.cfg.hook_name) on `model`."""
    from saelab.progress_bars import tqdm

    config = config or AbsorptionConfig()
    if not sae.cfg.hook_name:
        raise ValueError("absorption reads the SAE's hook, but its cfg.hook_name is empty")
    start = time.perf_counter()
    data, n_words = prepare(sae, model, config, progress)
    scored, skipped = [], {}
    for letter in tqdm(range(len(LETTERS)), desc="absorption: letters", disable=not progress, leave=False):
        if not bool((data.test_letters == letter).any()) or not bool((data.train_letters == letter).any()):
            skipped[LETTERS[letter]] = "no words in the train or test split"
            continue
        outcome = score_letter(letter, data, config)
        if isinstance(outcome, str):
            skipped[LETTERS[letter]] = outcome
        else:
            scored.append(outcome)
    if len(scored) < config.min_feats_for_eval:
        raise DataError(f"only {len(scored)} letters can be scored (probe F1 >= {config.min_GT_probe_f1}), fewer "
                        f"than min_feats_for_eval={config.min_feats_for_eval}: {skipped}")
    metrics, intervals = summarise(scored, config)
    return AbsorptionResult(config=config, hook=sae.cfg.hook_name, sae_name=sae_label(sae), letters=scored,
                            metrics=metrics, intervals=intervals, skipped=skipped, n_words=n_words,
                            seconds=time.perf_counter() - start)


def sae_label(sae) -> str:
    cfg = sae.cfg
    return f"{cfg.arch}-{cfg.width}" + (f"-k{cfg.k}" if getattr(cfg, "k", None) else "")


__all__ = ["CATEGORY", "EVAL_TYPE_ID", "LETTERS", "METRICS", "AbsorptionConfig", "AbsorptionResult",
           "LetterAbsorption", "Word", "absorption_scores", "first_letter_vocab", "icl_contexts", "k_sparse_f1s",
           "letter_probes", "run", "split_features", "split_words", "summarise", "word_activations"]
