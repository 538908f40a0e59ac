"""The envelope of a message nested too deep for the JSON parsers, read without recursion.

orjson stops at 1,024 levels and the standard library's parser at the
interpreter's recursion limit, yet a message nested deeper than that is still
a message whose sender waits for a reply. :func:`read_envelope` reads the
fields of its top level and of its ``body`` (``src``, ``dest``, ``msg_id``,
``saga_id``: what an error reply needs) as the parsers would, and skips every
array or object below them by counting brackets, outside strings.

It recurses once, into the body, never per level of nesting, and is linear in
the text's size: a run of brackets is one match of a regex (a megabyte of
``[`` is a few operations in C). It is as lenient as framing's lenient parser
(``NaN``, ``Infinity`` and raw control characters in strings pass), and the
values it skips are only checked to be balanced: the text is refused anyway,
and the question is only whether its sender can be told why.
"""

from __future__ import annotations

import json.decoder
import re
from collections.abc import Callable
from typing import Any

__all__ = ["NESTED", "read_envelope"]

# The value of a field that holds an array or an object (not read), or a number
# past the interpreter's digit limit: no field an error reply reads takes it,
# as none takes a list where it wants a scalar.
NESTED: Any = ...

# The json module's own string reader (in C), as its parser calls it: a string
# read here is the string the parser would read. Not in typeshed's stubs.
_scanstring: Callable[[str, int, bool], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]

_SPACE = re.compile(r"[ \t\n\r]*")
_SCALAR = re.compile(
    r"(-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|NaN|-?Infinity)|(true|false|null)"
)
_LITERALS: dict[str, Any] = {"true": True, "false": False, "null": None}
# As framing's: brackets in runs, and the rest of a string after its opening quote.
_STRUCTURE = re.compile(r'[{\[]+|[}\]]+|"')
_STRING_REST = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*"', re.S)


def read_envelope(text: str) -> tuple[dict[str, Any], int] | None:
    """``(fields, depth)`` for a text that is one JSON object (``depth``: how deep
    it is nested). ``fields``: its top-level fields, scalars as the parsers read
    them, ``body`` (when an object) with its own scalar fields, arrays and objects
    :data:`NESTED`. None for a text that is not one object.
    """
    pos = _space(text, 0)
    if not text.startswith("{", pos):
        return None
    found = _object(text, pos + 1, 1, read_body=True)
    if found is None:
        return None
    fields, end, depth = found
    return (fields, depth) if not text[end:].strip(" \t\n\r") else None


def _object(
    text: str, pos: int, depth: int, *, read_body: bool
) -> tuple[dict[str, Any], int, int] | None:
    """The object whose ``{`` ends at ``pos``, ``depth`` deep: (fields, end, deepest)."""
    fields: dict[str, Any] = {}
    deepest = depth
    pos = _space(text, pos)
    if text.startswith("}", pos):
        return fields, pos + 1, deepest
    while True:
        if not text.startswith('"', pos):
            return None
        try:
            key, pos = _scanstring(text, pos + 1, False)
        except ValueError:
            return None
        pos = _space(text, pos)
        if not text.startswith(":", pos):
            return None
        pos = _space(text, pos + 1)
        first = text[pos : pos + 1]
        value: Any
        if first == "{" and read_body and key == "body":
            found = _object(text, pos + 1, depth + 1, read_body=False)
            if found is None:
                return None
            value, pos, inner = found
        elif first == "{" or first == "[":
            pos, inner = _skip(text, pos)
            if pos < 0:
                return None
            value, inner = NESTED, depth + inner
        elif first == '"':
            try:
                value, pos = _scanstring(text, pos + 1, False)
            except ValueError:
                return None
            inner = depth
        else:
            m = _SCALAR.match(text, pos)
            if m is None:
                return None
            value, pos, inner = _scalar(m.group(1), m.group(2)), m.end(), depth
        fields[key] = value  # a repeated key: the last one counts, as for the parsers
        deepest = max(deepest, inner)
        pos = _space(text, pos)
        after = text[pos : pos + 1]
        if after == "}":
            return fields, pos + 1, deepest
        if after != ",":
            return None
        pos = _space(text, pos + 1)


def _space(text: str, pos: int) -> int:
    """Past the whitespace at ``pos``."""
    m = _SPACE.match(text, pos)
    return pos if m is None else m.end()


def _scalar(number: str | None, literal: str | None) -> Any:
    if literal is not None:
        return _LITERALS[literal]
    assert number is not None
    try:
        return float(number) if any(c in number for c in ".eEIN") else int(number)
    except ValueError:  # past the interpreter's digit limit
        return NESTED


def _skip(text: str, pos: int) -> tuple[int, int]:
    """(end, depth) of the array or object opening at ``pos``; end -1 if it does
    not close. Counts brackets outside strings, as framing's scan does."""
    depth = deepest = 0
    find = _STRUCTURE.search
    while (m := find(text, pos)) is not None:
        start, pos = m.span()
        if text[start] == '"':
            s = _STRING_REST.match(text, pos)
            if s is None:
                return -1, 0
            pos = s.end()
        elif text[start] in "{[":
            depth += pos - start
            deepest = max(deepest, depth)
        elif pos - start < depth:
            depth -= pos - start
        else:
            return start + depth, deepest
    return -1, 0
