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


def split_list(text: str) -> list[str]:
    """The items of a list flag: separated by commas or semicolons outside braces, so a hook pattern
    (`blocks.{9,15}.hook_resid_post`) is one item, and `a;b`, `a,b` and `a, b` are the same two."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char in ",;" and depth <= 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items]


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
        return lambda text: [item(part) for part in split_list(text)]
    if origin is tuple and args and all(_ranges(a)[0] in (int, float) for a in args):
        items = [_parser_for(a) for a in args]

        def parse_tuple(text: str):
            parts = split_list(text)
            if len(parts) != len(items):
                raise argparse.ArgumentTypeError(f"expected {len(items)} numbers separated by commas or ';', got "
                                                 f"{text!r}")
            return tuple(p(part) for p, part in zip(items, parts))

        return parse_tuple
    return None


@dataclasses.dataclass(frozen=True)
class Flag:
    """How one field is spelled on the command line where the rule (`--field-name`, its text parsed and checked by
    the annotation) does not fit: carried in the annotation (`Annotated[str, Flag(positional=True)]`), or given to
    add_flags (`spell=`) for a field of a library config."""

    name: str | None = None
    """The flag's name where it is not the field's (`nulls` for null_draws)."""
    positional: bool = False
    """An argument without a flag name, in field order; a list takes one or more."""
    switch: bool = False
    """Takes no value: `--NAME` sets a field defaulting to False, `--no-NAME` clears one defaulting to True."""
    repeat: bool = False
    """A list given one item per flag (`--sae A --sae B`), for items that may hold commas."""
    parse: Any = None
    """The argparse type, where the annotation cannot say how text becomes a value (a text source to resolve)."""
    bare: Any = None
    """Not None: the flag may also be given without a value, meaning this (`--dry-run` alone: True)."""
    metavar: str | None = None
    required: bool = False
    """Must be given, though the field has a default (an empty list the command cannot run on)."""


@dataclasses.dataclass(frozen=True)
class Group:
    """Marks a field holding a config of its own (`Annotated[MatchConfig, Group(spell=...)]`): its fields are flags
    too, in one help group, spelled as `spell` says. A field typed by a dataclass needs no mark."""

    spell: dict[str, Flag] | None = None


def _marks(hint: Any) -> tuple[Any, Flag | None, Group | None]:
    """(the annotation without its Flag / Group marks, the Flag, the Group)."""
    if typing.get_origin(hint) is not Annotated:
        return hint, None, (Group() if dataclasses.is_dataclass(hint) else None)
    inner, *extras = typing.get_args(hint)
    rest = [extra for extra in extras if not isinstance(extra, (Flag, Group))]
    flags = [extra for extra in extras if isinstance(extra, Flag)]
    groups = [extra for extra in extras if isinstance(extra, Group)]
    return (Annotated[(inner, *rest)] if rest else inner), (flags or [None])[0], (groups or [None])[0]


def add_flags(group, cls: type, names: list[str] | None = None, *, lists: tuple[str, ...] = (),
              defaults: dict[str, Any] | None = None, notes: dict[str, str] | None = None,
              spell: dict[str, Flag] | None = None) -> list[str]:
    """Add one flag per field of `cls` (all, or `names`) to an argparse group; returns the fields added.

    Flags default to None, so `flag_values` can tell what the user set; a field without a default is a required
    flag. Fields in `lists` take a comma list (a product dimension) and give a list of the field's type. Every value
    is checked where it is parsed. `defaults` overrides the default shown in the help; `notes` appends to it; `spell`
    says how fields of a config the command line does not own are spelled (see Flag).
    """
    hints, docs = _hints(cls), field_docs(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    added = []
    for name in names if names is not None else list(fields):
        hint, how, _ = _marks(hints[name])
        how = (spell or {}).get(name) or how or Flag()
        default = (defaults or {}).get(name, "required" if how.required else _default_of(fields[name]))
        help_text = docs.get(name, "")
        if typing.get_origin(hint) is Literal:
            help_text += f" [{', '.join(map(str, typing.get_args(hint)))}]"
        if name in lists:
            help_text += " Comma list: one SAE per combination."
        help_text += f" {notes[name]}" if notes and name in notes else ""
        if not (how.switch or how.positional or default is None):
            help_text += " (required)" if default == "required" else f" (default: {default})"
        options = dict(default=None, help=help_text.strip().replace("%", "%%"))
        if not _add_flag(group, name, hint, how, default, options, name in lists):
            continue
        added.append(name)
    return added


def _add_flag(group, name: str, hint: Any, how: Flag, default: Any, options: dict, product: bool) -> bool:
    """One field's argument, as `how` spells it; False when the field has no command-line form."""
    names = [how.name or name] if how.positional else [flag(how.name or name)]
    if how.positional:
        options["nargs"] = "+" if typing.get_origin(hint) is list else None if default == "required" else "?"
    else:
        options.update(dest=name, required=default == "required")
    if how.switch:
        names = [flag("no_" + (how.name or name))] if default is True else names
        group.add_argument(*names, action="store_false" if default is True else "store_true", **options)
    elif hint is bool:
        group.add_argument(*names, action=argparse.BooleanOptionalAction, **options)
    elif product:
        group.add_argument(*names, type=_parser_for(list[hint]), metavar="A,B,...", **options)
    elif typing.get_origin(hint) is Literal and how.parse is None:
        group.add_argument(*names, choices=typing.get_args(hint), **options)
    else:
        item = typing.get_args(hint)[0] if how.repeat or options.get("nargs") == "+" else hint
        parse = how.parse or _parser_for(item)
        if parse is None:
            return False
        if how.repeat:
            options["action"] = "append"
        if how.bare is not None:
            options.update(nargs="?", const=how.bare)
        group.add_argument(*names, type=parse, metavar=how.metavar or (None if how.positional else _metavar(item)),
                           **options)
    return True


