"""Days and months as circles in a model: the calendar arithmetic tasks, a circle probe per layer fitted on some
prompts and scored on others, the calendar order of the representation, and interventions that move a day or a
month along the fitted circle, against baselines.

    study = calendar_study(model, DAYS_TASK, layers=range(model.n_layers), intervention_layers=[6, 9])
    study.save("runs/circles/days")        # days.json, days_layers.png, days_planes.png, days_interventions.png

Tasks (Engels et al. 2024): "Let's do some days of the week math. Two days from Monday is" (7 x 7 = 49 prompts)
and "Let's do some calendar math. Four months from March is" (12 x 12 = 144); the answer is (a + b) mod p and the
model's choice is the argmax over the p answer words' first tokens. Done differently from the public code: the
day or month token is found by its characters in each prompt (any tokenizer; a word split into several tokens or
absent is an error, not a silently wrong position), and the probe is scored two ways:
    leave one item out   fitted on the prompts of all items but one, it places the held-out item's prompts on the
                         circle, each item in turn. Only a circle that generalises to an unseen item puts it between
                         its calendar neighbours, so the shuffled-order control (the same with the items in a
                         random order round the circle) falls to chance.
    held-out durations   fitted on the prompts of some durations and scored on the others. Every item is on both
                         sides, so with few items p tight clusters fit almost any order: read it against its control.
The calendar order of the item means is read from the task's own template and from ORDER_TEMPLATES (other
wordings of the same arithmetic), since one template's order can flip where the circle loosens.

Probe: PCA (k = 5) of the train prompts' activations at the day/month token, then least squares from the PCA
coordinates (+ 1) to (cos, sin)(2 pi a / p). Its reading of held-out prompts gives the angle error, the nearest-
class accuracy and the share of variance in the circle plane (the 2-D plane of activation space the probe reads).

Interventions at one layer, at the day/month token of held-out prompts, towards another item a' with the duration
b kept; the effect is the change of logit(answer) - logit((a' + b) mod p) (positive: towards a'):
    circle        move the activation inside the circle plane so the probe reads a' (the fitted circle's point)
    layer         replace the activation by the (a', b) prompt's (the ceiling: everything the layer holds)
    pca_subspace  replace the k PCA coordinates by the (a', b) prompt's
    mean_ablate   replace the activation by the mean over all prompts (no target: how much a' gains by chance)
    zero_circle   move the activation to the circle's centre (no target)
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Sequence

import torch
from torch import Tensor

from saelab.analysis.concepts import DAYS, MONTHS
from saelab.analysis.irreducibility import PCA, pca
from saelab.analysis.study import SCHEMA_VERSION, StudyResult
from saelab.errors import DataError
from saelab.figures import GRID_ALPHA, pyplot, save_figure
from saelab.interventions import Replace, Tokens, in_call_order
from saelab.options import NonNegativeInt, PositiveInt, Range, check_fields

NUMBERS = ["One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine", "Ten", "Eleven", "Twelve"]
METHODS = ("circle", "layer", "pca_subspace", "mean_ablate", "zero_circle")
CONTROLS = 5
PROBE_TENSORS = ("mean", "components", "variance", "explained", "weights")


# ---------------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class CalendarPrompt:
    text: str
    item: int
    """a: the day or month in the prompt (0 = Monday / January)."""
    shift: int
    """b: the duration (1 .. p)."""
    answer: int
    """(a + b) mod p."""
    span: tuple[int, int]
    """Character range [start, end) of the day or month word in text."""


@dataclass(frozen=True)
class CalendarTask:
    """Modular arithmetic on a cycle of words: template holds {duration} and {item} once each."""

    name: str
    template: str
    items: tuple[str, ...]
    durations: tuple[str, ...]

    @property
    def period(self) -> int:
        return len(self.items)

    def prompts(self) -> list[CalendarPrompt]:
        """Every (duration, item) pair: p x p prompts, in order (b - 1) * p + a."""
        for key in ("{duration}", "{item}"):
            if self.template.count(key) != 1:
                raise DataError(f"task {self.name}: the template must hold {key} exactly once, got {self.template!r}")
        if len(self.durations) != self.period or self.period < 3:
            raise DataError(f"task {self.name}: needs at least 3 items and one duration per item (1 .. p), got "
                            f"{len(self.items)} items and {len(self.durations)} durations")
        out = []
        for b, duration in enumerate(self.durations, 1):
            for a, item in enumerate(self.items):
                head, tail = self.template.split("{item}")
                head = head.replace("{duration}", duration)
                text = head + item + tail.replace("{duration}", duration)
                out.append(CalendarPrompt(text, a, b, (a + b) % self.period, (len(head), len(head) + len(item))))
        return out


DAYS_TASK = CalendarTask("days", "Let's do some days of the week math. {duration} from {item} is", tuple(DAYS),
                         tuple(f"{n} day{'s' if i else ''}" for i, n in enumerate(NUMBERS[:7])))
MONTHS_TASK = CalendarTask("months", "Let's do some calendar math. {duration} from {item} is", tuple(MONTHS),
                           tuple(f"{n} month{'s' if i else ''}" for i, n in enumerate(NUMBERS)))
TASKS = {"days": DAYS_TASK, "months": MONTHS_TASK}
ORDER_TEMPLATES = {
    "days": ("Today is {item}. {duration} from now it will be", "Calendar question. {duration} after {item} comes",
             "We met on {item}. {duration} later we met again, on"),
    "months": ("It is {item} now. {duration} from now it will be", "Calendar question. {duration} after {item} comes",
               "We moved in {item}. {duration} later we moved again, in"),
}
"""Other wordings of each task's arithmetic (the item after a space, as in the task's own template, so SmolLM2's and
Gemma 3's tokenizers keep every day and month one token); the calendar order is read from each."""
RECORD_VERSION = 2
"""CalendarStudy.record_version this code writes: 1 had the held-out-duration probe and one template's order; 2 adds
the leave-one-item-out probe and the order over several templates."""


