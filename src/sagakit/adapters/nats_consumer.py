"""One subscription of the NATS event bus: a pull loop on its consumer, and delivery.

Each subscription keeps one pull request open on its consumer
(``$JS.API.CONSUMER.MSG.NEXT``: up to ``batch`` events, expiring after a few
seconds) and asks again when it is served or expires; the events arrive on an
inbox of its own and are handled one at a time, in arrival order (or, with
``concurrency`` > 1, by up to that many chains at once, one per saga). Stopping is
clean: the inbox is unsubscribed (the server stops sending to it) and what
arrived but was not handled is given back with a ``nak``.

Failures are counted with :mod:`._nats_attempts` (not by the server's delivery
count); at ``max_deliveries`` the subscription stores the event in the dead
letters (as :mod:`._nats_dead_letters` stores them), then terminates it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.js.api import ConsumerConfig

from sagakit.adapters._handlers import forget, handling, in_handler, run_handler, spawn
from sagakit.adapters._nats_attempts import NO_STREAM, EarlyAttempt, stream_sequence
from sagakit.adapters._nats_dead_letters import dead_letter_message
from sagakit.core.envelope import decode_event
from sagakit.core.event import Event
from sagakit.errors import BackendError, DefinitionError
from sagakit.ports.event_bus import Handler

if TYPE_CHECKING:
    from sagakit.adapters.nats_bus import NatsEventBus

__all__ = [
    "MAX_BACKOFF",
    "TOKEN",
    "PullSubscription",
    "describe",
    "subject_token",
    "token",
]

log = logging.getLogger("sagakit.bus.nats")

MAX_BACKOFF = 30.0
TOKEN = re.compile(r"[A-Za-z0-9_-]+")
_PULL_EXPIRES = 2.0  # seconds a pull request waits on the server for events


def token(name: str) -> str:
    """``name`` as one subject token that is also a valid consumer name."""
    if TOKEN.fullmatch(name):
        return name
    return "~" + base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


# The server's control line (4,096 bytes by default) carries a publish's subject, its reply
# subject and sizes; a longer line makes the server close the connection ("maximum control
# line exceeded"), every subscription of the process with it, and the publish time out.
MAX_TOKEN = 3000


def subject_token(name: str, field: str) -> str:
    """:func:`token`, refused (naming ``field``) when too long for a subject the server takes."""
    written = token(name)
    if len(written) > MAX_TOKEN:
        raise DefinitionError(
            field,
            f"{name[:40]!r}... is {len(written)} characters on a NATS subject; at most {MAX_TOKEN}",
        )
    return written


def _deliveries(reply: str) -> int:
    """The delivery count in a JetStream ack subject (0 if it is not one).

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>``,
    or with ``<domain>.<account hash>`` after ``ACK`` and a random token at the
    end; read here in one split, cheaper than nats-py's full Metadata.
    """
    tokens = reply.split(".")
    if len(tokens) < 9 or tokens[0] != "$JS" or tokens[1] != "ACK":
        return 0
    count = tokens[4] if len(tokens) == 9 else tokens[6]
    return int(count) if count.isdigit() else 0


def _is_status(msg: Msg) -> bool:
    # The server's status messages (408 expired, 409 ...) come without a reply
    # subject; an event always has one (its ack subject), even if a publisher
    # gave it a "Status" header of its own.
    headers = msg.headers
    return not msg.reply and headers is not None and "Status" in headers


async def _in_progress(msg: Msg) -> None:
    with contextlib.suppress(nats.errors.Error):  # the server redelivers it instead
        await msg.in_progress()


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class PullSubscription:
    """One handler pulling from one consumer; its loop runs until cancelled."""

    def __init__(
        self,
        bus: NatsEventBus,
        event_type: str,
        handler: Handler,
        config: ConsumerConfig,
        *,
        group: str,
        consumer: str,
        solo: bool,
        max_deliveries: int,
        ack_timeout: float,
        backoff: float,
    ) -> None:
        self._bus = bus
        self.config = config
        self.event_type, self.handler, self.group = event_type, handler, group
        self.consumer, self.solo = consumer, solo
        self.max_deliveries, self.ack_timeout, self.backoff = max_deliveries, ack_timeout, backoff
        self._inbox = ""
        # Events pulled and not yet handled, each with the time it arrived (or
        # was last kept ours with an in-progress ack).
        self._pending: deque[list[Any]] = deque()
        self._arrival = asyncio.Event()
        self._woken = False
        self._kept_at = 0.0  # when the queued events were last kept ours
        # Wakes the loop if its open pull request is lost (a restart, a
        # reconnect) and neither events nor the request's expiry status come.
        self._watchdog: asyncio.TimerHandle | None = None
        self._progress: set[asyncio.Task[None]] = set()
        self._sub: NatsSubscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._handling = 0  # handlers of this subscription running now
        # With concurrency > 1: per saga id, the events waiting behind the one
        # its handler chain is running (one saga's events stay in order), and
        # the chains' tasks.
        self._concurrency = bus._concurrency
        self._sagas: dict[str, deque[list[Any]]] = {}
        self._chains: set[asyncio.Task[None]] = set()
        self._slot = asyncio.Event()
        self._cancelled = False
        self._unsubscribing: asyncio.Task[None] | None = None  # cancel() by its own handler

    async def start(self, nc: Client) -> None:
        self._inbox = nc.new_inbox()
        self._sub = await nc.subscribe(self._inbox + ".*", cb=self._arrived)
        self._task = asyncio.get_running_loop().create_task(
            self._run(nc), name=f"sagakit-nats-{self.consumer}"
        )

    async def _arrived(self, msg: Msg) -> None:
        self._pending.append([time.monotonic(), msg])
        self._arrival.set()

    def wake(self) -> None:
        """Make the loop ask for events again (after a reconnect lost its pull request)."""
        self._woken = True
        self._arrival.set()

    async def _run(self, nc: Client) -> None:
        bus, batch = self._bus, self._bus._batch
        handling(bus)  # the chains it starts inherit the mark
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{bus._stream}.{self.consumer}"
        expires_ns = int(_PULL_EXPIRES * 1e9)
        loop = asyncio.get_running_loop()
        try:
            await self._pull_loop(nc, loop, subject, batch, expires_ns)
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
        await self._give_back_pending()

    async def _pull_loop(
        self,
        nc: Client,
        loop: asyncio.AbstractEventLoop,
        subject: str,
        batch: int,
        expires_ns: int,
    ) -> None:
        request_no, current, owed = 0, "", 0
        while not self._stopping:
            if owed == 0:
                request_no += 1
                current = f"{self._inbox}.{request_no}"
                try:
                    await nc.publish(
                        subject,
                        b'{"batch":%d,"expires":%d}' % (batch, expires_ns),
                        reply=current,
                    )
                except nats.errors.Error as exc:
                    log.debug("pull for %s failed (%s); retrying", self.consumer, describe(exc))
                    await asyncio.sleep(0.25)
                    continue
                owed = batch
                if self._watchdog is not None:
                    self._watchdog.cancel()
                self._watchdog = loop.call_later(_PULL_EXPIRES + 1.0, self.wake)
            if not self._pending:
                self._arrival.clear()
                await self._arrival.wait()
            if self._woken:
                self._woken, owed = False, 0
            if not self._pending:
                continue
            fetched_at, msg = self._pending.popleft()
            if _is_status(msg):
                if msg.subject == current:
                    owed = 0
                    await self._status(msg)
                continue
            # An event carries its own subject, not the request's: count it
            # against the current request (one from a lost request only makes
            # the next request come early).
            owed = max(0, owed - 1)
            if self._stopping:
                await self._give_back(msg)
                break
            if self._concurrency == 1:
                await self._deliver(msg, fetched_at)
                continue
            prepared = await self._prepare(msg, fetched_at)
            if prepared is None:
                continue
            event, before, again = prepared
            waiting = self._sagas.get(event.saga_id)
            if waiting is not None:
                waiting.append([fetched_at, msg, event, before, again])
                continue
            try:
                while len(self._chains) >= self._concurrency:
                    self._slot.clear()
                    await self._slot.wait()
            except asyncio.CancelledError:
                if self._stopping:  # close(): the event goes back to the group at once
                    await self._give_back(msg)
                raise
            self._sagas[event.saga_id] = deque()
            chain = loop.create_task(self._chain(msg, event, before, again))
            self._chains.add(chain)
            chain.add_done_callback(self._chain_done)

    async def _give_back_pending(self) -> None:
        """Events pulled but not handled go back to the group at once."""
        pending, self._pending = self._pending, deque()
        for _, msg in pending:
            if not _is_status(msg):
                await self._give_back(msg)

    async def _status(self, msg: Msg) -> None:
        """A pull request ended without events: 408 (expired) is routine, 409 is not."""
        headers = msg.headers or {}
        status = headers.get("Status")
        if status in ("404", "408"):
            return
        description = headers.get("Description", "")
        log.warning("consumer %s: %s %s", self.consumer, status, description)
        if status == "503" or "deleted" in description.lower():
            # Deleted from outside (an operator, or idle too long): make it again.
            try:
                await self._bus._create_consumer(self.config)
            except BackendError as exc:
                log.warning("recreating consumer %s: %s", self.consumer, exc)
        await asyncio.sleep(0.25)  # do not spin on a refusal

    async def _give_back(self, msg: Msg) -> None:
        if self._stopping and self._sub is not None:
            # Its inbox still open, a nak would send it straight back here, to be lost
            # when the inbox goes: stop() gives it back once the inbox is gone.
            self._pending.append([time.monotonic(), msg])
            return
        with contextlib.suppress(nats.errors.Error):  # else redelivered after ack_wait
            await msg.nak()

    def _chain_done(self, chain: asyncio.Task[None]) -> None:
        self._chains.discard(chain)
        self._slot.set()

    async def _chain(self, msg: Msg, event: Event, before: int, again: bool) -> None:
        """Handle one saga's events in order, while more of them arrive."""
        saga_id = event.saga_id
        try:
            while True:
                await self._handle(msg, event, before, again)
                waiting = self._sagas[saga_id]
                if not waiting or self._stopping:
                    break
                fetched_at, msg, event, before, again = waiting.popleft()
                if time.monotonic() - fetched_at > self.ack_timeout / 2:
                    await _in_progress(msg)
        finally:
            for item in self._sagas.pop(saga_id, ()):
                await self._give_back(item[1])

    async def _prepare(self, msg: Msg, fetched_at: float) -> tuple[Event, int, bool] | None:
        """The event, the attempts that reached a handler before, and whether the server
        sent it before; None once it is dead-lettered or skipped.

        The server's count also counts deliveries no handler started (pulled ahead
        and given back, or lost with a dead process), so a redelivery's attempts
        are read from the bus's own records (:mod:`._nats_attempts`).
        """
        deliveries = _deliveries(msg.reply)
        if deliveries < 1:  # not a JetStream delivery: nothing to acknowledge
            return None
        if time.monotonic() - fetched_at > self.ack_timeout / 2:
            # It waited here behind slow handlers: keep it ours rather than
            # have the server give it to another consumer while it is queued.
            try:
                await msg.in_progress()
            except nats.errors.Error:
                return None
        try:
            event = decode_event(msg.data)
        except DefinitionError as exc:
            error = f"undecodable envelope: {exc}"
            await self._dead_letter(msg, None, error, deliveries)
            return None
        if deliveries == 1:
            return event, 0, False
        seq = stream_sequence(msg.reply)
        before, error = await self._bus._attempts.count(self.consumer, seq)
        if before >= self.max_deliveries:
            # Its handler was started that often and did not finish (its consumers
            # died or hung), or failed under a higher max_deliveries.
            error = error or self._unfinished(before)
            await self._dead_letter(msg, event, error, before, counted=True)
            return None
        return event, before, True

    def _unfinished(self, attempts: int) -> str:
        return f"not acknowledged within {self.ack_timeout}s on {attempts} deliveries"

    async def _deliver(self, msg: Msg, fetched_at: float) -> None:
        prepared = await self._prepare(msg, fetched_at)
        if prepared is not None:
            await self._handle(msg, *prepared)

    async def _handle(self, msg: Msg, event: Event, before: int, again: bool) -> None:
        """Run the handler on its attempt ``before + 1``; ``again``: a redelivery, whose
        attempt is recorded before the handler runs (a handler that never returns, or
        dies with its process, counts), and whose record goes once it is settled."""
        deliveries = before + 1
        self._handling += 1
        started = time.monotonic()
        if started - self._kept_at >= self.ack_timeout / 3:
            self._keep(started)
        keeper: list[asyncio.TimerHandle] = []  # this handler's timer, as it is renewed
        early = EarlyAttempt()
        early.closed = again  # a redelivery's attempt is written before it runs
        keeper.append(
            asyncio.get_running_loop().call_later(
                self.ack_timeout / 3, self._keep_pending, started, keeper, msg, early
            )
        )
        try:
            if again:
                seq = stream_sequence(msg.reply)
                await self._bus._attempts.record(
                    self.consumer, seq, deliveries, self._unfinished(deliveries)
                )
            error = await run_handler(self.handler, event, self.ack_timeout)
            keeper[0].cancel()  # an in-progress ack after the nak below would undo its delay
            counted = await early.written()
            if error is not None:
                await self._failed(msg, event, error, deliveries, again, counted)
                return
            try:
                await msg.ack()
            except nats.errors.Error as exc:
                log.warning("ack of %s failed (%s): it will come again", event.type, describe(exc))
            else:
                if again or counted:
                    await self._bus._attempts.forget(self.consumer, stream_sequence(msg.reply))
        finally:
            self._handling -= 1
            keeper[0].cancel()

    def _keep_pending(
        self,
        started: float,
        keeper: list[asyncio.TimerHandle],
        msg: Msg,
        early: EarlyAttempt,
    ) -> None:
        """While a handler runs, keep its event and the events queued behind it ours
        (in-progress acks).

        Without this, a slow handler would let the ack timeout of the events it
        holds up lapse: the server would send them again, counting deliveries
        towards the dead letters though no handler failed. Its own event is kept
        too: cancelled at the ack timeout, it is a failed delivery of this
        consumer, not one the server hands to another meanwhile (to run twice at
        once, and count twice). Both are kept until the handler is settled, which
        is at most the ack timeout and the grace of a cancelled handler
        (:data:`._handlers.GRACE`).

        A first delivery's handler still running at 60% of the ack timeout (the
        tick at two thirds) has its attempt written then, so that a handler that
        hangs, then dies with its process before its cancellation is settled,
        counts from its first delivery (``early`` holds the write; a handler that
        then returns has it purged with its ack).
        """
        now = time.monotonic()
        if not early.closed and early.task is None and now - started >= self.ack_timeout * 0.6:
            record = self._bus._attempts.record
            seq = stream_sequence(msg.reply)
            early.task = spawn(record(self.consumer, seq, 1, self._unfinished(1)))
        self._keep(now)
        self._track(_in_progress(msg))
        keeper[0] = asyncio.get_running_loop().call_later(
            self.ack_timeout / 3, self._keep_pending, started, keeper, msg, early
        )

    async def _failed(
        self,
        msg: Msg,
        event: Event,
        exc: BaseException,
        deliveries: int,
        again: bool,
        early: bool = False,
    ) -> None:
        """``early``: the attempt of this first delivery was written while it ran."""
        log.warning(
            "handler of %s (group %r) failed on %s of saga %s, delivery %d: %s",
            self.event_type,
            self.group,
            event.type,
            event.saga_id,
            deliveries,
            describe(exc),
            exc_info=exc,
        )
        if deliveries >= self.max_deliveries:
            counted = again or early
            await self._dead_letter(msg, event, describe(exc), deliveries, counted=counted)
            return
        if not again:  # a first delivery's attempt is recorded only now, as it failed
            await self._bus._attempts.record(
                self.consumer, stream_sequence(msg.reply), deliveries, describe(exc)
            )
        delay = max(self.backoff, min(self.backoff * 2 ** (deliveries - 1), MAX_BACKOFF))
        with contextlib.suppress(nats.errors.Error):  # else redelivered after ack_wait
            await msg.nak(delay=delay)

    async def _dead_letter(
        self,
        msg: Msg,
        event: Event | None,
        error: str,
        deliveries: int,
        *,
        counted: bool = False,
    ) -> None:
        """Store the event in the group's dead letters, then end its delivery (and drop
        its attempts, if ``counted``: recorded in the attempts stream)."""
        bus, js, nc = self._bus, self._bus._js, self._bus._nc
        meta = {
            "group": self.group,
            "consumer": self.consumer,
            "subscription": self.event_type,
            "error": error,
            "deliveries": deliveries,
            "failed_at": time.time(),
        }
        try:
            assert js is not None
            assert nc is not None
            body, headers = dead_letter_message(msg.data, meta, nc.max_payload)
            subject = f"{bus.prefix}.dlq.{token(self.group)}"
            try:
                await js.publish(subject, body, headers=headers)
            except NO_STREAM:  # the stream was deleted by hand: make it again, once
                await bus._ensure_streams(js)
                await js.publish(subject, body, headers=headers)
        except Exception as exc:
            # Not stored: the event stays in the stream and comes back later.
            log.error(
                "dead-lettering %s for group %r failed (%s); it will be retried",
                event.type if event else "an undecodable event",
                self.group,
                describe(exc),
            )
            with contextlib.suppress(nats.errors.Error):
                await msg.nak(delay=MAX_BACKOFF)
            return
        log.error(
            "dead letter in group %r after %d deliveries: %s%s",
            self.group,
            deliveries,
            error,
            "" if len(body) == len(msg.data) else f" (stored cut to {len(body)} bytes)",
        )
        with contextlib.suppress(nats.errors.Error):  # else it comes back, is dead-lettered again
            await msg.term()
        if counted:
            await bus._attempts.forget(self.consumer, stream_sequence(msg.reply))

    def _keep(self, now: float) -> None:
        """An in-progress ack for each queued event that waited a third of the ack timeout."""
        self._kept_at = now
        queued = [self._pending, *self._sagas.values()]
        for item in (item for queue in queued for item in queue):
            if now - item[0] >= self.ack_timeout / 3:
                item[0] = now
                self._track(_in_progress(item[1]))

    def _track(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._progress.add(task)
        task.add_done_callback(self._progress.discard)

    @property
    def busy(self) -> bool:
        return self._handling > 0 or bool(self._chains)

    async def stop(self) -> None:
        """Finish the handler in flight, give the rest back, stop pulling."""
        self._stopping = True
        # The inbox goes first: the server then stops serving this subscription's open
        # pull request. An event given back (nak) while that request is open is sent
        # straight back to it, and once the inbox is gone it is lost until ack_wait.
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None
        task = self._task
        if task is not None and not task.done():
            if self._handling and self._concurrency == 1:
                self.wake()  # the loop runs the handler itself: let it finish
                await asyncio.wait([task])
            else:
                while not task.done():
                    # Again after a while: Python 3.11's asyncio.wait_for (nats-py's
                    # requests use it) may swallow a cancellation that meets its reply.
                    task.cancel()
                    await asyncio.wait([task], timeout=1.0)
        if self._chains:  # each finishes its handler and gives back what waits behind it
            await asyncio.wait(list(self._chains))
        await self._give_back_pending()  # whatever arrived before the inbox went

    async def cancel(self) -> None:
        """Stop this subscription's deliveries; cancelling again does nothing."""
        if self._cancelled:
            return
        self._cancelled = True
        if in_handler(self._bus):
            # From a handler (or a task one awaits), which the stop may wait for: no more
            # events from now on, the rest once the handler has returned. Until then it
            # stays the bus's, so drain() and close() wait for its acknowledgement.
            self._stopping = True
            self._unsubscribing = asyncio.get_running_loop().create_task(self._cancel_later())
            self._unsubscribing.add_done_callback(forget)
            return
        await self._bus._unsubscribe(self)

    async def _cancel_later(self) -> None:
        await self.stop()
        await self._bus._unsubscribe(self)
