"""The RabbitMQ event bus (``amqp://`` and ``amqps://``), through aio-pika.

URL: ``amqp://user:password@host:5672/vhost?prefix=app``. Options of sagakit's
own, in the query: ``prefix`` (default ``sagakit``; letters, digits, ``-`` and
``_``) names everything this bus creates, so two apps share a broker;
``prefetch`` (default 64) is how many events one subscription may hold at once;
``timeout`` (seconds, default 10) bounds connecting, waiting for a lost
connection to come back, and waiting for a publish's confirm. Other query
options (``heartbeat``, ``name``, TLS files) go to aio-pika as they are.

Topology, all derived from the prefix:

- ``<prefix>.events``: a durable topic exchange; an event is published to it
  with its type as the routing key, persistent, and ``publish`` returns once
  the broker's publisher confirm arrives (a nack, or a connection lost before
  the confirm, raises a :class:`~sagakit.errors.BackendError`).
- ``<prefix>.<group>:<type>``: one durable quorum queue per group and event
  type, bound with the type (``"*"``: the queue ``<prefix>.<group>:#``, bound
  with ``#``, every event; a type with characters AMQP names refuse, or over
  120 of them, appears as ``/`` and a hash). Every subscription of that group
  and type, in any process, consumes from it, so they compete. A queue per
  type rather than per group keeps a consumer from being handed events of a
  type its process has no handler for.
- ``<prefix>.<group>.dlq``: the group's dead letters, a durable classic queue
  of persistent messages (``<prefix>.dlq`` for subscriptions without a group,
  listed as group ``""``). Classic, because it keeps its order when a listing
  puts messages back.
- A subscription without a group consumes from a queue of its own,
  ``<prefix>.@<random>:<type>``, classic, exclusive and auto-deleted: it lives
  as long as the subscription and its connection (events published while the
  connection is down are not kept).

Delivery: manual acknowledgement. A handler that returns acknowledges. One that
raises (or outlives ``ack_timeout``: it is cancelled) is a failed delivery:
the bus holds the event for ``backoff * 2**(n-1)`` seconds (at most 30, or
``backoff`` if larger), then puts it back: it publishes the event again to its
queue with its count of failures in the header ``sagakit-failures``, waits for
the confirm and acknowledges the delivery (a crash in between: both, at least
once), and the broker delivers it to some consumer of the group, behind the
events queued meanwhile. The quorum queue's ``x-delivery-count`` is not used:
it also counts the events a consumer held in its prefetch window and gave back
unstarted, closing or dying, so a service restarted often with a backlog would
dead-letter events no handler tried (and RabbitMQ 4.3 no longer counts a
``basic.nack``). So only failures count: an event whose consumer dies while
its handler runs comes back uncounted (a handler that kills its process is not
dead-lettered by count). At ``max_deliveries`` the bus publishes the event to
the group's dead-letter queue with the last error, the group, the count, the
time and the queue it came from as headers, waits for the confirm, then
acknowledges the original (so a crash in between leaves the event in both
places: at least once).

``ack_timeout`` on RabbitMQ: a consumer whose connection closes or drops gives
its unacknowledged events back at once, when the broker notices (at once for a
closed socket, after the heartbeat timeout for a silent peer). A live consumer
whose handler holds an event longer than ``ack_timeout`` cancels that handler
and puts the event back as a failed delivery. The broker's own
``consumer_timeout`` (30 minutes by default) is the last resort behind both.

Dead letters are listed with ``basic.get`` on a channel of their own, without
acknowledging, then the channel is closed, which puts them back in their order:
the listing does not consume them. Replay looks the id up the same way,
publishes the event (its original body and properties) to the queue it came
from through the default exchange, mandatory and confirmed, then acknowledges
the dead letter.

Ordering: a queue is FIFO, and one subscription runs the events of one saga
one at a time, in the order the queue delivers them (events of different sagas
run concurrently, up to ``prefetch``). So with one consumer in a group, one
saga's events are handled in publication order, as long as no delivery fails.
A failed event put back comes behind later events of its saga, and
several consumers of one group may handle one saga's events at the same time.

A lost connection is re-established in the background (with a growing pause,
at most 5 s); the exchange, the queues and the subscriptions are declared
again. ``publish`` waits for it up to ``timeout``, then raises
:class:`~sagakit.errors.BackendUnavailable`. Events whose handlers were running
when the connection went are not acknowledged (the broker has given them back).

``close`` cancels the consumers, waits for the handlers running to finish and
acknowledges their events, gives back the events received but not started, and
disconnects. A handler may close its own bus: close does not wait for that
handler, whose event, unacknowledged, is delivered again to its group.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import re
from collections.abc import Sequence
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aio_pika
import aiormq.exceptions as amqp
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
)

from sagakit.adapters._amqp_delivery import (
    DEAD_LETTER_HEADERS,
    H_ID,
    H_QUEUE,
    MAX_RECONNECT_PAUSE,
    Browse,
    Consumer,
    Subscription,
    dead_letter_of,
    short,
    translate,
)
from sagakit.adapters._bus_checks import GROUP, check_limit, check_subscribe, publishable
from sagakit.adapters._handlers import in_handler, refuse_in_handler, spawn
from sagakit.core.envelope import encode_event
from sagakit.core.event import Event
from sagakit.errors import (
    BackendBusy,
    BackendError,
    BackendRefused,
    BackendUnavailable,
    ConfigurationError,
    DefinitionError,
)
from sagakit.ports.event_bus import (
    ALL_EVENTS,
    DEFAULT_ACK_TIMEOUT,
    DEFAULT_BACKOFF,
    DEFAULT_MAX_DELIVERIES,
    DeadLetter,
    Handler,
)

__all__ = ["AmqpEventBus"]

log = logging.getLogger("sagakit.bus.amqp")

_PREFIX = re.compile(r"[A-Za-z0-9_-]{1,64}")
# No ":" in a group: it separates the group from the type in a queue's name.
_TYPE_IN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,120}")


class _Options(NamedTuple):
    driver_url: str  # what aio-pika gets: the URL without sagakit's own options
    where: str  # the URL without credentials, for messages
    prefix: str
    prefetch: int
    timeout: float


def _options(url: str) -> _Options:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("amqp", "amqps"):
        raise ConfigurationError(f"not an AMQP URL: {scheme}://")
    ours = {"prefix": "sagakit", "prefetch": "64", "timeout": "10"}
    rest: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in ours:
            ours[key] = value
        else:
            rest.append((key, value))
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"{scheme}://{parts.hostname}: {exc}") from exc
    where = f"{scheme}://{parts.hostname or 'localhost'}:{port or 5672}{parts.path}"
    if not _PREFIX.fullmatch(ours["prefix"]):
        raise ConfigurationError(
            f"{where}: prefix {ours['prefix']!r} must be 1 to 64 letters, digits, '-' or '_'"
        )
    try:
        prefetch = int(ours["prefetch"])
        timeout = float(ours["timeout"])
    except ValueError as exc:
        raise ConfigurationError(f"{where}: {exc}") from exc
    if not 1 <= prefetch <= 65535:
        raise ConfigurationError(f"{where}: prefetch must be 1 to 65535, got {prefetch}")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ConfigurationError(f"{where}: timeout must be positive seconds, got {timeout}")
    driver_url = urlunsplit((scheme, parts.netloc, parts.path, urlencode(rest), ""))
    return _Options(driver_url, where, ours["prefix"], prefetch, timeout)


def _queue_part(event_type: str) -> str:
    """The event type as it appears in a queue's name."""
    if event_type == ALL_EVENTS:
        return "#"  # no other type has it: it is refused in types
    if _TYPE_IN_NAME.fullmatch(event_type):
        return event_type
    # AMQP names take few characters: the others are hashed ("/" marks it, as no
    # type kept as it is has one).
    return "/" + hashlib.sha256(event_type.encode()).hexdigest()[:40]