def item_positions(model, prompts: Sequence[CalendarPrompt]) -> tuple[Tokens, Tensor]:
    """Tokenise the prompts and find each one's day/month token by its characters: (Tokens, positions [n])."""
    tokens = model.tokenize([p.text for p in prompts])
    if tokens.spans is None:
        raise DataError(f"{model.name}'s tokenizer gives no character offsets (a slow tokenizer); the day/month "
                        "token cannot be found by its characters")
    positions = []
    for i, prompt in enumerate(prompts):
        found = tokens.covering(i, *prompt.span)
        word = prompt.text[slice(*prompt.span)]
        if len(found) == 0:
            raise DataError(f"no token of prompt {i} covers {word!r} ({prompt.text!r})")
        if len(found) > 1:
            pieces = [model.tokenizer.decode([int(tokens.ids[i, j])]) for j in found]
            raise DataError(f"{model.name}'s tokenizer splits {word!r} into {len(found)} tokens {pieces} in "
                            f"{prompt.text!r}; the circle probe reads one token per word (choose another template "
                            "or word list)")
        positions.append(int(found[0]))
    return tokens, torch.tensor(positions)


def answer_ids(model, task: CalendarTask) -> Tensor:
    """The first token of ' ' + each item: what the model's answer is read from; they must differ."""
    ids = [model.tokenizer(" " + item, add_special_tokens=False)["input_ids"] for item in task.items]
    first = [row[0] if row else None for row in ids]
    if None in first or len(set(first)) != len(first):
        raise DataError(f"{model.name}'s tokenizer does not give the {task.name} distinct first tokens "
                        f"({[model.tokenizer.decode(r[:1]) for r in ids]}); the answer cannot be read off the logits")
    return torch.tensor(first)


def answer_logits(model, tokens: Tokens, answers: Tensor, *, patches=(), batch_size: int = 16,
                  progress: bool = False, desc: str = "forwards") -> Tensor:
    """Logits of the answer tokens at each text's last token: [n, p] (float32, CPU). One forward per batch of
    `model.batches` (at most batch_size texts); `patches` apply to each batch as a call of its own."""
    parts = []
    for batch in _progress(progress, iterable=model.batches(tokens, max_texts=batch_size), desc=desc):
        logits = model.logits(batch, patches=patches, positions="last")
        parts.append((batch, logits[:, answers.to(logits.device)].float().cpu()))
    return in_call_order(parts)


@dataclass
class TaskAccuracy:
    accuracy: float
    """Fraction of prompts whose argmax over the p answer tokens is (a + b) mod p."""
    chance: float
    mean_rank: float
    """Mean rank of the right answer among the p (0 = top; chance (p - 1) / 2)."""
    always: str
    """The answer the model gives most often, and how often."""


def task_accuracy(logits: Tensor, prompts: Sequence[CalendarPrompt], task: CalendarTask) -> TaskAccuracy:
    answers = torch.tensor([p.answer for p in prompts])
    chosen = logits.argmax(1)
    rank = (logits > logits.gather(1, answers[:, None])).sum(1).float()
    values, counts = torch.unique(chosen, return_counts=True)
    top = int(counts.argmax())
    return TaskAccuracy(float((chosen == answers).float().mean()), 1 / task.period, float(rank.mean()),
                        f"{task.items[int(values[top])]} ({int(counts[top])} of {len(prompts)})")


def split_by_duration(task: CalendarTask, seed: int = 0, test_fraction: float = 0.3) -> dict[str, list[int]]:
    """Train / test prompt indices: the prompts of a seeded share of the durations are held out, so every item is
    on both sides and no test prompt shares its context with a train prompt."""
    p = task.period
    n_test = max(1, round(test_fraction * p))
    if n_test >= p:
        raise ValueError(f"test_fraction={test_fraction} leaves no duration to fit on")
    order = torch.randperm(p, generator=torch.Generator().manual_seed(seed)).tolist()
    test = set(order[:n_test])
    rows = {"train": [], "test": []}
    for b in range(p):
        rows["test" if b in test else "train"] += [b * p + a for a in range(p)]
    return rows


# ---------------------------------------------------------------------------------------------------- probe
def circle_targets(items: Tensor, period: int) -> Tensor:
    angle = 2 * math.pi * items.double() / period
    return torch.stack([angle.cos(), angle.sin()], 1)


