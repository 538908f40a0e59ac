"""The parts of the RabbitMQ event bus that handle deliveries (see :mod:`.amqp_bus`).

A subscription's consumer (its channel, its lanes of events per saga, retries,
dead-lettering), the reader of a dead-letter queue, and the translation of
driver errors, kept apart from the bus so each module stays readable.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import aio_pika
import aiormq.exceptions as amqp
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from pamqp.common import FieldTable

from sagakit.adapters._handlers import handling, in_handler, run_handler, spawn
from sagakit.core.envelope import decode_event
from sagakit.core.event import Event
from sagakit.errors import (
    BackendBusy,
    BackendError,
    BackendRefused,
    BackendUnavailable,
    DefinitionError,
    SchemaMismatch,
)
from sagakit.ports.event_bus import ALL_EVENTS, DeadLetter, Handler

if TYPE_CHECKING:
    from sagakit.adapters.amqp_bus import AmqpEventBus

log = logging.getLogger("sagakit.bus.amqp")

QUORUM: FieldTable = {"x-queue-type": "quorum"}
# A classic queue puts back what a reader got and did not take in its place (a
# quorum queue puts it behind what another reader gave back before): the dead
# letters stay oldest first however often they are listed.
CLASSIC: FieldTable = {"x-queue-type": "classic"}
SHORTSTR = 255  # bytes of an AMQP short string: routing keys, queue names, ids
MAX_ERROR = 4000  # characters of an error kept in a dead letter's headers
MAX_BACKOFF = 30.0
MAX_RECONNECT_PAUSE = 5.0
# Headers of a dead letter.
H_ID, H_GROUP, H_ERROR = "sagakit-dead-letter-id", "sagakit-group", "sagakit-error"
H_DELIVERIES, H_FAILED_AT, H_QUEUE = (
    "sagakit-deliveries",
    "sagakit-failed-at-ms",
    "sagakit-queue",
)
# On an event put back in its queue after its handler failed: how many times it failed.
H_FAILURES = "sagakit-failures"
# Dropped on replay: the dead letter's own, and the count of its dead-letter queue's
# listings (a replayed event starts with a fresh count of deliveries).
DEAD_LETTER_HEADERS = frozenset(
    {H_ID, H_GROUP, H_ERROR, H_DELIVERIES, H_FAILED_AT, H_QUEUE, H_FAILURES, "x-delivery-count"}
)
# Errors that mean the connection or channel is gone: a retry may help.
LOST = (
    amqp.AMQPConnectionError,
    amqp.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    TimeoutError,
)


def short(text: str) -> bool:
    return len(text.encode()) <= SHORTSTR


def gone(message: AbstractIncomingMessage) -> bool:
    """Whether the message's channel is closed (so it cannot be acknowledged any more)."""
    try:
        return message.channel.is_closed
    except amqp.ChannelInvalidStateError:
        return True


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def translate(where: str, what: str, exc: BaseException) -> BackendError:
    """A driver error as one of sagakit's, saying whether a retry may help.

    A failed precondition means, on a declaration, a queue or exchange that
    exists with other settings (a schema mismatch); on a publish, a message the
    broker will not take (over its size limit): ``what`` says which it was.
    """
    if isinstance(exc, amqp.ProbableAuthenticationError | amqp.AuthenticationError):
        return BackendRefused(where, f"{what}: credentials refused ({exc})")
    if isinstance(exc, amqp.ChannelPreconditionFailed) and not what.startswith("publishing"):
        return SchemaMismatch(where, f"{what}: exists with other settings than sagakit's ({exc})")
    if isinstance(exc, amqp.ChannelAccessRefused):
        return BackendRefused(where, f"{what}: access refused ({exc})")
    if isinstance(exc, amqp.PublishError):
        return BackendRefused(where, f"{what}: no queue took it ({exc})")
    if isinstance(exc, amqp.DeliveryError):
        return BackendBusy(where, f"{what}: the broker refused it for now ({exc})")
    if isinstance(exc, amqp.ConnectionNotAllowed):
        return BackendRefused(where, f"{what}: connection refused ({exc})")
    if isinstance(exc, LOST):
        return BackendUnavailable(where, f"{what}: {describe(exc)}")
    return BackendRefused(where, f"{what}: {describe(exc)}")


