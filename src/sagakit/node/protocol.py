"""The wire protocol, as pure functions over text: framing, encoding, errors, fields.

Messages are ``{"src", "dest", "body"}`` JSON objects. Input may be one value per
line (the fast path), values pretty-printed over several lines, or values
written back to back; :class:`Decoder` accepts all three. Output is one
``json.dumps`` line per message, whose default spacing and key order the seed
samples fix byte for byte.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from enum import IntEnum
from typing import Any, NamedTuple

_exact_loads: Callable[[str], Any] = json.loads
loads: Callable[[str], Any]
try:  # orjson parses several times faster; the node must still run without it.
    from orjson import loads
except ImportError:  # pragma: no cover - exercised by running main.py on a bare python
    loads = json.loads

# orjson reads integers past 64 bits as floats, silently; json.loads keeps them
# exact. Text with a run of 19 digits goes to json.loads. The scan maps every
# digit to "0" and looks for nineteen of them: a regex would cost more than
# parsing the text (sre has no literal to skip ahead by).
_DIGITS_TO_ZERO = bytes(0x30 if 0x30 <= i <= 0x39 else 0x20 for i in range(256))
_NINETEEN_DIGITS = b"0" * 19


def _has_long_number(text: str) -> bool:
    return (
        text.encode("utf-8", "surrogatepass").translate(_DIGITS_TO_ZERO).find(_NINETEEN_DIGITS)
        != -1
    )


def _loads_any(text: str) -> Any:
    """orjson, then json.loads for what orjson refuses (lone surrogate escapes)."""
    if _has_long_number(text):
        return _exact_loads(text)
    try:
        return loads(text)
    except ValueError:
        return _exact_loads(text)


__all__ = [
    "BadInput",
    "Decoder",
    "Encoded",
    "ErrorCode",
    "RequestError",
    "encode",
    "error_body",
    "json_string",
    "msg_id_of",
    "optional_bool",
    "optional_str",
    "require_msg_id",
    "require_str",
    "require_str_list",
]

_raw_decode = json.JSONDecoder().raw_decode
# json.dumps' own C encoder, called without the Python layers around it: the
# same bytes (default spacing, ensure_ascii) at a fraction of the cost.
_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
_encoder: Any = (
    None
    if _make_encoder is None
    else _make_encoder(
        None, None, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True
    )
)


class ErrorCode(IntEnum):
    """Maelstrom's error codes, the ones this node uses."""

    NOT_SUPPORTED = 10
    MALFORMED_REQUEST = 12
    CRASH = 13
    ABORT = 14
    PRECONDITION_FAILED = 22


class RequestError(Exception):
    """A request that gets an error reply instead of a normal one."""

    def __init__(self, code: ErrorCode, text: str, **extra: Any) -> None:
        super().__init__(text)
        self.code, self.text, self.extra = code, text, extra


_escape: Callable[[str], str] = json.encoder.encode_basestring_ascii

# json_string(text): ``text`` as json.dumps writes a string (quoted,
# ASCII-escaped). The json module's own C function, not a wrapper around it:
# every reply calls it.
json_string: Callable[[str], str] = _escape


class Encoded(str):
    """A body already encoded exactly as json.dumps would encode it.

    A node kind whose replies have a fixed shape may return one instead of a
    dict; ``encode`` then only wraps it in the envelope. The saga node does,
    for the reply to every ``execute``.
    """

    __slots__ = ()


# '{"src": ..., "dest": ..., "body": ' for each (src, dest) pair seen: a node
# answers the same few clients over and over, so the envelope is encoded once.
_prefixes: dict[tuple[str, str], str] = {}


def encode(src: str, dest: str, body: dict[str, Any] | Encoded) -> str:
    """One output line (without the newline), byte for byte what json.dumps gives
    for ``{"src": src, "dest": dest, "body": body}``."""
    if _encoder is None:  # pragma: no cover - Pythons without the C accelerator
        if type(body) is Encoded:
            return f'{{"src": {json.dumps(src)}, "dest": {json.dumps(dest)}, "body": {body}}}'
        return json.dumps({"src": src, "dest": dest, "body": body})
    prefix = _prefixes.get((src, dest))
    if prefix is None:
        if len(_prefixes) >= 4096:
            _prefixes.clear()
        prefix = f'{{"src": {_escape(src)}, "dest": {_escape(dest)}, "body": '
        _prefixes[src, dest] = prefix
    if type(body) is Encoded:
        return prefix + body + "}"
    return prefix + "".join(_encoder(body, 0)) + "}"


def error_body(in_reply_to: int | None, code: int, text: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "error"}
    if in_reply_to is not None:
        body["in_reply_to"] = in_reply_to
    body["code"] = int(code)
    body["text"] = text
    body.update(extra)
    return body


# --- request fields: each check names the field it rejects ------------------------


def _malformed(name: str, problem: str) -> RequestError:
    return RequestError(ErrorCode.MALFORMED_REQUEST, f"{name}: {problem}")


def msg_id_of(body: dict[str, Any]) -> int | None:
    """The request's msg_id, if it has a usable one."""
    value = body.get("msg_id")
    return value if type(value) is int else None


def require_msg_id(body: dict[str, Any]) -> int:
    """The msg_id of a request that gets a reply, which the reply must point to."""
    value = body.get("msg_id")
    if type(value) is not int:
        raise _malformed("msg_id", "required, an integer")
    return value


