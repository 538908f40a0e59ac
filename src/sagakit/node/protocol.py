"""The wire protocol, as pure functions over text: framing, encoding, errors, fields.

Messages are ``{"src", "dest", "body"}`` JSON objects. Input may be one value per
line (the fast path), values pretty-printed over several lines, or values
written back to back; :class:`Decoder` accepts all three. Output is one
``json.dumps`` line per message, whose default spacing and key order the seed
samples fix byte for byte.
"""

from __future__ import annotations

import json
import reprlib
from collections.abc import Callable
from enum import IntEnum
from typing import Any

from sagakit.node.framing import BadInput, Decoder, SameLine

__all__ = [
    "MAX_ID",
    "BadInput",
    "Decoder",
    "Encoded",
    "ErrorCode",
    "RequestError",
    "SameLine",
    "encode",
    "error_body",
    "json_string",
    "msg_id_of",
    "optional_bool",
    "optional_str",
    "require_id",
    "require_msg_id",
    "require_msg_id_of",
    "require_str",
    "require_str_list",
]

# json.dumps' own C encoder, called without the Python layers around it: the
# same bytes (default spacing, ensure_ascii) at a fraction of the cost.
_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
_encoder: Any = (
    None
    if _make_encoder is None
    else _make_encoder(
        # allow_nan False: a NaN or an infinity raises instead of printing
        # "NaN" or "Infinity", which are not JSON.
        None,
        None,
        json.encoder.encode_basestring_ascii,
        None,
        ": ",
        ", ",
        False,
        False,
        False,
    )
)


class ErrorCode(IntEnum):
    """Maelstrom's error codes, the ones this node uses."""

    NOT_SUPPORTED = 10
    TEMPORARILY_UNAVAILABLE = 11  # the request definitely did not take effect: retry later
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
        return json.dumps({"src": src, "dest": dest, "body": body}, allow_nan=False)
    prefix = _prefixes.get((src, dest))
    if prefix is None:
        prefix = f'{{"src": {_escape(src)}, "dest": {_escape(dest)}, "body": '
        if len(prefix) <= 512:  # a name of megabytes is not worth keeping
            if len(_prefixes) >= 4096:
                _prefixes.clear()
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


# A refused value, quoted in the error's text: cut short, never whole (a value
# can be megabytes, or nested a thousand deep, past what repr can recurse).
_shown = reprlib.Repr()
_shown.maxlevel, _shown.maxstring, _shown.maxother = 3, 80, 80
_shown.maxdict = _shown.maxlist = 8


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


def require_msg_id_of(body: dict[str, Any]) -> int:
    """:func:`require_msg_id` for a request about a saga: a refusal echoes the
    request's saga id when it has a usable one, the one thing the caller can
    correlate a reply without ``in_reply_to`` by."""
    try:
        return require_msg_id(body)
    except RequestError as exc:
        value = body.get("saga_id")
        if type(value) is str and 0 < len(value) <= MAX_ID:
            exc.extra["saga_id"] = value
        raise


def require_str(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if type(value) is not str or not value:
        raise _malformed(name, "required, a non-empty string")
    return value


# Ids a node keeps (saga ids, SKUs): long enough for any real one, short
# enough that the records kept to answer retries stay small.
MAX_ID = 1024


def require_id(body: dict[str, Any], name: str) -> str:
    value = require_str(body, name)
    if len(value) > MAX_ID:
        raise _malformed(name, f"at most {MAX_ID} characters, got {len(value)}")
    return value


def optional_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and type(value) is not str:
        raise _malformed(name, f"must be a string or absent, got {type(value).__name__}")
    return value


def optional_bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if type(value) is not bool:
        raise _malformed(name, f"must be true or false, got {_shown.repr(value)}")
    return value


def require_str_list(body: dict[str, Any], name: str) -> list[str]:
    """A non-empty list of ids: non-empty strings of at most MAX_ID characters (the
    log keeps a saga's step names with it, as it keeps its id)."""
    value = body.get(name)
    if type(value) is not list or not value:
        raise _malformed(name, "required, a non-empty list of strings")
    for i, item in enumerate(value):
        if type(item) is not str or not item:
            raise _malformed(f"{name}[{i}]", "must be a non-empty string")
        if len(item) > MAX_ID:
            raise _malformed(f"{name}[{i}]", f"at most {MAX_ID} characters, got {len(item)}")
    return value
