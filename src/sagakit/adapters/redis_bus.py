"""The Redis Streams event bus: ``redis://host:port/db?prefix=app`` (``rediss://`` for TLS).

Layout (every key starts with the URL's ``prefix``, default ``sagakit``, so two
apps share a server):

- ``<prefix>:events:<type>``: a stream per event type. A consumer group per
  (group, type) reads it, so a group receives only the types it subscribed,
  and copies of a service that subscribe different types (a rolling upgrade)
  never acknowledge each other's events unhandled.
- ``<prefix>:all``: every event again, written in the same script as its type
  stream, for ``"*"`` subscriptions (trackers, audit): one stream keeps the
  global publish order, which type streams merged by id could not (ids of
  two streams in one millisecond do not compare).
- ``<prefix>:retry:<group>``: dead letters replayed to one group only.
- ``<prefix>:dlq:<group>``: the group's dead letters (envelope, last error,
  delivery count, time); ``<prefix>:dlq:`` holds those of subscriptions
  without a group (each has a private group, removed when it is cancelled).
- ``<prefix>:attempts:<group>``: a hash, the attempts of the group's entries
  that failed or were redelivered (field ``<stream> <entry id>``), until they
  are acknowledged or dead-lettered.

Delivery: each subscription has its own consumer, reading with ``XREADGROUP
BLOCK``; a handler that returns is acknowledged (``XACK``, sent with the next
read); one that raises stays pending and is claimed again by its consumer
after ``backoff`` seconds, doubling per failure up to a minute (``XCLAIM``
with that min-idle time). A consumer that dies holding events loses them after
``ack_timeout``: every consumer of the group sweeps the pending list with
``XPENDING IDLE`` and ``XCLAIM``. Failures are counted in the attempts hash,
not by Redis's delivery count, which counts every claim, also of entries a
dead consumer had read and never started: a new entry's attempt is counted
if its handler fails or still runs at 60% of ``ack_timeout`` (a slow one),
a claimed entry's before its handler runs (so a handler that dies with its
process counts from the entry's second delivery on). After
``max_deliveries`` the event goes to the dead letters and is acknowledged in
one Lua script, atomic as a ``MULTI`` would be. A group created by its first
``subscribe`` starts at the stream's end (``$``); from then on it keeps what
is published while none of its consumers runs. A handler still running at
``ack_timeout`` is cancelled, a failed delivery: it holds its consumer's batch
(acknowledged together) at most that long.

Publishing: concurrent publishes go out together on one connection
(auto-pipelining), each as one script call that adds the event to its type
stream and to the all stream; ``publish`` returns on the reply. A publish
that meets a connection the server closed (a restart) is sent once more on a
new one, so an event may be stored twice; consumers know it by event id.
Connection errors raise :class:`~sagakit.errors.BackendUnavailable`. Keep
``socket_timeout`` out of the URL: with it, redis-py 8.1 at times swallows the
cancellation of a task waiting in a command.

Ordering: a group's consumer receives each type stream in publish order, and
handles a read batch with one task per saga, so the events of one saga and
one type reach one consumer's handler in publish order. There is no order
across types (a group subscribed to two types may see the later first), nor
across competing consumers; ``"*"`` subscriptions see the global order. A
redelivered event arrives after events published later than it. Handlers
must therefore tolerate events out of order and twice.

Bounds: ``XADD ... MAXLEN ~ maxlen`` (default 100,000 per stream) caps every
stream; a group that lags that far behind loses its oldest events (Redis
skips unread ones silently; pending ones are logged when claimed). Below the
cap, each bus trims the streams it reads to
the oldest entry some group still needs (``XTRIM MINID``) every
``trim_interval`` seconds, and removes consumers left idle and empty by dead
processes. Publishing awaits the script's reply; with ``appendfsync always``
on the server that reply means the event is on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis import exceptions as rexc

from sagakit.adapters import redact_url
from sagakit.adapters._bus_checks import check_limit, check_subscribe, publishable
from sagakit.adapters._handlers import in_handler, refuse_in_handler, spawn
from sagakit.adapters._options import count, seconds
from sagakit.adapters._redis_consumer import (
    COMMAND_TIMEOUT,
    Pipeliner,
    Reader,
    Subscription,
    check_server,
    sid,
    translate,
)
from sagakit.adapters._redis_drain import all_settled
from sagakit.adapters._redis_scripts import ACK_DELETE, DEAD_LETTER, PUBLISH, REPLAY
from sagakit.core.envelope import decode_event, encode_event
from sagakit.core.event import Event
from sagakit.errors import BackendError, BackendUnavailable, ConfigurationError, DefinitionError
from sagakit.ports.event_bus import (
    ALL_EVENTS,
    DEFAULT_ACK_TIMEOUT,
    DEFAULT_BACKOFF,
    DEFAULT_MAX_DELIVERIES,
    DeadLetter,
    Handler,
)

__all__ = ["RedisEventBus"]

log = logging.getLogger("sagakit.bus.redis")

STALE_CONSUMER = 3600.0  # seconds idle, with nothing pending, before a consumer is removed


class RedisEventBus:
    """An :class:`~sagakit.ports.event_bus.EventBus` on Redis Streams (see the module doc)."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "sagakit",
        maxlen: int = 100_000,
        trim_interval: float = 10.0,
    ) -> None:
        if (
            not isinstance(prefix, str)
            or not prefix
            or any(c.isspace() or not c.isprintable() for c in prefix)
        ):
            raise ConfigurationError(f"redis bus prefix {prefix!r:.100}: printable, no spaces")
        maxlen = count("redis bus maxlen", maxlen, least=1)
        trim_interval = seconds("redis bus trim_interval", trim_interval, zero=False)
        self.url, self.prefix, self.maxlen, self.trim_interval = url, prefix, maxlen, trim_interval
        self._name = f"redis://{urlsplit(url).hostname}:{urlsplit(url).port or 6379}"
        try:
            # An unreachable host fails a publish within seconds rather than at
            # the OS's TCP timeout, unless the URL says otherwise.
            # (No default socket_timeout: with one, redis-py 8.1 at times swallows
            # the cancellation of a task in a command, and the task runs on.)
            self._pool = aioredis.ConnectionPool.from_url(url, socket_connect_timeout=10.0)
        except ValueError as exc:
            raise ConfigurationError(f"redis bus URL {redact_url(url)!r}: {exc}") from exc
        # redis-py hands an option it does not know to the connection, whose first
        # use then raises TypeError: refused here, by name, as NATS refuses its own.
        known = {
            name
            for cls in self._pool.connection_class.__mro__
            if "__init__" in vars(cls)
            for name in inspect.signature(vars(cls)["__init__"]).parameters
        }
        unknown = sorted({key for key, _ in parse_qsl(urlsplit(url).query)} - known)
        if unknown:
            raise ConfigurationError(
                f"redis bus URL {redact_url(url)!r}: unknown option(s) {', '.join(unknown)}"
            )
        # Typed Any: redis-py's stubs type replies as unions the caller narrows anyway.
        self._redis: Any = aioredis.Redis(connection_pool=self._pool)
        self._publisher = Pipeliner(self._pool, PUBLISH)
        self._dead_letter_script = self._redis.register_script(DEAD_LETTER)
        self._replay = self._redis.register_script(REPLAY)
        self._ack_delete = self._redis.register_script(ACK_DELETE)
        self._subscriptions: list[Subscription] = []
        self._readers: list[Reader] = []
        self._retry_readers: dict[str, Reader] = {}
        self._anonymous: set[str] = set()  # the private groups of subscriptions without one
        self._published: dict[str, tuple[int, int]] = {}  # stream -> last id this bus added
        self._progress: asyncio.Event | None = None
        self._janitor: asyncio.Task[None] | None = None
        self._janitor_stop: asyncio.Event | None = None
        self._closing = self._closed = False
        self._deferred_close: asyncio.Task[None] | None = None  # close() from a handler
        self._server_checked = False

    @classmethod
    def from_url(cls, url: str) -> RedisEventBus:
        """``redis://[user:password@]host:port/db?prefix=app&maxlen=N&trim_interval=S``."""
        parts = urlsplit(url)
        # redis-py reads a path that is not /N as database 0: a typo would share it.
        if parts.path.strip("/") and not parts.path.strip("/").isdigit():
            raise ConfigurationError(
                f"redis bus URL {redact_url(url)!r}: the path names a database by"
                f" number (/0, /1...), not {parts.path!r}"
            )
        ours: dict[str, str] = {}
        theirs: list[tuple[str, str]] = []
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            (
                ours.__setitem__(key, value)
                if key in ("prefix", "maxlen", "trim_interval")
                else theirs.append((key, value))
            )
        driver_url = urlunsplit(parts._replace(query=urlencode(theirs)))
        try:
            return cls(
                driver_url,
                prefix=ours.get("prefix", "sagakit"),
                maxlen=int(ours.get("maxlen", 100_000)),
                trim_interval=float(ours.get("trim_interval", 10.0)),
            )
        except ValueError as exc:
            raise ConfigurationError(f"redis bus URL {redact_url(url)!r}: {exc}") from exc

    # Keys ------------------------------------------------------------------

    def _stream(self, event_type: str) -> str:
        return (
            f"{self.prefix}:all"
            if event_type == ALL_EVENTS
            else f"{self.prefix}:events:{event_type}"
        )

    def _retry_stream(self, group: str) -> str:
        return f"{self.prefix}:retry:{group}"

    def _dlq(self, group: str) -> str:
        return f"{self.prefix}:dlq:{group}"

    def _attempts_key(self, group: str) -> str:
        return f"{self.prefix}:attempts:{group}"

    # Publishing --------------------------------------------------------------

    async def publish(self, event: Event) -> None:
        event = publishable(event)
        if self._closed:
            raise BackendError(self._name, f"the event bus is closed; {event.type} not published")
        # An event whose type is "*" goes to events:* (no one reads it), not twice to all.
        keys = [f"{self.prefix}:events:{event.type}", self._stream(ALL_EVENTS)]
        try:
            ids = await self._publisher.call(2, *keys, self.maxlen, encode_event(event))
        except (rexc.RedisError, OSError) as exc:
            raise translate(exc, self._name, f"publishing {event.type}") from exc
        for key, eid in zip(keys, ids, strict=True):
            added = sid(eid)
            if added > self._published.get(key, (0, 0)):
                self._published[key] = added
        self._signal()

    # Subscribing -------------------------------------------------------------

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
        if self._closing:
            raise BackendError(self._name, "the event bus is closed; cannot subscribe")
        if not self._server_checked:
            await self._check_server()
        anonymous = group is None
        name = group if group is not None else f"~{uuid.uuid4().hex}"
        subscription = Subscription(
            self,
            event_type,
            handler,
            name,
            anonymous,
            max_deliveries,
            ack_timeout,
            backoff,
        )
        if anonymous:
            self._anonymous.add(name)
        stream = self._stream(event_type)
        await self._create_group(stream, name, "$")
        if name not in self._retry_readers:
            await self._create_group(self._retry_stream(name), name, "0")
        if self._closing:
            raise BackendError(self._name, "the event bus closed; cannot subscribe")
        # From here on nothing awaits: two subscribes of one new group at once
        # start one retry consumer, not two.
        if name not in self._retry_readers:
            retry = Reader(
                self, self._retry_stream(name), name, self._router(name), delete_acked=True
            )
            self._retry_readers[name] = retry
            retry.start()
        reader = Reader(self, stream, name, lambda _event: subscription)
        reader.ack_timeout = subscription.ack_timeout
        subscription.reader = reader
        self._subscriptions.append(subscription)
        self._readers.append(reader)
        self._retry_readers[name].ack_timeout = min(
            s.ack_timeout for s in self._subscriptions if s.group == name
        )
        reader.start()
        if self._janitor is None:
            self._janitor_stop = asyncio.Event()
            self._janitor = asyncio.get_running_loop().create_task(self._janitor_loop())
        return subscription

    async def _check_server(self) -> None:
        await check_server(self._redis, self._name)  # a server too old, or evicting
        self._server_checked = True

    def _router(self, group: str) -> Callable[[Event], Subscription | None]:
        def route(event: Event) -> Subscription | None:
            fallback = None
            for s in self._subscriptions:
                if s.group == group:
                    if s.event_type == event.type:
                        return s
                    if s.event_type == ALL_EVENTS:
                        fallback = s
            return fallback

        return route

    async def _create_group(self, stream: str, group: str, start: str) -> None:
        try:
            await self._redis.xgroup_create(stream, group, id=start, mkstream=True)
        except rexc.ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise translate(exc, self._name, f"creating group {group}") from exc
        except rexc.RedisError as exc:
            raise translate(exc, self._name, f"creating group {group}") from exc

    async def _unsubscribe(self, subscription: Subscription) -> None:
        if subscription not in self._subscriptions or subscription.reader is None:
            return
        self._subscriptions.remove(subscription)
        reader = subscription.reader
        self._readers.remove(reader)
        stopping = [reader]
        if not any(s.group == subscription.group for s in self._subscriptions):
            stopping.append(self._retry_readers.pop(subscription.group))
        await asyncio.gather(*(r.stop() for r in stopping))
        with contextlib.suppress(rexc.RedisError):
            await self._forget(stopping, subscription.anonymous)

    async def _forget(self, readers: list[Reader], anonymous: bool) -> None:
        """Remove the consumers that hold nothing, and a private group altogether."""
        for reader in readers:
            if anonymous:
                await self._redis.xgroup_destroy(reader.stream, reader.group)
                await self._redis.delete(reader.ledger)
                if reader.delete_acked:
                    await self._redis.delete(reader.stream)
                continue
            mine = await self._redis.xpending_range(
                reader.stream, reader.group, "-", "+", 1, consumername=reader.consumer
            )
            if not mine:
                await self._redis.xgroup_delconsumer(reader.stream, reader.group, reader.consumer)

    # Acknowledging and dead letters ----------------------------------------

    async def _dead_letter(
        self, reader: Reader, eid: bytes, data: bytes, error: str, deliveries: int
    ) -> None:
        log.warning(
            "redis %s: dead letter %s after %d deliveries: %s",
            reader.group,
            eid.decode(),
            deliveries,
            error,
        )
        await self._dead_letter_script(
            keys=[
                self._dlq("" if reader.group in self._anonymous else reader.group),
                reader.stream,
                reader.ledger,
            ],
            args=[
                self.maxlen,
                reader.group,
                eid,
                data,
                error[:4000],
                deliveries,
                repr(time.time()),
                "1" if reader.delete_acked else "0",
                reader.attempt(eid),
            ],
        )

    async def dead_letters(self, group: str, *, limit: int = 100) -> Sequence[DeadLetter]:
        check_limit(limit, least=1)
        self._refuse_closed("cannot read dead letters")
        try:
            entries = await self._redis.xrange(self._dlq(group), "-", "+", count=limit)
        except rexc.RedisError as exc:
            raise translate(exc, self._name, f"reading dead letters of {group}") from exc
        letters = []
        for eid, fields in entries:
            raw = fields.get(b"e", b"")
            try:
                event = decode_event(raw)
            except (ValueError, KeyError, TypeError, DefinitionError):
                # Kept visible rather than hidden: the raw text, as an event.
                event = Event(
                    "sagakit.Undecodable", "unknown", {"raw": raw[:2000].decode(errors="replace")}
                )
            letters.append(
                DeadLetter(
                    id=eid.decode(),
                    group=group,
                    event=event,
                    error=fields.get(b"error", b"").decode(errors="replace"),
                    deliveries=int(fields.get(b"deliveries", b"0")),
                    failed_at=float(fields.get(b"failed_at", b"0")),
                )
            )
        return letters

    async def replay_dead_letter(self, group: str, dead_letter_id: str) -> None:
        self._refuse_closed("cannot replay a dead letter")
        try:
            sid(dead_letter_id)
        except (ValueError, AttributeError) as exc:
            raise DefinitionError("dead_letter_id", f"{dead_letter_id!r} is no stream id") from exc
        try:
            # The group that failed it: for group "" (subscriptions without a
            # group) the private group of the subscription.
            found = await self._redis.xrange(self._dlq(group), dead_letter_id, dead_letter_id)
            owner = found[0][1].get(b"group", b"").decode() if found else group
            retry = self._retry_stream(owner or group)
            added = await self._replay(
                keys=[self._dlq(group), retry], args=[dead_letter_id, owner or group, self.maxlen]
            )
        except rexc.RedisError as exc:
            raise translate(exc, self._name, f"replaying {dead_letter_id}") from exc
        if not added:
            raise DefinitionError(
                "dead_letter_id", f"no dead letter {dead_letter_id} in group {group!r}"
            )
        # drain() waits for the replay like for a publish.
        self._published[retry] = max(self._published.get(retry, (0, 0)), sid(added))
        self._signal()

    # Waiting and closing -------------------------------------------------------

    def _refuse_closed(self, what: str) -> None:
        # Its pool would connect again, quietly, and stay open after close().
        if self._closed:
            raise BackendError(self._name, f"the event bus is closed; {what}")

    def _signal(self) -> None:
        if self._progress is not None:
            self._progress.set()

    async def drain(self) -> None:
        refuse_in_handler(self)
        if self._progress is None:
            self._progress = asyncio.Event()
        targets: dict[str, tuple[int, int]] = {}
        while True:
            self._progress.clear()
            published = dict(self._published)
            readers = [*self._readers, *self._retry_readers.values()]
            try:
                settled = not any(r.busy or r.due for r in readers) and await all_settled(
                    self._redis, self._name, readers, targets, published
                )
            except BackendUnavailable as exc:
                # An outage delays the handling, it does not end the wait.
                log.info("redis bus drain: %s; waiting", exc)
                settled = False
            if settled and published == self._published:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._progress.wait(), 0.02)

    async def close(self) -> None:
        """Stop reading, let handlers in flight finish and acknowledge them, disconnect.

        From a handler, the close ends once that handler returns; close() called again
        meanwhile, from outside the handlers, waits for it to end.
        """
        if self._closing:
            if self._deferred_close is not None and not in_handler(self):
                await asyncio.wait([self._deferred_close])
            return
        self._closing = True
        if in_handler(self):  # which closing waits for (a deadlock): done once it returns
            self._deferred_close = spawn(self._close())
            return
        await self._close()

    async def _close(self) -> None:
        readers = [(r, s.anonymous) for s in self._subscriptions if (r := s.reader) is not None]
        retries = [(r, g in self._anonymous) for g, r in self._retry_readers.items()]
        await asyncio.gather(*(r.stop() for r, _ in [*readers, *retries]))
        await self._stop_janitor()
        for reader, anonymous in [*readers, *retries]:
            with contextlib.suppress(rexc.RedisError):
                await self._forget([reader], anonymous)
        self._subscriptions.clear()
        self._readers.clear()
        self._retry_readers.clear()
        self._closed = True
        await self._publisher.close()
        await self._redis.aclose()
        await self._pool.disconnect()

    async def _abort(self) -> None:
        """Die as a crashed process would: stop everything, acknowledge nothing."""
        self._closing = self._closed = True
        readers = [*self._readers, *self._retry_readers.values()]
        for reader in readers:
            # The flag first: a cancellation that the driver swallows still ends
            # the consumer at its next turn, and a dropped connection ends its read.
            reader.stopping = True
            await reader.conn.disconnect()
        tasks = [r.task for r in readers if r.task is not None and not r.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        await self._stop_janitor()
        await self._publisher.conn.disconnect()
        await self._pool.disconnect()

    # Housekeeping ----------------------------------------------------------------

    async def _stop_janitor(self) -> None:
        if self._janitor is None or self._janitor_stop is None:
            return
        # Told, not cancelled: a cancellation inside a redis-py command may be
        # swallowed, and awaiting such a task would never end.
        self._janitor_stop.set()
        done, _ = await asyncio.wait({self._janitor}, timeout=COMMAND_TIMEOUT)
        if not done:
            self._janitor.cancel()

    async def _janitor_loop(self) -> None:
        assert self._janitor_stop is not None
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._janitor_stop.wait(), self.trim_interval)
            if self._janitor_stop.is_set():
                return
            try:
                await self.trim()
            except Exception as exc:
                # Housekeeping may fail for a while (an outage); it must not stop.
                log.warning("redis bus housekeeping: %r", exc)

    async def trim(self) -> None:
        """Trim the streams read here to what some group still needs; drop dead consumers."""
        for stream in sorted({r.stream for r in [*self._readers, *self._retry_readers.values()]}):
            needed: tuple[int, int] | None = None
            for info in await self._redis.xinfo_groups(stream):
                group = info["name"]
                first = sid(info["last-delivered-id"])
                first = (first[0], first[1] + 1)
                if int(info["pending"]):
                    # Read after the group's position: what was acked meanwhile
                    # shows as no minimum, and only raises the bound.
                    summary = await self._redis.xpending(stream, group)
                    if summary["min"] is not None:
                        first = min(first, sid(summary["min"]))
                for c in await self._redis.xinfo_consumers(stream, group):
                    if not int(c["pending"]) and int(c["idle"]) > STALE_CONSUMER * 1000:
                        await self._redis.xgroup_delconsumer(stream, group, c["name"])
                needed = first if needed is None else min(needed, first)
            if needed is not None:
                await self._redis.execute_command(
                    "XTRIM", stream, "MINID", "~", f"{needed[0]}-{needed[1]}"
                )
