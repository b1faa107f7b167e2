"""Checked reading of a composed YAML document: values by key path, with file and line in errors.

The rack loader (:mod:`pytest_hilfarm.description.rack`) reads a rack file as YAML *nodes*
(``yaml.compose``), not as plain data, so that every error can name the line of the bad value.
These helpers take one node and either return a checked Python value or raise a
:class:`~pytest_hilfarm.errors.ConfigError` naming the file, the line, the key path
(``boards[2].power.hub``), the bad value and what was expected. They only read: they never open
a file or decide what a rack means.

A document built from Python data (:func:`nodes_of`) has no line numbers; its errors name the
source alone.
"""

from __future__ import annotations

import difflib
import io
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from pytest_hilfarm.errors import ConfigError

Entries = dict[str, tuple[ScalarNode, Node]]


def closest(word: str, choices: Iterable[str]) -> str | None:
    """Return the choice most like ``word`` (for "did you mean"), or None if none is close."""
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


@dataclass(frozen=True)
class Location:
    """A place in a rack file (line numbers start at 1, as editors show them; 0: unknown)."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file


def nodes_of(data: Any) -> Node:
    """The YAML node graph of already-loaded data (no line numbers), to check like a file."""
    dumper = yaml.SafeDumper(io.StringIO(), sort_keys=False)
    try:
        return dumper.represent_data(data)
    except yaml.YAMLError as exc:
        raise ConfigError(f"the rack holds a value YAML cannot carry: {exc}",
                          hint="use only mappings, lists, text, numbers and booleans") from None


@dataclass(frozen=True)
class Ctx:
    """The document being read: its name for errors and the folder relative paths start from."""

    source: str
    base_dir: Path
    constructor: SafeConstructor

    def loc(self, node: Node) -> Location:
        mark = node.start_mark
        return Location(self.source, mark.line + 1 if mark is not None else 0)

    def error(self, node: Node, path: str, what: str, hint: str | None = None) -> ConfigError:
        text = f"{path}: {what}" if path else what
        return ConfigError(text, where=str(self.loc(node)), hint=hint)


def describe(ctx: Ctx, node: Node) -> str:
    """How a bad value reads in an error: the value and, when it is no string, its type."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    value = ctx.constructor.construct_object(node, deep=True)
    if value is None:
        return "nothing (an empty value)"
    if isinstance(value, bool):
        return f"{node.value} (a boolean)"
    if isinstance(value, (int, float)):
        return f"{node.value} (a number)"
    if isinstance(value, str):
        return repr(value)
    return f"{node.value!r} (a {type(value).__name__})"


def fields(ctx: Ctx, node: Node, path: str, allowed: Collection[str], what: str) -> Entries:
    """The entries of a mapping node by key, refusing non-mappings and duplicate keys."""
    if not isinstance(node, MappingNode):
        raise ctx.error(node, path, f"expected {what}, got {describe(ctx, node)}")
    own = {id(key_node) for key_node, _value in node.value}
    # Resolve YAML merge keys (<<: *anchor) the way yaml.safe_load would: merged entries come
    # first and the mapping's own keys override them. A copy, because flattening rewrites the
    # node and an aliased node may be read again.
    flat = MappingNode(node.tag, list(node.value), node.start_mark, node.end_mark)
    ctx.constructor.flatten_mapping(flat)
    entries: Entries = {}
    merged: set[str] = set()
    for key_node, value_node in flat.value:
        if not isinstance(key_node, ScalarNode):
            raise ctx.error(key_node, path or "top level",
                            f"keys must be names, got {describe(ctx, key_node)}",
                            hint=f"allowed keys: {', '.join(allowed)}")
        # Keys are taken as written: YAML 1.1 would read the http power keys `on`/`off` as
        # booleans, and nobody means a number or a boolean as a key here.
        key = str(key_node.value)
        keypath = f"{path}.{key}" if path else key
        if id(key_node) not in own:
            merged.add(key)
        elif key in merged:
            merged.discard(key)
        elif key in entries:
            first = ctx.loc(entries[key][0]).line
            raise ctx.error(key_node, keypath, f"duplicate key (first given on line {first})",
                            hint="keep one of them")
        entries[key] = (key_node, value_node)
    return entries


def check_keys(ctx: Ctx, entries: Mapping[str, tuple[ScalarNode, Node]], path: str,
               allowed: Collection[str]) -> None:
    for key, (key_node, _value) in entries.items():
        if key not in allowed:
            guess = closest(key, allowed)
            hint = (f"did you mean {guess!r}?" if guess
                    else f"allowed keys here: {', '.join(allowed)}")
            keypath = f"{path}.{key}" if path else key
            raise ctx.error(key_node, keypath, "unknown key", hint=hint)


def require(ctx: Ctx, node: Node, entries: Mapping[str, object], path: str,
            keys: Iterable[str], hint: str | None = None) -> None:
    for key in keys:
        if key not in entries:
            raise ctx.error(node, path or "top level", f"missing required key {key!r}",
                            hint=hint)


def scalar(ctx: Ctx, node: Node, path: str, expected: str) -> object:
    if not isinstance(node, ScalarNode):
        raise ctx.error(node, path, f"expected {expected}, got {describe(ctx, node)}")
    return ctx.constructor.construct_object(node, deep=True)


def string(ctx: Ctx, node: Node, path: str, expected: str,
           pattern: re.Pattern[str] | None = None, hint: str | None = None) -> str:
    value = scalar(ctx, node, path, expected)
    key = path.rsplit(".", 1)[-1]
    if not isinstance(value, str):
        # YAML reads 0001 as 1 and 12:34:56 as a base-60 number; quoting keeps the text.
        quote = hint if value is None else f'quote it: {key}: "{node.value}"'
        raise ctx.error(node, path, f"expected {expected}, got {describe(ctx, node)}",
                        hint=quote)
    if not value.strip() or (pattern is not None and not pattern.fullmatch(value)):
        raise ctx.error(node, path, f"expected {expected}, got {value!r}", hint=hint)
    return value


def choice(ctx: Ctx, node: Node, path: str, choices: Collection[str],
           hint: str | None = None) -> str:
    """One of ``choices``; ``hint`` is added to the "did you mean" (or replaces "use ...")."""
    expected = "one of " + ", ".join(choices)
    value = scalar(ctx, node, path, expected)
    if isinstance(value, str) and value in choices:
        return value
    guess = closest(str(value), choices) if value is not None else None
    says = f"did you mean {guess!r}?" if guess else f"use {expected}"
    raise ctx.error(node, path, f"expected {expected}, got {describe(ctx, node)}",
                    hint=f"{says} ({hint})" if hint else says)


def integer(ctx: Ctx, node: Node, path: str, expected: str, low: int, high: int | None = None,
            hint: str | None = None) -> int:
    value = scalar(ctx, node, path, expected)
    # bool is an int subclass in Python: `yes` must not pass as 1.
    if isinstance(value, int) and not isinstance(value, bool) and value >= low \
            and (high is None or value <= high):
        return value
    raise ctx.error(node, path, f"expected {expected}, got {describe(ctx, node)}", hint=hint)


def boolean(ctx: Ctx, node: Node, path: str) -> bool:
    value = scalar(ctx, node, path, "true or false")
    if isinstance(value, bool):
        return value
    raise ctx.error(node, path, f"expected true or false, got {describe(ctx, node)}")


def path_value(ctx: Ctx, node: Node, path: str, expected: str) -> Path:
    text = string(ctx, node, path, expected, hint="give a path, e.g. ./images/baseline.bin")
    result = Path(text).expanduser()
    return result if result.is_absolute() else ctx.base_dir / result
