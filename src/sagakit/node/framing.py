"""Framing: a stream of text, fed in any pieces, into JSON values, in time linear in its size.

Input may be one value per line (the fast path), values pretty-printed over
several lines, or values written back to back. Framing is by lines: a line is
looked at once it is complete (or at end of input), and every character is
scanned a bounded number of times, however the text is cut into pieces, so
the values (and the bad input reported) do not depend on where the cuts fall.

Nothing the input holds can stop the decoder: a value that any parser refuses
(too deep, a number past the interpreter's digit limit, ``NaN``, a float that
overflows, a lone surrogate orjson refuses and json.loads accepts is kept) is
one :class:`BadInput`, and decoding goes on with the next line.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

from sagakit.node.deep import read_envelope

__all__ = ["MAX_LINE", "BadInput", "Decoder", "SameLine", "loads_exact"]

# A line (or a value over several lines) longer than this is refused whole:
# the node would otherwise hold any amount of input waiting for a newline.
MAX_LINE = 16 * 1024 * 1024


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} overflows a float")
    return value


# The standard library's parser, strict: no NaN or Infinity (they would come
# back out as invalid JSON), no float that overflows to infinity.
_strict = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)
loads_exact: Callable[[str], Any] = _strict.decode
_raw_decode = _strict.raw_decode


def _int_or_inf(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:  # past the interpreter's digit limit
        return math.inf


# Strict but for numbers and raw control characters in strings: a number out of
# range reads as an infinity, NaN and Infinity (not JSON, but what json.dumps
# writes for such a float) as floats, a typed tab as itself, so that a message
# refused for one can still be answered: its sender waits.
_lenient = json.JSONDecoder(parse_constant=float, parse_int=_int_or_inf, strict=False).decode

# How deep orjson nests (its documented limit); the standard library's
# parser stops at the interpreter's recursion limit, somewhat less.
ORJSON_DEPTH = 1024

loads: Callable[[str], Any]
try:  # orjson parses several times faster; the node must still run without it.
    from orjson import loads
except ImportError:  # pragma: no cover - exercised by running main.py on a bare python
    loads = loads_exact

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
    """orjson, then the exact parser for what orjson refuses (lone surrogate escapes).

    Raises ValueError or RecursionError (or MemoryError) for text neither takes.
    """
    if _has_long_number(text):
        return loads_exact(text)
    try:
        return loads(text)
    except ValueError:
        return loads_exact(text)


class BadInput(NamedTuple):
    """Input that is not a JSON value; reported, then skipped.

    ``text`` is the start of it only: a refused value can be megabytes long.
    ``message``: an object with string ``src`` and ``dest`` that is JSON but
    holds a number the node cannot read (out of range, read as an infinity, or
    NaN), a raw control character in a string, or is nested past the parser's
    depth (then only its envelope, see :mod:`sagakit.node.deep`), so that it
    can be answered with an error instead of nothing.
    """

    text: str
    reason: str
    message: dict[str, Any] | None = None


class SameLine(list[Any]):
    """The values of one line that holds more than one (written back to back), in order.

    Kept together so that their reader can report a line of bad values once
    (a line of a few megabytes can hold millions): the decoder yields one of
    these where it would yield the values one by one.
    """

    __slots__ = ()


def _bad(text: str, reason: str) -> BadInput:
    return BadInput(text.strip()[:200], reason)


def _why(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    text = getattr(exc, "msg", None) or str(exc)
    return text[:200]


# Whitespace between values, and U+FEFF: a byte order mark starting a later line
# (files concatenated, one saved with a mark) is not a reason to drop the message.
_WS = " \t\r\n\ufeff"
# Brackets in runs: a hostile line of a million "[" is one match, not a million.
_STRUCTURE = re.compile(r'[{\[]+|[}\]]+|"')
# The rest of a string after its opening quote, to the closing one (unrolled:
# no alternation per character, so a string of megabytes is one quick match).
_STRING_REST = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*"', re.S)


class Decoder:
    """Turns a stream of text, fed in any pieces, into JSON values and BadInput."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._max = max_line
        self._tail: list[str] = []  # the text after the last newline, in pieces
        self._tail_size = 0
        self._skipping = False  # dropping the rest of a line already refused as too long
        self._value: list[str] | None = None  # lines of a value still open at its last line
        self._value_size = 0
        self._depth = 0  # brackets open at the end of the open value's last line
        # (line index, depth before it) of a line starting "{" inside the open
        # value: where a pretty-printed message may begin after a truncated value.
        self._restart: tuple[int, int] | None = None

    def feed(self, text: str, *, final: bool = False) -> list[Any]:
        """Values (and BadInput items) completed by ``text``; ``final`` marks end of input."""
        out: list[Any] = []
        exact = _has_long_number(text)
        lines = text.split("\n")
        last = lines.pop()  # the text after the last newline: not known to be whole yet
        if lines:
            if self._skipping:
                self._skipping = False
                del lines[0]  # the end of the line refused as too long
            elif self._tail:
                self._tail.append(lines[0])
                lines[0] = "".join(self._tail)
                self._tail.clear()
                self._tail_size = 0
                if self._too_long(lines[0]):
                    out.append(_bad(lines[0], f"a line over {self._max} characters"))
                    del lines[0]
                elif not exact:
                    # A long number may straddle the cut between two pieces.
                    exact = _has_long_number(lines[0])
            if lines:
                self._lines(lines, len(text) > self._max, exact, out)
        if (
            last
            and last[-1] in "}]"
            and not self._tail
            and self._value is None
            and not self._skipping
        ):
            # A whole value without its newline yet (an interactive client may
            # send no more): an object or array is closed by its bracket, so
            # nothing that follows can change it. Tried on a single piece only,
            # hence once per piece: a long line in many pieces stays linear.
            try:
                value = loads(last) if not exact else loads_exact(last)
            except Exception:
                pass
            else:
                out.append(value)
                last = ""
        if last and not self._skipping:
            self._tail.append(last)
            self._tail_size += len(last)
            # Not counting a "\r" that may start the line's "\r\n" (see _too_long).
            if self._tail_size - (last[-1] == "\r") > self._max:
                out.append(_bad("".join(self._tail), f"a line over {self._max} characters"))
                self._tail.clear()
                self._tail_size = 0
                self._skipping = True
        if final:
            if self._tail:
                line = "".join(self._tail)
                self._tail.clear()
                self._tail_size = 0
                self._lines([line], False, _has_long_number(line), out)
            self._skipping = False
            if self._value is not None:
                out.append(_bad("\n".join(self._value), "input ended inside a JSON value"))
                self._value = None
        return out

    def _too_long(self, line: str) -> bool:
        """Over the cap, not counting the "\r" of a "\r\n" line end: a line a client
        ends so is as long as the same line ended by "\n"."""
        return len(line) - line.endswith("\r") > self._max

    def close(self) -> list[Any]:
        """Whatever the end of input leaves: an unfinished value is BadInput."""
        return self.feed("", final=True)

    def _lines(self, lines: list[str], check_size: bool, exact: bool, out: list[Any]) -> None:
        """Decode whole lines. The common case first: every line one whole value."""
        if check_size:  # rare: a piece longer than the cap
            for line in lines:
                if self._too_long(line):
                    out.append(_bad(line, f"a line over {self._max} characters"))
                else:
                    self._lines([line], False, exact, out)
            return
        fast = loads_exact if exact else loads
        append = out.append
        it = iter(lines)
        line = ""
        while True:
            if self._value is None:
                try:
                    for line in it:
                        append(fast(line))
                    return
                except Exception:
                    # Anything the fast parser refuses, a RecursionError or the
                    # digit limit's ValueError included: the line, alone, goes the slow way.
                    self._slow_line(line, out)
                    continue
            for line in it:
                self._slow_line(line, out)
                if self._value is None:
                    break
            else:
                return

    def _slow_line(self, line: str, out: list[Any]) -> None:
        """A line that is not one whole value: part of one, several, or bad input."""
        start = len(out)
        self._line_values(line, out)
        if len(out) - start > 1:
            out[start:] = [SameLine(out[start:])]

    def _line_values(self, line: str, out: list[Any]) -> None:
        pos = 0
        if self._value is not None:
            if line.lstrip().startswith("{"):
                message = _envelope(line)
                if message is not None:
                    # Resynchronise: the open value was truncated, and this line
                    # is a whole message. Without this, one broken line would
                    # swallow every message after it.
                    self._resync(len(self._value), message, out)
                    return
                if self._restart is None and _cannot_continue(self._value):
                    # A value cannot start here: the open one is broken, and this
                    # may be a pretty-printed message, tried whole once it closes.
                    self._restart = (len(self._value), self._depth)
            end = self._scan(line, 0)
            self._value.append(line if end == -1 else line[:end])
            self._value_size += len(line) + 1
            if end == -1:
                restart = self._restart
                if restart is not None and self._depth <= restart[1]:
                    self._restart = None  # closed (or closed past): tried once, here
                    if self._depth == restart[1]:
                        message = _envelope("\n".join(self._value[restart[0] :]))
                        if message is not None:
                            self._resync(restart[0], message, out)
                            return
                if self._value_size > self._max:
                    out.append(_bad(self._value[0], f"a value over {self._max} characters"))
                    self._value = None
                return
            text = "\n".join(self._value)
            self._value = None
            self._decode(text, out)
            pos = end
        n = len(line)
        junk: str | None = None  # why the line's first junk was refused, once it has had some
        while True:
            while pos < n and line[pos] in _WS:
                pos += 1
            if pos >= n:
                return
            if line[pos] in "{[":
                self._depth = 0
                end = self._scan(line, pos)
                if end == -1:
                    self._value = [line[pos:]]
                    self._value_size = n - pos
                    self._restart = None
                    return
                self._decode(line[pos:end], out)
                pos = end
                continue
            if junk is None:
                try:
                    value, pos = _raw_decode(line, pos)
                except Exception as exc:
                    # A failed decode costs time in proportion to the line before
                    # it (JSONDecodeError counts the lines up to its position): once
                    # a line has had junk, what is not a message is skipped to the
                    # next one undecoded, so junk and messages in turn stay linear.
                    junk = f"not JSON ({_why(exc)})"
                else:
                    out.append(value)
                    continue
            found = self._message_after(line, pos)
            if found is None:
                out.append(_bad(line[pos:], junk))
                return
            # Junk before a message (a prompt, a stray byte): the message is
            # served, as a truncated value's next message is.
            brace, end, message = found
            out.append(_bad(line[pos:brace], junk))
            out.append(message)
            pos = end

    def _message_after(
        self, line: str, pos: int
    ) -> tuple[int, int, dict[str, Any] | BadInput] | None:
        """(start, end, message) of the object at the first ``{`` after ``pos``, if it
        is a whole message. Looked for once per stretch of junk, and the scan stops
        at that object's end, so a line is still read in linear time."""
        brace = line.find("{", pos + 1)
        if brace == -1:
            return None
        self._depth = 0
        end = self._scan(line, brace)
        self._depth = 0
        message = None if end == -1 else _envelope(line[brace:end])
        return None if message is None else (brace, end, message)

    def _resync(self, lines: int, message: dict[str, Any] | BadInput, out: list[Any]) -> None:
        """Report the open value's first ``lines`` lines as a truncated value, then
        ``message``, the whole message that followed them; no value is open after."""
        broken = "\n".join(self._value[:lines]) if self._value is not None else ""
        out.append(_bad(broken, "an unfinished JSON value followed by a new message"))
        self._value = None
        self._restart = None
        out.append(message)

    def _scan(self, line: str, pos: int) -> int:
        """Index just past the bracket that closes the open value; -1 if it stays open.

        Carries the depth over lines in ``self._depth``. A string cannot span
        lines in JSON: one left open runs to the end of its line (the value is
        refused when parsed).
        """
        depth = self._depth
        find = _STRUCTURE.search
        while (m := find(line, pos)) is not None:
            start, pos = m.span()
            ch = line[start]
            if ch == '"':
                s = _STRING_REST.match(line, pos)
                if s is None:
                    break
                pos = s.end()
            elif ch in "{[":
                depth += pos - start
            elif pos - start < depth:
                depth -= pos - start
            else:
                self._depth = 0
                return start + max(depth, 1)
        self._depth = depth
        return -1

    @staticmethod
    def _decode(text: str, out: list[Any]) -> None:
        try:
            out.append(_loads_any(text))
        except Exception as exc:
            bad = _bad(text, f"not JSON ({_why(exc)})")
            if isinstance(exc, RecursionError):
                bad = _deep_message(text, bad)
            elif isinstance(exc, ValueError):  # not too big (MemoryError)
                bad = _readable_message(text, bad, exc)
            out.append(bad)


