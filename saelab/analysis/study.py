"""What every study's result keeps and how it is written: one base for probing, steering, matching and circle
results, so each records its schema and saelab versions and its run time, saves as JSON (plus safetensors for the
tensors a plot needs; never pickle) with a Markdown table beside it, and loads back from what it saved.

    results.save("runs/probe")                    # probes.json, probes.md (+ probes.safetensors) and figures
    again = ProbeResults.load("runs/probe")       # the same record: again.to_dict() == results.to_dict()
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Union

from saelab.files import check_schema_version
from saelab.options import Range
from saelab.version import __version__

SCHEMA_VERSION = 1
Similarity = Annotated[float, Range(at_least=-1, at_most=1)]
"""A correlation or a cosine."""
META = ("seconds", "schema_version", "saelab_version")
"""The fields every result carries; written after the study's own."""


@dataclass(kw_only=True)
class StudyResult:
    """Base of every study's result. A subclass names its file (`NAME`: `<NAME>.json`), says what it is in errors
    (`WHAT`), gives `table()`, and, if it holds tensors, `tensors()` / `restore_tensors()` for the safetensors
    file; `save_figures(folder, name)` draws its plots."""

    NAME: ClassVar[str | None] = None
    """File stem of the record; None: every instance names its own (`name()`), and `load` needs the name."""
    WHAT: ClassVar[str] = "study results"
    SCHEMA: ClassVar[int] = SCHEMA_VERSION
    """The newest schema_version this saelab writes and reads for this record (a study whose record grew sets its
    own, and gives its schema_version field the same default)."""

    seconds: float = 0.0
    """Wall-clock time of the study."""
    schema_version: int = SCHEMA_VERSION
    saelab_version: str = __version__

    # ---------------------------------------------------------------------------------------------- record
    def name(self) -> str:
        if self.NAME is None:
            raise NotImplementedError(f"{type(self).__name__} must define NAME or name()")
        return self.NAME

    def record_fields(self) -> list[str]:
        """The fields written to JSON: the study's own in order, then seconds and the versions."""
        own = [f.name for f in dataclasses.fields(self) if f.name not in META and f.name not in self.tensor_fields()]
        return own + list(META)

    @classmethod
    def tensor_fields(cls) -> tuple[str, ...]:
        """Fields kept out of the JSON because they hold tensors (saved by `tensors()`)."""
        return ()

    def to_dict(self) -> dict[str, Any]:
        return {name: plain(getattr(self, name)) for name in self.record_fields()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StudyResult":
        check_schema_version(d, cls.SCHEMA, cls.WHAT)
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in cls.tensor_fields()]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"{cls.WHAT}: unknown field {unknown[0]!r} (the fields are {', '.join(names)})")
        return cls(**{key: build(hints[key], value) for key, value in d.items()})

    def table(self) -> str:
        raise NotImplementedError

    def report(self) -> str:
        """The Markdown written next to the JSON (default: `table()`)."""
        return self.table()

    def tensors(self) -> dict[str, Any]:
        """{name: tensor} to write to <name>.safetensors; empty: no file."""
        return {}

    def restore_tensors(self, tensors: dict[str, Any]) -> None:
        """Put back what `tensors()` gave."""

    def save_figures(self, folder: Path, name: str) -> None:
        """Draw the study's figures into `folder`."""

    # ---------------------------------------------------------------------------------------------- files
    def write(self, folder: str | Path, name: str | None = None) -> Path:
        """<name>.json, <name>.md and, if the result holds tensors, <name>.safetensors in `folder`; returns the
        JSON's path."""
        from saelab.files import safetensors_bytes

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        name = name or self.name()
        path = folder / f"{name}.json"
        path.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")
        (folder / f"{name}.md").write_text(self.report())
        tensors = {key: value.contiguous() for key, value in self.tensors().items()}
        if tensors:
            (folder / f"{name}.safetensors").write_bytes(safetensors_bytes(tensors))
        return path

    def save(self, folder: str | Path, name: str | None = None) -> Path:
        """The record (`write`) and the figures in `folder`; returns the folder."""
        self.write(folder, name)
        self.save_figures(Path(folder), name or self.name())
        return Path(folder)

    @classmethod
    def load(cls, path: str | Path, name: str | None = None):
        """A result back from its JSON file, or from the folder it was saved in (with `name` where the file is not
        <NAME>.json), with its tensors if it saved any."""
        from safetensors.torch import load_file

        path = Path(path)
        if path.suffix != ".json":
            stem = name or cls.NAME
            if stem is None:
                raise ValueError(f"{cls.__name__}.load needs the file (<name>.json) or name=, e.g. "
                                 f"{cls.__name__}.load(folder, name='days')")
            path = path / f"{stem}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file ({cls.WHAT} are saved there by save(folder))")
        result = cls.from_dict(json.loads(path.read_text()))
        tensors = path.with_suffix(".safetensors")
        if tensors.is_file():
            result.restore_tensors(load_file(tensors))
        return result


def plain(value: Any) -> Any:
    """Dataclasses as dicts and tuples as lists, all the way down: what JSON holds."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def build(hint: Any, value: Any) -> Any:
    """`value` read from JSON, rebuilt as the annotation `hint` says: nested dataclasses, lists, tuples and dicts
    of them (JSON's string keys back to ints where the annotation says int)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None:
        return None
    if origin is typing.Annotated:
        return build(args[0], value)
    if origin in (Union, types.UnionType):
        for arg in args:
            if arg is not type(None) and (dataclasses.is_dataclass(arg) or typing.get_origin(arg) is not None):
                return build(arg, value)
        return value
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        hints = typing.get_type_hints(hint)
        return hint(**{k: build(hints[k], v) for k, v in value.items()})
    if origin is list and args:
        return [build(args[0], v) for v in value]
    if origin is tuple and args:
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        return tuple(build(a, v) for a, v in zip(items, value))
    if origin is dict and args:
        key = int if args[0] is int else (lambda k: k)
        return {key(k): build(args[1], v) for k, v in value.items()}
    return value


__all__ = ["SCHEMA_VERSION", "Similarity", "StudyResult", "build", "plain"]
