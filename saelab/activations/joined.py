"""Several activations read as one: the input of a crosscoder.

A JoinedSource is an activation source with one more hook, whose rows are several of its hooks side by side, each
multiplied by a scale that gives it unit variance (mean squared distance from its mean). The scales are fixed once
(from the first rows in text order, or given) and recorded in the crosscoder's config (SAEConfig.parts), so
training, evaluation and analysis read exactly the same input, and a resumed run the same scales. Without them a
model or layer with larger activations would own the loss. Variance, not mean squared norm: the decoder bias takes
each part's mean, so the loss weighs what varies, and a part whose norm is mostly one constant direction (Gemma 3's
residual stream, 95 % of its squared norm at block 7) would otherwise weigh ~17x less than its partner.

A JoinedSource of a JoinedSource holds both joined hooks (its `parts` names each): a cross-layer transcoder reads
one (each layer's MLP input) and writes the other (each layer's MLP output).

Hooks of a two-model source (saelab.crosscoder.paired) are named "<model label>:<hook>" (the label is the model
name's last path part, since a hook name must not hold '/'); a part records the model's full name and the hook.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import torch
from torch import Tensor

from saelab.activations.source import open_source
from saelab.activations.store import ActivationBatch
from saelab.errors import HookError
from saelab.files import name_problem

SEPARATOR = "+"
"""Between the parts of a joined hook's name."""
MODEL_SEPARATOR = ":"
"""Between a model and its hook in a two-model source's hook names."""


def joined_name(hooks: Sequence[str]) -> str:
    return SEPARATOR.join(hooks)


def model_label(model_name: str) -> str:
    """A model's name as a hook name may hold it: the last part of a path or Hub id."""
    return model_name.rstrip("/").rsplit("/", 1)[-1]


def unit_variance_scale(x: Tensor) -> float:
    """The factor giving rows `x` [n, d] unit mean squared distance from their mean."""
    x = x.float()
    spread = float((x - x.mean(0)).square().sum(1).mean())
    if not spread > 0:
        raise ValueError("cannot scale a part whose rows are all alike (zero variance)")
    return spread ** -0.5


def source_hook(part: dict, hooks: Sequence[str]) -> str:
    """The name `part` has among a source's `hooks`: "<model label>:<hook>" in a two-model source, else its hook."""
    qualified = f"{model_label(part['model'])}{MODEL_SEPARATOR}{part['hook']}"
    return qualified if qualified in hooks else part["hook"]


def joined(parts: Sequence[dict], acts: dict[str, Tensor]) -> Tensor:
    """The crosscoder's input from each part's raw activations (keyed as in its source, see source_hook)."""
    keys = [source_hook(p, list(acts)) for p in parts]
    missing = [key for key in keys if key not in acts]
    if missing:
        raise HookError(f"the crosscoder reads {', '.join(missing)}, which the activations do not hold "
                        f"(they hold {', '.join(acts)})")
    return torch.cat([acts[key].float() * p["scale"] for key, p in zip(keys, parts)], dim=-1)


def hooks_read(sae, hook: str) -> list[str]:
    """The model hooks a dictionary at `hook` reads: a crosscoder's parts, else that hook (sae may be None)."""
    if sae is not None and sae.cfg.is_crosscoder:
        return [part["hook"] for part in sae.cfg.parts]
    return [hook]


def input_of(sae, hook: str, acts: dict[str, Tensor]) -> Tensor:
    """What a dictionary at `hook` reads from the activations at hooks_read: a crosscoder's parts joined."""
    return joined(sae.cfg.parts, acts) if sae is not None and sae.cfg.is_crosscoder else acts[hook]


def split(parts: Sequence[dict], x: Tensor, raw: bool = False) -> list[Tensor]:
    """A joined row (an input or a reconstruction) cut back into its parts: in the crosscoder's units (each part
    at unit variance), or raw=True in each hook's own units."""
    pieces, start = [], 0
    for part in parts:
        piece = x[..., start:start + part["d"]]
        pieces.append(piece / part["scale"] if raw else piece)
        start += part["d"]
    return pieces