@dataclass
class CircleProbe:
    """PCA to k components, then least squares to (cos, sin)(2 pi a / p): reading(x) = [pca(x), 1] @ weights."""

    pca: PCA
    weights: Tensor
    """[k + 1, 2], the last row the intercept."""
    period: int

    def reading(self, x: Tensor) -> Tensor:
        z = self.pca.project(x).double()
        return torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1) @ self.weights

    def angles(self, x: Tensor) -> Tensor:
        r = self.reading(x)
        return torch.atan2(r[:, 1], r[:, 0])

    def predict(self, x: Tensor) -> Tensor:
        """The nearest item on the circle to each reading."""
        step = 2 * math.pi / self.period
        return torch.round(self.angles(x) / step).long() % self.period

    def angle_errors(self, x: Tensor, items: Tensor) -> Tensor:
        """Signed angle (radians, in [-pi, pi)) from each item's place on the circle to the probe's reading of x."""
        items = torch.as_tensor(items)
        return torch.remainder(self.angles(x) - 2 * math.pi * items.double() / self.period + math.pi,
                               2 * math.pi) - math.pi

    def score(self, x: Tensor, items: Tensor) -> dict[str, float]:
        """Held-out accuracy (nearest item), mean absolute angle error (degrees) and R^2 of (cos, sin)."""
        items = torch.as_tensor(items)
        target = circle_targets(items, self.period)
        reading = self.reading(x)
        error = self.angle_errors(x, items)
        residual = (reading - target).square().sum()
        total = (target - target.mean(0)).square().sum()
        return dict(accuracy=float((self.predict(x) == items).float().mean()),
                    error_degrees=float(error.abs().mean() * 180 / math.pi), r2=float(1 - residual / total))

    def plane(self) -> Tensor:
        """[2, d] orthonormal basis of the activation-space plane the probe reads."""
        directions = self.weights[:-1].T.float() @ self.pca.components  # [2, d]
        q, _ = torch.linalg.qr(directions.T)
        return q.T

    def variance_share(self, x: Tensor) -> float:
        """Share of the variance of x (about its own mean) inside the circle plane."""
        centred = x.float() - x.float().mean(0)
        return float((centred @ self.plane().T).square().sum() / centred.square().sum().clamp_min(1e-30))

    def move(self, x: Tensor, target: Tensor) -> Tensor:
        """x [n, d] moved (least change, inside the circle plane) so that the probe reads target [n, 2]."""
        W = self.weights[:-1]  # [k, 2]
        step = W @ torch.linalg.solve(W.T @ W, (target.double() - self.reading(x)).T)  # [k, n], min-norm
        return x + (step.T.float() @ self.pca.components).to(x.dtype)

    def to_angle(self, x: Tensor, items: Tensor) -> Tensor:
        return self.move(x, circle_targets(torch.as_tensor(items), self.period))

    def to_centre(self, x: Tensor) -> Tensor:
        """Move to the reading of the PCA mean: the circle coordinates removed (relative to the mean)."""
        return self.move(x, self.weights[-1].expand(len(x), 2))


def fit_circle_probe(x: Tensor, items: Tensor, period: int, k: int = 5) -> CircleProbe:
    """Fit on activations x [n, d] of prompts with items [n]; n must exceed k (and cover the circle)."""
    x = torch.as_tensor(x).float()
    items = torch.as_tensor(items).long()
    if len(x) != len(items):
        raise ValueError(f"got {len(x)} activations but {len(items)} items")
    if len(x) <= k:
        raise ValueError(f"the circle probe reduces to {k} PCA components and needs more prompts than that; got "
                         f"{len(x)} (use more prompts or a smaller k)")
    if len(torch.unique(items)) < 3:
        raise ValueError("the circle probe needs prompts of at least 3 different items to fit a circle")
    fitted = pca(x, k)
    z = fitted.project(x).double()
    design = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1)
    weights = torch.linalg.lstsq(design, circle_targets(items, period)).solution
    return CircleProbe(fitted, weights, period)


@dataclass
class CalendarOrder:
    fraction: float
    """Share of items whose neighbour (going round the class means' angles in the better direction) is the next
    item in the calendar: 1.0 is the calendar order; a random order gives 1 / (p - 1) on average."""
    direction: int
    """+1 if the calendar runs counter-clockwise in the plane, -1 if clockwise."""
    angles: list[float]
    """Angle (degrees) of each item's mean around the centre of the means."""


def calendar_order(coords: Tensor, items: Tensor, period: int) -> CalendarOrder:
    """How well the class means of 2-D coordinates follow the calendar round their centre."""
    items = torch.as_tensor(items).long()
    missing = set(range(period)) - set(items.tolist())
    if missing:
        raise ValueError(f"calendar_order needs every item; items {sorted(missing)} have no points")
    means = torch.stack([coords[items == a].double().mean(0) for a in range(period)])
    centred = means - means.mean(0)
    angles = torch.atan2(centred[:, 1], centred[:, 0])
    order = torch.argsort(angles).tolist()
    successor = {order[i]: order[(i + 1) % period] for i in range(period)}
    forward = sum(successor[a] == (a + 1) % period for a in range(period)) / period
    backward = sum(successor[(a + 1) % period] == a for a in range(period)) / period
    return CalendarOrder(max(forward, backward), 1 if forward >= backward else -1,
                         (angles * 180 / math.pi).tolist())


@dataclass
class LeftOut:
    """The circle probe placing items it was not fitted on (leave_one_item_out)."""

    nearest: float
    """Share of the left-out item's prompts whose nearest item on the circle is their own (chance 1 / p)."""
    between: float
    """Share placed strictly between the item's two neighbours, less than one step from its place (chance 2 / p)."""
    error_degrees: float
    """Mean absolute angle from the item's place (chance 90)."""


