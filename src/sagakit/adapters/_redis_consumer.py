"""The consumer half of the Redis Streams bus: one reader per (stream, group).

Split from :mod:`sagakit.adapters.redis_bus` (whose docstring tells the
design) to keep each module readable; nothing here is public.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from redis import exceptions as rexc

from sagakit.adapters._bus_checks import check_server_version
from sagakit.adapters._handlers import done_handling, handling, in_handler, run_handler, spawn
from sagakit.core.envelope import decode_event
from sagakit.core.event import Event
from sagakit.errors import (
    BackendBusy,
    BackendError,
    BackendRefused,
    BackendUnavailable,
    DefinitionError,
)
from sagakit.ports.event_bus import (
    DEFAULT_ACK_TIMEOUT,
    DEFAULT_BACKOFF,
    DEFAULT_MAX_DELIVERIES,
    Handler,
)

if TYPE_CHECKING:
    from sagakit.adapters.redis_bus import RedisEventBus

log = logging.getLogger("sagakit.bus.redis")

BATCH = 256  # entries per read: enough for many sagas in flight, bounded memory
MAX_BLOCK = 2.0  # seconds a read blocks before the consumer looks at its timers
COMMAND_TIMEOUT = 30.0  # seconds without a reply after which the connection is given up


# Policies under which the server may delete any key, the bus's streams included.
_EVICTING = frozenset({"allkeys-lru", "allkeys-lfu", "allkeys-random"})


async def check_server(redis: Any, backend: str) -> None:
    """Refuse a server before 6.2; warn when its memory policy may evict the streams.

    Consumers sweep with XPENDING IDLE and the janitor trims with XTRIM MINID: on
    an older server both fail for ever (a dead consumer's events stuck, the streams
    unbounded). An evicting policy would drop events under memory pressure without
    anyone being told: said once, as the bus starts consuming.
    """
    try:
        server = await redis.info("server")
        memory = await redis.info("memory")
    except (rexc.RedisError, OSError) as exc:
        raise translate(exc, backend, "reading the server's version") from exc
    version = str(server.get("redis_version", ""))
    check_server_version(backend, "Redis", version, (6, 2), "XPENDING IDLE, XTRIM MINID")
    policy = str(memory.get("maxmemory_policy", ""))
    if policy in _EVICTING:
        log.warning(
            "%s: maxmemory-policy is %s: under memory pressure the server may evict the"
            " bus's streams and lose events; use noeviction",
            backend,
            policy,
        )


def retry_delay(backoff: float, deliveries: int) -> float:
    # Doubling per failed delivery, at most a minute: a flapping peer gets
    # time to recover, a poisoned event reaches the dead letters in bounded time.
    return float(min(backoff * 2 ** (deliveries - 1), max(backoff, 60.0)))


def sid(raw: bytes | str) -> tuple[int, int]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def translate(exc: BaseException, backend: str, what: str) -> BackendError:
    message = f"{what}: {exc}"
    if isinstance(exc, rexc.AuthenticationError | rexc.NoPermissionError):
        return BackendRefused(backend, message)
    if isinstance(exc, rexc.ConnectionError | rexc.TimeoutError | OSError):
        return BackendUnavailable(backend, message)
    text = str(exc)
    if text.startswith(("LOADING", "MASTERDOWN", "TRYAGAIN", "READONLY", "BUSY ")):
        return BackendUnavailable(backend, message)
    # Out of memory: "OOM ..." from a command, without the prefix from inside a script
    # (publish is one). Consumers acknowledging and the trims free memory: retryable.
    if text.startswith("OOM") or "used memory > 'maxmemory'" in text:
        return BackendBusy(backend, message)
    return BackendRefused(backend, message)


class Subscription:
    def __init__(
        self,
        bus: RedisEventBus,
        event_type: str,
        handler: Handler,
        group: str,
        anonymous: bool,
        max_deliveries: int,
        ack_timeout: float,
        backoff: float,
    ) -> None:
        self.bus, self.event_type, self.handler, self.group = bus, event_type, handler, group
        self.anonymous, self.max_deliveries = anonymous, max_deliveries
        self.ack_timeout, self.backoff = ack_timeout, backoff
        self.reader: Reader | None = None

    async def cancel(self) -> None:
        """Stop this subscription's deliveries; what it holds goes back to its group."""
        if in_handler(self.bus) and self.reader is not None:
            # From a handler of this bus: stopping waits for the reader running that
            # handler, which waits for this call (a deadlock). It reads no more from
            # now on and is removed once its handlers return; until then it stays the
            # bus's, so drain() and close() wait for its acknowledgements.
            self.reader.stopping = True
            spawn(self._cancel_later())
            return
        await self.bus._unsubscribe(self)

    async def _cancel_later(self) -> None:
        if self.reader is not None:
            await self.reader.stop()
        await self.bus._unsubscribe(self)