class JoinedSource:
    """`source` (a cache folder or any activation source) plus the hook `name` holding `hooks` side by side.

    scales: one per hook (None: each estimated from the first batch in text order). The other hooks pass through,
    so SAEs on the single hooks can train from the same stream beside the crosscoder; so do the joined hooks of a
    JoinedSource given as `source` (`parts` then holds both)."""

    def __init__(self, source, hooks: Sequence[str], *, name: str | None = None, scales: Sequence[float] | None = None,
                 batch_size: int = 4096, seed: int = 0):
        self.source = open_source(source, batch_size=batch_size, seed=seed)
        hooks = list(hooks)
        unknown = [h for h in hooks if h not in self.source.hooks]
        if len(hooks) < 2 or len(set(hooks)) != len(hooks) or unknown:
            raise HookError(f"a crosscoder joins two or more different hooks of its source (which holds "
                            f"{', '.join(self.source.hooks)}); got {hooks}")
        self.name = name or joined_name(hooks)
        if problem := name_problem(self.name):
            raise ValueError(f"the joined hook's name {self.name!r} {problem}")
        if scales is None:
            first = next(iter(self.source.in_order(hooks)))
            scales = [unit_variance_scale(first.acts[h]) for h in hooks]
        if len(scales) != len(hooks):
            raise ValueError(f"give one scale per hook: {len(hooks)} hooks, {len(scales)} scales")
        own = []
        for hook, scale in zip(hooks, scales):
            model, name = _model_and_hook(hook, self.source.model_name)
            own.append(dict(model=model, hook=name, d=self.source.d[hook], scale=float(scale)))
        self.parts = {**getattr(self.source, "parts", {}), self.name: own}
        self.joined_hooks = hooks
        self.hooks = [*self.source.hooks, self.name]
        self.batch_size, self.rank, self.world_size = self.source.batch_size, self.source.rank, self.source.world_size

    @classmethod
    def for_crosscoder(cls, source, sae, **kwargs) -> "JoinedSource":
        """`source` as the crosscoder `sae` reads it: its parts at their recorded scales, under its hook name (and
        a transcoder's joined target, target_parts, under its target_hook)."""
        parts = sae.cfg.parts
        if not parts:
            raise ValueError("this dictionary is not a crosscoder (its config has no parts)")
        opened = open_source(source, batch_size=kwargs.pop("batch_size", 4096), seed=kwargs.pop("seed", 0))
        joined_source = cls(opened, [source_hook(p, opened.hooks) for p in parts], name=sae.cfg.hook_name or None,
                            scales=[p["scale"] for p in parts], **kwargs)
        if not sae.cfg.target_parts:
            return joined_source
        return cls(joined_source, [source_hook(p, opened.hooks) for p in sae.cfg.target_parts],
                   name=sae.cfg.target_hook, scales=[p["scale"] for p in sae.cfg.target_parts], **kwargs)

    @property
    def d(self) -> dict[str, int]:
        return {**self.source.d, self.name: sum(p["d"] for p in self.parts[self.name])}

    @property
    def model_name(self) -> str:
        return self.source.model_name

    def fingerprint(self) -> dict:
        return {**self.source.fingerprint(), "joined": self.parts}

    def _with_joined(self, batch: ActivationBatch) -> ActivationBatch:
        parts = self.parts[self.name]
        return dataclasses.replace(batch, acts={**batch.acts, self.name: joined(parts, batch.acts)})

    def batches(self, start: int = 0) -> Iterator[ActivationBatch]:
        return map(self._with_joined, self.source.batches(start))

    def __iter__(self) -> Iterator[ActivationBatch]:
        return self.batches()

    def in_order(self, hooks: list[str] | None = None) -> Iterator[ActivationBatch]:
        wanted = hooks or self.hooks
        below = [h for h in wanted if h != self.name]
        if self.name in wanted:
            below = list(dict.fromkeys([*below, *self.joined_hooks]))
        for batch in self.source.in_order(below):
            batch = self._with_joined(batch) if self.name in wanted else batch
            yield dataclasses.replace(batch, acts={h: batch.acts[h] for h in wanted})


def _model_and_hook(hook: str, model_name: str) -> tuple[str, str]:
    """(model, hook) of a source's hook; a two-model source's model_name is "<model A>+<model B>" in full."""
    if MODEL_SEPARATOR in hook:
        label, _, name = hook.partition(MODEL_SEPARATOR)
        return next((m for m in model_name.split(SEPARATOR) if model_label(m) == label), label), name
    return model_name, hook