def leave_one_item_out(x: Tensor, items: Tensor, period: int, k: int = 5, order: Tensor | None = None) -> LeftOut:
    """For each item in turn, fit the circle probe on the other items' prompts and place this item's prompts on
    the circle. order [p]: each item's place round the circle (a permutation; None: the calendar's)."""
    x, items = torch.as_tensor(x).float(), torch.as_tensor(items).long()
    place = items if order is None else torch.as_tensor(order).long()[items]
    errors = []
    for a in range(period):
        left_out = items == a
        if not bool(left_out.any()):
            raise ValueError(f"item {a} has no prompts to leave out")
        probe = fit_circle_probe(x[~left_out], place[~left_out], period, k)
        errors.append(probe.angle_errors(x[left_out], place[left_out]).abs())
    error = torch.cat(errors)
    step = 2 * math.pi / period
    return LeftOut(float((error < step / 2).double().mean()), float((error < step).double().mean()),
                   float(error.mean() * 180 / math.pi))


def shuffled_orders(period: int, count: int, seed: int = 0) -> list[Tensor]:
    """Seeded random orders of the items round the circle, none a rotation or mirror of the calendar's (those are
    the calendar order itself to a circle probe)."""
    if period < 4:
        raise ValueError(f"every order of {period} items round a circle is a rotation or mirror of any other")
    generator = torch.Generator().manual_seed(seed * 7919 + 1)
    calendar = {tuple((s * a + r) % period for a in range(period)) for r in range(period) for s in (1, -1)}
    out = []
    while len(out) < count:
        order = torch.randperm(period, generator=generator)
        if tuple(order.tolist()) not in calendar:
            out.append(order)
    return out


def item_plane_order(x: Tensor, items: Tensor, period: int) -> CalendarOrder:
    """calendar_order of the item means (each averaged over its prompts, so what the durations add cancels) in the
    top-2 PCA plane of those means."""
    items = torch.as_tensor(items).long()
    missing = set(range(period)) - set(items.tolist())
    if missing:
        raise ValueError(f"item_plane_order needs every item; items {sorted(missing)} have no points")
    means = torch.stack([x[items == a].float().mean(0) for a in range(period)])
    return calendar_order(pca(means, 2).project(means), torch.arange(period), period)


def cyclic_sequence(order: CalendarOrder) -> tuple[int, ...]:
    """The items in the order they go round, from item 0, in the direction whose next item is the smaller: equal
    for two planes that put the items in the same cyclic order (whatever their rotation or mirror)."""
    walk = torch.argsort(torch.tensor(order.angles)).tolist()
    walk = walk[walk.index(0):] + walk[:walk.index(0)]
    return tuple(walk if walk[1] <= walk[-1] else [walk[0], *walk[:0:-1]])


def order_agreement(orders: Sequence[CalendarOrder]) -> float:
    """Share of templates whose item means go round in the commonest cyclic order."""
    sequences = [cyclic_sequence(o) for o in orders]
    return max(sequences.count(s) for s in sequences) / len(sequences)


# ---------------------------------------------------------------------------------------------------- study
@dataclass
class LayerRecord:
    layer: int
    hook: str
    probe_accuracy: float
    """Held-out prompts: the nearest item to the probe's reading is right."""
    probe_error_degrees: float
    probe_r2: float
    control_accuracy: float
    """The same probe fitted to seeded random orders of the items round the circle (mean of CONTROLS): with few
    items a k-dimensional probe can place any order on a circle, so only accuracy above this says "calendar"."""
    order: float
    """calendar_order of the held-out prompts' item means in the train PCA's top-2 plane."""
    order_direction: int
    circle_variance: float
    """Held-out: share of the variance (across prompts) inside the probe's circle plane."""
    top2_variance: float
    """Train: share of the variance along the top 2 PCA components."""
    left_out: LeftOut | None = None
    """The probe placing each item it was not fitted on (None in records before version 2)."""
    left_out_control: LeftOut | None = None
    """The same with the items in CONTROLS shuffled orders round the circle (means): chance if the probe must
    generalise."""
    template_orders: list[float] | None = None
    """item_plane_order of every prompt's activation, per template (the task's own first, then ORDER_TEMPLATES)."""
    template_agreement: float | None = None
    """Share of the templates whose item means go round in the commonest cyclic order (1: no template flips it)."""


@dataclass
class InterventionRecord:
    layer: int
    method: str
    n: int
    """Interventions (held-out prompt x target item)."""
    logit_shift: float
    """Mean change of logit(answer) - logit((a' + b) mod p), clean minus patched: positive moves towards a'."""
    to_target: float
    """Share of interventions after which the argmax answer is (a' + b) mod p."""
    kept_answer: float
    """Share after which the argmax answer is still the clean argmax."""
    recovered: float
    """How much of the change in the answer logits from the (a, b) prompt to the (a', b) prompt the patch
    reproduces: sum of (after - before) . (source - before) over sum of |source - before|^2, the logits centred
    over the p answers (1: the patched run answers like the (a', b) prompt; 0: unchanged). Meaningful even when
    the model cannot do the arithmetic."""


