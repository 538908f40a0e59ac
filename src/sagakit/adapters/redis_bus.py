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
  delivery count, time).

Delivery: each subscription has its own consumer, reading with ``XREADGROUP
BLOCK``; a handler that returns is acknowledged (``XACK``, sent with the next
read); one that raises stays pending and is claimed again by its consumer
after a backoff (``XCLAIM`` with that min-idle time, which counts the
delivery). A consumer that dies holding events loses them after
``ack_timeout``: every consumer of the group sweeps the pending list with
``XPENDING IDLE`` and ``XCLAIM`` (``XAUTOCLAIM`` does the same but does not
return the delivery counts that decide on a dead letter). After
``max_deliveries`` the event goes to the dead letters and is acknowledged in
one Lua script, atomic as a ``MULTI`` would be.

Ordering: a group's consumer receives each type stream in publish order, and
handles a read batch with one task per saga, so the events of one saga and
one type reach one consumer's handler in publish order. There is no order
across types (a group subscribed to two types may see the later first), nor
across competing consumers; ``"*"`` subscriptions see the global order. A
redelivered event arrives after events published later than it. Handlers
must therefore tolerate events out of order and twice.

Bounds: ``XADD ... MAXLEN ~ maxlen`` (default 100,000 per stream) caps every
stream; a group that lags that far behind loses its oldest unread events
(logged when seen). Below the cap, each bus trims the streams it reads to
the oldest entry some group still needs (``XTRIM MINID``) every
``trim_interval`` seconds, and removes consumers left idle and empty by dead
processes. Publishing awaits the script's reply; with ``appendfsync always``
on the server that reply means the event is on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis import exceptions as rexc

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
    DEFAULT_MAX_DELIVERIES,
    DeadLetter,
    Handler,
)

__all__ = ["RedisEventBus"]

log = logging.getLogger("sagakit.bus.redis")

# Two XADDs in one script: the type stream and the all-events stream hold an
# event together or not at all.
_PUBLISH = """
local a = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[2])
local b = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[2])
return {a, b}
"""
# The XACK comes first: an entry that another consumer already acknowledged is
# not dead-lettered as well.
_DEAD_LETTER = """
if redis.call('XACK', KEYS[2], ARGV[2], ARGV[3]) == 0 then return 0 end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[4], 'error', ARGV[5],
  'group', ARGV[2], 'deliveries', ARGV[6], 'failed_at', ARGV[7])
if ARGV[8] == '1' then redis.call('XDEL', KEYS[2], ARGV[3]) end
return 1
"""
_REPLAY = """
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then return 0 end
local fields, envelope = found[1][2], nil
for i = 1, #fields, 2 do if fields[i] == 'e' then envelope = fields[i + 1] end end
if envelope == nil then return 0 end
redis.pcall('XGROUP', 'CREATE', KEYS[2], ARGV[2], '0', 'MKSTREAM')
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'e', envelope)
redis.call('XDEL', KEYS[1], ARGV[1])
return 1
"""
# Retried entries are deleted once acknowledged: the retry stream has one group.
_ACK_DELETE = """
redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
return redis.call('XDEL', KEYS[1], unpack(ARGV, 2))
"""

ENVELOPE_VERSION = 1
BATCH = 256  # entries per read: enough for many sagas in flight, bounded memory
MAX_BLOCK = 2.0  # seconds a read blocks before the consumer looks at its timers
STALE_CONSUMER = 3600.0  # seconds idle, with nothing pending, before a consumer is removed


def _backoff(deliveries: int) -> float:
    # 50 ms doubling per failed delivery, at most 5 s: a flapping peer gets
    # time to recover, a poisoned event reaches the dead letters within seconds.
    return float(min(0.05 * 2 ** (deliveries - 1), 5.0))


def _encode(event: Event) -> bytes:
    document = {
        "v": ENVELOPE_VERSION,
        "id": event.event_id,
        "type": event.type,
        "saga_id": event.saga_id,
        "payload": dict(event.payload),
        "time": event.timestamp,
        "source": event.source,
        "headers": {},
    }
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def _decode(data: bytes) -> Event:
    document = json.loads(data)
    if not isinstance(document, dict) or document.get("v") != ENVELOPE_VERSION:
        raise ValueError("not a version 1 sagakit event envelope")
    return Event(
        document["type"],
        document["saga_id"],
        document.get("payload") or {},
        source=document.get("source") or "",
        event_id=document["id"],
        timestamp=document["time"],
    )


