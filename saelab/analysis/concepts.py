"""Labelled text for probes: loading, built-in concepts from offline text, balanced tasks and document splits.

Every example carries the document it was cut from. Splits assign whole documents, so two passages of one
Wikipedia article, or one filler word in two templates, never sit on both sides of a train / test boundary
(otherwise a probe can score by recognising the document rather than the concept).
"""

from __future__ import annotations

import csv
import json
import math
import random
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from saelab.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass
class LabelledTexts:
    """Texts with a string label and a document id each (the unit a split never cuts)."""

    texts: list[str]
    labels: list[str]
    docs: list[str]
    name: str = "data"
    positive: str | None = None
    """For two labels: the one a binary probe detects (default: the second in sorted order)."""
    origins: list[str] = field(default_factory=list)
    """Where each text came from, for messages ("data.jsonl, line 31"); empty: "<name>: text <i>"."""

    def __post_init__(self):
        self.texts, self.docs = list(self.texts), [str(d) for d in self.docs]
        self.labels = [class_name(x, f"{self.name}: example {i}") for i, x in enumerate(self.labels)]
        if not (len(self.texts) == len(self.labels) == len(self.docs)):
            raise DataError(f"{self.name}: {len(self.texts)} texts, {len(self.labels)} labels and {len(self.docs)} "
                            "document ids; give one of each per example")
        if not self.texts:
            raise DataError(f"{self.name}: no examples")
        if self.origins and len(self.origins) != len(self.texts):
            raise DataError(f"{self.name}: {len(self.origins)} origins for {len(self.texts)} texts; give one each")
        for i, text in enumerate(self.texts):
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{self.name}: text {i} is empty" if isinstance(text, str) else
                                f"{self.name}: text {i} is a {type(text).__name__}, not a str")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))

    def origin(self, i: int) -> str:
        """Where text i came from, to name it in a message."""
        return self.origins[i] if self.origins else f"{self.name}: text {i}"

    def subset(self, rows: Sequence[int]) -> "LabelledTexts":
        return LabelledTexts([self.texts[i] for i in rows], [self.labels[i] for i in rows],
                             [self.docs[i] for i in rows], self.name, self.positive,
                             [self.origins[i] for i in rows] if self.origins else [])


@dataclass
class Task:
    """One binary probing task: rows of a LabelledTexts per split, y = 1 for `positive`, classes balanced."""

    name: str
    positive: str
    rows: dict[str, list[int]]
    """{"train" | "val" | "test": row indices into the LabelledTexts}."""
    y: dict[str, list[int]]
    """{split: 0/1 label per row}."""