def require_str(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if type(value) is not str or not value:
        raise _malformed(name, "required, a non-empty string")
    return value


def optional_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and type(value) is not str:
        raise _malformed(name, f"must be a string or absent, got {type(value).__name__}")
    return value


def optional_bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if type(value) is not bool:
        raise _malformed(name, f"must be true or false, got {value!r}")
    return value


def require_str_list(body: dict[str, Any], name: str) -> list[str]:
    value = body.get(name)
    if type(value) is not list or not value:
        raise _malformed(name, "required, a non-empty list of strings")
    for i, item in enumerate(value):
        if type(item) is not str or not item:
            raise _malformed(f"{name}[{i}]", "must be a non-empty string")
    return value


# --- framing ----------------------------------------------------------------------


class BadInput(NamedTuple):
    """Input that is not a JSON value; reported, then skipped."""

    text: str
    reason: str


_WS = " \t\r\n"
_STRUCTURE = re.compile(r'[{}\[\]"]')
_STRING_REST = re.compile(r'(?:[^"\\]|\\.)*"', re.S)


def _balanced_end(buf: str, pos: int) -> int:
    """Index just past the bracketed value opening at ``pos``; -1 if not closed yet."""
    depth = 0
    find = _STRUCTURE.search
    while (m := find(buf, pos)) is not None:
        ch = m.group()
        if ch == '"':
            s = _STRING_REST.match(buf, m.end())
            if s is None:
                return -1
            pos = s.end()
            continue
        pos = m.end()
        depth += 1 if ch in "{[" else -1
        if depth == 0:
            return pos
    return -1


def _envelope_line(buf: str, start: int, final: bool) -> int:
    """Start of the first line after ``start``'s line that is a whole message by itself.

    Used to resynchronise after a truncated value: without it, one broken line
    would swallow every message after it while the decoder waits for a closing
    brace. Only lines that are a complete object with a "body" count, so a
    pretty-printed message's own lines never trigger it. The last line counts
    only at end of input: before that it may still be growing.
    """
    pos = buf.find("\n", start)
    while pos != -1:
        nxt = buf.find("\n", pos + 1)
        if nxt == -1:
            if not final or pos + 1 >= len(buf):
                return -1
            nxt = len(buf)
        line = buf[pos + 1 : nxt]
        if line.lstrip().startswith("{"):
            try:
                value = loads(line)
            except ValueError:
                pass
            else:
                if type(value) is dict and "body" in value:
                    return pos + 1
        pos = nxt
    return -1


class Decoder:
    """Turns a stream of text, fed in any pieces, into JSON values and BadInput."""

    def __init__(self, max_pending: int = 16 * 1024 * 1024) -> None:
        self._pending = ""
        self._max_pending = max_pending

    def feed(self, text: str, *, final: bool = False) -> list[Any]:
        """Values (and BadInput items) completed by ``text``; ``final`` marks end of input."""
        buf = self._pending + text if self._pending else text
        fast = _exact_loads if _has_long_number(buf) else loads
        # The common case first: every line one whole value. The first line
        # that is not (blank, part of a value over several lines, bad input)
        # hands over to the general loop below, at that line's start.
        lines = buf.split("\n")
        tail = lines.pop()  # the text after the last newline: not known to be whole yet
        out: list[Any] = []
        append = out.append
        try:
            for line in lines:
                append(fast(line))
        except ValueError:
            done = len(out)
            pos = sum(map(len, lines[:done])) + done
        else:
            pos = len(buf) - len(tail)
        n = len(buf)
        while True:
            while pos < n and buf[pos] in _WS:
                pos += 1
            if pos >= n:
                break
            nl = buf.find("\n", pos)
            if nl != -1:
                try:
                    out.append(fast(buf[pos:nl]))
                    pos = nl + 1
                    continue
                except ValueError:
                    pass
            end = self._slow(buf, pos, nl, final, out)
            if end == -1:
                break
            pos = end
        rest = buf[pos:]
        if len(rest) > self._max_pending:
            out.append(BadInput(rest[:200], f"a value over {self._max_pending} bytes"))
            rest = ""
        self._pending = rest
        return out

    def close(self) -> list[Any]:
        """Whatever the end of input leaves: an unfinished value is BadInput."""
        return self.feed("", final=True)

    def _slow(self, buf: str, pos: int, nl: int, final: bool, out: list[Any]) -> int:
        """A value over several lines, several values on one line, or bad input.

        Returns where to carry on, or -1 to wait for more text.
        """
        line_end = len(buf) if nl == -1 else nl
        if buf[pos] in "{[":
            end = _balanced_end(buf, pos)
            if end != -1:
                try:
                    out.append(_loads_any(buf[pos:end]))
                    return end
                except ValueError as exc:
                    problem = f"not JSON ({exc})"
            elif final:
                problem = "input ended inside a JSON value"
                end = len(buf)
            else:
                problem = "an unfinished JSON value followed by a new message"
            resync = _envelope_line(buf, pos, final)
            if resync != -1 and (end == -1 or resync < end):
                end = resync
            if end == -1:
                return -1
            out.append(BadInput(buf[pos:end].strip(), problem))
            return end
        try:
            value, end = _raw_decode(buf, pos)
        except json.JSONDecodeError as exc:
            if nl == -1 and not final:
                return -1
            out.append(BadInput(buf[pos:line_end].strip(), f"not JSON ({exc.msg})"))
            return line_end
        if end == len(buf) and not final:
            # A bare number at the end of the text may go on in the next piece.
            return -1
        out.append(value)
        return end
