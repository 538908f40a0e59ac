"""Dead letters of the NATS event bus as stored in the ``<prefix>-dlq`` stream.

A dead letter is a message whose body is the original message, byte for byte
(an envelope, or whatever undecodable bytes a foreign publisher sent), and
whose header ``Sagakit-Dead-Letter`` holds the rest as ASCII JSON: ``v`` (2),
``group``, ``consumer``, ``subscription``, ``error`` (at most 4,000
characters), ``deliveries`` and ``failed_at``. The body is not wrapped in a
JSON record: escaped inside one, an event of more than about half the
server's maximum payload (or a few hundred kilobytes of binary garbage, each
byte escaped as ``\\u00xx``) no longer fitted, and its dead-lettering failed
and was retried for ever. Only an original within a few hundred bytes of the
maximum payload is cut to fit (header ``truncated``: its length); it is listed
but cannot be replayed.

Version 1 records (a JSON body with the envelope as text) are still read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sagakit.core.envelope import decode_event
from sagakit.core.event import Event
from sagakit.errors import DefinitionError
from sagakit.ports.event_bus import DeadLetter

__all__ = ["HEADER", "dead_letter_message", "read_dead_letter", "replay_body"]

HEADER = "Sagakit-Dead-Letter"
MAX_ERROR = 4000  # characters of an error kept in a dead letter
_FRAMING = 64  # "NATS/1.0", the header's name, separators: more than they take


def _dump(value: Any) -> str:
    # ASCII: a header value must not hold a line break, and \u escapes keep any text one line.
    return json.dumps(value, ensure_ascii=True, separators=(",", ":"))


def dead_letter_message(
    data: bytes, meta: Mapping[str, Any], max_payload: int
) -> tuple[bytes, dict[str, str]]:
    """The body and headers that store ``data`` (the original message) as a dead letter.

    ``meta``: group, consumer, subscription, error, deliveries, failed_at. The
    whole fits in ``max_payload`` (the server's, headers included): only an
    original that leaves no room for the header is cut, and says so.
    """
    record = {"v": 2, **meta, "error": str(meta.get("error", ""))[:MAX_ERROR]}
    header = _dump(record)
    room = max_payload - len(header) - _FRAMING
    if len(data) > room:
        record["truncated"] = len(data)
        header = _dump(record)
        data = data[: max(0, max_payload - len(header) - _FRAMING)]
    return data, {HEADER: header}


def _load(data: bytes | str) -> dict[str, Any] | None:
    try:
        record = json.loads(data)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _parts(data: bytes, headers: Mapping[str, str] | None) -> tuple[dict[str, Any], bytes | None]:
    """The record's fields and the original message (None: a version 1 record without one)."""
    header = (headers or {}).get(HEADER)
    if header is not None:
        return _load(header) or {}, data
    record = _load(data) or {}  # version 1: the envelope as text inside a JSON record
    envelope = record.get("envelope")
    return record, envelope.encode() if isinstance(envelope, str) else None


def read_dead_letter(letter_id: str, data: bytes, headers: Mapping[str, str] | None) -> DeadLetter:
    """A stored dead letter; one whose message is not an envelope is shown with what it holds."""
    record, original = _parts(data, headers)
    try:
        if original is None:
            raise DefinitionError("envelope", "missing")
        event = decode_event(original)
    except DefinitionError:
        # Keep it visible (and replayable) even when its envelope is not ours.
        text = (original if original is not None else data).decode("utf-8", "replace")
        event = Event("sagakit.Undecodable", "unknown", {"envelope": text[:10_000]})
    deliveries = record.get("deliveries")
    failed_at = record.get("failed_at")
    return DeadLetter(
        id=letter_id,
        group=str(record.get("group", "")),
        event=event,
        error=str(record.get("error", "")),
        deliveries=deliveries if type(deliveries) is int else 0,
        failed_at=float(failed_at) if isinstance(failed_at, int | float) else 0.0,
    )


def replay_body(
    letter_id: str, data: bytes, headers: Mapping[str, str] | None
) -> tuple[str, bytes]:
    """The consumer that gave up on a dead letter, and the message to send it again."""
    record, original = _parts(data, headers)
    consumer = record.get("consumer")
    if not isinstance(consumer, str) or original is None:
        raise DefinitionError("dead_letter_id", f"dead letter {letter_id} is corrupt")
    if "truncated" in record:
        raise DefinitionError(
            "dead_letter_id",
            f"dead letter {letter_id} was stored cut to fit the server's maximum payload"
            f" ({record['truncated']} bytes): it cannot be replayed",
        )
    return consumer, original
