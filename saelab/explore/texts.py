"""What token ids read as, decoded once each: every view of a feature (cards, search, the dashboard) shows tokens as
text, and a byte-level tokenizer's pieces of one character must read as that character, not as "\ufffd"."""

from __future__ import annotations

from typing import Sequence

REPLACEMENT = "\ufffd"
"""What a tokenizer decodes the bytes of a partial UTF-8 character to."""


class TokenTexts:
    """A tokenizer's texts of token ids, alone and in a window, cached (a pass's examples repeat tokens a lot)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}
        self._runs: dict[tuple[int, ...], list[str]] = {}

    def alone(self, ids: Sequence[int]) -> list[str]:
        """Each token id decoded on its own."""
        missing = sorted({i for i in ids if i not in self._texts})
        if missing:
            self._texts.update(zip(missing, self.tokenizer.batch_decode([[i] for i in missing])))
        return [self._texts[i] for i in ids]

    def window(self, ids: Sequence[int]) -> list[str]:
        """Each token's piece of the text of consecutive tokens `ids`, so that "".join(pieces) reads as the tokens
        decoded together. A byte-level tokenizer splits a character such as 東 or ö into several tokens that decode
        alone to "\ufffd"; each run of such tokens is decoded together, and each character goes to the token that
        completes it (the ones before it get ""). Every other token reads as decoded alone."""
        texts = self.alone(ids)
        if not any(REPLACEMENT in text for text in texts):
            return texts
        pieces, start = list(texts), None
        for i, text in enumerate([*texts, ""]):
            broken = REPLACEMENT in text
            if broken and start is None:
                start = i
            elif not broken and start is not None:
                pieces[start:i] = self._run(tuple(ids[start:i]))
                start = None
        return pieces

    def _run(self, run: tuple[int, ...]) -> list[str]:
        """The pieces of a run of tokens that do not decode to whole characters alone: each token gets the
        characters it completes; what the run leaves incomplete at its end reads as "\ufffd" on its last token."""
        if run not in self._runs:
            whole = self.tokenizer.decode(list(run))
            pieces, done = [], ""
            for end in range(1, len(run)):
                text = self.tokenizer.decode(list(run[:end])).rstrip(REPLACEMENT)  # less what the next complete
                grown = len(text) >= len(done) and whole.startswith(text)
                pieces.append(text[len(done):] if grown else "")
                done = text if grown else done
            self._runs[run] = [*pieces, whole[len(done):]]  # "".join(pieces) == whole, whatever the tokenizer
        return self._runs[run]
