"""Aligned features of two models over the same text: row i of side A and row i of side B come from the same
character position, even when the two models tokenise differently.

Streaming from the models (any two tokenizers): each document is tokenised by both; a position is kept when a
token of A and a token of B end at the same character (mode "end"), or, stricter, at the end of a word or
punctuation mark (mode "word": the last token of each word). Both models have then read exactly the same prefix of
the text. BOS and padding never enter (their spans are (-1, -1)); when several tokens end at one character (byte
fallback inside a character) the last one counts. Documents longer than a model's context are cut, and only
characters both models read are aligned.

From two caches (`aligned_cache_chunks`): a cache stores token ids, not character offsets, so two caches align
only position by position, which is right only for the same text packed by the same tokenizer (two SAEs of one
model, or two models that share a tokenizer). That is checked (text fingerprint, context length, token ids at
every row); caches of models with different tokenizers are refused: stream from the models instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor

from saelab.activations.joined import hooks_read, input_of
from saelab.activations.manifest import Manifest
from saelab.analysis.correlation import Features
from saelab.codes import Codes, encode_sparse, iter_codes
from saelab.errors import DataError

WORD = re.compile(r"\w+|[^\w\s]")
"""A word (letters, digits, underscore) or a single punctuation mark."""
MODES = ("word", "end")


@dataclass
class Side:
    """One side of a comparison: a model, a hook, and an SAE reading it (None: the hook's own units, e.g. MLP
    neurons, as dense features)."""

    model: object
    hook: str
    sae: object | None = None
    label: str = ""

    def __post_init__(self):
        if self.sae is not None and self.sae.cfg.is_crosscoder:  # it reads its parts' hooks, joined
            self.hook = self.hook or self.sae.cfg.hook_name
            d = sum(self.model.hook_dim(self.model.resolve_hooks(hook)[0]) for hook in self.reads)
        else:
            self.hook = self.model.resolve_hooks(self.hook)[0]
            d = self.model.hook_dim(self.hook)
        if self.sae is not None:
            self.sae.check_hook(self.hook)
            if self.sae.cfg.d_in != d:
                raise ValueError(f"SAE expects d_in={self.sae.cfg.d_in} but hook {self.hook} of {self.model.name} "
                                 f"gives {d}")
            trained_on = getattr(self.sae.cfg, "model_name", "")
            if trained_on and trained_on != self.model.name:
                raise ValueError(f"the SAE was trained on {trained_on!r} activations, not {self.model.name!r}'s")
            if self.sae.cfg.input_scale != 1:
                self.sae = self.sae.fold_input_scale()
            self.sae = self.sae.eval()
        if not self.label:
            kind = f"sae{self.sae.cfg.width}" if self.sae is not None else "units"
            self.label = f"{self.model.name}:{self.hook}:{kind}"

    @property
    def width(self) -> int:
        return self.sae.cfg.width if self.sae is not None else self.model.hook_dim(self.hook)

    @property
    def reads(self) -> list[str]:
        """The model's hooks this side needs: a crosscoder's parts, else its hook."""
        return hooks_read(self.sae, self.hook)

    def read(self, acts: dict[str, Tensor]) -> Tensor:
        """This side's input from the activations at `reads`."""
        return input_of(self.sae, self.hook, acts)

    def features(self, acts: Tensor) -> Features:
        """Activations [n, d] at this side's hook -> sparse codes (SAE) or the activations themselves."""
        if self.sae is None:
            return acts.float()
        with torch.no_grad():
            crow, latents, values = encode_sparse(self.sae, acts.to(self.sae.device, self.sae.dtype))
        n = len(acts)
        zeros = torch.zeros(n, dtype=torch.long)
        return Codes(crow.cpu(), latents.cpu(), values.float().cpu(), self.sae.cfg.width, zeros, torch.arange(n),
                     zeros, zeros)


@dataclass
class AlignedChunk:
    """Features of both sides at the same aligned positions of a batch of documents."""

    a: dict[str, Features]
    """side label -> features [n, width] of side A (row order = aligned positions)."""
    b: dict[str, Features]
    token_a: Tensor
    """A's token id at each aligned row."""
    token_b: Tensor
    document: Tensor
    """Index of the document of each row."""
    char_end: Tensor
    """Character where the aligned tokens end (exclusive) in their document."""
    words: list[str] = field(default_factory=list)
    """The word (or punctuation mark, or token text) ending at each row."""

    def __len__(self) -> int:
        return len(self.token_a)