class Browse:
    """A dead-letter queue read on a channel of its own, without consuming it.

    What :meth:`get` returns stays unacknowledged unless :meth:`take` acknowledges
    it; closing the channel puts the rest back, in order. The broker applies that
    after the close returns, so the exit waits (a moment at most) until the queue
    holds them again: a listing right after sees them all.
    """

    def __init__(self, bus: AmqpEventBus, name: str) -> None:
        self._bus, self._name = bus, name
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._ready = self._taken = 0

    async def __aenter__(self) -> Browse:
        await self._bus._browsing.acquire()
        try:
            link = await self._bus._ready(declare=False)  # a look creates nothing
            self._channel = await link.connection.channel(publisher_confirms=False)
            self._queue = await self._channel.declare_queue(self._name, passive=True)
            self._ready = self._queue.declaration_result.message_count or 0
        except amqp.ChannelNotFoundEntity:
            self._queue = None  # never declared: no dead letters
        except BaseException as exc:
            self._bus._browsing.release()
            if isinstance(exc, BackendError | asyncio.CancelledError):
                raise
            raise translate(self._bus.where, f"reading {self._name}", exc) from exc
        return self

    async def get(self) -> AbstractIncomingMessage | None:
        if self._queue is None:
            return None
        try:
            return await self._queue.get(no_ack=False, fail=False)
        except Exception as exc:
            raise translate(self._bus.where, f"reading {self._name}", exc) from exc

    async def take(self, message: AbstractIncomingMessage) -> None:
        await message.ack()
        self._taken += 1

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            channel = self._channel
            if channel is None or channel.is_closed:
                return
            try:
                await channel.close()
                await self._settled()
            except LOST:
                pass  # the connection went: the broker gives them back all the same
        finally:
            self._bus._browsing.release()

    async def _settled(self) -> None:
        link = await self._bus._ready(declare=False)
        channel = await link.connection.channel(publisher_confirms=False)
        try:
            async with asyncio.timeout(2.0):
                while True:
                    queue = await channel.declare_queue(self._name, passive=True)
                    if (queue.declaration_result.message_count or 0) >= self._ready - self._taken:
                        return
                    await asyncio.sleep(0.005)
        except TimeoutError:
            pass  # another reader holds some: nothing to wait for
        finally:
            await channel.close()


def dead_letter_of(message: AbstractIncomingMessage) -> DeadLetter:
    headers = message.headers or {}
    try:
        event = decode_event(message.body)
    except DefinitionError as exc:
        # Not an envelope (another producer's message): shown, so it can be looked at.
        text = bytes(message.body[:1000]).decode("utf-8", "replace")
        payload = {"raw": text, "problem": str(exc)}
        try:
            event = Event(message.type or "undecodable", "unknown", payload)
        except DefinitionError:  # a type no event may have ("*")
            event = Event("undecodable", "unknown", payload)
    failed_at = headers.get(H_FAILED_AT)
    deliveries = headers.get(H_DELIVERIES)
    return DeadLetter(
        id=str(headers.get(H_ID, "")),
        group=str(headers.get(H_GROUP, "")),
        event=event,
        error=str(headers.get(H_ERROR, "")),
        deliveries=deliveries if type(deliveries) is int else 0,
        failed_at=failed_at / 1000 if type(failed_at) is int else 0.0,
    )


