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

Forwards are batched on tokens, not texts (`plan_batches`): each holds at most the model's `max_batch_tokens`
padded tokens (texts x the longest of them), shortest texts first so little is padding, and each batch is cut to
its longest text, so one long text among short ones costs its own forward instead of padding every text to its
length. Results come back in the order of the texts (`in_call_order`). A text that cannot fit (longer than the
context or the budget) is an error naming it before any forward runs.
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

MAX_BATCH_TOKENS = 4096
"""Default token budget of one forward (`max_batch_tokens`): texts x the longest of them, padding included.
Activations grow with it linearly, eager attention with budget x longest text, logits with budget x vocabulary,
so the worst case is one text of the whole budget, which this default keeps within a 24 GB machine for the built-in
models (their peaks: docs/reliability.md). Longer texts need a larger budget."""


# ---------------------------------------------------------------------------------------------------- tokens
@dataclass
class Tokens:
    """Right-padded token ids [n, L] and which positions hold real tokens (a prefix of each row).

    spans: long [n, L, 2], each token's [start, end) character range in its text ((-1, -1) for BOS and padding),
    when the tokens came from text; it is how analyses find a word's tokens with any tokenizer, and how positions
    of two tokenizers are aligned.
    window: (rows, n_texts, width) of the whole call when these are one batch of it (see `take`): which texts of
    the call these rows are, so a positions spec with one entry per text of the call (a list, a bool mask) is cut
    to this batch's rows and `in_call_order` puts results back.
    """

    ids: Tensor
    mask: Tensor
    bos_id: int | None = None
    spans: Tensor | None = None
    window: tuple[Tensor, int, int] | None = None

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

    def take(self, rows: Tensor) -> "Tokens":
        """Texts `rows` (ascending) as one batch of a call over all of these, cut to the longest of them."""
        width = max(1, int(self.lengths[rows].max()))
        part = Tokens(self.ids[rows, :width], self.mask[rows, :width], self.bos_id,
                      None if self.spans is None else self.spans[rows, :width])
        part.window = (rows, len(self), self.ids.shape[1])
        return part

    @property
    def call(self) -> tuple[Tensor, int, int]:
        """(rows, n_texts, width) of the call these rows belong to (see `window`); themselves when not a batch."""
        return self.window or (torch.arange(len(self)), len(self), self.ids.shape[1])

    def rows_of(self, per_text: Tensor, what: str) -> Tensor:
        """This batch's rows of something given once per text of the whole call ([n_call, ...])."""
        rows, total, _ = self.call
        if len(per_text) != total:
            raise ValueError(f"positions gives {len(per_text)} {what} for {total} texts; give one per text")
        return per_text[rows.to(per_text.device)]

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
    rows, spans = encode(tokenizer, texts, n_ctx, prepend_bos=prepend_bos, truncate=truncate)
    return padded(rows, spans, pad_id(tokenizer), tokenizer.bos_token_id)


def encode(tokenizer, texts: str | Sequence[str], n_ctx: int, *, prepend_bos: bool = True, truncate: bool = False,
           names: Callable[[int], str] | None = None) -> tuple[list[list[int]], list[list[tuple]] | None]:
    """Each text's token ids, BOS first and unpadded, and its character spans (None for a slow tokenizer).

    A text longer than n_ctx is an error naming it by names(i) ("text i"), unless truncate keeps its first n_ctx.
    """
    name = names or _text_name
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise DataError("no texts given: the list is empty")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name(i)} is a {type(text).__name__}, not a str")
    bos = tokenizer.bos_token_id
    head = [bos] if prepend_bos and bos is not None else []
    fast = bool(getattr(tokenizer, "is_fast", False))
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=fast)
    offsets = encoded["offset_mapping"] if fast else [None] * len(texts)
    rows, row_spans = [], []
    for i, (ids, spans) in enumerate(zip(encoded["input_ids"], offsets)):
        if not ids:
            raise DataError(f"{name(i)} is empty (no tokens)")
        row = head + list(ids)
        if len(row) > n_ctx:
            if not truncate:
                raise DataError(f"{name(i)} is {len(row)} tokens long (BOS included), longer than the model's "
                                f"context of {n_ctx}; shorten it or pass truncate=True")
            row = row[:n_ctx]
        rows.append(row)
        if fast:
            row_spans.append(([(-1, -1)] * len(head) + [tuple(s) for s in spans])[: len(row)])
    return rows, row_spans if fast else None