def add_config_flags(parser, cls: type, *, spell: dict[str, Flag] | None = None, title: str | None = None) -> None:
    """Flags for a command's config `cls`: its own fields in `parser` (or a group titled `title`), each field that
    holds a config of its own (a dataclass, or one marked by Group) in a group of its own. `config_from_flags`
    builds the config back from what was parsed."""
    hints, own = _hints(cls), []
    for field in dataclasses.fields(cls):
        inner, _, group = _marks(hints[field.name])
        if not field.init:
            continue
        if group is None:
            own.append(field.name)
        else:
            add_config_flags(parser, inner, spell=group.spell, title=_title(inner))
    add_flags(parser.add_argument_group(title) if title else parser, cls, own, spell=spell)


def config_from_flags(cls: type, args: argparse.Namespace):
    """`cls` from parsed flags (see add_config_flags): each field the command line gave, else its default."""
    hints, values = _hints(cls), {}
    for field in dataclasses.fields(cls):
        inner, _, group = _marks(hints[field.name])
        if not field.init:
            continue
        if group is not None:
            values[field.name] = config_from_flags(inner, args)
        elif getattr(args, field.name, None) is not None:
            values[field.name] = getattr(args, field.name)
    return cls(**values)


def _title(cls: type) -> str:
    return " ".join((inspect.getdoc(cls) or cls.__name__).split("\n\n")[0].split()).rstrip(".")


def _metavar(hint: Any) -> str | None:
    """How the help writes a flag's value; None: the flag's name in capitals (a string)."""
    inner = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    base = _ranges(inner[0] if typing.get_origin(hint) in (Union, types.UnionType) else hint)[0]
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        return "A,B,..."
    return {int: "N", float: "X", str: None}.get(base, "VALUE")


def _default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return "required"


def flag_values(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """{field: value} for the flags among `names` that were given on the command line."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