@dataclass
class CalendarStudy(StudyResult):
    """One task on one model; saved as <task>.json, <task>.md, <task>.safetensors (each layer's activations and
    circle probe, which the plane figure reads) and the figures."""

    WHAT: ClassVar[str] = "calendar study"

    model: str
    task: str
    accuracy: TaskAccuracy
    layers: list[LayerRecord] = field(default_factory=list)
    interventions: list[InterventionRecord] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    record_version: int = 1
    """What the record holds (RECORD_VERSION); older records load with the newer fields None."""
    activations: dict[int, Tensor] = field(default_factory=dict, repr=False, compare=False)
    probes: dict[int, CircleProbe] = field(default_factory=dict, repr=False, compare=False)

    def name(self) -> str:
        return self.task

    @classmethod
    def tensor_fields(cls) -> tuple[str, ...]:
        return ("activations", "probes")

    def tensors(self) -> dict[str, Tensor]:
        out = {f"activations.{layer}": x for layer, x in self.activations.items()}
        for layer, probe in self.probes.items():
            parts = dict(mean=probe.pca.mean, components=probe.pca.components, variance=probe.pca.variance,
                         explained=probe.pca.explained, weights=probe.weights)
            out.update({f"probes.{layer}.{key}": value for key, value in parts.items()})
        return out

    def restore_tensors(self, tensors: dict[str, Tensor]) -> None:
        for key, value in tensors.items():
            if key.startswith("activations."):
                self.activations[int(key.split(".")[1])] = value
        for layer in sorted({int(key.split(".")[1]) for key in tensors if key.startswith("probes.")}):
            part = {key: tensors[f"probes.{layer}.{key}"] for key in PROBE_TENSORS}
            fitted = PCA(part["mean"], part["components"], part["variance"], part["explained"])
            self.probes[layer] = CircleProbe(fitted, part["weights"], self.settings["period"])

    def table(self) -> str:
        lines = [f"{self.task} on {self.model}: accuracy {self.accuracy.accuracy:.2f} (chance "
                 f"{self.accuracy.chance:.2f}; mean rank of the answer {self.accuracy.mean_rank:.1f}; most common "
                 f"answer {self.accuracy.always})\n"]
        if any(r.left_out is not None for r in self.layers):
            lines += self.left_out_table()
        lines += ["Held-out durations: every item is among the training prompts, so with few items the probe fits "
                  "almost any order (read it against its shuffled-order control).\n",
                  "| layer | probe acc (held out) | shuffled-order control | angle error | R^2 | calendar order | "
                 "circle-plane var | top-2 PC var |", "|---|---|---|---|---|---|---|---|"]
        for r in self.layers:
            lines.append(f"| {r.layer} | {r.probe_accuracy:.2f} | {r.control_accuracy:.2f} | "
                         f"{r.probe_error_degrees:.0f}° | {r.probe_r2:.2f} | "
                         f"{r.order:.2f} | {r.circle_variance:.2f} | {r.top2_variance:.2f} |")
        if self.interventions:
            lines += ["", "| layer | intervention | n | logit shift to a' | argmax = a'+b | answer kept | "
                      "change recovered |", "|---|---|---|---|---|---|---|"]
            lines += [f"| {r.layer} | {r.method} | {r.n} | {r.logit_shift:+.2f} | {r.to_target:.2f} | "
                      f"{r.kept_answer:.2f} | {r.recovered:+.2f} |" for r in self.interventions]
        return "\n".join(lines) + "\n"

    def left_out_table(self) -> list[str]:
        p, item = self.settings["period"], self.task[:-1] if self.task.endswith("s") else "item"
        templates = 1 + len(self.settings.get("order_templates", []))
        return [f"Leave one {item} out: the probe, fitted on the other {item}s' prompts, places each left-out "
                f"{item}'s prompts on the circle (chance: nearest {1 / p:.2f}, between its neighbours {2 / p:.2f}); "
                f"the shuffled-order control does the same with the {item}s in {CONTROLS} random orders round the "
                f"circle. Calendar order of the {item} means over {templates} templates.\n",
                "| layer | left-out nearest | left-out between neighbours | angle error | shuffled-order control: "
                "nearest | between neighbours | order per template | same cyclic order |", "|---" * 8 + "|",
                *[f"| {r.layer} | {r.left_out.nearest:.2f} | {r.left_out.between:.2f} | "
                  f"{r.left_out.error_degrees:.0f}° | {r.left_out_control.nearest:.2f} | "
                  f"{r.left_out_control.between:.2f} | {' '.join(f'{o:.2f}' for o in r.template_orders)} | "
                  f"{r.template_agreement:.2f} |" for r in self.layers if r.left_out is not None], ""]

    def plot_layers(self, path: str | Path) -> Path:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7, 4))
        x = [r.layer for r in self.layers]
        period = self.settings["period"]
        left_out = [r for r in self.layers if r.left_out is not None]
        if left_out:
            ax.plot([r.layer for r in left_out], [r.left_out.nearest for r in left_out], "D-", ms=3, color="black",
                    label="left-out item placed nearest (leave one out)")
            ax.plot([r.layer for r in left_out], [r.left_out_control.nearest for r in left_out], "D:", ms=3,
                    color="black", label="same, shuffled-order control")
        ax.plot(x, [r.probe_accuracy for r in self.layers], "o-", ms=3, label="probe accuracy (held-out durations)")
        ax.plot(x, [r.control_accuracy for r in self.layers], "o:", ms=3, label="same, shuffled-order control")
        ax.plot(x, [r.order for r in self.layers], "s-", ms=3, label="calendar order of item means")
        ax.plot(x, [r.circle_variance for r in self.layers], "^-", ms=3, label="variance share in circle plane")
        ax.axhline(1 / period, color="grey", ls=":", lw=1, label=f"chance accuracy 1/{period}")
        ax.axhline(1 / (period - 1), color="grey", ls="--", lw=1, label=f"random order 1/{period - 1}")
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{self.task} on {self.model} (task accuracy {self.accuracy.accuracy:.2f})", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=GRID_ALPHA)
        return save_figure(fig, path)

    def plot_planes(self, path: str | Path, layers: Sequence[int], items: Sequence[str]) -> Path:
        """Each layer's activations at the day/month token in the train PCA's top-2 plane, coloured and labelled
        by item (class means labelled with the item's name)."""
        plt = pyplot()
        layers = [layer for layer in layers if layer in self.activations]
        fig, axes = plt.subplots(1, len(layers), figsize=(3.6 * len(layers), 3.6), squeeze=False)
        item_of = torch.tensor(self.settings["items"])
        for ax, layer in zip(axes[0], layers):
            z = self.probes[layer].pca.project(self.activations[layer])[:, :2]
            colours = plt.cm.hsv(item_of.numpy() / len(items))
            ax.scatter(z[:, 0], z[:, 1], s=8, c=colours, alpha=0.6)
            for a, name in enumerate(items):
                mean = z[item_of == a].mean(0)
                ax.annotate(name[:3], (float(mean[0]), float(mean[1])), fontsize=8, weight="bold",
                            color=plt.cm.hsv(a / len(items)))
            record = next(r for r in self.layers if r.layer == layer)
            ax.set_title(f"layer {layer}: order {record.order:.2f}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(f"{self.task} on {self.model}: PC1-PC2 at the {self.task[:-1]} token", fontsize=10)
        return save_figure(fig, path)

    def plot_interventions(self, path: str | Path) -> Path:
        plt = pyplot()
        layers = sorted({r.layer for r in self.interventions})
        fig, ax = plt.subplots(figsize=(7, 3.8))
        width = 0.8 / len(METHODS)
        for m, method in enumerate(METHODS):
            values = [next((r.recovered for r in self.interventions if r.layer == layer and r.method == method),
                           float("nan")) for layer in layers]
            ax.bar([i + m * width for i in range(len(layers))], values, width, label=method)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(layers))], [f"layer {layer}" for layer in layers])
        ax.axhline(0, color="black", lw=0.8)
        ax.set_ylabel("share of the (a,b) -> (a',b) change\nin the answer logits reproduced")
        ax.set_title(f"{self.task} on {self.model}: interventions at the {self.task[:-1]} token", fontsize=10)
        ax.legend(fontsize=7)
        return save_figure(fig, path)

    def save(self, folder: str | Path, name: str | None = None, plane_layers: Sequence[int] | None = None) -> Path:
        """The record and the figures (planes at `plane_layers`, default four spread over the depth studied)."""
        self.write(folder, name)
        self.save_figures(Path(folder), name or self.name(), plane_layers)
        return Path(folder)

    def save_figures(self, folder: Path, name: str, plane_layers: Sequence[int] | None = None) -> None:
        if self.layers:
            self.plot_layers(folder / f"{name}_layers.png")
            if plane_layers is None:  # four layers spread over the depth studied
                studied = [r.layer for r in self.layers]
                plane_layers = sorted({studied[round(i * (len(studied) - 1) / 3)] for i in range(4)})
            self.plot_planes(folder / f"{name}_planes.png", plane_layers, TASKS[self.task].items
                             if self.task in TASKS else [str(i) for i in range(self.settings["period"])])
        if self.interventions:
            self.plot_interventions(folder / f"{name}_interventions.png")


