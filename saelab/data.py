"""Text sources and token packing: from files, folders, JSONL, Hub datasets or the built-in default to contexts.

Packing is deterministic: the same source, tokenizer, context length and seed always give the same contexts in the
same order, which is what lets an interrupted activation cache resume exactly where it stopped.
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import hashlib
import io
import json
import os
import random
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Annotated, Iterable, Iterator

import torch

from saelab.errors import DataError
from saelab.files import file_sha256
from saelab.options import NonNegativeInt, PositiveInt, Range

ContextLen = Annotated[int, Range(at_least=2)]
"""Tokens per context: BOS and at least one token of text."""

DEFAULT_TEXT = "default"
TEXT_SUFFIXES = {".txt", ".md", ".raw", ".text", ".rst"}
JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
DATA_SUFFIXES = TEXT_SUFFIXES | JSONL_SUFFIXES | {".csv", ".tsv", ".parquet", ".gz", ".zip"}
"""Suffixes that make a missing source a mistyped local path rather than a Hub dataset name."""
CHUNK_CHARS = 1 << 20  # a plain text file is read in ~1M-character documents cut at blank lines
DATA_ENV = "SAELAB_DATA"
"""The environment variable naming the shared data folder (the one holding wikitext-2-raw and tinyshakespeare)."""
CHECKOUT = Path(__file__).resolve().parents[1]
"""The folder above the package: a source checkout when it holds pyproject.toml, else wherever pip installed it."""


def shared_data(name: str = "") -> Path:
    """A file or folder of the shared data (WikiText-2, tinyshakespeare), by its path inside that folder.

    The folder is $SAELAB_DATA when set, else ../shared/data beside a source checkout. An installed saelab has no
    checkout to look beside, so without the variable it says so rather than guessing a path in site-packages.
    """
    if os.environ.get(DATA_ENV):
        root, where = Path(os.environ[DATA_ENV]).expanduser(), f"{DATA_ENV}={os.environ[DATA_ENV]}"
    elif (CHECKOUT / "pyproject.toml").is_file():
        root, where = CHECKOUT.parent / "shared" / "data", "../shared/data beside the checkout"
    else:
        raise DataError(f"saelab runs from {CHECKOUT}, not a source checkout, so it cannot find the shared data: "
                        f"set {DATA_ENV} to the folder holding wikitext-2-raw and tinyshakespeare")
    path = root / name
    if not path.exists():
        raise DataError(f"{path} is missing from the shared data ({where}); set {DATA_ENV} to the folder that holds "
                        f"{name or 'wikitext-2-raw and tinyshakespeare'}")
    return path


def iter_documents(source: str | Path | None = None, *, field: str = "text", split: str = "train",
                   config: str | None = None) -> Iterator[str]:
    """Yield the documents of a text source, in a fixed order.

    source: None or "default" (Python's own documentation prose, on every machine, no download), a text file,
    a JSONL file (each line's `field`), a folder of such files (sorted, recursive), or a Hugging Face dataset
    name (streamed; needs the network and the `datasets` package).
    """
    found_text = False
    for document in _source_documents(source, field, split, config):
        found_text = found_text or (bool(document) and not document.isspace())
        yield document
    if not found_text:  # an empty file would otherwise give an empty cache or training run without a word
        raise DataError(f"text source {str(source or DEFAULT_TEXT)!r} holds no text (it is empty or only whitespace)")


def text_source(source: str | Path | None) -> str | Path:
    """What a text source names: DEFAULT_TEXT, an existing file or folder (as a Path), or a Hub dataset name.

    Every reader of text (and every `--text` flag) resolves its source here, so a mistyped path is always an
    error, never a dataset to look up nor the text itself. A source is a local path when it cannot be a Hub dataset
    id (a space, two slashes, a leading `.`, `/` or `~`, ...) or ends in a text file's suffix; a local path must
    exist.
    """
    if source is None or str(source) == DEFAULT_TEXT:
        return DEFAULT_TEXT
    path = Path(source).expanduser()
    if path.exists():
        return path
    if _looks_like_path(str(source)):
        raise DataError(f"text source {str(source)!r} does not exist (no such file or folder); check the path")
    return str(source)


def _source_documents(source, field: str, split: str, config: str | None) -> Iterator[str]:
    source = text_source(source)
    if source == DEFAULT_TEXT:
        yield from _default_documents()
    elif isinstance(source, str):
        yield from _hub_documents(source, field, split, config)
    elif source.is_dir():
        for file in _folder_files(source):
            yield from _file_documents(file, field)
    else:
        yield from _file_documents(source, field)


def _folder_files(path: Path) -> list[Path]:
    """The files of a folder source, in reading order."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES | JSONL_SUFFIXES)
    if not files:
        raise DataError(f"folder {path} holds no text files ({', '.join(sorted(TEXT_SUFFIXES | JSONL_SUFFIXES))})")
    return files


def describe_source(source: str | Path | None) -> str:
    """A stable description of a source, stored in cache manifests to recognise the same run."""
    if source is None or str(source) == DEFAULT_TEXT:
        return DEFAULT_TEXT
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


def source_sha256(source: str | Path | None) -> str | None:
    """SHA-256 of a local source's content, so a run can tell an edited or replaced text from the one it began on.

    A file: the hash of its bytes (what `sha256sum` prints). A folder: the hash of each text file's relative name
    and hash, in reading order. None for the built-in default and Hub datasets (known by name only).
    """
    if source is None or str(source) == DEFAULT_TEXT:
        return None
    path = Path(source).expanduser()
    if path.is_file():
        return _file_sha256(path)
    if not path.is_dir():
        return None
    digest = hashlib.sha256()
    for file in _folder_files(path):
        digest.update(f"{file.relative_to(path).as_posix()}\0{_file_sha256(file)}\0".encode())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    return _hashed(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _hashed(path: str, size: int, mtime_ns: int) -> str:
    """Hash a file once per (size, mtime): fingerprints are taken at every checkpoint, and a big text takes seconds."""
    return file_sha256(Path(path))


def _default_documents() -> Iterator[str]:
    # pydoc_data ships with CPython: ~465k characters of real English technical prose (the Python reference).
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]


def _file_documents(path: Path, field: str) -> Iterator[str]:
    if path.suffix in JSONL_SUFFIXES:
        with _open_text(path) as lines:
            for number, line in enumerate(_strict_lines(path, lines), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number} is not valid JSON ({error.msg})") from None
                if not isinstance(record, dict) or field not in record:
                    keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                    raise DataError(f"{path}:{number} has no field {field!r} (it has: {keys}); pass field=...")
                yield str(record[field])
        return
    with _open_text(path) as text:
        chunk: list[str] = []
        size = 0
        for line in _strict_lines(path, text):
            chunk.append(line)
            size += len(line)
            if size >= CHUNK_CHARS and not line.strip():
                yield "".join(chunk)
                chunk, size = [], 0
        if size:
            yield "".join(chunk)


def _open_text(path: Path) -> io.TextIOWrapper:
    """Open a text file strictly: a binary file is refused at once, invalid UTF-8 where it is met (no silent U+FFFD)."""
    with path.open("rb") as raw:
        if b"\0" in raw.read(1 << 13):
            raise _binary(path)
    return path.open(encoding="utf-8", errors="strict")


def _strict_lines(path: Path, handle) -> Iterator[str]:
    try:
        for line in handle:
            if "\0" in line:
                raise _binary(path)
            yield line
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text (invalid byte at offset {_first_bad_byte(path)}); convert it, "
                        f"e.g. iconv -f latin1 -t utf-8 '{path}' > converted.txt") from None


def _binary(path: Path) -> DataError:
    return DataError(f"{path} holds NUL bytes: it is a binary file, not text; pass a UTF-8 text or JSONL file")


def _first_bad_byte(path: Path) -> int:
    """Byte offset of the first invalid UTF-8 sequence in a file (the text decoder only knows its own buffer)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as raw:
        while True:
            chunk = raw.read(1 << 20)
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                return offset - pending + error.start
            if not chunk:
                return offset
            offset += len(chunk)


def _hub_documents(name: str, field: str, split: str, config: str | None) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{name!r} is not a local path; to stream it from the Hub: pip install 'saelab[datasets]'") from None
    try:
        rows = datasets.load_dataset(name, config, split=split, streaming=True)
        for row in rows:
            if field not in row:
                raise DataError(f"dataset {name!r} has no field {field!r} (it has: {', '.join(row)}); pass field=...")
            yield str(row[field])
    except (FileNotFoundError, ConnectionError, ValueError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"{name!r} is neither a local path nor a loadable Hub dataset: {error}") from error


def _looks_like_path(source: str) -> bool:
    """Whether a source that does not exist was meant as a local path: it is no valid Hub dataset id, or it ends
    like a data file (`notes.txt` is a valid id, but nobody names a dataset so)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return True
    return source.startswith((".", "~")) or Path(source).suffix.lower() in DATA_SUFFIXES


@dataclass
class TokenBatch:
    """A batch of contexts: token ids [batch, pos] and which positions hold real text (not BOS, not padding)."""

    tokens: torch.Tensor
    mask: torch.Tensor  # bool [batch, pos]; False at padding, and at the prepended BOS when it is to be dropped


def pack_contexts(documents: Iterable[str], tokenizer, context_len: int, *, prepend_bos: bool = True,
                  pack: bool = True) -> Iterator[list[int]]:
    """Tokenise documents into contexts of exactly `context_len` tokens (unpacked: up to that many).

    Packed: documents are joined into one stream with a separator token (EOS, else BOS) between them and cut
    into contexts; with prepend_bos each context is BOS + (context_len - 1) stream tokens, so every context
    starts like a fresh sequence. Unpacked: one context per document, truncated. A final partial context is dropped.
    """
    bos = tokenizer.bos_token_id
    if prepend_bos and bos is None:
        raise DataError("the tokenizer has no BOS token; pass prepend_bos=False")
    if context_len < 2:
        raise DataError(f"context_len must be at least 2, got {context_len}")
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    body = context_len - 1 if prepend_bos else context_len
    head = [bos] if prepend_bos else []
    stream: list[int] = []
    for ids in _tokenised(documents, tokenizer):
        if not pack:
            if ids:
                yield head + ids[:body]
            continue
        stream += ids
        if separator is not None:
            stream.append(separator)
        start = 0
        while len(stream) - start >= body:
            yield head + stream[start : start + body]
            start += body
        del stream[:start]


def _tokenised(documents: Iterable[str], tokenizer, group: int = 64) -> Iterator[list[int]]:
    """Tokenise in groups: one fast-tokenizer call per group is far quicker than one per document."""
    documents = iter(documents)
    while batch := list(islice(documents, group)):
        yield from tokenizer(batch, add_special_tokens=False)["input_ids"]


def shuffled(items: Iterable, window: int, seed: int) -> Iterator:
    """Shuffle within consecutive windows of `window` items: deterministic for a seed, bounded memory."""
    rng = random.Random(seed)
    items = iter(items)
    while chunk := list(islice(items, window)):
        rng.shuffle(chunk)
        yield from chunk


def token_batches(contexts: Iterable[list[int]], batch_size: int, context_len: int, *, pad_id: int,
                  drop_bos: bool = False) -> Iterator[TokenBatch]:
    """Stack contexts into TokenBatches, right-padding short ones (causal attention never sees the padding)."""
    contexts = iter(contexts)
    while rows := list(islice(contexts, batch_size)):
        tokens = torch.full((len(rows), context_len), pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), context_len, dtype=torch.bool)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = True
        if drop_bos:
            mask[:, 0] = False
        yield TokenBatch(tokens, mask)