# ---------------------------------------------------------------------------------------------------- loading
def load_labelled(path: str | Path, *, text_field: str = "text", label_field: str = "label",
                  doc_field: str = "doc") -> LabelledTexts:
    """Examples from a JSONL or CSV file with text and label columns (and optionally a document id; without one
    every example is its own document)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (expected a .jsonl or .csv with '{text_field}' and '{label_field}')")
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            records = [(i + 2, row) for i, row in enumerate(csv.DictReader(f))]
    else:
        records = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                try:
                    records.append((i + 1, json.loads(line)))
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}, line {i + 1}: not JSON ({error.msg})") from None
    texts, labels, docs, origins = [], [], [], []
    for line, record in records:
        if not isinstance(record, dict) or text_field not in record or label_field not in record:
            raise DataError(f"{path}, line {line}: needs the fields '{text_field}' and '{label_field}'")
        text = record[text_field]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}, line {line}: the text is empty")
        texts.append(text)
        labels.append(class_name(record[label_field], f"{path}, line {line}"))
        docs.append(str(record.get(doc_field) or f"line{line}"))
        origins.append(f"{path}, line {line}")
    if not texts:
        raise DataError(f"{path}: no examples")
    return LabelledTexts(texts, labels, docs, name=path.stem, origins=origins)


def class_name(label, where: str) -> str:
    """A label as the name of its class. null, an empty string, NaN, a list or an object is refused: str() would
    quietly make a class "None" or "[1, 2]" of it, and the probe would learn that class."""
    if isinstance(label, (str, int)) or (isinstance(label, float) and math.isfinite(label)):
        if str(label).strip():
            return str(label)
    shown = json.dumps(label) if not isinstance(label, float) else str(label)
    raise DataError(f"{where}: the label is {shown}, not a class name; give every example a string or number label")


def from_templates(templates: Sequence[str], fillers: dict[str, Sequence[str]], name: str = "templates") -> LabelledTexts:
    """Each template ("I will see you on {}.") filled with each word; the label is the word's group and the
    document is the word, so test words are words no probe saw in training."""
    if not templates or any("{}" not in t for t in templates):
        raise DataError("every template needs one '{}' where the word goes")
    texts, labels, docs = [], [], []
    for label, words in fillers.items():
        for word in words:
            for template in templates:
                texts.append(template.format(word))
                labels.append(label)
                docs.append(word)
    return LabelledTexts(texts, labels, docs, name)


def documents(source: str | Path | Sequence[str], doc_chars: int = 3000) -> list[str]:
    """A source's documents: each file of a folder, or blocks of blank-line-separated paragraphs of about
    `doc_chars` characters from a single file; a list of strings is taken as documents already."""
    if not isinstance(source, (str, Path)):
        return [d for d in source if d.strip()]
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"{path}: the folder holds no files")
        return [t for p in files if (t := p.read_text(encoding="utf-8", errors="strict")).strip()]
    if not path.is_file():
        raise DataError(f"{path}: no such file or folder")
    blocks, current, size = [], [], 0
    for paragraph in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
        if paragraph.strip():
            current.append(paragraph.strip())
            size += len(paragraph)
            if size >= doc_chars:
                blocks.append("\n\n".join(current))
                current, size = [], 0
    if current:
        blocks.append("\n\n".join(current))
    return blocks


def passages(text: str, words: int) -> list[str]:
    """Consecutive windows of `words` words (whitespace-split) from one document; a short tail is dropped."""
    tokens = text.split()
    return [" ".join(tokens[i : i + words]) for i in range(0, len(tokens) - words + 1, words)]


def from_sources(sources: dict[str, str | Path | Sequence[str]], *, words: int = 48, per_label: int = 300,
                 per_doc: int = 4, seed: int = 0, name: str = "sources") -> LabelledTexts:
    """Passages of `words` words from each labelled source (a file, a folder, or a list of documents), at most
    `per_doc` from one document and `per_label` per label, documents visited in a seeded order."""
    texts, labels, docs = [], [], []
    for label, source in sources.items():
        docs_of = documents(source)
        order = list(range(len(docs_of)))
        random.Random(f"{seed}-{label}").shuffle(order)
        taken = 0
        for d in order:
            for passage in passages(docs_of[d], words)[:per_doc]:
                if taken == per_label:
                    break
                texts.append(passage)
                labels.append(label)
                docs.append(f"{label}/{d}")
                taken += 1
        if taken == 0:
            raise DataError(f"source of label {label!r} has no passage of {words} words")
    return LabelledTexts(texts, labels, docs, name)


# ---------------------------------------------------------------------------------------------------- built-ins
def genre(shared_data: str | Path, **kwargs) -> LabelledTexts:
    """Wikipedia (WikiText-2 raw test) vs Shakespeare vs Python's reference documentation (ships with CPython)."""
    from pydoc_data.topics import topics

    root = Path(shared_data)
    wiki, shakespeare = root / "wikitext-2-raw" / "wiki.test.raw", root / "tinyshakespeare" / "input.txt"
    for path in (wiki, shakespeare):
        if not path.is_file():
            raise DataError(f"{path} is missing: genre needs the shared data (WikiText-2 raw and "
                            "tinyshakespeare): pass its folder or set SAELAB_DATA")
    articles = [_clean_wikitext(a) for a in re.split(r"\n \= [^=\n]+ \= \n", wiki.read_text(encoding="utf-8"))]
    sources = {"wikipedia": [a for a in articles if a.strip()], "shakespeare": documents(shakespeare),
               "python-docs": [topics[k] for k in sorted(topics)]}
    return from_sources(sources, name="genre", **kwargs)