class Subscription:
    __slots__ = ("_bus", "_consumer")

    def __init__(self, bus: AmqpEventBus, consumer: Consumer) -> None:
        self._bus: AmqpEventBus | None = bus
        self._consumer = consumer

    @property
    def group(self) -> str:
        return self._consumer.group or ""

    async def cancel(self) -> None:
        """Stop this subscription; what it has not started goes back to its queue."""
        bus, self._bus = self._bus, None
        if bus is None:
            return
        stopped = self._consumer.begin_stop()
        stopped.add_done_callback(lambda _: self._forget(bus))
        if not in_handler(bus):
            await asyncio.wait([stopped])
        # From a handler (or a task one awaits), which the stop waits for: no more
        # events from now on, the rest once the handlers have returned and acked.
        # (Stopping in the handler's own task closed the channel under it: its event
        # went back to the queue unacknowledged, to be handled again.)

    def _forget(self, bus: AmqpEventBus) -> None:
        if self._consumer in bus._consumers:
            bus._consumers.remove(self._consumer)


class Consumer:
    """One subscription: a channel, a consumer on its queue, and lanes of events per saga."""

    def __init__(
        self,
        bus: AmqpEventBus,
        event_type: str,
        handler: Handler,
        group: str | None,
        queue_name: str,
        max_deliveries: int,
        ack_timeout: float,
        backoff: float,
    ) -> None:
        self.bus, self.event_type, self.handler, self.group = bus, event_type, handler, group
        self.queue_name, self.dlq_name = queue_name, bus.dead_letter_queue(group or "")
        self.max_deliveries, self.ack_timeout, self.backoff = max_deliveries, ack_timeout, backoff
        self.channel: AbstractChannel | None = None
        self.queue: AbstractQueue | None = None
        self.tag: str | None = None
        # Per saga, the events received and not yet handled; the first is being handled.
        self.lanes: dict[str, deque[AbstractIncomingMessage]] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.held = 0  # received and not yet acknowledged or given back
        self.stopping = False
        self._stopper: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()  # cuts backoff pauses short when stopping
        self.connection: AbstractConnection | None = None
        self.restarting: asyncio.Task[None] | None = None

    async def start(self, connection: AbstractConnection) -> None:
        private = self.group is None
        channel: AbstractChannel | None = None
        try:
            channel = await connection.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=self.bus._prefetch)
            await channel.declare_queue(self.dlq_name, durable=True, arguments=CLASSIC)
            if private:
                queue = await channel.declare_queue(
                    self.queue_name, durable=False, exclusive=True, auto_delete=True
                )
            else:
                queue = await channel.declare_queue(self.queue_name, durable=True, arguments=QUORUM)
            binding = "#" if self.event_type == ALL_EVENTS else self.event_type
            await queue.bind(self.bus.exchange_name, routing_key=binding)
            lost = functools.partial(self._lost, connection, channel)
            channel.close_callbacks.add(lost)
            underlay = await channel.get_underlay_channel()
            underlay.on_consumer_cancel_callbacks.add(lost)
            self.tag = await queue.consume(self._on_message)
        except BaseException as exc:
            if channel is not None and not channel.is_closed:
                with contextlib.suppress(Exception):
                    await channel.close()
            if not isinstance(exc, Exception):
                raise
            raise translate(self.bus.where, f"subscribing {self.queue_name}", exc) from exc
        self.connection, self.channel, self.queue = connection, channel, queue

    async def _declare_dead_letter_queue(self) -> None:
        channel = self.channel
        if channel is None or channel.is_closed:
            return
        try:
            await channel.declare_queue(self.dlq_name, durable=True, arguments=CLASSIC)
        except Exception as exc:
            raise translate(self.bus.where, f"declaring {self.dlq_name}", exc) from exc

    def _lost(self, connection: AbstractConnection, channel: AbstractChannel, *_: object) -> None:
        """The broker closed this consumer's channel, or cancelled its consumer (its
        queue was deleted): consume again, unless the whole connection went (the
        bus reconnects then, and starts every subscription again)."""
        if self.stopping or self.restarting is not None or channel is not self.channel:
            return
        self.restarting = asyncio.get_running_loop().create_task(self._restart(connection))

    async def _restart(self, connection: AbstractConnection) -> None:
        pause = 0.2
        try:
            while True:
                await asyncio.sleep(pause)
                link = self.bus._link
                if self.stopping or link is None or link.connection is not connection:
                    return
                old = self.channel
                try:
                    await self.start(connection)
                except BackendError as exc:
                    log.warning("%s: cannot consume again: %s", self.queue_name, exc)
                    pause = min(pause * 2, MAX_RECONNECT_PAUSE)
                    continue
                log.info("%s: consuming again", self.queue_name)
                if old is not None and not old.is_closed:
                    with contextlib.suppress(Exception):
                        await old.close()
                return
        finally:
            self.restarting = None

    def begin_stop(self) -> asyncio.Task[None]:
        """Stop in a task of its own (one, however often asked): no intake from now on."""
        if self._stopper is None:
            self.stopping = True
            self.wake.set()
            self._stopper = spawn(self._stop())
        return self._stopper

    async def stop(self) -> None:
        """Stop and wait for it: not from a handler of the bus (it would wait for itself)."""
        await asyncio.wait([self.begin_stop()])

    async def _stop(self) -> None:
        """Cancel the intake, wait for the handlers running, close the channel."""
        channel, queue, tag = self.channel, self.queue, self.tag
        if channel is not None and not channel.is_closed and queue is not None and tag:
            try:
                await queue.cancel(tag)
            except (amqp.AMQPError, *LOST):
                pass  # the channel went: the broker gave its events back already
        if self.tasks:
            await asyncio.wait(list(self.tasks))
        if channel is not None and not channel.is_closed:
            try:
                await channel.close()
            except (amqp.AMQPError, *LOST):
                pass

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # Called in delivery order; it joins the saga's lane before any await, so a
        # lane keeps that order.
        self.bus._received += 1
        if self.stopping:
            return  # not acknowledged: closing the channel gives it back
        self.held += 1
        key = message.correlation_id or ""
        lane = self.lanes.get(key)
        if lane is not None:
            lane.append(message)
            return
        lane = self.lanes[key] = deque((message,))
        # A task of the bus's own: the driver cancels its channel's tasks when the
        # channel closes, and a handler must not die of that (nor of its own
        # bus.close()); its acknowledgement is then simply not sent.
        task = asyncio.get_running_loop().create_task(self._run(key, lane))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, key: str, lane: deque[AbstractIncomingMessage]) -> None:
        handling(self.bus)
        try:
            while lane and not self.stopping:
                try:
                    await self._handle(lane[0])
                finally:
                    lane.popleft()
                    self.held -= 1
        finally:
            del self.lanes[key]
            self.held -= len(lane)  # left unacknowledged for the channel's close to give back

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        """Run the handler; count its failures in the event's ``sagakit-failures`` header.

        Not the quorum queue's ``x-delivery-count``: it also counts the events a
        consumer held in its prefetch window and gave back unstarted (closing, or
        dying), so a service restarted with a backlog would dead-letter events no
        handler tried (and RabbitMQ 4.3 no longer counts a ``basic.nack``).
        """
        if gone(message):
            return  # its connection went: the broker has given it back already
        private = self.group is None
        count = (message.headers or {}).get(H_FAILURES, 0)
        before = count if type(count) is int and count > 0 else 0
        try:
            event = decode_event(message.body)
        except DefinitionError as exc:
            await self._dead_letter(message, f"undecodable event: {exc}", before + 1)
            return
        if not private and before >= self.max_deliveries:
            # Put back by a consumer of the group with a higher max_deliveries.
            reason = f"failed {before} times, max_deliveries is {self.max_deliveries}"
            await self._dead_letter(message, reason, before)
            return
        deliveries = before + 1
        while True:
            error = await self._attempt(event)
            if error is None:
                await self._settle(message, ack=True)
                return
            log.warning(
                "%s: %s of saga %s failed (delivery %d of %d): %s",
                self.queue_name,
                event.type,
                event.saga_id,
                deliveries,
                self.max_deliveries,
                error,
            )
            if deliveries >= self.max_deliveries:
                await self._dead_letter(message, error, deliveries)
                return
            await self._pause(deliveries)
            if not private:
                # Back in the queue, counted, for any consumer of the group to try again.
                await self._put_back(message, deliveries)
                return
            if self.stopping:  # the private queue goes with its subscription
                await self._settle(message, ack=False)
                return
            # A private queue has no other consumer: retry here.
            deliveries += 1

    async def _put_back(self, message: AbstractIncomingMessage, failures: int) -> None:
        """Publish the event again to its queue with its count of failures, confirmed, then
        acknowledge this delivery (a crash in between: both, at least once)."""
        headers: dict[str, Any] = dict(message.headers or {})
        headers.pop("x-delivery-count", None)
        headers[H_FAILURES] = failures
        again = _copy(message, headers)
        try:
            await self.bus._send(again, self.queue_name, what="putting back", direct=True)
        except BackendError as exc:
            # Given back instead: retried, this failure not counted.
            log.warning("%s: cannot put a failed event back: %s", self.queue_name, exc)
            await self._settle(message, ack=False)
            return
        await self._settle(message, ack=True)

    async def _attempt(self, event: Event) -> str | None:
        """Run the handler once: None if it returned, else the error it ended with."""
        error = await run_handler(self.handler, event, self.ack_timeout)
        return None if error is None else describe(error)

    async def _pause(self, deliveries: int) -> None:
        cap = max(self.backoff, MAX_BACKOFF)
        delay = min(self.backoff * 2 ** min(deliveries - 1, 30), cap)
        try:
            async with asyncio.timeout(delay):
                await self.wake.wait()
        except TimeoutError:
            pass

    async def _settle(self, message: AbstractIncomingMessage, *, ack: bool) -> None:
        try:
            if ack:
                await message.ack()
            else:
                await message.nack(requeue=True)
        except (amqp.AMQPError, *LOST) as exc:
            # The channel went with the connection: the broker has given it back.
            log.info("%s: could not settle a delivery: %s", self.queue_name, exc)

    async def _dead_letter(
        self, message: AbstractIncomingMessage, error: str, deliveries: int
    ) -> None:
        headers: dict[str, Any] = dict(message.headers or {})
        headers.pop("x-delivery-count", None)
        headers.pop(H_FAILURES, None)
        headers.update(
            {
                H_ID: os.urandom(16).hex(),
                H_GROUP: self.group or "",
                H_ERROR: error[:MAX_ERROR],
                H_DELIVERIES: deliveries,
                H_FAILED_AT: int(time.time() * 1000),
                H_QUEUE: self.queue_name,
            }
        )
        letter = _copy(message, headers)
        try:
            try:
                await self.bus._send(
                    letter, self.dlq_name, what="publishing a dead letter", direct=True
                )
            except BackendRefused:
                # No queue took it: the dead-letter queue was deleted since; again.
                await self._declare_dead_letter_queue()
                await self.bus._send(
                    letter, self.dlq_name, what="publishing a dead letter", direct=True
                )
        except BackendError as exc:
            log.error("%s: cannot dead-letter, giving it back: %s", self.queue_name, exc)
            await self._pause(deliveries)
            await self._settle(message, ack=False)
            return
        log.error("%s: dead letter after %d deliveries: %s", self.queue_name, deliveries, error)
        await self._settle(message, ack=True)


def _copy(message: AbstractIncomingMessage, headers: dict[str, Any]) -> aio_pika.Message:
    """The delivered event as a new persistent message, with ``headers``."""
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        type=message.type,
    )
