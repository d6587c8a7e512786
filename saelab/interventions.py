"""Interventions on a LanguageModel: activations at chosen positions, patched forwards, loss, greedy generation.

    acts = model.activations_at(texts, "blocks.9.hook_resid_post", positions="mean")  # {hook: [n, 576]}, CPU fp32
    with model.patched(Add("blocks.9.hook_resid_post", direction, scale=8.0)):         # steering, while it lasts
        model.generate("Tomorrow is", 10).texts
    model.loss(texts, patches=[Splice(sae, error_term=True, clamp={123: 20.0})]).mean

Probes, circles, explore and steering all need these, so they live here once instead of in each analysis.

Texts are tokenised the way the activation cache packs them (BOS prepended, no other special tokens), so a probe
or a steering vector sees the activations an SAE was trained on, and right-padded: under causal attention no real
token ever attends to the padding to its right, so a padded batch gives exactly the numbers of each text alone and
needs no attention mask. Every method also takes token ids [n, L] (all real) or a `Tokens` (ids + real-token mask).

Positions (`positions=`), one spec for all texts:
    None            every real token, BOS included, padding excluded (a Splice leaves BOS alone unless bos=True)
    int             one token per text; negative counts from the end of that text's real tokens (-1 = last)
    "last"          the last real token
    [i0, i1, ...]   one index per text
    bool [n, L]     a mask per text (shorter than the sequence: the rest is False)
    "mean"          (reads only) the mean over real tokens, without a leading BOS and padding
Patches at one hook apply in the order given (a Read after an Add sees the sum); patches from `patched()` blocks
apply before those passed as `patches=`. Heads x d_head hooks are flattened, so vectors there are [n_heads*d_head].
Forwards run without gradients.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, Union

import torch
from torch import Tensor

from saelab.errors import DataError, HookError

if TYPE_CHECKING:
    from saelab.sae import SAE

Positions = Union[None, int, str, Sequence[int], Tensor]


# ---------------------------------------------------------------------------------------------------- tokens
@dataclass
class Tokens:
    """Right-padded token ids [n, L] and which positions hold real tokens (a prefix of each row).

    spans: long [n, L, 2], each token's [start, end) character range in its text ((-1, -1) for BOS and padding),
    when the tokens came from text; it is how analyses find a word's tokens with any tokenizer, and how positions
    of two tokenizers are aligned.
    window: (first text, number of texts) of the whole call when these are one batch of it, so a positions spec
    with one entry per text of the call (a list, a bool mask) is cut to this batch's rows.
    """

    ids: Tensor
    mask: Tensor
    bos_id: int | None = None
    spans: Tensor | None = None
    window: tuple[int, int] | None = None

    def __post_init__(self):
        if self.ids.shape != self.mask.shape or self.ids.ndim != 2:
            raise ValueError(f"Tokens needs ids and mask of one shape [n, L], got {tuple(self.ids.shape)} and "
                             f"{tuple(self.mask.shape)}")
        if self.ids.is_floating_point():
            raise ValueError(f"token ids must be integers, got {self.ids.dtype}")
        self.mask = self.mask.bool()
        if self.mask.shape[1] > 1 and bool((self.mask[:, 1:] & ~self.mask[:, :-1]).any()):
            raise ValueError("Tokens.mask must mark a prefix of each row (right padding)")
        if self.spans is not None and self.spans.shape != (*self.ids.shape, 2):
            raise ValueError(f"Tokens.spans must be [n, L, 2] for ids {tuple(self.ids.shape)}, got "
                             f"{tuple(self.spans.shape)}")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, rows: slice) -> "Tokens":
        return Tokens(self.ids[rows], self.mask[rows], self.bos_id,
                      None if self.spans is None else self.spans[rows])

    def batch(self, start: int, size: int) -> "Tokens":
        """Texts [start, start + size) as one batch of a call over all of these (see `window`)."""
        part = self[start : start + size]
        part.window = (start, len(self))
        return part

    def rows_of(self, per_text: Tensor, what: str) -> Tensor:
        """This batch's rows of something given once per text of the whole call ([n_call, ...])."""
        first, total = self.window or (0, len(self))
        if len(per_text) != total:
            raise ValueError(f"positions gives {len(per_text)} {what} for {total} texts; give one per text")
        return per_text[first : first + len(self)]

    @property
    def lengths(self) -> Tensor:
        """Real tokens per text [n], BOS included."""
        return self.mask.sum(1)

    @property
    def text_mask(self) -> Tensor:
        """Real tokens minus a leading BOS: what SAEs are trained on and what "mean" averages."""
        keep = self.mask.clone()
        if self.bos_id is not None:
            keep[:, 0] &= self.ids[:, 0] != self.bos_id
        return keep

    def covering(self, row: int, start: int, end: int) -> Tensor:
        """Positions (long, ascending) of the tokens of text `row` that overlap its characters [start, end)."""
        if self.spans is None:
            raise DataError("these Tokens carry no character spans (they were not made from text by tokenize)")
        if not 0 <= start < end:
            raise ValueError(f"a character range needs 0 <= start < end, got [{start}, {end})")
        s = self.spans[row]
        return ((s[:, 0] < end) & (s[:, 1] > start) & self.mask[row]).nonzero().squeeze(1)