def _clean_wikitext(text: str) -> str:
    """Undo WikiText's tokenisation marks (" @-@ ", " @,@ ") and drop its "= = Heading = =" lines."""
    text = re.sub(r"^\s*=.*=\s*$", "", text, flags=re.M)
    text = re.sub(r" @(.)@ ", r"\1", text)
    return re.sub(r" ([,.;:!?)']|'s|n't)", r"\1", text).replace("( ", "(")


DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
OTHER_WORDS = ["London", "Paris", "Berlin", "Tokyo", "Canada", "Brazil", "Egypt", "India", "the park", "the office",
               "the station", "the beach", "the library", "the garden", "the market", "the river", "Alice", "Robert",
               "Maria", "David", "Sophie", "Thomas", "a table", "a window", "the kitchen", "the museum", "a bicycle",
               "the mountain", "the school", "the hospital", "the bridge", "the airport", "a letter", "the forest",
               "the island", "the theatre", "the village", "the harbour"]
CALENDAR_TEMPLATES = ["I will see you on {}.", "The meeting was moved to {}.", "We are going to {} together.",
                      "Everything changed after {}.", "She kept talking about {}.", "My favourite is {}.",
                      "They wrote a song about {}.", "Nothing happened near {}.", "It all started with {}.",
                      "He was thinking of {} again."]


def calendar() -> LabelledTexts:
    """Day and month names vs other nouns (places, people, objects) in the same templates; documents are words."""
    data = from_templates(CALENDAR_TEMPLATES, {"calendar": DAYS + MONTHS, "other": OTHER_WORDS}, name="calendar")
    data.positive = "calendar"
    return data


LANGUAGES = ("de", "fr", "es", "it", "nl")
CATALOGUES = ("iso_3166-1", "iso_639-2")


def read_mo(path: str | Path) -> dict[str, str]:
    """{msgid: msgstr} of a gettext .mo catalogue (the header entry and plural forms left out)."""
    data = Path(path).read_bytes()
    magic = struct.unpack("<I", data[:4])[0]
    order = "<" if magic == 0x950412DE else ">" if magic == 0xDE120495 else None
    if order is None:
        raise DataError(f"{path} is not a gettext .mo catalogue")
    n, originals, translations = struct.unpack(order + "3I", data[8:20])

    def string(table: int, i: int) -> str:
        length, offset = struct.unpack(order + "2I", data[table + 8 * i : table + 8 * i + 8])
        return data[offset : offset + length].decode("utf-8")

    pairs = ((string(originals, i), string(translations, i)) for i in range(n))
    return {k: v for k, v in pairs if k and "\x00" not in k and v}


def languages(locale_dir: str | Path = "/usr/share/locale", langs: Sequence[str] = LANGUAGES, *, names: int = 4,
              catalogues: Sequence[str] = CATALOGUES) -> LabelledTexts:
    """Which language a list of country and language names is written in, from iso-codes' translations.

    A text is `names` consecutive entries of a catalogue ("Allemagne, Autriche, ..."); the document is that
    group of English originals, so the same countries land in the same split in every language.
    Needs Debian's iso-codes package (`apt-get install -y iso-codes`).
    """
    texts, labels, docs = [], [], []
    for catalogue in catalogues:
        found = {lang: Path(locale_dir) / lang / "LC_MESSAGES" / f"{catalogue}.mo" for lang in langs}
        missing = [str(p) for p in found.values() if not p.is_file()]
        if missing:
            raise DataError(f"{missing[0]} is missing: the language task needs iso-codes' catalogues "
                            f"(apt-get install -y iso-codes)")
        tables = {lang: read_mo(path) for lang, path in found.items()}
        shared = sorted(set.intersection(*(set(t) for t in tables.values())))
        for g in range(0, len(shared) - names + 1, names):
            group = shared[g : g + names]
            for lang, table in tables.items():
                texts.append(", ".join(table[k] for k in group))
                labels.append(lang)
                docs.append(f"{catalogue}/{g}")
    return LabelledTexts(texts, labels, docs, name="languages")