def word_ends(text: str) -> set[int]:
    """Character offsets (exclusive) where a word or punctuation mark ends."""
    return {m.end() for m in WORD.finditer(text)}


def word_at(text: str, end: int) -> str:
    """The word (run of word characters) or punctuation mark that ends at `end`: what a reader sees at a row."""
    if end <= 0:
        return ""
    if not _WORD_CHAR.match(text[end - 1]):
        return text[end - 1:end]
    start = end - 1
    while start > 0 and _WORD_CHAR.match(text[start - 1]):
        start -= 1
    return text[start:end]


_WORD_CHAR = re.compile(r"\w")


def align_positions(spans_a: Tensor, spans_b: Tensor, text: str, mode: str = "word") -> tuple[Tensor, Tensor, Tensor]:
    """Positions of A and of B whose tokens end at the same character of `text` (ascending), and that character.

    spans: long [L, 2] character [start, end) of each position, (-1, -1) for BOS and padding.
    """
    if mode not in MODES:
        raise ValueError(f"alignment mode must be one of {MODES}, got {mode!r}")
    last_a = _last_position_per_end(spans_a)
    last_b = _last_position_per_end(spans_b)
    common = sorted(set(last_a) & set(last_b))
    if mode == "word":
        ends = word_ends(text)
        common = [e for e in common if e in ends]
    return (torch.tensor([last_a[e] for e in common], dtype=torch.long),
            torch.tensor([last_b[e] for e in common], dtype=torch.long), torch.tensor(common, dtype=torch.long))


def _last_position_per_end(spans: Tensor) -> dict[int, int]:
    out: dict[int, int] = {}
    for position, (start, end) in enumerate(spans.tolist()):
        if start >= 0 and end > start:
            out[end] = position
    return out


def documents_from_text(text: str, *, max_words: int = 80, min_words: int = 8) -> list[str]:
    """Cut text into documents of whole lines (paragraphs), each at most ~max_words words (long paragraphs are cut
    at sentence ends), so each fits both models' contexts; lines with fewer than min_words words are skipped."""
    out: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if len(line.split()) < min_words:
            continue
        current: list[str] = []
        for sentence in re.split(r"(?<=[.!?])\s+", line):
            if current and len(" ".join(current + [sentence]).split()) > max_words:
                out.append(" ".join(current))
                current = []
            current.append(" ".join(sentence.split()[:max_words]))
        if current:
            out.append(" ".join(current))
    return out


def read_documents(source: str | Path | Sequence[str], *, start_char: int = 0, max_words: int = 80) -> list[str]:
    """Documents from a text file (from character start_char on) or a list of strings (kept as they are)."""
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and len(source) < 4096
                                    and Path(source).is_file()):
        text = Path(source).read_text(encoding="utf-8")[start_char:]
        return documents_from_text(text, max_words=max_words)
    if isinstance(source, str):
        return documents_from_text(source[start_char:], max_words=max_words)
    return list(source)


def aligned_chunks(sides_a: Sequence[Side], sides_b: Sequence[Side], documents: Sequence[str], *,
                   mode: str = "word", batch_size: int = 8, max_tokens: int | None = None,
                   progress=None) -> Iterator[AlignedChunk]:
    """Run both models over `documents` (one forward per model per batch, all hooks at once) and yield the
    features of every side at the aligned positions. Every side of A must share one model, and of B."""
    model_a, model_b = _one_model(sides_a, "A"), _one_model(sides_b, "B")
    hooks_a = list(dict.fromkeys(hook for s in sides_a for hook in s.reads))
    hooks_b = list(dict.fromkeys(hook for s in sides_b for hook in s.reads))
    done = 0
    for start in range(0, len(documents), batch_size):
        docs = list(documents[start:start + batch_size])
        tokens_a = model_a.tokenize(docs, truncate=True)
        tokens_b = model_b.tokenize(docs, truncate=True)
        if tokens_a.spans is None or tokens_b.spans is None:
            raise DataError("cross-tokenizer alignment needs character offsets: load the models with fast tokenizers")
        mask_a = torch.zeros(tokens_a.ids.shape, dtype=torch.bool)
        mask_b = torch.zeros(tokens_b.ids.shape, dtype=torch.bool)
        doc_ids, ends, words = [], [], []
        for i, doc in enumerate(docs):
            pos_a, pos_b, common = align_positions(tokens_a.spans[i], tokens_b.spans[i], doc, mode)
            mask_a[i, pos_a] = True
            mask_b[i, pos_b] = True
            doc_ids.append(torch.full((len(common),), start + i, dtype=torch.long))
            ends.append(common)
            words += [word_at(doc, e) for e in common.tolist()]
        n = int(mask_a.sum())
        if n == 0:
            continue
        acts_a = model_a.activations_at(tokens_a, hooks_a, positions=mask_a, batch_size=batch_size)
        acts_b = model_b.activations_at(tokens_b, hooks_b, positions=mask_b, batch_size=batch_size)
        chunk = AlignedChunk({s.label: s.features(s.read(acts_a)) for s in sides_a},
                             {s.label: s.features(s.read(acts_b)) for s in sides_b},
                             tokens_a.ids[mask_a], tokens_b.ids[mask_b], torch.cat(doc_ids), torch.cat(ends), words)
        if max_tokens is not None and done + n > max_tokens:
            chunk = _head(chunk, max_tokens - done)
        done += len(chunk)
        if progress:
            progress(done)
        yield chunk
        if max_tokens is not None and done >= max_tokens:
            return