def calendar_study(model, task: CalendarTask, layers: Sequence[int] | None = None, *, k: int = 5, seed: int = 0,
                   test_fraction: float = 0.3, intervention_layers: Sequence[int] = (), targets: int | None = 3,
                   order_templates: Sequence[str] | None = None, batch_size: int = 16,
                   progress: bool = True) -> CalendarStudy:
    """Accuracy, a circle probe per layer (left one item out, and fitted on train durations and scored on held-out
    ones), the calendar order over the task's template and `order_templates` (None: ORDER_TEMPLATES of the task,
    if any), and interventions at `intervention_layers` on held-out prompts towards `targets` other items each
    (None: all p - 1)."""
    started = time.perf_counter()
    layers = list(range(model.n_layers)) if layers is None else sorted(set(layers))
    bad = [layer for layer in [*layers, *intervention_layers] if not 0 <= layer < model.n_layers]
    if bad:
        raise ValueError(f"layer {bad[0]} is out of range for {model.name} ({model.n_layers} layers)")
    prompts = task.prompts()
    tokens, positions = item_positions(model, prompts)
    answers = answer_ids(model, task)
    clean = answer_logits(model, tokens, answers, batch_size=batch_size, progress=progress, desc=f"{task.name}: task")
    split = split_by_duration(task, seed, test_fraction)
    items = torch.tensor([p.item for p in prompts])
    order_templates = list(ORDER_TEMPLATES.get(task.name, ()) if order_templates is None else order_templates)
    study = CalendarStudy(model.name, task.name, task_accuracy(clean, prompts, task), settings=dict(
        template=task.template, period=task.period, n_prompts=len(prompts), k=k, seed=seed,
        test_fraction=test_fraction, test_durations=sorted({prompts[i].shift for i in split["test"]}),
        positions=positions.tolist(), items=items.tolist(), targets=targets, order_templates=order_templates),
        record_version=RECORD_VERSION)
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in sorted({*layers, *intervention_layers})]
    acts = model.activations_at(tokens, hooks, positions=positions.tolist(), batch_size=batch_size)
    probed = [f"blocks.{layer}.hook_resid_post" for layer in layers]
    reworded = [template_activations(model, dataclasses.replace(task, template=t), probed, batch_size)
                for t in order_templates] if probed else []
    train, test = torch.tensor(split["train"]), torch.tensor(split["test"])
    for layer in sorted({*layers, *intervention_layers}):
        x = acts[f"blocks.{layer}.hook_resid_post"]
        probe = fit_circle_probe(x[train], items[train], task.period, k)
        study.activations[layer], study.probes[layer] = x, probe
        if layer in layers:
            reread = [other[f"blocks.{layer}.hook_resid_post"] for other in reworded]
            study.layers.append(layer_record(layer, x, items, probe, train, test, reread, k=k, seed=seed))
    for layer in intervention_layers:
        study.interventions += intervene(model, task, layer, study.probes[layer], study.activations[layer], tokens,
                                         positions, prompts, split["test"], answers, clean, targets=targets,
                                         seed=seed, batch_size=batch_size, progress=progress)
    study.seconds = time.perf_counter() - started
    return study


