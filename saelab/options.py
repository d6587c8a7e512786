"""Config dataclasses as the single source of every setting's name, type, default and help.

The same field becomes a strictly checked key in YAML / JSON run files (`from_mapping`: an unknown key or a value of
the wrong type is refused, naming the valid keys or the expected type) and a command-line flag (`add_flags`: its
help is the field's docstring). Nothing is copied by hand, so the CLI, the files and the Python API cannot drift.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import math
import textwrap
import types
import typing
from functools import cache
from typing import Annotated, Any, Literal, Union


class SettingError(ValueError):
    """A setting with an unknown name or a value of the wrong type."""


@dataclasses.dataclass(frozen=True)
class Range:
    """The finite numbers a setting may take, carried in its annotation (`Annotated[int, Range(at_least=1)]`), so
    run files (`from_mapping`), flags (`add_flags`, `flag_type`) and objects built in Python (`check_fields`) refuse
    the same values in the same words, and NaN or infinity never passes as "large" or "all"."""

    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None

    def __contains__(self, value) -> bool:
        return (math.isfinite(value) and (self.at_least is None or value >= self.at_least)
                and (self.above is None or value > self.above) and (self.at_most is None or value <= self.at_most)
                and (self.below is None or value < self.below))

    def __str__(self) -> str:
        low = (f"[{self.at_least:g}" if self.at_least is not None else f"({self.above:g}" if self.above is not None
               else None)
        high = f"{self.at_most:g}]" if self.at_most is not None else f"{self.below:g})" if self.below is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return (">= " if low[0] == "[" else "> ") + low[1:]
        if high:
            return ("<= " if high[-1] == "]" else "< ") + high[:-1]
        return ""


PositiveInt = Annotated[int, Range(at_least=1)]
NonNegativeInt = Annotated[int, Range(at_least=0)]
FiniteFloat = Annotated[float, Range()]
PositiveFloat = Annotated[float, Range(above=0)]
NonNegativeFloat = Annotated[float, Range(at_least=0)]
Fraction = Annotated[float, Range(at_least=0, at_most=1)]
Decay = Annotated[float, Range(at_least=0, below=1)]
"""A per-step decay factor (Adam's betas, an EMA): 1 would never forget."""


@cache
def field_docs(cls: type) -> dict[str, str]:
    """{field: docstring}: the string literal written under each field of the dataclass (and its bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _ranges(hint: Any) -> tuple[Any, list[Range]]:
    """(the annotation without its Annotated wrapper, the Ranges it carries)."""
    if typing.get_origin(hint) is Annotated:
        inner, *extras = typing.get_args(hint)
        return inner, [extra for extra in extras if isinstance(extra, Range)]
    return hint, []


def describe(hint: Any) -> str:
    """A type annotation in words, for error messages."""
    hint, ranges = _ranges(hint)
    if ranges:
        bounds = " and ".join(filter(None, map(str, ranges)))
        name = {int: "an integer", float: "a number" if bounds else "a finite number"}.get(hint, describe(hint))
        return f"{name} {bounds}".strip()
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        return f"a list of {len(args)} ({', '.join(describe(a) for a in args)})"
    if origin is list:
        return f"a list of {describe(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}.get(hint, str(hint))


def check_value(value: Any, hint: Any, where: str) -> Any:
    """`value` if it fits the annotation `hint` (ints are accepted as floats, lists as tuples), else SettingError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    fail = SettingError(f"{where} must be {describe(hint)}, got {value!r}")
    if hint is Any:
        return value
    if origin is Annotated:
        inner, ranges = _ranges(hint)
        try:
            value = check_value(value, inner, where)
        except SettingError:
            raise fail from None
        if any(value not in r for r in ranges):
            raise fail
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return check_value(value, arg, where)
                except SettingError:
                    pass
        raise fail
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise fail
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise fail
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise fail
    if hint is str:
        if isinstance(value, str):
            return value
        raise fail
    if origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(check_value(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        raise fail
    if origin is list:
        if isinstance(value, (list, tuple)):
            return [check_value(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
        raise fail
    if origin is dict or hint is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
        raise fail
    return value


def check_keys(data: dict, valid: list[str], where: str) -> None:
    """Refuse keys that are not in `valid`, suggesting the closest valid one."""
    if not isinstance(data, dict):
        raise SettingError(f"{where} must be a mapping of settings, got {type(data).__name__}: {data!r}")
    for key in data:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SettingError(f"{where} has no setting {key!r}{hint}; valid settings: {', '.join(valid)}")


def from_mapping(cls: type, data: dict, where: str, *, only: list[str] | None = None):
    """`cls(**data)` after checking every key exists (among `only`, if given) and every value has its field's type."""
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    check_keys(data, only if only is not None else names, where)
    return cls(**checked(cls, data, where))


def checked(cls: type, data: dict, where: str) -> dict:
    """`data` with each value checked (and converted) against the annotation of the field of `cls` it names."""
    hints = _hints(cls)
    return {key: check_value(value, hints[key], f"{where}.{key}") for key, value in data.items()}


def check_fields(obj) -> None:
    """Refuse a dataclass built directly in Python whose fields do not fit their annotations (types and Ranges):
    the checks `from_mapping` makes on run files, for `TrainConfig(batch_size=0)` too."""
    cls = type(obj)
    checked(cls, {f.name: getattr(obj, f.name) for f in dataclasses.fields(cls) if f.init}, cls.__name__)


# ------------------------------------------------------------------------------------------ command-line flags
def parse_count(text: str) -> int:
    """'300k' -> 300000, '1.5M' -> 1500000."""
    scale = {"k": 1_000, "m": 1_000_000, "b": 1_000_000_000}.get(text[-1:].lower(), 1)
    number = text[:-1] if scale != 1 else text
    try:
        value = float(number) * scale
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (examples: 5000, 300k, 1.5M)")
    if value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole count: {text!r}")
    return int(value)


def parse_number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def flag_type(hint: Any):
    """The argparse `type` for a flag of this annotation: `type=flag_type(PositiveInt)` refuses 0, -1, nan and inf
    where the flag is parsed, in argparse's one line naming the flag and the allowed range."""
    parse = _parser_for(hint)
    if parse is None:
        raise TypeError(f"no command-line form for {hint}")
    return parse


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parser_for(hint: Any):
    """A string -> value converter for one annotation, or None when the field has no single-flag form."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        parse, ranges = _parser_for(args[0]), _ranges(hint)[1]
        if parse is None:
            return None

        def parse_in_range(text: str):
            value = parse(text)
            if any(value not in r for r in ranges):
                raise argparse.ArgumentTypeError(f"must be {describe(hint)}, got {text!r}")
            return value

        return parse_in_range
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        parse = _parser_for(inner[0]) if len(inner) == 1 else None
        if parse is None:
            return None
        return lambda text: None if text.lower() in ("none", "null") else parse(text)
    if hint is int:
        return parse_count
    if hint is float:
        return parse_number
    if hint is str or origin is Literal:
        return str
    if origin is list and args and typing.get_origin(args[0]) not in (list, tuple) and _parser_for(args[0]):
        item = _parser_for(args[0])
        return lambda text: [item(part.strip()) for part in text.split(",")]
    if origin is tuple and args and all(_ranges(a)[0] in (int, float) for a in args):
        items = [_parser_for(a) for a in args]

        def parse_tuple(text: str):
            parts = text.split(",")
            if len(parts) != len(items):
                raise argparse.ArgumentTypeError(f"expected {len(items)} comma-separated numbers, got {text!r}")
            return tuple(p(part) for p, part in zip(items, parts))

        return parse_tuple
    return None


def add_flags(group, cls: type, names: list[str] | None = None, *, lists: tuple[str, ...] = (),
              defaults: dict[str, Any] | None = None, notes: dict[str, str] | None = None) -> list[str]:
    """Add one flag per field of `cls` (all, or `names`) to an argparse group; returns the fields added.

    Flags default to None, so `flag_values` can tell what the user set. Fields in `lists` take a comma list
    (a product dimension) and give a list of the field's type. Every value is checked where it is parsed. `defaults` overrides the default shown in the help; `notes` appends to it.
    """
    hints, docs = _hints(cls), field_docs(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    added = []
    for name in names if names is not None else list(fields):
        hint = hints[name]
        default = (defaults or {}).get(name, _default_of(fields[name]))
        help_text = docs.get(name, "")
        if typing.get_origin(hint) is Literal:
            help_text += f" [{', '.join(map(str, typing.get_args(hint)))}]"
        if name in lists:
            help_text += " Comma list: one SAE per combination."
        help_text += (f" {notes[name]}" if notes and name in notes else "") + f" (default: {default})"
        help_text = help_text.replace("%", "%%")
        if hint is bool:
            group.add_argument(flag(name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif name in lists:
            group.add_argument(flag(name), type=_parser_for(list[hint]), default=None, metavar="A,B,...",
                               help=help_text)
        elif typing.get_origin(hint) is Literal:
            group.add_argument(flag(name), choices=typing.get_args(hint), default=None, help=help_text)
        else:
            parse = _parser_for(hint)
            if parse is None:
                continue
            group.add_argument(flag(name), type=parse, default=None, metavar=_metavar(hint), help=help_text)
        added.append(name)
    return added


def _metavar(hint: Any) -> str:
    inner = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    base = _ranges(inner[0] if typing.get_origin(hint) in (Union, types.UnionType) else hint)[0]
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        return "A,B,..."
    return {int: "N", float: "X", str: "TEXT"}.get(base, "VALUE")


def _default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return "required"


def flag_values(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """{field: value} for the flags among `names` that were given on the command line."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