AGREEMENT_HEADS = ["key", "book", "teacher", "student", "dog", "car", "window", "letter", "painting", "bottle",
                   "lamp", "chair", "doctor", "singer", "farmer", "river", "tower", "flower", "soldier", "picture",
                   "ship", "engine", "road", "girl"]
AGREEMENT_NOUNS = ["cabinet", "table", "house", "village", "island", "castle", "mountain", "forest", "museum",
                   "station", "office", "kitchen", "wall", "hill", "lake", "garden"]
PREPOSITIONS = ["near", "behind", "beside", "above", "under", "next to", "by", "with"]


ENDINGS = ["on the floor", "very old", "in the photo", "still there", "quite small", "for sale"]


def agreement(attractors: int | Sequence[int] = (0, 1, 2), per_head: int = 4, seed: int = 0) -> LabelledTexts:
    """Whether a sentence's verb agrees in number with its subject ("The keys near the cabinet are on the floor."
    vs "The keys near the cabinet is on the floor.").

    No word tells the class (every head, attractor and verb form is in both), so a linear probe needs a feature
    that compares the verb with its subject. Difficulty is graded by `attractors`: 0 puts a noun of the subject's
    own number between subject and verb, 1 and 2 put one or two nouns of the other number there, which misleads
    a reader that takes the nearest noun. The document is the head noun, so test heads are nouns no probe saw."""
    levels = [attractors] if isinstance(attractors, int) else list(attractors)
    if not levels or any(not isinstance(n, int) or not 0 <= n <= 2 for n in levels):
        raise DataError(f"agreement: attractors must be 0, 1 or 2 (or a list of them), got {attractors!r}")
    rng = random.Random(f"agreement-{seed}")
    texts, labels, docs = [], [], []
    for head in AGREEMENT_HEADS:
        for plural in (False, True):
            for level in levels:
                for i in range(per_head):
                    nouns = rng.sample(AGREEMENT_NOUNS, max(level, 1))
                    other = plural if level == 0 else not plural
                    phrases = [f"{rng.choice(PREPOSITIONS)} the {noun + 's' if other else noun}" for noun in nouns]
                    agrees = i % 2 == 0
                    verb = "are" if plural == agrees else "is"
                    texts.append(" ".join([f"The {head + 's' if plural else head}"] + phrases +
                                          [verb, rng.choice(ENDINGS)]) + ".")
                    labels.append("agrees" if agrees else "violates")
                    docs.append(head)
    data = LabelledTexts(texts, labels, docs, name="agreement")
    data.positive = "violates"
    return data


def builtin(name: str, shared_data: str | Path | None = None, **kwargs) -> LabelledTexts:
    """A built-in concept by name: genre, calendar, languages or agreement."""
    if name == "genre":
        from saelab.data import shared_data as default_shared_data

        return genre(shared_data or default_shared_data(), **kwargs)
    if name == "calendar":
        return calendar()
    if name == "languages":
        return languages(**kwargs)
    if name == "agreement":
        return agreement(**kwargs)
    raise DataError(f"unknown built-in concept {name!r}; choose {', '.join(BUILTINS)}, or give a file")


def load_data(spec: str | Path, shared_data: str | Path | None = None, **kwargs) -> LabelledTexts:
    """What `saelab probe --data` takes: a built-in name (genre, calendar, languages, agreement), a JSONL / CSV file of
    text and label, or a folder whose entries (files or sub-folders) are one label each, named after them."""
    if str(spec) in BUILTINS:
        return builtin(str(spec), shared_data)
    path = Path(spec)
    if path.is_dir():
        entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
        if len(entries) < 2:
            raise DataError(f"{path}: a folder of labelled text needs one file or sub-folder per label, at least two")
        return from_sources({p.stem: p for p in entries}, name=path.name, **kwargs)
    if path.is_file():
        return load_labelled(path)
    raise DataError(f"--data {spec!r} is neither a built-in concept ({', '.join(BUILTINS)}), a .jsonl / .csv file "
                    "nor a folder of labelled text")


BUILTINS = ("genre", "calendar", "languages", "agreement")


