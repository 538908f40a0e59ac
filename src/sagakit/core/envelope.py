"""The wire format of an event on every broker: one versioned JSON envelope.

::

    {"v": 1, "id": "9f2c...", "type": "PaymentCharged", "saga_id": "order-7",
     "payload": {"payment_id": "p1", "amount": 99.99}, "time": 1700000000,
     "source": "payment", "headers": {"traceparent": "00-...-01"}}

- ``v``: the envelope version. A reader refuses a version newer than it knows
  (it cannot tell what it would lose); version 1 readers ignore keys they do
  not know, so later minor additions need no new version.
- ``id``: the event id (what consumers deduplicate on), ``type``, ``saga_id``.
- ``payload``: a JSON object, the event's own fields.
- ``time``: seconds since the epoch, an integer.
- ``source``: the publishing service's name, ``""`` when unknown.
- ``headers``: strings to strings, for trace context (W3C ``traceparent``,
  ``tracestate``) and the like.

The text is UTF-8 JSON, encoded by orjson when it is installed and by the
standard library otherwise (the two read each other's output).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from sagakit.core.event import NO_HEADERS, Event
from sagakit.errors import DefinitionError

__all__ = ["ENVELOPE_VERSION", "decode_event", "encode_event"]

ENVELOPE_VERSION = 1

_dumps: Callable[[Any], bytes]
_loads: Callable[[bytes | str], Any]
try:
    import orjson

    # A datetime or a dataclass would be written as text or an object and read back as
    # one: the handlers of a broker would get another type than those of memory://,
    # which hands over the event itself. Refused, as the standard library refuses them.
    _STRICT = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS

    def _dumps(value: Any) -> bytes:
        return orjson.dumps(value, option=_STRICT)

    _loads = orjson.loads
    _JSONError: tuple[type[Exception], ...] = (orjson.JSONDecodeError, TypeError)
    _ENCODE_ERRORS: tuple[type[Exception], ...] = (orjson.JSONEncodeError, TypeError)
except ImportError:  # pragma: no cover - orjson is a dependency; the fallback keeps core pure

    def _dumps(value: Any) -> bytes:
        return json.dumps(
            value, ensure_ascii=False, separators=(",", ":"), allow_nan=False
        ).encode()

    _loads = json.loads
    _JSONError = (ValueError, TypeError)
    _ENCODE_ERRORS = (ValueError, TypeError, OverflowError)


def encode_event(event: Event) -> bytes:
    """The event as envelope bytes; a payload that is not JSON is refused, naming the event."""
    envelope = {
        "v": ENVELOPE_VERSION,
        "id": event.event_id,
        "type": event.type,
        "saga_id": event.saga_id,
        "payload": dict(event.payload),
        "time": event.timestamp,
        "source": event.source,
        "headers": dict(event.headers),
    }
    try:
        data = _dumps(envelope)
    except _ENCODE_ERRORS as exc:
        raise DefinitionError(
            _culprit(envelope), f"event {_named(event)} is not JSON: {exc}"
        ) from exc
    # orjson writes NaN and infinities as null: a value would change on the way.
    # Only a text with a null in it can hide one, so only such texts are looked at.
    if b"null" in data and _has_non_finite(envelope["payload"]):
        raise DefinitionError(
            "payload",
            f"event {_named(event)} is not JSON: NaN or infinity",
        )
    return data


# The Event field behind each envelope key, to name the one that cannot be encoded.
_FIELDS = {"id": "event_id", "time": "timestamp"}


def _culprit(envelope: Mapping[str, Any]) -> str:
    """The Event field that makes ``envelope`` unencodable: a payload value that is not
    JSON, or a lone surrogate (not UTF-8) in a type, saga id, source, id or header."""
    for key, value in envelope.items():
        try:
            _dumps(value)
        except _ENCODE_ERRORS:
            return _FIELDS.get(key, key)
    return "payload"


def _named(event: Event) -> str:
    # Lone surrogates written as escapes: the message itself must be printable as UTF-8.
    text = f"{event.type} of saga {event.saga_id}"
    return text.encode("utf-8", "backslashreplace").decode()


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_non_finite(v) for v in value)
    return False


def _field(envelope: Mapping[str, Any], name: str, kind: type, what: str) -> Any:
    if name not in envelope:
        raise DefinitionError(name, "missing from the event envelope")
    value = envelope[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DefinitionError(name, f"must be {what}, got {type(value).__name__}")
    return value


def decode_event(data: bytes | bytearray | memoryview | str) -> Event:
    """The event in an envelope; what is wrong is named (a :class:`DefinitionError`)."""
    try:
        envelope = _loads(bytes(data) if isinstance(data, bytearray | memoryview) else data)
    except _JSONError as exc:
        raise DefinitionError("envelope", f"not JSON: {exc}") from exc
    if not isinstance(envelope, dict):
        raise DefinitionError("envelope", f"must be a JSON object, got {type(envelope).__name__}")
    version = _field(envelope, "v", int, "an integer")
    if version > ENVELOPE_VERSION:
        raise DefinitionError(
            "v",
            f"envelope version {version} is newer than this sagakit reads"
            f" ({ENVELOPE_VERSION}); upgrade sagakit",
        )
    if version < 1:
        raise DefinitionError("v", f"envelope version {version} does not exist")
    event_id = _field(envelope, "id", str, "a string")
    if not event_id:
        raise DefinitionError("id", "must be a non-empty string")
    headers = envelope.get("headers")
    if headers is None or headers == {}:
        headers = NO_HEADERS
    elif not isinstance(headers, dict):
        raise DefinitionError("headers", f"must be an object, got {type(headers).__name__}")
    source = envelope.get("source", "")
    if not isinstance(source, str):
        raise DefinitionError("source", f"must be a string, got {type(source).__name__}")
    # Event checks type, saga_id and the rest, naming the field.
    return Event(
        type=_field(envelope, "type", str, "a string"),
        saga_id=_field(envelope, "saga_id", str, "a string"),
        payload=_field(envelope, "payload", dict, "an object"),
        source=source,
        event_id=event_id,
        timestamp=_field(envelope, "time", int, "an integer (seconds since the epoch)"),
        headers=headers,
    )
