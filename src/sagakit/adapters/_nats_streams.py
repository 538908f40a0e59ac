"""The NATS event bus's streams: made when missing, refused when another app's."""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from sagakit.adapters._nats_errors import translate
from sagakit.errors import SchemaMismatch

if TYPE_CHECKING:
    from sagakit.adapters.nats_bus import NatsEventBus

__all__ = ["ensure_streams", "msg_id"]

# What a Nats-Msg-Id header carries unchanged: the client writes a line break as a
# space and the server trims a value and refuses a header block over 64 KB, so other
# ids would be stored under one that another event may have (and be dropped as its
# duplicate). '~' is not in the set, so a digest cannot collide with a plain id.
_PLAIN_ID = re.compile(r"[A-Za-z0-9_.:@/+=-]{1,256}")


def msg_id(event_id: str) -> str:
    """The ``Nats-Msg-Id`` that deduplicates the event ``event_id``, one per id."""
    if _PLAIN_ID.fullmatch(event_id):
        return event_id
    return "~" + hashlib.sha256(event_id.encode()).hexdigest()


async def ensure_streams(bus: NatsEventBus, js: JetStreamContext) -> None:
    """Make the bus's streams (events, dead letters, attempts) where they are missing."""
    p = bus.prefix
    events = StreamConfig(
        name=bus._stream,
        description=f"sagakit events of prefix {p}",
        subjects=[f"{p}.events.>", f"{p}.replay.>"],
        retention=RetentionPolicy.INTEREST,
        storage=StorageType.FILE,
        max_age=bus._max_age,
        duplicate_window=120.0,
    )
    dead = StreamConfig(
        name=bus._dlq_stream,
        description=f"sagakit dead letters of prefix {p}",
        subjects=[f"{p}.dlq.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_msgs_per_subject=bus._dead_letter_limit,
        discard=DiscardPolicy.NEW,
        discard_new_per_subject=True,
    )
    for config in (events, dead, bus._attempts.config(bus._max_age)):
        try:
            try:
                info = await js.stream_info(config.name or "")
            except nats.js.errors.NotFoundError:
                await js.add_stream(config)
                continue
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != 10058:  # created meanwhile by another process
                raise translate(bus._where, f"creating stream {config.name}", exc) from exc
            continue
        except Exception as exc:
            raise translate(bus._where, f"creating stream {config.name}", exc) from exc
        if set(info.config.subjects or ()) != set(config.subjects or ()):
            raise SchemaMismatch(
                bus._where,
                f"stream {config.name} exists with subjects {info.config.subjects},"
                f" not sagakit's {config.subjects}; choose another prefix",
            )