def layer_record(layer: int, x: Tensor, items: Tensor, probe: CircleProbe, train: Tensor, test: Tensor,
                 reworded: Sequence[Tensor] = (), *, k: int = 5, seed: int = 0) -> LayerRecord:
    """One layer's probes, controls and orders: x [n_prompts, d] at the item token, `probe` fitted on the train
    prompts, `reworded` the same prompts' activations under the other templates."""
    period = probe.period
    score = probe.score(x[test], items[test])
    control = []
    for c in range(CONTROLS):
        shuffle = torch.randperm(period, generator=torch.Generator().manual_seed(seed * 7919 + c))
        shuffled = fit_circle_probe(x[train], shuffle[items[train]], period, k)
        control.append(shuffled.score(x[test], shuffle[items[test]])["accuracy"])
    order = calendar_order(probe.pca.project(x[test])[:, :2], items[test], period)
    left_out, controls = None, []
    if period >= 4:  # with one item left out, at least 3 remain to fit a circle to
        left_out = leave_one_item_out(x, items, period, k)
        controls = [leave_one_item_out(x, items, period, k, order=o) for o in shuffled_orders(period, CONTROLS, seed)]
    orders = [item_plane_order(other, items, period) for other in (x, *reworded)]
    return LayerRecord(layer, f"blocks.{layer}.hook_resid_post", score["accuracy"], score["error_degrees"],
                       score["r2"], sum(control) / len(control), order.fraction, order.direction,
                       probe.variance_share(x[test]), float(probe.pca.explained[:2].sum()), left_out,
                       mean_left_out(controls) if controls else None, [o.fraction for o in orders],
                       order_agreement(orders))


def template_activations(model, task: CalendarTask, hooks: Sequence[str], batch_size: int = 16) -> dict[str, Tensor]:
    """Every prompt's activation at its day/month token at `hooks`, in task.prompts() order (the items are the same
    for every template of a task)."""
    tokens, positions = item_positions(model, task.prompts())
    return model.activations_at(tokens, list(hooks), positions=positions.tolist(), batch_size=batch_size)


def mean_left_out(results: Sequence[LeftOut]) -> LeftOut:
    return LeftOut(*(sum(getattr(r, f.name) for r in results) / len(results) for f in dataclasses.fields(LeftOut)))