# ---------------------------------------------------------------------------------------------------- splits
def split_documents(data: LabelledTexts, fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0
                    ) -> dict[str, list[int]]:
    """Rows per split, whole documents at a time, stratified by each document's (majority) label, seeded."""
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three positive numbers summing to 1 (train, val, test), got {fractions}")
    if len(data.classes) < 2:
        raise DataError(f"{data.name}: every example has the label {data.classes[0]!r}; a probe needs two classes")
    rows_of: dict[str, list[int]] = {}
    for i, doc in enumerate(data.docs):
        rows_of.setdefault(doc, []).append(i)
    by_label: dict[str, list[str]] = {}
    for doc, rows in rows_of.items():
        labels = [data.labels[i] for i in rows]
        by_label.setdefault(max(sorted(set(labels)), key=labels.count), []).append(doc)
    split: dict[str, list[int]] = {s: [] for s in SPLITS}
    for label in sorted(by_label):
        docs = sorted(by_label[label])
        if len(docs) < 3:
            raise DataError(f"{data.name}: label {label!r} comes from {len(docs)} document(s); splitting by "
                            "document needs at least 3 (one each for train, validation and test)")
        random.Random(f"{seed}-{label}").shuffle(docs)
        total, seen = sum(len(rows_of[d]) for d in docs), 0
        bounds = (fractions[0] * total, (fractions[0] + fractions[1]) * total)
        parts: list[list[str]] = [[], [], []]
        for doc in docs:
            parts[0 if seen < bounds[0] else 1 if seen < bounds[1] else 2].append(doc)
            seen += len(rows_of[doc])
        for s in (1, 2):  # every split gets at least one document: take one from the largest other split
            if not parts[s]:
                parts[s].append(max(parts, key=len).pop())
        for s, part in enumerate(parts):
            split[SPLITS[s]] += [i for doc in part for i in rows_of[doc]]
    return {s: sorted(rows) for s, rows in split.items()}


def tasks(data: LabelledTexts, split: dict[str, list[int]], seed: int = 0, positive: str | None = None) -> list[Task]:
    """Binary tasks with balanced classes in every split: one for two labels (positive: the given label, else the
    data's own, else the second in sorted order), one-vs-rest per label for more (negatives drawn evenly from the
    other labels)."""
    classes = data.classes
    positive = positive or data.positive
    if len(classes) < 2:
        raise DataError(f"{data.name}: every example has the label {classes[0]!r}; a probe needs two classes")
    if positive is not None and positive not in classes:
        raise DataError(f"{data.name}: no label {positive!r}; the labels are {', '.join(classes)}")
    wanted = [positive or classes[1]] if len(classes) == 2 else classes
    out = []
    for pos in wanted:
        rows, ys = {}, {}
        for s in SPLITS:
            rng = random.Random(f"{seed}-{pos}-{s}")
            mine = [i for i in split[s] if data.labels[i] == pos]
            others = {c: [i for i in split[s] if data.labels[i] == c] for c in classes if c != pos}
            if not mine or not any(others.values()):
                raise DataError(f"{data.name}: the {s} split has no {'examples of ' + repr(pos) if not mine else 'negatives'}"
                                f" for the task {pos!r}; add documents to that label")
            negatives = _even_draw(others, len(mine), rng)
            mine = rng.sample(mine, min(len(mine), len(negatives)))
            chosen = sorted([(i, 1) for i in mine] + [(i, 0) for i in negatives])
            rows[s], ys[s] = [i for i, _ in chosen], [y for _, y in chosen]
        name = pos if len(classes) > 2 else f"{pos} vs {[c for c in classes if c != pos][0]}"
        out.append(Task(name=name, positive=pos, rows=rows, y=ys))
    return out


def _even_draw(groups: dict[str, list[int]], n: int, rng: random.Random) -> list[int]:
    """Up to n rows drawn as evenly as the groups allow (round robin over shuffled groups)."""
    pools = {c: rng.sample(rows, len(rows)) for c, rows in sorted(groups.items()) if rows}
    drawn: list[int] = []
    while len(drawn) < n and any(pools.values()):
        for c in list(pools):
            if pools[c] and len(drawn) < n:
                drawn.append(pools[c].pop())
    return drawn