def _sid(raw: bytes | str) -> tuple[int, int]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _translate(exc: BaseException, backend: str, what: str) -> BackendError:
    message = f"{what}: {exc}"
    if isinstance(exc, rexc.AuthenticationError | rexc.NoPermissionError):
        return BackendRefused(backend, message)
    if isinstance(exc, rexc.ConnectionError | rexc.TimeoutError | OSError):
        return BackendUnavailable(backend, message)
    text = str(exc)
    if text.startswith(("LOADING", "MASTERDOWN", "TRYAGAIN", "READONLY", "BUSY ")):
        return BackendUnavailable(backend, message)
    if text.startswith("OOM"):
        return BackendBusy(backend, message)
    return BackendRefused(backend, message)


async def _call(handler: Handler, event: Event) -> None:
    result = handler(event)
    if inspect.isawaitable(result):
        await result


class _Subscription:
    def __init__(
        self,
        bus: RedisEventBus,
        event_type: str,
        handler: Handler,
        group: str,
        anonymous: bool,
        max_deliveries: int,
        ack_timeout: float,
    ) -> None:
        self.bus, self.event_type, self.handler, self.group = bus, event_type, handler, group
        self.anonymous, self.max_deliveries, self.ack_timeout = (
            anonymous,
            max_deliveries,
            ack_timeout,
        )
        self.reader: _Reader | None = None

    async def cancel(self) -> None:
        """Stop this subscription's deliveries; what it holds goes back to its group."""
        await self.bus._unsubscribe(self)


# One delivery: entry id, envelope bytes (None when the stream lost it), delivery count.
_Entry = tuple[bytes, bytes | None, int]