# One delivery: entry id, envelope bytes (None when the stream lost it), and whether it
# is a redelivery (claimed from the pending list rather than read new).
_Entry = tuple[bytes, bytes | None, bool]


class Reader:
    """One consumer of one (stream, group): reads, hands to handlers, acks, retries, sweeps."""

    def __init__(
        self,
        bus: RedisEventBus,
        stream: str,
        group: str,
        route: Callable[[Event], Subscription | None],
        *,
        delete_acked: bool = False,
    ) -> None:
        self.bus, self.stream, self.group, self.route = bus, stream, group, route
        self.delete_acked = delete_acked  # retry streams: one group, so delete what it acked
        self.consumer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.conn: Any = raw_connection(bus._pool)
        self.client_id: int | None = None
        self.blocked = False
        self.stopping = False
        self.busy = False  # a batch is being handled
        self.ack_timeout = DEFAULT_ACK_TIMEOUT
        # The group's attempts (see attempts()): a hash, field "<stream> <entry id>".
        self.ledger = bus._attempts_key(group)
        # failed entry -> (retry time, its backoff in ms)
        self.due: dict[bytes, tuple[float, int]] = {}
        # New entries whose attempt is counted while their handler runs (_count_early),
        # and those acknowledged meanwhile, whose field goes with the ack.
        self.early: dict[bytes, asyncio.Task[int]] = {}
        self.counted: set[bytes] = set()
        self.next_sweep = 0.0
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run(), name=f"redis:{self.stream}")

    async def _command(self, *args: Any) -> Any:
        await self.conn.send_command(*args)
        return await self.conn.read_response(timeout=COMMAND_TIMEOUT)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        pause = 0.05
        acks: list[bytes] = []
        recover, regroup = True, False
        while not self.stopping:
            try:
                if not self.conn.is_connected:
                    await self.conn.connect()
                    self.client_id = int(await self._command("CLIENT", "ID"))
                if regroup:
                    # Here, not in the handler of NOGROUP: an error making the group
                    # must be retried like any other, not end the consumer.
                    await self.bus._create_group(self.stream, self.group, "$")
                    regroup = False
                if recover:
                    # Entries read just before a lost connection are ours in the
                    # pending list, and no one else's until ack_timeout.
                    await self._claim_pending(0, mine=True)
                    recover = False
                now = loop.time()
                if self.due and min(t for t, _ in self.due.values()) <= now:
                    await self._retry_due(now)
                if now >= self.next_sweep:
                    if acks:  # else the sweep takes them back, idle since their read
                        await self._ack(acks)
                        acks = []
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
                    regroup = True
                    continue
                log.warning("redis consumer %s on %s: %s", self.group, self.stream, exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)  # a refusal that lasts (a key of another kind)
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
            if counted := [self.attempt(eid) for eid in acks if eid in self.counted]:
                self.counted.difference_update(acks)
                commands.append(("HDEL", self.ledger, *counted))
        elif acks:
            await self._ack(acks)
        read = ("XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", BATCH)
        commands.append((*read, "BLOCK", block, "STREAMS", self.stream, ">"))
        await self.conn.send_packed_command(self.conn.pack_commands(commands))
        self.blocked = True
        try:
            # Beyond the block, a server that says nothing is gone (a half-open
            # connection): reconnect rather than wait forever.
            wait = block / 1000 + COMMAND_TIMEOUT
            replies = [await self.conn.read_response(timeout=wait) for _ in commands]
        finally:
            self.blocked = False
        reply = replies[-1]
        if not reply:
            return []
        return [(eid, _field(fields), False) for eid, fields in reply[0][1]]

    async def _ack(self, ids: list[bytes], *, claimed: bool = False) -> None:
        """Acknowledge; for claimed entries, also drop their attempts (see attempts())."""
        if self.delete_acked:
            await self.bus._ack_delete(keys=[self.stream], args=[self.group, *ids])
        else:
            await self.bus._redis.xack(self.stream, self.group, *ids)
        counted = [eid for eid in ids if claimed or eid in self.counted]
        self.counted.difference_update(ids)
        if counted:
            await self.bus._redis.hdel(self.ledger, *(self.attempt(eid) for eid in counted))

    def attempt(self, eid: bytes) -> bytes:
        """The entry's field in the group's attempts."""
        return self.stream.encode() + b" " + eid

    async def attempts(self, eid: bytes) -> int:
        """Count a handler start (or failure) of the entry; the starts counted so far.

        Redis's own delivery count (``XPENDING``) counts every ``XCLAIM``, also of
        entries a dead consumer had read but never started (its read batch): a
        crash-looping service would dead-letter events no handler tried. So the
        attempts are counted here, in a hash per group: a redelivered entry's
        start before its handler runs (so a handler that dies with its process
        counts), a new entry's only when its handler fails or runs past 60% of
        ``ack_timeout`` (a hung one counts; quick ones cost nothing). The field is
        dropped once the entry is acknowledged or dead-lettered.
        """
        return int(await self.bus._redis.hincrby(self.ledger, self.attempt(eid), 1))

    async def _claim(self, ids: list[bytes], min_idle_ms: int) -> None:
        reply = await self._command(
            "XCLAIM", self.stream, self.group, self.consumer, min_idle_ms, *ids
        )
        entries: list[_Entry] = []
        for item in reply or ():
            if item is None:
                continue
            eid, fields = item
            entries.append((eid, _field(fields) if fields is not None else None, True))
        acks = await self._handle(entries) if entries else []
        if acks:
            await self._ack(acks, claimed=True)

    async def _retry_due(self, now: float) -> None:
        ready = {eid: wait for eid, (t, wait) in self.due.items() if t <= now}
        for eid in ready:
            del self.due[eid]
        # The entry has been idle at least its backoff since this consumer got
        # it, unless another consumer's sweep took it meanwhile: then its idle
        # time restarted, and this min-idle makes XCLAIM leave it to that one.
        by_idle: dict[int, list[bytes]] = {}
        for eid, wait in ready.items():
            by_idle.setdefault(max(0, wait - 10), []).append(eid)
        for min_idle, eids in by_idle.items():
            await self._claim(eids, min_idle)

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
        eids = [eid for eid, _c, _idle, _n in pending or () if eid not in self.due]
        if eids:
            await self._claim(eids, min_idle_ms)

    async def _handle(self, entries: list[_Entry]) -> list[bytes]:
        """Run the handlers of a batch: a task per saga, each saga's events in order."""
        self.busy = True
        mark = handling(self.bus)  # seen by the handlers' tasks too (a copied context)
        try:
            by_saga: dict[str, list[tuple[bytes, Event | None, bytes | None, bool]]] = {}
            for eid, data, again in entries:
                event: Event | None = None
                if isinstance(data, _Foreign):
                    reason = "undecodable: no envelope (field 'e') in the entry"
                    await self.bus._dead_letter(self, eid, data, reason, 1)
                    continue
                if data is not None:
                    try:
                        event = decode_event(data)
                    except (ValueError, KeyError, TypeError, DefinitionError) as exc:
                        await self.bus._dead_letter(self, eid, data, f"undecodable: {exc!r}", 1)
                        continue
                key = event.saga_id if event is not None else ""
                by_saga.setdefault(key, []).append((eid, event, data, again))
            acks: list[bytes] = []
            chains = [self._chain(chain, acks) for chain in by_saga.values()]
            if len(chains) == 1:
                await chains[0]
            else:
                await asyncio.gather(*chains)
            return acks
        finally:
            done_handling(mark)
            self.busy = False
            self.bus._signal()

    async def _chain(
        self, chain: list[tuple[bytes, Event | None, bytes | None, bool]], acks: list[bytes]
    ) -> None:
        for eid, event, data, again in chain:
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
                n = await self.attempts(eid)
                if n >= DEFAULT_MAX_DELIVERIES:
                    await self.bus._dead_letter(self, eid, data, reason, n)
                else:
                    self._later(eid, n, DEFAULT_BACKOFF)
                continue
            # A redelivery's start is counted before its handler runs; a new entry
            # is its first attempt, counted only if it fails or runs long (attempts()).
            n = await self.attempts(eid) if again else 1
            if n > subscription.max_deliveries:
                # Its handler was started that many times and never finished: a
                # poisoned event that kills (or hangs) every consumer that runs it.
                reason = (
                    f"not acknowledged within {subscription.ack_timeout}s"
                    f" on {n - 1} deliveries that reached its handler"
                )
                await self.bus._dead_letter(self, eid, data, reason, n - 1)
                continue
            loop, wait = asyncio.get_running_loop(), subscription.ack_timeout
            early = None if again else loop.call_later(0.6 * wait, self._count_early, eid)
            try:
                error = await run_handler(subscription.handler, event, wait)
            finally:
                if early is not None:
                    early.cancel()
            counted = await self._counted_early(eid)
            if error is None:
                acks.append(eid)
                if counted:
                    self.counted.add(eid)
                continue
            reason = f"{type(error).__name__}: {error}"
            if n >= subscription.max_deliveries:
                await self.bus._dead_letter(self, eid, data, reason, n)
            else:
                if not again and not counted:
                    await self.attempts(eid)  # the first attempt, counted now it failed
                log.info(
                    "redis %s: %s failed delivery %d of %s: %s",
                    self.group,
                    event.type,
                    n,
                    eid.decode(),
                    reason,
                )
                self._later(eid, n, subscription.backoff)

    def _count_early(self, eid: bytes) -> None:
        # Counted before another consumer's sweep may claim the entry (idle since it
        # was read, so maybe before this handler's cancellation at ack_timeout), so
        # a handler that hangs counts from its first delivery, as it does if it
        # then dies with its process.
        self.early[eid] = spawn(self.attempts(eid))

    async def _counted_early(self, eid: bytes) -> bool:
        """Whether the entry's first attempt was counted while its handler ran (done)."""
        if (task := self.early.pop(eid, None)) is not None:
            await asyncio.wait([task])
        return task is not None

    def _later(self, eid: bytes, deliveries: int, backoff: float) -> None:
        wait = retry_delay(backoff, deliveries)
        self.due[eid] = (asyncio.get_running_loop().time() + wait, int(wait * 1000))

    async def stop(self) -> None:
        self.stopping = True
        while self.task is not None and not self.task.done():
            if self.blocked and self.client_id is not None:
                with contextlib.suppress(Exception):
                    await self.bus._redis.execute_command("CLIENT", "UNBLOCK", self.client_id)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.task), 0.05)