def tokenize(tokenizer, texts: str | Sequence[str], n_ctx: int, *, prepend_bos: bool = True,
             truncate: bool = False) -> Tokens:
    """Texts -> right-padded Tokens, BOS first as in the activation cache; too long: an error naming the text.

    Character spans come from the tokenizer's offsets (fast tokenizers); a slow tokenizer gives Tokens without.
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise DataError("no texts given: the list is empty")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {i} is a {type(text).__name__}, not a str")
    bos = tokenizer.bos_token_id
    head = [bos] if prepend_bos and bos is not None else []
    fast = bool(getattr(tokenizer, "is_fast", False))
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=fast)
    offsets = encoded["offset_mapping"] if fast else [None] * len(texts)
    rows, row_spans = [], []
    for i, (ids, spans) in enumerate(zip(encoded["input_ids"], offsets)):
        if not ids:
            raise DataError(f"text {i} is empty (no tokens)")
        row = head + list(ids)
        if len(row) > n_ctx:
            if not truncate:
                raise DataError(f"text {i} is {len(row)} tokens long (BOS included), longer than the model's "
                                f"context of {n_ctx}; shorten it or pass truncate=True")
            row = row[:n_ctx]
        rows.append(row)
        if fast:
            row_spans.append(([(-1, -1)] * len(head) + [tuple(s) for s in spans])[: len(row)])
    ids = torch.full((len(rows), max(map(len, rows))), pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    spans = torch.full((*ids.shape, 2), -1, dtype=torch.long) if fast else None
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = True
        if fast:
            spans[i, : len(row)] = torch.tensor(row_spans[i], dtype=torch.long)
    return Tokens(ids, mask, bos, spans)


def pad_id(tokenizer) -> int:
    """The id right padding uses (the pad token, else EOS, else 0); causal attention never reads it."""
    return next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)


# ---------------------------------------------------------------------------------------------------- positions
def check_positions(positions: Positions, read: bool = False) -> None:
    """Refuse a positions spec that is none of the kinds above, before any forward runs."""
    if isinstance(positions, str) and positions == "mean" and not read:
        raise ValueError("positions='mean' is for reading activations; a patch needs positions to act on")
    ok = (positions is None or (isinstance(positions, str) and positions in ("last", "mean"))
          or (isinstance(positions, int) and not isinstance(positions, bool))
          or (isinstance(positions, (list, tuple)) and all(isinstance(i, int) for i in positions))
          or (isinstance(positions, Tensor) and not positions.is_floating_point()))
    if not ok:
        raise TypeError(f"positions must be None, an int, 'last', 'mean' (reads only), one int per text or a bool "
                        f"mask [n, L]; got {positions!r}")


def position_index(positions: Positions, tokens: Tokens) -> Tensor:
    """long [n]: one position per text from an int, "last" or a list of ints; out of range is an error."""
    n, lengths = len(tokens), tokens.lengths
    if isinstance(positions, str) and positions == "last":
        return lengths - 1
    if isinstance(positions, int) and not isinstance(positions, bool):
        given = torch.full((n,), positions, dtype=torch.long)
    elif isinstance(positions, (list, tuple, Tensor)) and not (isinstance(positions, Tensor) and
                                                                (positions.dtype == torch.bool or
                                                                 positions.is_floating_point())):
        given = tokens.rows_of(torch.as_tensor(positions, dtype=torch.long).reshape(-1), "indices")
    else:
        raise TypeError(f"positions must be None, an int, 'last', 'mean' (reads only), one int per text or a bool "
                        f"mask [n, L]; got {positions!r}")
    index = torch.where(given < 0, given + lengths, given)
    bad = ((index < 0) | (index >= lengths)).nonzero()
    if len(bad):
        i = int(bad[0])
        first = tokens.window[0] if tokens.window else 0
        raise ValueError(f"position {int(given[i])} is out of range for text {first + i}, which has {int(lengths[i])} "
                         f"tokens (BOS included)")
    return index


def position_mask(positions: Positions, tokens: Tokens) -> Tensor:
    """bool [n, L]: where a patch acts (see the module docstring for the specs)."""
    n, length = tokens.ids.shape
    if positions is None:
        return tokens.mask
    if isinstance(positions, str) and positions == "mean":
        raise ValueError("positions='mean' is for reading activations; a patch needs positions to act on")
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        total = tokens.window[1] if tokens.window else n
        given = positions.expand(total, -1) if positions.ndim == 1 else positions
        if given.ndim != 2 or given.shape[0] != total or given.shape[1] > length and given[:, length:].any():
            raise ValueError(f"a positions mask must be [n_texts={total}, <= {length}], got {tuple(positions.shape)}")
        given = tokens.rows_of(given, "mask rows")
        mask = torch.zeros(n, length, dtype=torch.bool)
        mask[:, : given.shape[1]] = given[:, :length].cpu()
        return mask & tokens.mask
    mask = torch.zeros(n, length, dtype=torch.bool)
    mask[torch.arange(n), position_index(positions, tokens)] = True
    return mask


def select(x: Tensor, positions: Positions, tokens: Tokens) -> Tensor:
    """Activations [n, L, d] at `positions`: [n, d] for an index or "mean", [N, d] for a mask, x itself for None."""
    if positions is None:
        return x
    if isinstance(positions, str) and positions == "mean":
        keep = tokens.text_mask.to(x.device)
        counts = keep.sum(1)
        if bool((counts == 0).any()):
            i = int((counts == 0).nonzero()[0])
            raise ValueError(f"text {i} has no tokens besides BOS to average over")
        return torch.where(keep.unsqueeze(-1), x, 0).sum(1) / counts.unsqueeze(-1).to(x.dtype)
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        return x[position_mask(positions, tokens).to(x.device)]
    return x[torch.arange(len(x), device=x.device), position_index(positions, tokens).to(x.device)]


# ---------------------------------------------------------------------------------------------------- patches
def _one_hook(model, name: str) -> str:
    found = model.resolve_hooks(name)  # unknown names: HookError with suggestions
    if len(found) != 1:
        raise HookError(f"hook {name!r} matches {len(found)} hook points ({', '.join(found[:5])}); name exactly one")
    return found[0]


def _vector(value: Tensor, model, hook: str, kind: str) -> Tensor:
    value = torch.as_tensor(value)
    d = model.hook_dim(hook)
    if value.ndim != 1 or value.shape[0] != d:
        got = value.shape[-1] if value.ndim == 1 else tuple(value.shape)
        raise ValueError(f"{kind}: expects d={d} at {hook}, got {got}")
    return finite(value.detach(), f"{kind} at {hook}: the vector")


def finite(value: Tensor, what: str) -> Tensor:
    """`value`, if it holds no NaN or infinity: one non-finite number in a patch makes every later position's
    logits NaN, and each metric computed from them NaN, without an error."""
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{what} holds NaN or infinite values; a patch must be finite (check how it was computed, "
                         "e.g. a direction normalised by a zero norm)")
    return value


@dataclass(eq=False)
class Add:
    """Add scale * vector at `hook` (steering along a direction); vector is [d] at that hook."""

    hook: str
    vector: Tensor
    scale: float = 1.0
    positions: Positions = None

    def _bind(self, model):
        hook = _one_hook(model, self.hook)
        check_positions(self.positions)
        step = finite(_vector(self.vector, model, hook, "Add") * self.scale, f"Add at {hook}: scale={self.scale} x "
                      "the vector")

        def apply(x: Tensor, tokens: Tokens) -> Tensor:
            where = position_mask(self.positions, tokens).to(x.device).unsqueeze(-1)
            return torch.where(where, x + step.to(x.device, x.dtype), x)

        return hook, apply


@dataclass(eq=False)
class Replace:
    """Replace the activation at `hook` by a fixed vector [d], or by fn(x) for x [n, L, d] (ablations, splices)."""

    hook: str
    value: Tensor | Callable[[Tensor], Tensor]
    positions: Positions = None

    def _bind(self, model):
        hook = _one_hook(model, self.hook)
        check_positions(self.positions)
        fixed = None if callable(self.value) else _vector(self.value, model, hook, "Replace")

        def apply(x: Tensor, tokens: Tokens) -> Tensor:
            where = position_mask(self.positions, tokens).to(x.device).unsqueeze(-1)
            if fixed is not None:
                new = fixed.to(x.device, x.dtype).expand_as(x)
            else:
                new = self.value(x)
                if not isinstance(new, Tensor) or new.shape != x.shape:
                    shape = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
                    raise ValueError(f"Replace at {hook}: the function must return {tuple(x.shape)}, got {shape}")
                finite(new[where.squeeze(-1)], f"Replace at {hook}: the function's value")
            return torch.where(where, new.to(x.dtype), x)

        return hook, apply


@dataclass(eq=False)
class Read:
    """Record the activation at `hook` (after earlier patches there) into `.value`, CPU float32.

    `.value` is [n, d] for an index, "last" or "mean", [N, d] for a mask, [n, L, d] for None; it holds the latest
    call (for generate: its last step, i.e. the prompt and every generated token but the final one).
    """

    hook: str
    positions: Positions = None
    value: Tensor | None = field(default=None, init=False, repr=False)

    def _bind(self, model):
        hook = _one_hook(model, self.hook)
        check_positions(self.positions, read=True)
        self._parts: list[Tensor] = []

        def apply(x: Tensor, tokens: Tokens) -> None:
            self._parts.append(select(x.detach(), self.positions, tokens).to("cpu", torch.float32))

        return hook, apply

    def _collect(self) -> None:
        parts, self._parts = getattr(self, "_parts", []), []
        self.value = torch.cat(parts) if parts else None


@dataclass(eq=False)
class Splice:
    """Run the activation at the SAE's hook through the SAE, optionally clamping latents to values.

    error_term=False: the reconstruction replaces the activation (what eval's ce_sae measures).
    error_term=True: sae(x) + (x - sae(x)).detach(), i.e. the clean activation, with the latents there to edit:
    clamping latent i to v then moves the activation by exactly (v - code_i) * W_dec[i].
    Codes and clamp values are in the model's raw units (an SAE's input_scale is folded in). A leading BOS is left
    alone unless bos=True, as in eval (SAEs are trained without it); explicit `positions` decide for themselves.
    """

    sae: "SAE"
    hook: str | None = None
    error_term: bool = False
    clamp: dict[int, float] = field(default_factory=dict)
    positions: Positions = None
    bos: bool = False

    def _bind(self, model):
        name = self.hook or self.sae.cfg.hook_name
        if not name:
            raise ValueError("Splice: the SAE's cfg.hook_name is empty; pass hook= (the hook point it reads)")
        hook = _one_hook(model, name)
        self.sae.check_hook(hook)
        check_positions(self.positions)
        d = model.hook_dim(hook)
        if self.sae.cfg.d_in != d:
            trained = f" (it was trained on {self.sae.cfg.hook_name})" if self.sae.cfg.hook_name != hook else ""
            raise ValueError(f"Splice: expects d={d} at {hook}, got an SAE with d_in={self.sae.cfg.d_in}{trained}")
        bad = [i for i in self.clamp if not 0 <= int(i) < self.sae.cfg.width]
        if bad:
            raise ValueError(f"Splice: clamped latent {bad[0]} is out of range for an SAE of width {self.sae.cfg.width}")
        sae = (self.sae.fold_input_scale() if self.sae.cfg.input_scale != 1 else self.sae).eval()
        latents = torch.tensor([int(i) for i in self.clamp], dtype=torch.long, device=sae.device)
        values = finite(torch.tensor(list(self.clamp.values()), dtype=sae.dtype, device=sae.device),
                        f"Splice at {hook}: clamp {self.clamp}")

        def apply(x: Tensor, tokens: Tokens) -> Tensor:
            where = position_mask(self.positions, tokens) if self.positions is not None else (
                tokens.mask if self.bos else tokens.text_mask)
            where = where.to(x.device)
            rows = x[where].to(sae.device)
            codes = sae.encode(rows)
            x_hat = sae.decode(codes)
            out = x_hat
            if len(latents):
                out = sae.decode(codes.index_copy(-1, latents, values.expand(len(codes), -1)))
            if self.error_term:
                out = out + (rows - x_hat).detach()
            new = x.clone()
            new[where] = out.to(x.device, x.dtype)
            return new

        return hook, apply


Patch = Union[Add, Replace, Read, Splice]


# ---------------------------------------------------------------------------------------------------- results
@dataclass
class TokenLoss:
    """Next-token cross-entropy: per_token[i, t] is the loss of predicting token t+1 of text i (0 where masked)."""

    per_token: Tensor
    """float32 [n, L-1] on CPU."""
    mask: Tensor
    """bool [n, L-1]: predictions whose target is a real token (padding is never a target)."""
    mean: float
    """Mean over every unmasked prediction of every text."""


@dataclass
class Generation:
    """What greedy generation produced."""

    texts: list[str]
    """The continuation of each prompt (new tokens only), decoded."""
    new_ids: Tensor
    """long [n, n_new]: the generated tokens."""
    tokens: Tokens
    """Prompt + continuation of every text, right-padded."""


# ---------------------------------------------------------------------------------------------------- the mixin
class Interventions:
    """LanguageModel's intervention methods (mixed into LanguageModel; see the module docstring)."""

    def tokenize(self, texts: str | Sequence[str], *, prepend_bos: bool = True, truncate: bool = False) -> Tokens:
        """Texts -> right-padded Tokens with BOS first, as the activation cache packs text; too long: an error
        naming the text, unless truncate=True keeps the first n_ctx tokens."""
        return tokenize(self.tokenizer, texts, self.n_ctx, prepend_bos=prepend_bos, truncate=truncate)

    def as_tokens(self, inputs, *, truncate: bool = False) -> Tokens:
        """Tokens from texts, token ids [n, L] / [L] (all real), or Tokens; checked against the context length."""
        if isinstance(inputs, Tokens):
            tokens = inputs
        elif isinstance(inputs, Tensor):
            ids = inputs.unsqueeze(0) if inputs.ndim == 1 else inputs
            if ids.ndim != 2 or ids.is_floating_point():
                raise ValueError(f"token ids must be integers [n, L], got {ids.dtype} {tuple(inputs.shape)}")
            tokens = Tokens(ids.long(), torch.ones(ids.shape, dtype=torch.bool), self.bos_token_id)
        else:
            return self.tokenize(inputs, truncate=truncate)
        if tokens.ids.numel() == 0:
            raise DataError(f"no tokens given: ids of shape {tuple(tokens.ids.shape)}")
        if tokens.ids.shape[1] > self.n_ctx:
            raise DataError(f"context of {tokens.ids.shape[1]} tokens is longer than {self.name} allows ({self.n_ctx})")
        return tokens

    @contextlib.contextmanager
    def patched(self, *patches: Patch) -> Iterator[dict[str, Tensor]]:
        """Apply `patches` to every forward of this model inside the block (nested blocks stack).

        Yields a dict that, after each call, maps the hook of every Read in the block to its `.value`.
        """
        bound = [(p, *p._bind(self)) for p in patches]  # validate now, not at the first forward
        reads: dict[str, Tensor] = {}
        frame = (bound, reads)
        self._patch_frames().append(frame)
        try:
            yield reads
        finally:
            self._patch_frames().remove(frame)

    def activations_at(self, inputs, hooks: str | list[str], positions: Positions = "last", *,
                       patches: Sequence[Patch] = (), batch_size: int = 32,
                       truncate: bool = False) -> dict[str, Tensor]:
        """{hook: [n_texts, d]} CPU float32 at `positions` ("last", "mean", an int, one int per text), for probes.

        Batched; each forward stops after the deepest hook; `patches` (and any `patched()` block) apply first.
        positions=None gives [n, L, d] (padding included, see `tokenize(texts).mask`), a bool mask [N, d].
        """
        hooks = self.resolve_hooks(hooks)
        tokens = self.as_tokens(inputs, truncate=truncate)
        reads = [Read(hook, positions) for hook in hooks]
        self._run(tokens, [*patches, *reads], batch_size=batch_size, stop_at_layer=self.stop_layer(hooks),
                  logits=False)
        return {read.hook: read.value for read in reads}

    def logits(self, inputs, *, patches: Sequence[Patch] = (), batch_size: int | None = None) -> Tensor:
        """Logits [n, L, vocab] (model device and dtype) with the patches active."""
        tokens = self.as_tokens(inputs)
        return torch.cat(self._run(tokens, patches, batch_size=batch_size, keep=lambda batch, out: out))

    def loss(self, inputs, *, patches: Sequence[Patch] = (), batch_size: int | None = None) -> TokenLoss:
        """Next-token cross-entropy per token and its mean, with the patches active; padding is never a target."""
        tokens = self.as_tokens(inputs)
        if tokens.ids.shape[1] < 2:
            raise DataError("loss needs texts of at least 2 tokens (BOS included): nothing is predicted")

        def per_token(batch: Tokens, logits: Tensor) -> Tensor:
            logp = logits[:, :-1].float().log_softmax(-1)
            targets = batch.ids[:, 1:].to(logp.device)
            return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()

        nll = torch.cat(self._run(tokens, patches, batch_size=batch_size, keep=per_token))
        mask = tokens.mask[:, 1:]
        nll = torch.where(mask, nll, 0.0)
        return TokenLoss(per_token=nll, mask=mask, mean=float(nll.double().sum() / mask.sum().clamp_min(1)))

    def generate(self, inputs, n_new: int, *, patches: Sequence[Patch] = ()) -> Generation:
        """Greedy decoding of `n_new` tokens per text, the patches active at every step and every position
        (positions specs are re-read each step, so -1 / "last" follow the newest token)."""
        tokens = self.as_tokens(inputs)
        n, lengths = len(tokens), tokens.lengths.clone()
        if n_new < 1:
            raise ValueError(f"n_new must be at least 1, got {n_new}")
        longest = int(lengths.argmax())
        if int(lengths[longest]) + n_new > self.n_ctx:
            raise DataError(f"text {longest} has {int(lengths[longest])} tokens; with {n_new} new ones it would be "
                            f"longer than the model's context of {self.n_ctx}")
        ids = torch.full((n, tokens.ids.shape[1] + n_new), pad_id(self.tokenizer), dtype=torch.long)
        ids[:, : tokens.ids.shape[1]] = tokens.ids
        rows = torch.arange(n)
        bound = self._bind_all(patches)
        for step in range(n_new):
            width = int(lengths.max())
            current = Tokens(ids[:, :width], torch.arange(width) < lengths.unsqueeze(1), tokens.bos_id)
            (logits,) = self._run(current, bound=bound, keep=lambda batch, out: out[rows, lengths - 1].cpu())
            ids[rows, lengths] = logits.argmax(-1)
            lengths += 1
        width = int(lengths.max())
        full = Tokens(ids[:, :width], torch.arange(width) < lengths.unsqueeze(1), tokens.bos_id)
        new_ids = ids[rows.unsqueeze(1), (lengths - n_new).unsqueeze(1) + torch.arange(n_new)]
        return Generation([self.tokenizer.decode(row) for row in new_ids.tolist()], new_ids, full)

    # -------------------------------------------------------------------------------------------- machinery
    def _patch_frames(self) -> list:
        if not hasattr(self, "_frames"):
            self._frames: list = []
        return self._frames

    def _bind_all(self, patches: Sequence[Patch]) -> list:
        """Context patches (outer block first), then `patches`, each as (patch, hook, apply)."""
        if isinstance(patches, (Add, Replace, Read, Splice)):
            patches = [patches]
        return [b for bound, _ in self._patch_frames() for b in bound] + [(p, *p._bind(self)) for p in patches]

    @torch.no_grad()
    def _run(self, tokens: Tokens, patches: Sequence[Patch] = (), *, bound: list | None = None,
             batch_size: int | None = None, stop_at_layer: int | None = None, logits: bool = True,
             keep: Callable[[Tokens, Any], Any] | None = None, extra_hooks: Sequence = ()) -> list:
        """Forward `tokens` in batches with the patches (bound=[]: none, not even a block's) and `extra_hooks`
        (raw TransformerLens hooks, after the patches); returns keep(batch, logits) per batch; Reads collect."""
        bound = self._bind_all(patches) if bound is None else bound
        reads = [p for p, _, _ in bound if isinstance(p, Read)]
        for read in reads:
            read._parts = []
        kept = []
        step = batch_size or len(tokens)
        for start in range(0, len(tokens), step):
            batch = tokens.batch(start, step)
            hooks = [(hook, _hook_fn(hook, apply, batch)) for _, hook, apply in bound] + list(extra_hooks)
            out = self.bridge.run_with_hooks(batch.ids.to(self.device), fwd_hooks=hooks, stop_at_layer=stop_at_layer,
                                             return_type="logits" if logits else None)
            if keep is not None:
                kept.append(keep(batch, out))
        for read in reads:
            read._collect()
        for frame_bound, frame_reads in self._patch_frames():
            frame_reads.update({hook: p.value for p, hook, _ in frame_bound if isinstance(p, Read)})
        return kept


def _hook_fn(name: str, apply: Callable[[Tensor, Tokens], Tensor | None], tokens: Tokens):
    """A TransformerLens forward hook: apply(x [n, L, d] with heads flattened, tokens) -> new x, or None to read."""

    def fn(activation, hook=None):  # TransformerLens passes the HookPoint as the keyword `hook`
        if not isinstance(activation, Tensor) or activation.ndim < 3:
            raise HookError(f"hook {name} does not give a [batch, pos, ...] tensor; it cannot be patched")
        new = apply(activation.flatten(2), tokens)
        return activation if new is None else new.reshape(activation.shape)

    return fn


__all__ = ["Add", "Generation", "Interventions", "Patch", "Positions", "Read", "Replace", "Splice", "TokenLoss",
           "Tokens", "position_index", "position_mask", "select", "tokenize"]
