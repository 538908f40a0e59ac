"""The NATS event bus's own count of attempts, for dead-lettering (see :mod:`.nats_bus`).

JetStream's delivery count (``num_delivered``) counts every time the server
sends an event, also the events a subscription pulled ahead of its handler and
gave back unstarted (at ``close``) or lost with its process. A service that
restarts or crash-loops with a backlog would then dead-letter events no handler
ever tried. So the bus counts the attempts that reached a handler itself, in
the stream ``<prefix>-attempts``: at most one message per subject
``<prefix>.attempts.<consumer>.<stream sequence>``, JSON ``{"n": count,
"error": last error}``, kept at most ``max_age``.

An event's quick first delivery (``num_delivered`` 1) costs nothing here: its
attempt is recorded only if its handler fails, or still runs at 60% of
``ack_timeout`` (so a hung one counts, before the server hands the event to
another consumer). A redelivery reads its record; unless ``max_deliveries``
attempts are behind it, one more is recorded before its handler runs, so a
handler that dies with its process counts from the event's second delivery on. The record is
purged once the event is acknowledged or dead-lettered.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING

import nats.errors
import nats.js.errors
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

if TYPE_CHECKING:
    from sagakit.adapters.nats_bus import NatsEventBus

__all__ = ["NO_STREAM", "Attempts", "EarlyAttempt", "stream_sequence"]

log = logging.getLogger("sagakit.bus.nats")

# What a JetStream publish to a subject no stream takes raises: js.publish turns the
# core client's NoRespondersError into NoStreamResponseError.
NO_STREAM = (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError)


def stream_sequence(reply: str) -> int:
    """The stream sequence in a JetStream ack subject (0 if it is not one; see _deliveries)."""
    tokens = reply.split(".")
    if len(tokens) < 9 or tokens[0] != "$JS" or tokens[1] != "ACK":
        return 0
    seq = tokens[5] if len(tokens) == 9 else tokens[7]
    return int(seq) if seq.isdigit() else 0


class Attempts:
    """Records of the attempts of redelivered events, one per (consumer, stream sequence)."""

    def __init__(self, bus: NatsEventBus) -> None:
        self._bus = bus
        self.stream = f"{bus.prefix}-attempts"

    def config(self, max_age: float) -> StreamConfig:
        return StreamConfig(
            name=self.stream,
            description=f"sagakit attempts of redelivered events, prefix {self._bus.prefix}",
            subjects=[f"{self._bus.prefix}.attempts.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=max_age,
            max_msgs_per_subject=1,
            discard=DiscardPolicy.OLD,
        )

    def _subject(self, consumer: str, seq: int) -> str:
        return f"{self._bus.prefix}.attempts.{consumer}.{seq}"

    async def count(self, consumer: str, seq: int) -> tuple[int, str]:
        """The attempts recorded for the event and the last one's error ((0, "") if none)."""
        js = self._bus._js
        if js is None or seq < 1:
            return 0, ""
        try:
            raw = await js.get_msg(self.stream, subject=self._subject(consumer, seq))
        except nats.js.errors.NotFoundError:
            return 0, ""
        except Exception as exc:
            # Counted low, not lost: the event is handled, at worst once too often.
            log.warning("reading the attempts of %s #%d: %r", consumer, seq, exc)
            return 0, ""
        try:
            record = json.loads(raw.data or b"")
            return int(record["n"]), str(record.get("error", ""))
        except (ValueError, TypeError, KeyError):
            return 0, ""

    async def record(self, consumer: str, seq: int, count: int, error: str) -> None:
        """Record ``count`` attempts of the event, the last ending with ``error``."""
        js = self._bus._js
        if js is None or seq < 1:
            return
        data = json.dumps({"n": count, "error": error[:4000]}).encode()
        subject = self._subject(consumer, seq)
        for attempt in (1, 2):
            try:
                await js.publish(subject, data)
                return
            except NO_STREAM:
                if attempt == 1:  # the stream was deleted by hand: make it again, once
                    try:
                        await self._bus._ensure_streams(js)
                    except Exception as exc:  # counted low, not lost (see count())
                        log.warning("remaking stream %s: %r", self.stream, exc)
                        return
                    continue
                log.warning("recording an attempt of %s #%d: no stream", consumer, seq)
            except Exception as exc:
                log.warning("recording an attempt of %s #%d: %r", consumer, seq, exc)
                return

    async def forget(self, consumer: str, seq: int) -> None:
        """Drop the event's record (it is acknowledged or dead-lettered)."""
        js = self._bus._js
        if js is None or seq < 1:
            return
        try:
            await js.purge_stream(self.stream, subject=self._subject(consumer, seq))
        except Exception as exc:  # it expires at max_age anyway
            log.debug("purging the attempts of %s #%d: %r", consumer, seq, exc)


class EarlyAttempt:
    """A first delivery's attempt, written while its handler runs (its consumer's
    ``_keep_pending``)."""

    __slots__ = ("closed", "task")

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.closed = False  # the handler is done: too late to begin

    async def written(self) -> bool:
        """Whether it was written (once the write is done); none begins after this."""
        self.closed = True
        if self.task is None:
            return False
        await asyncio.wait([self.task])
        return True