@dataclass(frozen=True)
class TextConfig:
    """Everything that decides which contexts a run sees, in order; two runs with equal TextConfigs see the same."""

    source: str = DEFAULT_TEXT
    context_len: ContextLen = 128
    prepend_bos: bool = True
    pack: bool = True
    field: str = "text"
    split: str = "train"
    config: str | None = None
    seed: NonNegativeInt | None = None  # None: keep document order; else shuffle contexts in windows of `shuffle_window`
    shuffle_window: PositiveInt = 1024
    start: NonNegativeInt = 0  # skip this many contexts: held-out text after the ones a training run used

    def contexts(self, tokenizer) -> Iterator[list[int]]:
        documents = iter_documents(self.source, field=self.field, split=self.split, config=self.config)
        contexts = pack_contexts(documents, tokenizer, self.context_len, prepend_bos=self.prepend_bos, pack=self.pack)
        contexts = contexts if self.seed is None else shuffled(contexts, self.shuffle_window, self.seed)
        return islice(contexts, self.start, None)

    def after(self, n_contexts: int) -> "TextConfig":
        """The same text from context `n_contexts` on: held out from a run that used the first n_contexts."""
        return dataclasses.replace(self, start=self.start + n_contexts)

    def fingerprint(self) -> dict:
        """What identifies this text: the settings, the source, and for a local file or folder its content."""
        content = source_sha256(self.source)
        return {**self.__dict__, "source": describe_source(self.source), **({"sha256": content} if content else {})}

    @classmethod
    def from_fingerprint(cls, fingerprint: dict) -> "TextConfig":
        """The text a cache manifest names (its fingerprint), to read on past it: held-out text for evaluation."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in fingerprint.items() if key in names})