def padded(rows: Sequence[list[int]], spans: Sequence[list[tuple]] | None, pad: int, bos_id: int | None) -> Tokens:
    """Token rows (and their spans) as Tokens right-padded to the longest row."""
    ids = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    all_spans = torch.full((*ids.shape, 2), -1, dtype=torch.long) if spans is not None else None
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = True
        if spans is not None:
            all_spans[i, : len(row)] = torch.tensor(spans[i], dtype=torch.long).reshape(-1, 2)
    return Tokens(ids, mask, bos_id, all_spans)


def _text_name(i: int) -> str:
    return f"text {i}"


# ---------------------------------------------------------------------------------------------------- batches
def plan_batches(lengths: Sequence[int], max_tokens: int, max_texts: int | None = None, *,
                 names: Callable[[int], str] | None = None) -> list[Tensor]:
    """Which texts share each forward: at most `max_tokens` padded tokens (texts x the longest of them) and
    `max_texts` texts (None: no limit) each. Texts go shortest first, so a batch pads little; each batch lists its
    texts (long [b]) in call order, and texts of equal length keep their order (equal lengths: consecutive slices).

    A text longer than `max_tokens` is an error naming it by names(i) ("text i"), before any batch runs.
    """
    check_budget(max_tokens)
    if max_texts is not None and (isinstance(max_texts, bool) or not isinstance(max_texts, int) or max_texts < 1):
        raise ValueError(f"batch_size (texts per forward) must be a whole number of at least 1, got {max_texts!r}")
    lengths = [int(n) for n in lengths]
    too_long = [i for i, n in enumerate(lengths) if n > max_tokens]
    if too_long:
        i = too_long[0]
        more = f" ({len(too_long) - 1} more texts are too)" if len(too_long) > 1 else ""
        raise DataError(f"{(names or _text_name)(i)} is {lengths[i]} tokens long (BOS included), more than one "
                        f"forward may hold (max_batch_tokens {max_tokens}){more}; shorten it, or raise "
                        f"--max-batch-tokens (max_batch_tokens= in Python) if memory allows")
    batches, current = [], []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if current and (len(current) == max_texts or (len(current) + 1) * lengths[i] > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    return [torch.tensor(sorted(batch), dtype=torch.long) for batch in [*batches, current] if batch]


def check_budget(max_tokens: int) -> int:
    """`max_tokens` if it is a whole number of tokens of at least 1 (a token budget), else ValueError."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_batch_tokens must be a whole number of tokens of at least 1, got {max_tokens!r}")
    return max_tokens


def in_call_order(parts: Sequence[tuple[Tokens, Tensor]], positions: Positions = "last") -> Tensor:
    """Per-batch results of `select(x, positions, batch)` back in the order of the call's texts: [n, ...] for one
    position per text, [n, width, ...] for positions=None (each batch's [b, its width, ...]; padding is set to
    zero in place, so the numbers do not depend on how the call was batched), [N, ...] for a mask (each text's
    positions in turn). Batches come from `Interventions.batches`."""
    if not parts:
        raise ValueError("no batches to put in order")
    first_batch, first = parts[0]
    rows, total, width = first_batch.call
    per_position = positions is None
    for batch, value in parts if per_position else []:
        value[~batch.mask.to(value.device)] = 0
    if len(parts) == 1 and len(rows) == total and (not per_position or first.shape[1] == width):
        return first  # one batch of the whole call, in order: nothing to move
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        chunks: dict[int, Tensor] = {}
        for batch, value in parts:
            counts = position_mask(positions, batch).sum(1).tolist()
            chunks.update(zip(batch.call[0].tolist(), value.split(counts)))
        return torch.cat([chunks[i] for i in sorted(chunks)])
    out = first.new_zeros((total, width, *first.shape[2:]) if per_position else (total, *first.shape[1:]))
    for batch, value in parts:
        at = batch.call[0].to(out.device)
        if per_position:
            out[at, : value.shape[1]] = value
        else:
            out[at] = value
    return out


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
        raise ValueError(f"position {int(given[i])} is out of range for text {int(tokens.call[0][i])}, which has "
                         f"{int(lengths[i])} tokens (BOS included)")
    return index


def position_mask(positions: Positions, tokens: Tokens) -> Tensor:
    """bool [n, L]: where a patch acts (see the module docstring for the specs)."""
    n, length = tokens.ids.shape
    if positions is None:
        return tokens.mask
    if isinstance(positions, str) and positions == "mean":
        raise ValueError("positions='mean' is for reading activations; a patch needs positions to act on")
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        _, total, width = tokens.call
        given = positions.expand(total, -1) if positions.ndim == 1 else positions
        if given.ndim != 2 or given.shape[0] != total or given.shape[1] > width and given[:, width:].any():
            raise ValueError(f"a positions mask must be [n_texts={total}, <= {width}], got {tuple(positions.shape)}")
        given = tokens.rows_of(given, "mask rows")[:, :length]
        mask = torch.zeros(n, length, dtype=torch.bool)
        mask[:, : given.shape[1]] = given.cpu()
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
    """Add scale * vector at `hook` (steering along a direction); vector is [d] at that hook. bos=False leaves a
    leading BOS alone when positions is None (steering does: BOS is an attention sink whose norm dwarfs the
    others', and a push there moves every later token through attention)."""

    hook: str
    vector: Tensor
    scale: float = 1.0
    positions: Positions = None
    bos: bool = True

    def _bind(self, model):
        hook = _one_hook(model, self.hook)
        check_positions(self.positions)
        step = finite(_vector(self.vector, model, hook, "Add") * self.scale, f"Add at {hook}: scale={self.scale} x "
                      "the vector")

        def apply(x: Tensor, tokens: Tokens) -> Tensor:
            skip_bos = self.positions is None and not self.bos
            where = (tokens.text_mask if skip_bos else position_mask(self.positions, tokens)).to(x.device).unsqueeze(-1)
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
        self._parts: list[tuple[Tokens, Tensor]] = []

        def apply(x: Tensor, tokens: Tokens) -> None:
            self._parts.append((tokens, select(x.detach(), self.positions, tokens).to("cpu", torch.float32)))

        return hook, apply

    def _collect(self) -> None:
        parts, self._parts = getattr(self, "_parts", []), []
        self.value = in_call_order(parts, self.positions) if parts else None


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

    max_batch_tokens: int = MAX_BATCH_TOKENS
    """Padded tokens one forward may hold (see `plan_batches`): what bounds the memory of every call."""

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

    def batches(self, inputs, *, max_texts: int | None = None, truncate: bool = False,
                names: Callable[[int], str] | None = None) -> list[Tokens]:
        """`inputs` (texts, token ids or Tokens) as the forwards that hold them: at most `max_batch_tokens` padded
        tokens (and `max_texts` texts) each, shortest texts first, each cut to its longest text (see plan_batches).
        Each batch's `window` names its texts in the call; `in_call_order` puts per-batch results back in order.
        Every text is checked first, so one that cannot fit is an error naming it (names(i), else "text i")
        before any forward runs. Texts are padded per batch, never all to the longest."""
        if isinstance(inputs, (Tokens, Tensor)):
            tokens = self.as_tokens(inputs)
            plan = plan_batches(tokens.lengths.tolist(), self.max_batch_tokens, max_texts, names=names)
            return [tokens.take(rows) for rows in plan]
        rows, spans = encode(self.tokenizer, inputs, self.n_ctx, truncate=truncate, names=names)
        plan = plan_batches([len(row) for row in rows], self.max_batch_tokens, max_texts, names=names)
        width, pad, out = max(map(len, rows)), pad_id(self.tokenizer), []
        for chosen in plan:
            picked = chosen.tolist()
            batch = padded([rows[i] for i in picked], None if spans is None else [spans[i] for i in picked], pad,
                           self.bos_token_id)
            batch.window = (chosen, len(rows), width)
            out.append(batch)
        return out

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
                       patches: Sequence[Patch] = (), batch_size: int | None = None, truncate: bool = False,
                       names: Callable[[int], str] | None = None) -> dict[str, Tensor]:
        """{hook: [n_texts, d]} CPU float32 at `positions` ("last", "mean", an int, one int per text), for probes.

        Batched on tokens (see `batches`; batch_size also caps texts per forward); each forward stops after the
        deepest hook; `patches` (and any `patched()` block) apply first. positions=None gives [n, L, d] (zeros at
        padding, see `tokenize(texts).mask`), a bool mask [N, d]. names(i) names text i in errors.
        """
        hooks = self.resolve_hooks(hooks)
        batches = self.batches(inputs, max_texts=batch_size, truncate=truncate, names=names)
        reads = [Read(hook, positions) for hook in hooks]
        self._run(batches, [*patches, *reads], stop_at_layer=self.stop_layer(hooks), logits=False)
        return {read.hook: read.value for read in reads}

    def logits(self, inputs, *, patches: Sequence[Patch] = (), batch_size: int | None = None,
               positions: Positions = None) -> Tensor:
        """Logits (model device and dtype) with the patches active: [n, L, vocab] (zeros at padding), or
        only at `positions` ([n, vocab] for "last", an int or one int per text; [N, vocab] for a mask), which keeps
        a call's memory to those rows instead of every position's vocabulary."""
        check_positions(positions, read=True)
        parts = self._run(self.batches(inputs, max_texts=batch_size), patches,
                          keep=lambda batch, out: select(out, positions, batch))
        return in_call_order(parts, positions)

    def loss(self, inputs, *, patches: Sequence[Patch] = (), batch_size: int | None = None) -> TokenLoss:
        """Next-token cross-entropy per token and its mean, with the patches active; padding is never a target."""
        batches = self.batches(inputs, max_texts=batch_size)
        width = batches[0].call[2]
        if width < 2:
            raise DataError("loss needs texts of at least 2 tokens (BOS included): nothing is predicted")

        def per_token(batch: Tokens, logits: Tensor) -> Tensor:  # [b, L]: position t predicts t + 1, the last nothing
            logp = logits[:, :-1].float().log_softmax(-1)
            targets = batch.ids[:, 1:].to(logp.device)
            nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
            return torch.nn.functional.pad(nll, (0, 1))

        nll = in_call_order(self._run(batches, patches, keep=per_token), None)[:, :-1]
        lengths = in_call_order([(batch, batch.lengths) for batch in batches])
        mask = torch.arange(1, width) < lengths.unsqueeze(1)  # prediction t is real when its target t + 1 is
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
        plan_batches((lengths + n_new).tolist(), self.max_batch_tokens)  # the last step fits too: refuse it now
        ids = torch.full((n, tokens.ids.shape[1] + n_new), pad_id(self.tokenizer), dtype=torch.long)
        ids[:, : tokens.ids.shape[1]] = tokens.ids
        rows = torch.arange(n)
        bound = self._bind_all(patches)
        for step in range(n_new):
            width = int(lengths.max())
            current = Tokens(ids[:, :width], torch.arange(width) < lengths.unsqueeze(1), tokens.bos_id)
            parts = self._run(self.batches(current), bound=bound, keep=lambda batch, out: select(out, "last", batch))
            ids[rows, lengths] = in_call_order(parts).argmax(-1).cpu()
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
    def _run(self, batches: Sequence[Tokens], patches: Sequence[Patch] = (), *, bound: list | None = None,
             stop_at_layer: int | None = None, logits: bool = True,
             keep: Callable[[Tokens, Any], Any] | None = None, extra_hooks: Sequence = ()) -> list:
        """Forward each of `batches` (from `batches`) with the patches (bound=[]: none, not even a block's) and
        `extra_hooks` (raw TransformerLens hooks, after the patches); returns (batch, keep(batch, logits)) per batch,
        for `in_call_order`; Reads collect in call order. Only what `keep` returns outlives its forward."""
        bound = self._bind_all(patches) if bound is None else bound
        reads = [p for p, _, _ in bound if isinstance(p, Read)]
        for read in reads:
            read._parts = []
        kept = []
        for batch in batches:
            hooks = [(hook, _hook_fn(hook, apply, batch)) for _, hook, apply in bound] + list(extra_hooks)
            out = self.bridge.run_with_hooks(batch.ids.to(self.device), fwd_hooks=hooks, stop_at_layer=stop_at_layer,
                                             return_type="logits" if logits else None)
            if keep is not None:
                kept.append((batch, keep(batch, out)))
            del out  # before the next forward allocates its own
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


__all__ = ["Add", "Generation", "Interventions", "MAX_BATCH_TOKENS", "Patch", "Positions", "Read", "Replace", "Splice",
           "TokenLoss", "Tokens", "check_budget", "encode", "in_call_order", "padded", "plan_batches", "position_index",
           "position_mask", "select", "tokenize"]