def _saga_key(saga_id: str) -> str:
    # The saga id rides in the correlation id, a short string: long ones are hashed.
    if short(saga_id):
        return saga_id
    return "sha256:" + hashlib.sha256(saga_id.encode()).hexdigest()


class _Link(NamedTuple):
    connection: AbstractConnection
    channel: AbstractChannel  # with publisher confirms
    exchange: AbstractExchange | None  # None until the bus needs it (not to read)


class AmqpEventBus:
    """An :class:`~sagakit.ports.event_bus.EventBus` on RabbitMQ (see the module's text)."""

    def __init__(self, url: str) -> None:
        options = _options(url)
        self._driver_url, self.where = options.driver_url, options.where
        self.prefix, self._prefetch, self._timeout = (
            options.prefix,
            options.prefetch,
            options.timeout,
        )
        self.exchange_name = f"{self.prefix}.events"
        # How the broker lists this bus's connections (rabbitmqctl list_connections).
        self.connection_name = f"sagakit {self.prefix} {os.getpid()} {os.urandom(4).hex()}"
        self._link: _Link | None = None
        self._up = asyncio.Event()
        self._opening = asyncio.Lock()
        self._reconnector: asyncio.Task[None] | None = None
        self._inspector: AbstractChannel | None = None
        self._browsing = asyncio.Lock()  # one reader of dead letters at a time, here
        self._consumers: list[Consumer] = []
        self._state = "open"  # then "closing", "closed"; "dead" once abandoned
        self._shut = asyncio.Event()  # set once closed
        self._received = 0  # deliveries seen: drain() watches it stand still
        self._declares = False  # whether the exchange is declared on (re)connecting

    @classmethod
    def from_url(cls, url: str) -> AmqpEventBus:
        """The bus the URL names; it connects on first use."""
        return cls(url)

    @classmethod
    async def connect(cls, url: str) -> AmqpEventBus:
        """The bus the URL names, connected (so a wrong URL fails here)."""
        bus = cls(url)
        await bus._ready()
        return bus

    # --- the connection -------------------------------------------------------------------

    async def _ready(self, *, declare: bool = True) -> _Link:
        """The open link; with ``declare``, the events exchange declared on it too.

        Reading dead letters declares nothing: a look at a broker leaves no exchange.
        """
        if declare:
            self._declares = True
        link = await self._connected()
        if link.exchange is None and self._declares:
            async with self._opening:
                link = self._link or link
                if link.exchange is None:
                    exchange = await self._declare_exchange(link.channel)
                    self._link = link = link._replace(exchange=exchange)
        return link

    async def _connected(self) -> _Link:
        if self._state in ("closed", "dead"):
            raise BackendError(self.where, "the event bus is closed")
        link = self._link
        if link is not None and not link.channel.is_closed:
            return link
        if self._reconnector is not None:
            try:
                async with asyncio.timeout(self._timeout):
                    await self._up.wait()
            except TimeoutError:
                raise BackendUnavailable(
                    self.where, f"the connection is lost and not back after {self._timeout:g}s"
                ) from None
            return await self._connected()
        async with self._opening:
            link = self._link
            if link is not None and not link.channel.is_closed:
                return link
            if link is not None and not link.connection.is_closed:
                # The connection stands but its channel was closed by an error: a new one.
                return await self._open_channel(link.connection)
            return await self._open()

    async def _open(self) -> _Link:
        """Connect, declare the exchange, and start (again) every subscription."""
        try:
            async with asyncio.timeout(self._timeout):
                connection = await aio_pika.connect(
                    self._driver_url, client_properties={"connection_name": self.connection_name}
                )
        except Exception as exc:
            raise translate(self.where, "cannot connect", exc) from exc
        # Watched from the start: a connection lost while the subscriptions start
        # again is noticed, not left standing in the link.
        connection.close_callbacks.add(self._on_lost)
        try:
            link = await self._open_channel(connection)
            for consumer in list(self._consumers):
                if not consumer.stopping:
                    await consumer.start(connection)
        except BaseException:
            self._link = None
            self._up.clear()
            await connection.close()
            raise
        return link

    async def _open_channel(self, connection: AbstractConnection) -> _Link:
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        except Exception as exc:
            raise translate(self.where, "opening a channel", exc) from exc
        exchange = await self._declare_exchange(channel) if self._declares else None
        self._link = _Link(connection, channel, exchange)
        self._inspector = None
        self._up.set()
        return self._link

    async def _declare_exchange(self, channel: AbstractChannel) -> AbstractExchange:
        try:
            return await channel.declare_exchange(
                self.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
            )
        except Exception as exc:
            raise translate(self.where, f"exchange {self.exchange_name}", exc) from exc

    def _on_lost(self, connection: Any, exc: BaseException | None = None) -> None:
        link = self._link
        if link is None or link.connection is not connection:
            return
        self._link = None
        self._up.clear()
        if self._state in ("open", "closing") and self._reconnector is None:
            log.warning("%s: connection lost (%s); reconnecting", self.where, exc)
            self._reconnector = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        pause = 0.1
        try:
            while self._state in ("open", "closing"):
                await asyncio.sleep(pause)
                try:
                    async with self._opening:
                        await self._open()
                except BackendError as exc:
                    log.warning("%s: reconnecting failed: %s", self.where, exc)
                    pause = min(pause * 2, MAX_RECONNECT_PAUSE)
                else:
                    log.info("%s: reconnected", self.where)
                    return
        finally:
            self._reconnector = None

    # --- publishing -----------------------------------------------------------------------

    async def publish(self, event: Event) -> None:
        event = publishable(event)
        if self._state in ("closed", "dead"):
            raise BackendError(self.where, f"the event bus is closed; {event.type} not published")
        message = aio_pika.Message(
            encode_event(event),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=event.event_id if short(event.event_id) else None,
            correlation_id=_saga_key(event.saga_id),
            type=event.type,
        )
        await self._send(message, event.type, what=f"publishing {event.type}")

    async def _send(
        self, message: aio_pika.Message, routing_key: str, *, what: str, direct: bool = False
    ) -> None:
        """Publish and await the broker's confirm (direct: to the queue named routing_key)."""
        link = await self._ready(declare=not direct)  # to a queue: no exchange needed
        exchange = link.channel.default_exchange if direct else link.exchange
        assert exchange is not None  # _ready() declares it
        try:
            # Bounded: a broker under a memory or disk alarm blocks its publishers
            # for as long as the alarm lasts, and a caller must hear of it.
            async with asyncio.timeout(self._timeout):
                await exchange.publish(message, routing_key=routing_key, mandatory=direct)
        except TimeoutError as exc:
            raise BackendBusy(
                self.where,
                f"{what}: no confirm within {self._timeout:g}s (is the broker blocking"
                " publishers under a memory or disk alarm?); it may still arrive",
            ) from exc
        except Exception as exc:
            raise translate(self.where, what, exc) from exc

    # --- subscribing ----------------------------------------------------------------------

    async def subscribe(
        self,
        event_type: str,
        handler: Handler,
        *,
        group: str | None = None,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        ack_timeout: float = DEFAULT_ACK_TIMEOUT,
        backoff: float = DEFAULT_BACKOFF,
    ) -> Subscription:
        ack_timeout, backoff = check_subscribe(
            event_type, handler, group, max_deliveries, ack_timeout, backoff
        )
        owner = f"@{os.urandom(8).hex()}" if group is None else group
        queue = f"{self.prefix}.{owner}:{_queue_part(event_type)}"
        consumer = Consumer(
            self, event_type, handler, group, queue, max_deliveries, ack_timeout, backoff
        )
        if self._state != "open":
            raise BackendError(self.where, "the event bus is closed")
        link = await self._ready()
        await consumer.start(link.connection)
        self._consumers.append(consumer)
        return Subscription(self, consumer)

    def dead_letter_queue(self, group: str) -> str:
        """The name of the group's dead-letter queue (``""``: subscriptions without a group)."""
        if group == "":
            return f"{self.prefix}.dlq"
        if not isinstance(group, str) or not GROUP.fullmatch(group):
            raise DefinitionError("group", f"{group!r} is not a group name")
        return f"{self.prefix}.{group}.dlq"

    # --- waiting, dead letters, closing ---------------------------------------------------

    async def drain(self) -> None:
        refuse_in_handler(self)
        # Settled when no handler holds an event, the queues hold none ready, and no
        # delivery arrived, twice in a row: an event the broker has just handed to
        # this process is in neither count until it arrives.
        calm, seen = 0, -1
        while calm < 2:
            # A stopping consumer's handlers still run (a handler cancelled its own
            # subscription): they are waited for, its queue no longer.
            consumers = list(self._consumers)
            if not consumers:
                return
            live = [c for c in consumers if not c.stopping]
            busy = any(c.held for c in consumers) or bool(
                live and await self._ready_count(live) > 0
            )
            calm = 0 if busy or self._received != seen else calm + 1
            seen = self._received
            await asyncio.sleep(0.01)

    async def _ready_count(self, consumers: list[Consumer]) -> int:
        link = await self._ready()
        if self._inspector is None or self._inspector.is_closed:
            self._inspector = await link.connection.channel(publisher_confirms=False)
        counts = 0
        for consumer in consumers:
            try:
                queue = await self._inspector.declare_queue(consumer.queue_name, passive=True)
            except amqp.ChannelNotFoundEntity:
                self._inspector = None  # the 404 closed the channel
                return 1  # not declared yet (reconnecting): not settled
            except Exception as exc:
                raise translate(self.where, "counting events", exc) from exc
            counts += queue.declaration_result.message_count or 0
        return counts

    async def dead_letters(self, group: str, *, limit: int = 100) -> Sequence[DeadLetter]:
        check_limit(limit)
        letters: list[DeadLetter] = []
        async with Browse(self, self.dead_letter_queue(group)) as browse:
            while len(letters) < limit:
                message = await browse.get()
                if message is None:
                    break
                letters.append(dead_letter_of(message))
        return letters

    async def replay_dead_letter(self, group: str, dead_letter_id: str) -> None:
        async with Browse(self, self.dead_letter_queue(group)) as browse:
            while (message := await browse.get()) is not None:
                headers = message.headers or {}
                if headers.get(H_ID) != dead_letter_id:
                    continue
                target = headers.get(H_QUEUE)
                if not isinstance(target, str) or not target:
                    raise BackendRefused(self.where, f"dead letter {dead_letter_id} names no queue")
                again = aio_pika.Message(
                    message.body,
                    headers={k: v for k, v in headers.items() if k not in DEAD_LETTER_HEADERS},
                    content_type=message.content_type,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=message.message_id,
                    correlation_id=message.correlation_id,
                    type=message.type,
                )
                await self._send(
                    again, target, what=f"publishing a replay to {target}", direct=True
                )
                await browse.take(message)
                return
        raise DefinitionError(
            "dead_letter_id", f"no dead letter {dead_letter_id!r} in group {group!r}"
        )

    async def close(self) -> None:
        """Stop taking events, let the handlers in flight finish and acknowledge, disconnect.

        From a handler, the close ends once that handler returns; close() called again
        meanwhile, from outside the handlers, waits for it to end.
        """
        if self._state == "dead":
            return
        if self._state != "open":  # closed, or closing elsewhere: wait for that
            if not in_handler(self):
                await self._shut.wait()
            return
        self._state = "closing"
        if in_handler(self):
            # Closing waits for the handlers, this one too: it goes on once it returns
            # (closing in its task closed its channel under it, its event unacked).
            spawn(self._close())
            return
        await self._close()

    async def _close(self) -> None:
        try:
            await asyncio.gather(*(consumer.stop() for consumer in self._consumers))
        finally:
            self._state = "closed"
            self._consumers.clear()
            try:
                await self._disconnect()
            finally:
                self._shut.set()

    async def _disconnect(self) -> None:
        reconnector, self._reconnector = self._reconnector, None
        if reconnector is not None:
            reconnector.cancel()
        link, self._link = self._link, None
        self._up.clear()
        if link is not None:
            await link.connection.close()

    def _abandon(self) -> None:
        """Drop everything as a crashed process would: no acknowledgement, no reconnection.

        For fault tests: the caller closes the connection from the server's side.
        """
        self._state = "dead"
        if self._reconnector is not None:
            self._reconnector.cancel()
        for consumer in self._consumers:
            consumer.stopping = True
            for task in consumer.tasks:
                task.cancel()