class _Reader:
    """One consumer of one (stream, group): reads, hands to handlers, acks, retries, sweeps."""

    def __init__(
        self,
        bus: RedisEventBus,
        stream: str,
        group: str,
        route: Callable[[Event], _Subscription | None],
        *,
        delete_acked: bool = False,
    ) -> None:
        self.bus, self.stream, self.group, self.route = bus, stream, group, route
        self.delete_acked = delete_acked  # retry streams: one group, so delete what it acked
        self.consumer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # RESP2 whatever the URL says: the replies below are parsed by hand.
        kwargs = {k: v for k, v in bus._pool.connection_kwargs.items() if "maint" not in k}
        kwargs["protocol"] = 2
        self.conn: Any = bus._pool.connection_class(**kwargs)
        self.client_id: int | None = None
        self.blocked = False
        self.stopping = False
        self.busy = False  # a batch is being handled
        self.ack_timeout = DEFAULT_ACK_TIMEOUT
        # failed entry -> (retry time, deliveries so far)
        self.due: dict[bytes, tuple[float, int]] = {}
        self.next_sweep = 0.0
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run(), name=f"redis:{self.stream}")

    async def _command(self, *args: Any) -> Any:
        await self.conn.send_command(*args)
        return await self.conn.read_response(timeout=math.inf)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        pause = 0.05
        acks: list[bytes] = []
        recover = True
        while not self.stopping:
            try:
                if not self.conn.is_connected:
                    await self.conn.connect()
                    self.client_id = int(await self._command("CLIENT", "ID"))
                if recover:
                    # Entries read just before a lost connection are ours in the
                    # pending list, and no one else's until ack_timeout.
                    await self._claim_pending(0, mine=True)
                    recover = False
                now = loop.time()
                if self.due and min(t for t, _ in self.due.values()) <= now:
                    await self._retry_due(now)
                if now >= self.next_sweep:
                    self.next_sweep = now + min(max(self.ack_timeout / 2, 0.05), 5.0)
                    await self._claim_pending(int(self.ack_timeout * 1000), mine=False)
                wake = min([self.next_sweep, *(t for t, _ in self.due.values())])
                block = max(1, int(min(wake - loop.time(), MAX_BLOCK) * 1000))
                entries = await self._read(acks, block)
                acks = await self._handle(entries) if entries else []
                pause = 0.05
            except rexc.ResponseError as exc:
                await self.conn.disconnect()
                if str(exc).startswith("NOGROUP"):
                    # The stream was deleted (FLUSHALL, a server without persistence):
                    # start the group again rather than stop delivering.
                    await self.bus._create_group(self.stream, self.group, "$")
                    continue
                log.warning("redis consumer %s on %s: %s", self.group, self.stream, exc)
                await asyncio.sleep(pause)
            except (rexc.ConnectionError, rexc.TimeoutError, OSError, BackendError) as exc:
                await self.conn.disconnect()
                recover = True
                log.warning("redis consumer %s on %s: %s; retrying", self.group, self.stream, exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)
            except Exception:
                # Never let one bad reply end a consumer: log it, start afresh.
                await self.conn.disconnect()
                recover = True
                log.exception("redis consumer %s on %s failed; restarting", self.group, self.stream)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)
        if acks:
            with contextlib.suppress(Exception):
                await self._ack(acks)
        await self.conn.disconnect()

    async def _read(self, acks: list[bytes], block: int) -> list[_Entry]:
        # The previous batch's XACK travels with the next read: one round trip.
        commands: list[tuple[Any, ...]] = []
        if acks and not self.delete_acked:
            commands.append(("XACK", self.stream, self.group, *acks))
        elif acks:
            await self._ack(acks)
        read = ("XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", BATCH)
        commands.append((*read, "BLOCK", block, "STREAMS", self.stream, ">"))
        await self.conn.send_packed_command(self.conn.pack_commands(commands))
        self.blocked = True
        try:
            replies = [await self.conn.read_response(timeout=math.inf) for _ in commands]
        finally:
            self.blocked = False
        reply = replies[-1]
        if not reply:
            return []
        return [(eid, _field(fields), 1) for eid, fields in reply[0][1]]

    async def _ack(self, ids: list[bytes]) -> None:
        if self.delete_acked:
            await self.bus._ack_delete(keys=[self.stream], args=[self.group, *ids])
        else:
            await self.bus._redis.xack(self.stream, self.group, *ids)

    async def _claim(self, ids: list[bytes], min_idle_ms: int, counts: dict[bytes, int]) -> None:
        reply = await self._command(
            "XCLAIM", self.stream, self.group, self.consumer, min_idle_ms, *ids
        )
        entries: list[_Entry] = []
        for item in reply or ():
            if item is None:
                continue
            eid, fields = item
            entries.append((eid, _field(fields) if fields is not None else None, counts[eid] + 1))
        acks = await self._handle(entries) if entries else []
        if acks:
            await self._ack(acks)

    async def _retry_due(self, now: float) -> None:
        ready = {eid: n for eid, (t, n) in self.due.items() if t <= now}
        for eid in ready:
            del self.due[eid]
        # The entry has been idle at least its backoff since this consumer got
        # it, unless another consumer's sweep took it meanwhile: then its idle
        # time restarted, and this min-idle makes XCLAIM leave it to that one.
        by_idle: dict[int, dict[bytes, int]] = {}
        for eid, n in ready.items():
            by_idle.setdefault(max(0, int(_backoff(n) * 1000) - 10), {})[eid] = n
        for min_idle, counts in by_idle.items():
            await self._claim(list(counts), min_idle, counts)

    async def _claim_pending(self, min_idle_ms: int, *, mine: bool) -> None:
        args: list[Any] = [
            "XPENDING",
            self.stream,
            self.group,
            "IDLE",
            min_idle_ms,
            "-",
            "+",
            BATCH,
        ]
        if mine:
            args.append(self.consumer)
        pending = await self._command(*args)
        counts = {eid: int(n) for eid, _c, _idle, n in pending or () if eid not in self.due}
        if counts:
            await self._claim(list(counts), min_idle_ms, counts)

    async def _handle(self, entries: list[_Entry]) -> list[bytes]:
        """Run the handlers of a batch: a task per saga, each saga's events in order."""
        self.busy = True
        try:
            by_saga: dict[str, list[tuple[bytes, Event | None, bytes | None, int]]] = {}
            for eid, data, n in entries:
                event: Event | None = None
                if data is not None:
                    try:
                        event = _decode(data)
                    except (ValueError, KeyError, TypeError, DefinitionError) as exc:
                        await self.bus._dead_letter(self, eid, data, f"undecodable: {exc!r}", n)
                        continue
                key = event.saga_id if event is not None else ""
                by_saga.setdefault(key, []).append((eid, event, data, n))
            acks: list[bytes] = []
            chains = [self._chain(chain, acks) for chain in by_saga.values()]
            if len(chains) == 1:
                await chains[0]
            else:
                await asyncio.gather(*chains)
            return acks
        finally:
            self.busy = False
            self.bus._signal()

    async def _chain(
        self, chain: list[tuple[bytes, Event | None, bytes | None, int]], acks: list[bytes]
    ) -> None:
        for eid, event, data, n in chain:
            if event is None or data is None:
                log.error(
                    "redis stream %s lost entry %s before %s handled it (trimmed at maxlen?)",
                    self.stream,
                    eid.decode(),
                    self.group,
                )
                acks.append(eid)
                continue
            subscription = self.route(event)
            if subscription is None:
                # Only a retry stream can hold a type this process's copy of the
                # group does not handle: count it as a failed delivery.
                reason = f"no handler for {event.type} in group {self.group} here"
                if n >= DEFAULT_MAX_DELIVERIES:
                    await self.bus._dead_letter(self, eid, data, reason, n)
                else:
                    self.due[eid] = (asyncio.get_running_loop().time() + _backoff(n), n)
                continue
            if n > subscription.max_deliveries:
                # Taken over from consumers that never acknowledged it, as many
                # times as the group allows: a poisoned event that kills its consumer.
                reason = f"not acknowledged within {subscription.ack_timeout}s, {n - 1} times"
                await self.bus._dead_letter(self, eid, data, reason, n - 1)
                continue
            try:
                await _call(subscription.handler, event)
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                error: BaseException = exc
            except Exception as exc:
                error = exc
            else:
                acks.append(eid)
                continue
            reason = f"{type(error).__name__}: {error}"
            if n >= subscription.max_deliveries:
                await self.bus._dead_letter(self, eid, data, reason, n)
            else:
                log.info(
                    "redis %s: %s failed delivery %d of %s: %s",
                    self.group,
                    event.type,
                    n,
                    eid.decode(),
                    reason,
                )
                self.due[eid] = (asyncio.get_running_loop().time() + _backoff(n), n)

    async def stop(self) -> None:
        self.stopping = True
        while self.task is not None and not self.task.done():
            if self.blocked and self.client_id is not None:
                with contextlib.suppress(Exception):
                    await self.bus._redis.execute_command("CLIENT", "UNBLOCK", self.client_id)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.task), 0.05)