def intervene(model, task: CalendarTask, layer: int, probe: CircleProbe, x: Tensor, tokens: Tokens,
              positions: Tensor, prompts: Sequence[CalendarPrompt], rows: Sequence[int], answers: Tensor,
              clean: Tensor, *, targets: int | None = 3, methods: Sequence[str] = METHODS, seed: int = 0,
              batch_size: int = 16, progress: bool = True) -> list[InterventionRecord]:
    """Each method at `layer`, at the day/month token of prompts `rows`, towards `targets` seeded other items per
    prompt; x [n_prompts, d] are every prompt's activations there (the sources for layer / pca_subspace)."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown intervention {sorted(unknown)[0]!r}; choose from {', '.join(METHODS)}")
    p = task.period
    generator = torch.Generator().manual_seed(seed * 1009 + layer)
    pairs = []  # (prompt row, target item)
    for row in rows:
        others = [a for a in range(p) if a != prompts[row].item]
        if targets is not None and targets < len(others):
            others = [others[i] for i in torch.randperm(len(others), generator=generator)[:targets].tolist()]
        pairs += [(row, a) for a in others]
    row_of = torch.tensor([r for r, _ in pairs])
    target = torch.tensor([a for _, a in pairs])
    shift = torch.tensor([prompts[r].shift for r, _ in pairs])
    source = (shift - 1) * p + target  # the (a', b) prompt
    original = torch.tensor([prompts[r].answer for r, _ in pairs])
    moved = (target + shift) % p
    here = x[row_of]
    hook = f"blocks.{layer}.hook_resid_post"
    new = {"circle": lambda: probe.to_angle(here, target),
           "layer": lambda: x[source],
           "pca_subspace": lambda: here + (probe.pca.project(x[source]) - probe.pca.project(here)) @ probe.pca.components}
    before = clean[row_of]
    centred = lambda logits: logits - logits.mean(1, keepdim=True)  # noqa: E731
    wanted = centred(clean[source]) - centred(before)
    diff_before = before.gather(1, original[:, None]) - before.gather(1, moved[:, None])
    unique, back = torch.unique(row_of, return_inverse=True)
    free = {"mean_ablate": lambda: x.mean(0).expand(len(unique), -1), "zero_circle": lambda: probe.to_centre(x[unique])}
    records = []
    for method in methods:
        desc = f"{task.name} L{layer} {method}"
        if method in free:  # no target: one forward per prompt, shared by its targets
            after = patched_answer_logits(model, tokens, unique, positions[unique], hook, free[method](), answers,
                                          batch_size=batch_size, progress=progress, desc=desc)[back]
        else:
            after = patched_answer_logits(model, tokens, row_of, positions[row_of], hook, new[method](), answers,
                                          batch_size=batch_size, progress=progress, desc=desc)
        diff_after = after.gather(1, original[:, None]) - after.gather(1, moved[:, None])
        chosen = after.argmax(1)
        moved_by = centred(after) - centred(before)
        recovered = float((moved_by * wanted).sum() / wanted.square().sum().clamp_min(1e-12))
        records.append(InterventionRecord(layer, method, len(pairs), float((diff_before - diff_after).mean()),
                                          float((chosen == moved).float().mean()),
                                          float((chosen == before.argmax(1)).float().mean()), recovered))
    return records


def patched_answer_logits(model, tokens: Tokens, rows: Tensor, positions: Tensor, hook: str, values: Tensor,
                          answers: Tensor, *, batch_size: int = 16, progress: bool = False,
                          desc: str = "forwards") -> Tensor:
    """Answer logits [m, p] of texts tokens[rows] with the activation at (hook, positions[i]) replaced by
    values[i]. Each batch of `model.batches` is one forward, so `put` sees exactly the rows it has values for."""
    parts = []
    for batch in _progress(progress, iterable=model.batches(tokens[rows], max_texts=batch_size), desc=desc):
        picked = batch.call[0]
        at, vectors = positions[picked], values[picked]

        def put(x: Tensor, at=at, vectors=vectors) -> Tensor:
            out = x.clone()
            out[torch.arange(len(x)), at.to(x.device)] = vectors.to(x.device, x.dtype)
            return out

        logits = model.logits(batch, patches=[Replace(hook, put, positions=at.tolist())], positions="last")
        parts.append((batch, logits[:, answers.to(logits.device)].float().cpu()))
    return in_call_order(parts)


def _progress(enabled: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, leave=False, **kwargs)


@dataclass
class CalendarConfig:
    """The calendar study on one model: which tasks and layers, how the circle probe is fitted and held out, and
    where the interventions are made."""

    model: str
    """Model to study: smollm2-135m, gemma-3-270m, a Hub id or a local folder."""
    tasks: str = "days,months"
    """Comma list of days, months."""
    layers: list[NonNegativeInt] | None = None
    """Layers to probe, e.g. 0,4,8 (None: all): the leave-one-item-out probe beside its shuffled-order control,
    the calendar order over templates, and the held-out-duration probe."""
    intervene: list[NonNegativeInt] = field(default_factory=list)
    """Layers to intervene at, e.g. 4,10."""
    targets: NonNegativeInt = 3
    """Other items per held-out prompt (0: all)."""
    order_templates: Annotated[int, Range(at_least=0, at_most=3)] = 3
    """Other wordings of the arithmetic the calendar order is also read from (0: the task's own only)."""
    k: PositiveInt = 5
    """PCA components the circle probe reads."""
    test_fraction: Annotated[float, Range(above=0, below=1)] = 0.3
    """Share of durations held out."""
    seed: NonNegativeInt = 0
    """Seeds the held-out durations, the shuffled-order controls and the intervention targets."""
    batch_size: PositiveInt = 16
    """Prompts per model forward (at most)."""

    def __post_init__(self):
        check_fields(self)
        self.task_list()

    def task_list(self) -> list[CalendarTask]:
        unknown = [t for t in self.tasks.split(",") if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}")
        return [TASKS[t] for t in self.tasks.split(",")]


def run_calendar(config: CalendarConfig, *, model=None, progress: bool = True, trust_remote_code: bool = False,
                 max_batch_tokens: int | None = None) -> list[CalendarStudy]:
    """One CalendarStudy per task of the config (what `saelab circles calendar` runs); `model` skips loading it."""
    from saelab.models import load_model

    if model is None:
        options = {} if max_batch_tokens is None else {"max_batch_tokens": max_batch_tokens}
        model = load_model(config.model, trust_remote_code=trust_remote_code, **options)
    return [calendar_study(model, task, config.layers, k=config.k, seed=config.seed,
                           test_fraction=config.test_fraction, intervention_layers=config.intervene,
                           targets=config.targets or None,
                           order_templates=ORDER_TEMPLATES.get(task.name, ())[:config.order_templates],
                           batch_size=config.batch_size, progress=progress)
            for task in config.task_list()]


__all__ = ["CalendarConfig", "CalendarOrder", "CalendarPrompt", "CalendarStudy", "CalendarTask", "CircleProbe",
           "DAYS_TASK", "InterventionRecord", "LayerRecord", "LeftOut", "METHODS", "MONTHS_TASK", "ORDER_TEMPLATES",
           "RECORD_VERSION", "TASKS", "TaskAccuracy", "answer_ids", "answer_logits", "calendar_order",
           "calendar_study", "circle_targets", "cyclic_sequence", "fit_circle_probe", "intervene",
           "item_plane_order", "item_positions", "layer_record", "leave_one_item_out", "order_agreement",
           "patched_answer_logits", "run_calendar", "shuffled_orders", "split_by_duration", "task_accuracy",
           "template_activations"]