def _readable_message(text: str, bad: BadInput, exc: ValueError) -> BadInput:
    """``bad`` with the message it holds, if only a number or a raw control character
    kept it from being read (its envelope is readable)."""
    try:
        value = _lenient(text)
    except RecursionError:  # too deep as well
        return _deep_message(text, bad)
    except Exception:
        return bad
    if type(value) is not dict or type(value.get("src")) is not str:
        return bad
    if type(value.get("dest")) is not str:
        return bad
    if isinstance(exc, json.JSONDecodeError):  # the strict parser's own: a control character
        return BadInput(bad.text, f"a raw control character in a string ({_why(exc)})", value)
    return BadInput(bad.text, f"a number the node cannot read ({_why(exc)})", value)


def _deep_message(text: str, bad: BadInput) -> BadInput:
    """``bad`` with the message it holds, if its envelope reads without recursion:
    a message nested past the parser's depth is answered, as its sender waits."""
    found = read_envelope(text)
    if found is None:
        return bad
    value, depth = found
    if type(value.get("src")) is not str or type(value.get("dest")) is not str:
        return bad
    # The limit of the parser that refused it: orjson's, unless orjson passed the
    # text on to the standard library's (a long number, a lone surrogate) or is
    # not installed. Never as much as the text's own depth: the probe of the
    # standard library's runs deeper in the stack than some parses do.
    if loads is not loads_exact and depth > ORJSON_DEPTH and not _has_long_number(text):
        limit = ORJSON_DEPTH
    else:
        limit = _stdlib_depth()
    limit = min(limit, depth - 1)
    return BadInput(bad.text, f"a value nested deeper than {limit} levels", value)


