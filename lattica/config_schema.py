"""Reading a tree of settings dataclasses as a schema: keys, types, bounds, defaults, docs.

A setting's documentation is the string literal right after its field (the attribute
docstring convention Sphinx uses); it is read from the class source with :mod:`ast`, so the
code, ``config.toml`` comments written by ``lattica init`` and ``docs/config.md`` say the same.
A field whose type is itself a dataclass is a section (a TOML table). Only dataclasses are
walked; nothing here knows Lattica's settings.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import json
import math
import textwrap
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec


@dataclass(frozen=True)
class Setting:
    """One leaf setting of a config tree, as a file spells it."""

    key: str
    """Dotted key: ``listen``, ``net.idle_timeout_s``."""
    type_text: str
    """The type with its bounds, for people: ``float, > 0, <= 31622400``."""
    default: Any
    """The default value (Python)."""
    doc: str
    """The field's documentation, one paragraph."""


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass and its bases (a subclass's text wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


@functools.cache
def _own_field_docs(cls: type) -> dict[str, str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    class_def = tree.body[0]
    assert isinstance(class_def, ast.ClassDef)
    docs: dict[str, str] = {}
    body = class_def.body
    for statement, following in itertools.pairwise(body):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[statement.target.id] = " ".join(following.value.value.split())
    return docs


def section_types(cls: type) -> dict[str, type]:
    """Fields of ``cls`` that are sections (their type is a dataclass), by name."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(cls)
        if isinstance(hints[f.name], type) and dataclasses.is_dataclass(hints[f.name])
    }


def iter_settings(cls: type, *, excluded: frozenset[str] = frozenset(), prefix: str = "") -> Iterator[Setting]:
    """Every leaf setting of the dataclass tree ``cls`` in field order, sections after the
    top-level settings (as TOML needs). Dotted keys in ``excluded`` are left out."""
    hints = typing.get_type_hints(cls, include_extras=True)
    docs = field_docs(cls)
    sections = section_types(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if f.name in sections or key in excluded:
            continue
        yield Setting(key, describe_type(hints[f.name]), getattr(defaults, f.name), docs.get(f.name, ""))
    for name, section in sections.items():
        yield from iter_settings(section, excluded=excluded, prefix=f"{prefix}{name}.")


def unknown_keys(
    raw: Mapping[str, Any], cls: type, *, excluded: frozenset[str] = frozenset(), prefix: str = ""
) -> list[str]:
    """Dotted keys of ``raw`` (parsed TOML) that are not settings of ``cls``."""
    names = {f.name for f in dataclasses.fields(cls)}
    sections = section_types(cls)
    unknown = []
    for name, value in raw.items():
        key = prefix + name
        if name not in names or key in excluded:
            unknown.append(key)
        elif name in sections and isinstance(value, Mapping):
            unknown += unknown_keys(value, sections[name], excluded=excluded, prefix=key + ".")
    return unknown


def describe_type(annotation: Any) -> str:
    """``int, >= 1, <= 32`` for ``Annotated[int, Meta(ge=1, le=32)]``; ``list of string``..."""
    bounds: list[str] = []
    if typing.get_origin(annotation) is typing.Annotated:
        annotation, *metadata = typing.get_args(annotation)
        for meta in metadata:
            if isinstance(meta, msgspec.Meta):
                for attribute, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
                    bound = getattr(meta, attribute)
                    if bound is not None:
                        bounds.append(f"{symbol} {toml_value(bound)}")
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        text = "one of " + ", ".join(toml_value(v) for v in typing.get_args(annotation))
    elif origin in (tuple, list):
        text = "list of " + describe_type(typing.get_args(annotation)[0])
    else:
        text = {bool: "boolean", int: "integer", float: "float", str: "string"}.get(annotation, str(annotation))
    return ", ".join([text, *bounds])


def toml_value(value: Any) -> str:
    """``value`` as a TOML literal (strings JSON-escaped, which TOML basic strings accept)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")