def _one_model(sides: Sequence[Side], which: str):
    if not sides:
        raise ValueError(f"side {which} is empty: give at least one (model, hook, SAE)")
    models = {id(s.model) for s in sides}
    if len(models) != 1:
        raise ValueError(f"every side of {which} must read the same model (one forward per batch)")
    return sides[0].model


def _head(chunk: AlignedChunk, n: int) -> AlignedChunk:
    def cut(f: Features) -> Features:
        if isinstance(f, Codes):
            end = int(f.crow[n])
            return Codes(f.crow[: n + 1], f.latents[:end], f.values[:end], f.width, f.token_ids[:n], f.rows[:n],
                         f.contexts[:n], f.positions[:n])
        return f[:n]

    return AlignedChunk({k: cut(v) for k, v in chunk.a.items()}, {k: cut(v) for k, v in chunk.b.items()},
                        chunk.token_a[:n], chunk.token_b[:n], chunk.document[:n], chunk.char_end[:n],
                        chunk.words[:n])


# ---------------------------------------------------------------------------------------------------- caches
def check_same_text(cache_a: str | Path, cache_b: str | Path) -> tuple[Manifest, Manifest]:
    """Refuse two caches that do not hold the same text, packed the same way."""
    ma, mb = Manifest.read(Path(cache_a)), Manifest.read(Path(cache_b))
    text_a, text_b = ma.run.get("text"), mb.run.get("text")
    if text_a != text_b:
        raise DataError(f"caches of different text: {cache_a} and {cache_b} were made from different text or text "
                        f"settings, so their rows are not the same tokens")
    if ma.context_len != mb.context_len:
        raise DataError(f"caches of different context lengths ({ma.context_len} and {mb.context_len})")
    return ma, mb


def aligned_cache_chunks(sae_a, cache_a: str | Path, sae_b, cache_b: str | Path, *, hook_a: str | None = None,
                         hook_b: str | None = None, batch_size: int = 4096,
                         max_tokens: int | None = None) -> Iterator[AlignedChunk]:
    """Codes of two SAEs over two caches of the same text and tokenizer, row by row (see the module docstring).

    Each SAE is checked against its cache's model (iter_codes) and hook width; differing token ids at any row
    (another tokenizer, or different text) stop the run with an error.
    """
    check_same_text(cache_a, cache_b)
    codes_a = iter_codes(sae_a, cache_a, hook=hook_a, batch_size=batch_size, max_tokens=max_tokens)
    codes_b = iter_codes(sae_b, cache_b, hook=hook_b, batch_size=batch_size, max_tokens=max_tokens)
    label_a, label_b = "a", "b"
    grad_mode = torch.is_grad_enabled()  # iter_codes holds no_grad across its yields: restore it when done
    try:
        for a, b in zip(codes_a, codes_b, strict=False):
            if len(a) != len(b) or not torch.equal(a.token_ids, b.token_ids):
                raise DataError(f"the caches {cache_a} and {cache_b} hold different tokens at the same rows "
                                f"(different tokenizers?); align models with different tokenizers by streaming "
                                f"them (aligned_chunks) instead")
            yield AlignedChunk({label_a: a}, {label_b: b}, a.token_ids, b.token_ids, a.contexts, a.positions)
    finally:
        codes_b.close()
        codes_a.close()
        torch.set_grad_enabled(grad_mode)


__all__ = ["AlignedChunk", "MODES", "Side", "align_positions", "aligned_cache_chunks", "aligned_chunks",
           "check_same_text", "documents_from_text", "read_documents", "word_at", "word_ends"]