_probed: list[int] = []


def _stdlib_depth() -> int:
    """The deepest array the standard library's parser takes: the interpreter's
    recursion limit less the calls on the stack, probed once, where a message
    is first refused (a call or two deeper than a parse on the fast path runs,
    so every parse takes at least as many levels): each refusal names the same."""
    if not _probed:
        low, high = 1, ORJSON_DEPTH
        while low < high:
            middle = (low + high + 1) // 2
            try:
                loads_exact("[" * middle + "]" * middle)
            except RecursionError:
                high = middle - 1
            else:
                low = middle
        _probed.append(low)
    return _probed[0]


def _cannot_continue(lines: list[str]) -> bool:
    """Whether no JSON value can follow ``lines`` (an open value): only ``[``, ``,``
    or ``:`` may come before one. Looks back to the last line that is not blank."""
    for line in reversed(lines):
        text = line.rstrip(_WS)
        if text:
            return text[-1] not in "[,:"
    return False


def _envelope(line: str) -> dict[str, Any] | BadInput | None:
    """The line as a message, if it is a whole one by itself (an object with a body);
    a BadInput holding it if it is one nested too deep to read (it is answered)."""
    try:
        value = _loads_any(line)
    except RecursionError:
        bad = _deep_message(line, _bad(line, "not JSON (nested too deeply)"))
        return bad if bad.message is not None and "body" in bad.message else None
    except Exception:
        return None
    return value if type(value) is dict and "body" in value else None