def _field(fields: list[bytes]) -> bytes | None:
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == b"e":
            return fields[i + 1]
    return None


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
        if not prefix or any(c.isspace() or not c.isprintable() for c in prefix):
            raise ConfigurationError(f"redis bus prefix {prefix!r}: printable, no spaces")
        if maxlen < 1 or not 0 < trim_interval < math.inf:
            raise ConfigurationError("redis bus: maxlen >= 1 and 0 < trim_interval required")
        self.url, self.prefix, self.maxlen, self.trim_interval = url, prefix, maxlen, trim_interval
        self._name = f"redis://{urlsplit(url).hostname}:{urlsplit(url).port or 6379}"
        try:
            self._pool = aioredis.ConnectionPool.from_url(url)
        except ValueError as exc:
            raise ConfigurationError(f"redis bus URL {url!r}: {exc}") from exc
        # Typed Any: redis-py's stubs type replies as unions the caller narrows anyway.
        self._redis: Any = aioredis.Redis(connection_pool=self._pool)
        self._publish = self._redis.register_script(_PUBLISH)
        self._dead_letter_script = self._redis.register_script(_DEAD_LETTER)
        self._replay = self._redis.register_script(_REPLAY)
        self._ack_delete = self._redis.register_script(_ACK_DELETE)
        self._subscriptions: list[_Subscription] = []
        self._readers: list[_Reader] = []
        self._retry_readers: dict[str, _Reader] = {}
        self._published: dict[str, tuple[int, int]] = {}  # stream -> last id this bus added
        self._progress: asyncio.Event | None = None
        self._janitor: asyncio.Task[None] | None = None
        self._closing = self._closed = False

    @classmethod
    def from_url(cls, url: str) -> RedisEventBus:
        """``redis://[user:password@]host:port/db?prefix=app&maxlen=N&trim_interval=S``."""
        parts = urlsplit(url)
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
            raise ConfigurationError(f"redis bus URL {url!r}: {exc}") from exc

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

    # Publishing --------------------------------------------------------------

    async def publish(self, event: Event) -> None:
        if not isinstance(event, Event):
            raise DefinitionError("event", f"must be an Event, got {type(event).__name__}")
        if self._closed:
            raise BackendError(self._name, f"the event bus is closed; {event.type} not published")
        keys = [self._stream(event.type), self._stream(ALL_EVENTS)]
        try:
            ids = await self._publish(keys=keys, args=[self.maxlen, _encode(event)])
        except rexc.RedisError as exc:
            raise _translate(exc, self._name, f"publishing {event.type}") from exc
        for key, eid in zip(keys, ids, strict=True):
            sid = _sid(eid)
            if sid > self._published.get(key, (0, 0)):
                self._published[key] = sid
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
    ) -> _Subscription:
        if not isinstance(event_type, str) or not event_type:
            raise DefinitionError("event_type", "must be a non-empty string")
        if not callable(handler):
            raise DefinitionError("handler", "must be a callable taking an Event")
        if group is not None and (not isinstance(group, str) or not group.strip()):
            raise DefinitionError("group", "must be a non-empty string or None")
        if type(max_deliveries) is not int or max_deliveries < 1:
            raise DefinitionError("max_deliveries", f"must be an int >= 1, got {max_deliveries!r}")
        if not isinstance(ack_timeout, int | float) or not 0 < ack_timeout < math.inf:
            raise DefinitionError("ack_timeout", f"must be seconds > 0, got {ack_timeout!r}")
        if self._closing:
            raise BackendError(self._name, "the event bus is closed; cannot subscribe")
        anonymous = group is None
        name = group if group is not None else f"~{uuid.uuid4().hex}"
        subscription = _Subscription(
            self, event_type, handler, name, anonymous, max_deliveries, float(ack_timeout)
        )
        stream = self._stream(event_type)
        await self._create_group(stream, name, "$")
        if name not in self._retry_readers:
            await self._create_group(self._retry_stream(name), name, "0")
            retry = _Reader(
                self, self._retry_stream(name), name, self._router(name), delete_acked=True
            )
            self._retry_readers[name] = retry
            retry.start()
        reader = _Reader(self, stream, name, lambda _event: subscription)
        reader.ack_timeout = subscription.ack_timeout
        subscription.reader = reader
        self._subscriptions.append(subscription)
        self._readers.append(reader)
        self._retry_readers[name].ack_timeout = min(
            s.ack_timeout for s in self._subscriptions if s.group == name
        )
        reader.start()
        if self._janitor is None:
            self._janitor = asyncio.get_running_loop().create_task(self._janitor_loop())
        return subscription

    def _router(self, group: str) -> Callable[[Event], _Subscription | None]:
        def route(event: Event) -> _Subscription | None:
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
                raise _translate(exc, self._name, f"creating group {group}") from exc
        except rexc.RedisError as exc:
            raise _translate(exc, self._name, f"creating group {group}") from exc

    async def _unsubscribe(self, subscription: _Subscription) -> None:
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

    async def _forget(self, readers: list[_Reader], anonymous: bool) -> None:
        """Remove the consumers that hold nothing, and a private group altogether."""
        for reader in readers:
            if anonymous:
                await self._redis.xgroup_destroy(reader.stream, reader.group)
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
        self, reader: _Reader, eid: bytes, data: bytes, error: str, deliveries: int
    ) -> None:
        log.warning(
            "redis %s: dead letter %s after %d deliveries: %s",
            reader.group,
            eid.decode(),
            deliveries,
            error,
        )
        await self._dead_letter_script(
            keys=[self._dlq(reader.group), reader.stream],
            args=[
                self.maxlen,
                reader.group,
                eid,
                data,
                error[:4000],
                deliveries,
                repr(time.time()),
                "1" if reader.delete_acked else "0",
            ],
        )

    async def dead_letters(self, group: str, *, limit: int = 100) -> Sequence[DeadLetter]:
        if type(limit) is not int or limit < 1:
            raise DefinitionError("limit", f"must be an int >= 1, got {limit!r}")
        try:
            entries = await self._redis.xrange(self._dlq(group), "-", "+", count=limit)
        except rexc.RedisError as exc:
            raise _translate(exc, self._name, f"reading dead letters of {group}") from exc
        letters = []
        for eid, fields in entries:
            raw = fields.get(b"e", b"")
            try:
                event = _decode(raw)
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
        try:
            _sid(dead_letter_id)
        except (ValueError, AttributeError) as exc:
            raise DefinitionError("dead_letter_id", f"{dead_letter_id!r} is no stream id") from exc
        retry = self._retry_stream(group)
        try:
            found = await self._replay(
                keys=[self._dlq(group), retry], args=[dead_letter_id, group, self.maxlen]
            )
        except rexc.RedisError as exc:
            raise _translate(exc, self._name, f"replaying {dead_letter_id}") from exc
        if not found:
            raise DefinitionError("dead_letter_id", f"no dead letter {dead_letter_id} in {group}")
        # drain() waits for the replay: its entry is the retry stream's newest.
        with contextlib.suppress(rexc.RedisError):
            last = await self._redis.xrevrange(retry, "+", "-", count=1)
            if last:
                self._published[retry] = max(self._published.get(retry, (0, 0)), _sid(last[0][0]))
        self._signal()

    # Waiting and closing -------------------------------------------------------

    def _signal(self) -> None:
        if self._progress is not None:
            self._progress.set()

    async def drain(self) -> None:
        if self._progress is None:
            self._progress = asyncio.Event()
        targets: dict[str, tuple[int, int]] = {}
        while True:
            self._progress.clear()
            published = dict(self._published)
            readers = [*self._readers, *self._retry_readers.values()]
            if (
                not any(r.busy or r.due for r in readers)
                and await self._settled(readers, targets, published)
                and published == self._published
            ):
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._progress.wait(), 0.02)

    async def _settled(
        self,
        readers: list[_Reader],
        targets: dict[str, tuple[int, int]],
        published: dict[str, tuple[int, int]],
    ) -> bool:
        """Has every group here read up to its target and acknowledged all it read?"""
        streams = sorted({r.stream for r in readers})
        if not streams:
            return True
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for stream in streams:
                    pipe.xinfo_groups(stream)
                    pipe.xrevrange(stream, "+", "-", count=1)
                replies = await pipe.execute()
        except rexc.ResponseError:
            return False  # a stream gone missing: its consumer recreates it
        except rexc.RedisError as exc:
            raise _translate(exc, self._name, "draining") from exc
        state: dict[tuple[str, str], tuple[tuple[int, int], int]] = {}
        for i, stream in enumerate(streams):
            last = replies[2 * i + 1]
            # Events published so far: the stream's newest entry when drain began.
            if stream not in targets:
                targets[stream] = _sid(last[0][0]) if last else (0, 0)
            targets[stream] = max(targets[stream], published.get(stream, (0, 0)))
            for info in replies[2 * i]:
                name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
                state[stream, name] = (_sid(info["last-delivered-id"]), int(info["pending"]))
        for reader in readers:
            delivered, pending = state.get((reader.stream, reader.group), ((0, 0), 1))
            if pending or delivered < targets[reader.stream]:
                return False
        return True

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        readers = [(r, s.anonymous) for s in self._subscriptions if (r := s.reader) is not None]
        retries = [(r, self._anonymous(g)) for g, r in self._retry_readers.items()]
        await asyncio.gather(*(r.stop() for r, _ in [*readers, *retries]))
        if self._janitor is not None:
            self._janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._janitor
        for reader, anonymous in [*readers, *retries]:
            with contextlib.suppress(rexc.RedisError):
                await self._forget([reader], anonymous)
        self._subscriptions.clear()
        self._readers.clear()
        self._retry_readers.clear()
        self._closed = True
        await self._redis.aclose()
        await self._pool.disconnect()

    def _anonymous(self, group: str) -> bool:
        return any(s.anonymous for s in self._subscriptions if s.group == group)

    async def _abort(self) -> None:
        """Die as a crashed process would: stop everything, acknowledge nothing."""
        self._closing = self._closed = True
        tasks = [r.task for r in [*self._readers, *self._retry_readers.values()] if r.task]
        if self._janitor is not None:
            tasks.append(self._janitor)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for reader in [*self._readers, *self._retry_readers.values()]:
            await reader.conn.disconnect()
        await self._pool.disconnect()

    # Housekeeping ----------------------------------------------------------------

    async def _janitor_loop(self) -> None:
        while True:
            await asyncio.sleep(self.trim_interval)
            try:
                await self.trim()
            except rexc.RedisError as exc:
                log.warning("redis bus housekeeping: %s", exc)

    async def trim(self) -> None:
        """Trim the streams read here to what some group still needs; drop dead consumers."""
        for stream in sorted({r.stream for r in [*self._readers, *self._retry_readers.values()]}):
            needed: tuple[int, int] | None = None
            for info in await self._redis.xinfo_groups(stream):
                group = info["name"]
                first = _sid(info["last-delivered-id"])
                first = (first[0], first[1] + 1)
                if int(info["pending"]):
                    summary = await self._redis.xpending(stream, group)
                    first = min(first, _sid(summary["min"]))
                    for c in await self._redis.xinfo_consumers(stream, group):
                        if not int(c["pending"]) and int(c["idle"]) > STALE_CONSUMER * 1000:
                            await self._redis.xgroup_delconsumer(stream, group, c["name"])
                needed = first if needed is None else min(needed, first)
            if needed is not None:
                await self._redis.execute_command(
                    "XTRIM", stream, "MINID", "~", f"{needed[0]}-{needed[1]}"
                )