class _Foreign(bytes):
    """The fields of an entry with no envelope (written by something else), as text."""


def _field(fields: list[bytes]) -> bytes | None:
    """The entry's envelope; None for an entry without fields (deleted, trimmed)."""
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == b"e":
            return fields[i + 1]
    if not fields:
        return None
    return _Foreign(b" ".join(fields)[:2000])


def raw_connection(pool: Any) -> Any:
    """A connection of the pool's kind, outside the pool, speaking RESP2 (parsed by hand)."""
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if "maint" not in k}
    kwargs["protocol"] = 2
    return pool.connection_class(**kwargs)


class Pipeliner:
    """Runs one Lua script for many callers: the calls made while a batch is on
    the wire go out together in the next write (auto-pipelining), so 64 sagas
    in flight cost a round trip per batch, not per event, and one at a time
    costs what a plain call does.
    """

    def __init__(self, pool: Any, script: str, timeout: float = COMMAND_TIMEOUT) -> None:
        self.conn = raw_connection(pool)
        self.script = script
        self.sha = hashlib.sha1(script.encode()).hexdigest()
        self.timeout = timeout
        self.queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self.task: asyncio.Task[None] | None = None

    async def call(self, *args: Any) -> Any:
        """EVALSHA the script with ``args`` (numkeys, keys..., argv...)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self.queue.append((args, future))
        if self.task is None:
            self.task = loop.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self.queue:
                batch, self.queue = self.queue, []
                try:
                    commands = [("EVALSHA", self.sha, *a) for a, _ in batch]
                    try:
                        replies = await self._send(commands)
                    except rexc.ConnectionError:
                        # A connection the server closed (a restart) fails on first
                        # use: one more try on a new one. If the first write did get
                        # through, the events are stored twice: at least once, as
                        # every delivery is, and consumers know them by event id.
                        await self.conn.disconnect()
                        replies = await self._send(commands)
                    again = [i for i, r in enumerate(replies) if isinstance(r, rexc.NoScriptError)]
                    if again:  # the server lost its scripts (a restart, SCRIPT FLUSH)
                        retried = await self._send(
                            [("EVAL", self.script, *batch[i][0]) for i in again]
                        )
                        for i, reply in zip(again, retried, strict=True):
                            replies[i] = reply
                except Exception as exc:
                    await self.conn.disconnect()
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), reply in zip(batch, replies, strict=True):
                    if future.done():
                        continue
                    if isinstance(reply, Exception):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
        finally:
            self.task = None

    async def _send(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        if not self.conn.is_connected:
            await self.conn.connect()
        await self.conn.send_packed_command(self.conn.pack_commands(commands), check_health=False)
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await self.conn.read_response(timeout=self.timeout))
            except rexc.ResponseError as exc:
                replies.append(exc)  # the reply was read whole: the next one follows
        return replies

    async def close(self) -> None:
        if self.task is not None:
            with contextlib.suppress(Exception):
                await self.task
        await self.conn.disconnect()
