"""The in-process event bus: consumer groups, acknowledgements and dead letters in memory.

``memory://`` opens a bus with a broker of its own; ``memory://NAME`` opens a bus
on the broker of that name, shared by every ``memory://NAME`` bus of the process
while any of them is referenced (so tests can run several consumers of one group).
``?capacity=N`` bounds the broker's queue of published events (default 10,000);
A payload that is not JSON fails at ``publish`` (``DefinitionError``), as on every
broker, so code that works here works there. ``?envelope=true`` also sends each
event through the JSON envelope as a broker would: handlers get a copy.

How it delivers (its ordering guarantees):

- One dispatcher per broker hands out the events in the order they were
  published (FIFO), each to all its subscriptions before the next event
  (breadth first), ``"*"`` subscriptions first, then those of the event's type,
  in the order they first subscribed. A group is one subscription for this
  order; its consumers take turns (round robin). Handlers run one at a time,
  so the order, and everything a choreography prints, is the same on every run.
- So, for one saga, one group and one consumer, publication order is kept
  while no delivery fails. A failed delivery comes back after its backoff
  (``backoff * 2**(n-1)``, at most 30 s) ahead of the events not yet handed
  out, so it may overtake events published after it.
- A handler still running at its ``ack_timeout`` is cancelled, as on every bus:
  a failed delivery, retried after its backoff (by the group's next consumer).
  Until then, nothing else is dispatched: slow handlers slow the whole bus.
- The dispatcher lets other tasks run every few deliveries, so a handler that
  publishes without ever suspending cannot starve the event loop. ``publish``
  waits while the queue is full (back-pressure); a handler, which would wait
  for itself, may fill it to twice its capacity, then its ``publish`` raises
  :class:`~sagakit.errors.BackendBusy` (its delivery fails and comes back later).
- ``drain()`` waits for the whole broker (every bus of its name): the queue,
  the deliveries in flight and those waiting out a backoff (a handler failing
  for good under the defaults holds it about 15 s before its dead letter).
- A group with no consumer keeps up to 100,000 events for when one subscribes;
  beyond that, events become dead letters. Each group keeps its newest 10,000
  dead letters.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Sequence
from contextvars import ContextVar
from itertools import count
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

from sagakit.adapters import redact_url
from sagakit.adapters._bus_checks import check_limit, check_subscribe, publishable
from sagakit.adapters._handlers import ENDS_PROCESS, call_handler, spawn, wait_handler
from sagakit.adapters._log_limits import Aggregated
from sagakit.core.envelope import decode_event, encode_event
from sagakit.core.event import Event
from sagakit.errors import BackendBusy, BackendError, ConfigurationError, DefinitionError
from sagakit.ports.event_bus import (
    ALL_EVENTS,
    DEFAULT_ACK_TIMEOUT,
    DEFAULT_BACKOFF,
    DEFAULT_MAX_DELIVERIES,
    DeadLetter,
    Handler,
)

__all__ = ["DeliveryFailure", "InMemoryEventBus"]

log = logging.getLogger("sagakit.bus")
# A line per event dropped would flood the log when a backlog overruns its bound.
_dropping = Aggregated(log, logging.ERROR)

DEFAULT_CAPACITY = 10_000
BACKLOG_LIMIT = 100_000
DEAD_LETTERS_KEPT = 10_000
FAILURES_KEPT = 1_000
MAX_BACKOFF = 30.0
YIELD_EVERY = 64  # deliveries between two turns given to the other tasks

# The broker whose dispatcher runs the current code: a handler that waited for
# room in its own broker's queue, or drained it, would wait for itself.
_DELIVERING: ContextVar[_Broker | None] = ContextVar("sagakit_delivering", default=None)
_SHARED: weakref.WeakValueDictionary[str, _Broker] = weakref.WeakValueDictionary()


class DeliveryFailure(NamedTuple):
    event: Event
    handler: str
    error: str


def _name(handler: Handler) -> str:
    return getattr(handler, "__qualname__", None) or repr(handler)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class _Consumer:
    """One ``subscribe`` call: a handler in a group."""

    __slots__ = ("ack_timeout", "backoff", "bus", "group", "handler", "killed", "max_deliveries")

    def __init__(
        self,
        bus: InMemoryEventBus,
        group: _Group,
        handler: Handler,
        max_deliveries: int,
        ack_timeout: float,
        backoff: float,
    ) -> None:
        self.bus, self.group, self.handler = bus, group, handler
        self.max_deliveries, self.ack_timeout, self.backoff = max_deliveries, ack_timeout, backoff
        self.killed = False


class _Group:
    """Where an event type's deliveries go: a named, durable group, or one subscription."""

    __slots__ = ("backlog", "durable", "event_type", "members", "name", "turn")

    def __init__(self, event_type: str, name: str, durable: bool) -> None:
        self.event_type, self.name, self.durable = event_type, name, durable
        self.members: list[_Consumer] = []
        self.turn = 0
        self.backlog: deque[tuple[Event, int]] = deque()

    def pick(self) -> _Consumer | None:
        members = self.members
        if len(members) == 1:
            return members[0]
        if not members:
            return None
        self.turn += 1
        return members[(self.turn - 1) % len(members)]


class _Subscription:
    __slots__ = ("_consumer",)

    def __init__(self, consumer: _Consumer) -> None:
        self._consumer: _Consumer | None = consumer

    async def cancel(self) -> None:
        """Stop this subscription's deliveries; cancelling again does nothing."""
        if self._consumer is not None:
            self._consumer.bus._broker.leave(self._consumer)
            self._consumer = None


class _Broker:
    """The queue, the groups and the dispatcher that one or more buses share."""

    def __init__(self, name: str, capacity: int) -> None:
        self.name, self.capacity = name, capacity
        self.queue: deque[Event] = deque()
        self.ready: deque[tuple[Event, _Group, int]] = deque()  # (event, group, deliveries)
        self.retries: list[tuple[float, int, Event, _Group, int]] = []
        self.targets: dict[str, tuple[_Group, ...]] = {}
        self.groups: dict[tuple[str, str], _Group] = {}
        self.dead: dict[str, dict[str, tuple[DeadLetter, _Group]]] = {}
        self.failures: list[DeliveryFailure] = []
        self.dispatcher: asyncio.Task[None] | None = None
        self.wake: asyncio.Future[None] | None = None
        self.space: deque[asyncio.Future[None]] = deque()
        self.in_flight: tuple[_Consumer, asyncio.Task[Any]] | None = None
        self.settled: asyncio.Future[None] | None = None
        self.open_buses = 0
        self._seq = count(1)

    # --- subscriptions ---------------------------------------------------------------

    def join(self, consumer: _Consumer) -> None:
        group = consumer.group
        group.members.append(consumer)
        if group.backlog:
            self.ready.extend((e, group, n) for e, n in group.backlog)
            group.backlog.clear()
            self.kick()

    def group(self, event_type: str, name: str | None) -> _Group:
        if name is not None:
            group = self.groups.get((event_type, name))
            if group is not None:
                return group
            group = self.groups[event_type, name] = _Group(event_type, name, durable=True)
        else:
            group = _Group(event_type, "", durable=False)
        # Replaced, not mutated: a dispatch in progress keeps the groups it started with.
        self.targets[event_type] = (*self.targets.get(event_type, ()), group)
        return group

    def leave(self, consumer: _Consumer) -> None:
        group = consumer.group
        # By identity: the same handler may be subscribed twice, each cancelled on its own.
        group.members = [c for c in group.members if c is not consumer]
        if not group.durable and not group.members:
            self.targets[group.event_type] = tuple(
                g for g in self.targets.get(group.event_type, ()) if g is not group
            )

    # --- publishing --------------------------------------------------------------------

    async def put(self, event: Event) -> None:
        queue = self.queue
        if len(queue) >= self.capacity:
            if _DELIVERING.get() is self:
                if len(queue) >= 2 * self.capacity:
                    raise BackendBusy(
                        self.name,
                        f"the queue holds {len(queue)} events; a handler publishing"
                        f" {event.type} must wait for them (its delivery will be retried)",
                    )
            else:
                while len(queue) >= self.capacity:
                    waiter = asyncio.get_running_loop().create_future()
                    self.space.append(waiter)
                    self.kick()
                    await waiter
        queue.append(event)
        self.kick()

    def kick(self) -> None:
        # A dispatcher that is done without having cleared itself was cancelled
        # before it ran (its event loop ended: a named broker outlives loops).
        if self.dispatcher is None or self.dispatcher.done():
            self.dispatcher = asyncio.get_running_loop().create_task(self._dispatch())
        elif self.wake is not None and not self.wake.done():
            self.wake.set_result(None)

    def _room(self) -> None:
        space = self.space
        while space and len(self.queue) < self.capacity:
            waiter = space.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def pending(self) -> bool:
        return bool(self.queue or self.ready or self.retries)

    # --- dispatching -------------------------------------------------------------------

    async def _dispatch(self) -> None:
        _DELIVERING.set(self)  # this task's own context
        queue, ready, retries, targets = self.queue, self.ready, self.retries, self.targets
        loop = asyncio.get_running_loop()
        turns = 0
        try:
            while True:
                if retries and retries[0][0] <= loop.time():
                    while retries and retries[0][0] <= loop.time():
                        _, _, event, group, deliveries = heapq.heappop(retries)
                        ready.append((event, group, deliveries))
                if ready:
                    event, group, deliveries = ready.popleft()
                    pending = self._start(event, group, deliveries)
                    if pending is not None:
                        await pending
                elif queue:
                    event = queue.popleft()
                    if self.space:
                        self._room()
                    for group in targets.get(ALL_EVENTS, ()) + targets.get(event.type, ()):
                        pending = self._start(event, group, 0)
                        if pending is not None:
                            await pending
                elif retries:
                    self.wake = loop.create_future()
                    await asyncio.wait((self.wake,), timeout=retries[0][0] - loop.time())
                    self.wake = None
                    continue
                else:
                    return
                turns += 1
                if turns == YIELD_EVERY:
                    turns = 0
                    await asyncio.sleep(0)
        finally:
            self.dispatcher = None
            self.wake = None

    def _start(self, event: Event, group: _Group, deliveries: int) -> Awaitable[None] | None:
        """Hand the event to one consumer of the group; an awaitable if its handler suspended."""
        consumer = group.pick()
        if consumer is None:
            if group.durable:
                if len(group.backlog) < BACKLOG_LIMIT:
                    group.backlog.append((event, deliveries))
                else:
                    self._bury(
                        event,
                        group,
                        deliveries,
                        f"BacklogFull: group {group.name!r}"
                        f" has no consumer and keeps {BACKLOG_LIMIT} events",
                    )
            return None  # a cancelled subscription's own group: nobody to deliver to
        deliveries += 1
        try:
            task = call_handler(consumer.handler, event)
            if task is None:
                return None
        except asyncio.CancelledError as exc:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the dispatcher itself is being cancelled
            self._failed(consumer, event, deliveries, exc)
            return None
        except ENDS_PROCESS:
            raise
        except BaseException as exc:
            self._failed(consumer, event, deliveries, exc)
            return None
        return self._settle(consumer, task, event, deliveries)

    async def _settle(
        self, consumer: _Consumer, task: asyncio.Task[Any], event: Event, deliveries: int
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + consumer.ack_timeout
        self.in_flight = (consumer, task)
        try:
            error = await wait_handler(task, consumer.ack_timeout, consumer.handler)
            if consumer.killed and loop.time() < deadline:
                await asyncio.sleep(deadline - loop.time())  # its ack died with it
        finally:
            self.in_flight = None
            if self.settled is not None and not self.settled.done():
                self.settled.set_result(None)
            self.settled = None
        if consumer.killed:
            late = TimeoutError(f"not acknowledged within {consumer.ack_timeout}s")
            # Taken over at once, as a dead process's event: the ack timeout was its wait.
            self._failed(consumer, event, deliveries, late, retry_now=True)
        elif error is not None:
            self._failed(consumer, event, deliveries, error)

    def _failed(
        self,
        consumer: _Consumer,
        event: Event,
        deliveries: int,
        exc: BaseException,
        *,
        retry_now: bool = False,
    ) -> None:
        failure = DeliveryFailure(event, _name(consumer.handler), _describe(exc))
        if len(self.failures) >= FAILURES_KEPT:
            del self.failures[: FAILURES_KEPT // 2]
        self.failures.append(failure)
        group = consumer.group
        dead = deliveries >= consumer.max_deliveries
        message = "handler %s failed on %s of saga %s (delivery %d of %d)%s: %s"
        outcome = ", dead-lettered" if dead else ""
        args = (failure.handler, event.type, event.saga_id, deliveries,
                consumer.max_deliveries, outcome, failure.error)  # fmt: skip
        if isinstance(exc, BackendBusy):
            # A full queue refuses every handler publishing into it, one event after
            # another, for as long as it stays full.
            _dropping(f"busy {failure.handler}", message, *args)
        else:
            log.error(message, *args, exc_info=exc)
        if dead:
            self._bury(event, group, deliveries, failure.error)
            return
        if retry_now:
            self.ready.append((event, group, deliveries))
            return
        delay = min(consumer.backoff * 2 ** (deliveries - 1), max(consumer.backoff, MAX_BACKOFF))
        due = asyncio.get_running_loop().time() + delay
        heapq.heappush(self.retries, (due, next(self._seq), event, group, deliveries))

    def _bury(self, event: Event, group: _Group, deliveries: int, error: str) -> None:
        letters = self.dead.setdefault(group.name, {})
        if len(letters) >= DEAD_LETTERS_KEPT:
            oldest = next(iter(letters))
            _dropping(f"dead letters of {group.name}",
                      "group %r keeps %d dead letters; dropped the oldest, %s",
                      group.name, DEAD_LETTERS_KEPT, oldest)  # fmt: skip
            del letters[oldest]
        letter_id = f"dl-{next(self._seq)}"
        letter = DeadLetter(letter_id, group.name, event, error, deliveries, time.time())
        letters[letter_id] = (letter, group)

    def replay(self, group_name: str, letter_id: str) -> None:
        found = self.dead.get(group_name, {}).pop(letter_id, None)
        if found is None:
            raise DefinitionError(
                "dead_letter_id", f"group {group_name!r} holds no dead letter {letter_id!r}"
            )
        letter, group = found
        self.ready.append((letter.event, group, 0))
        self.kick()

    async def drain(self) -> None:
        if _DELIVERING.get() is self:
            raise RuntimeError("drain() inside an event handler would wait for itself")
        while True:
            dispatcher = self.dispatcher
            if dispatcher is None or dispatcher.done():
                self.dispatcher = None
                if not self.pending():
                    return
                self.kick()
                continue
            # wait(), not the task itself: a dispatcher that ends badly must not raise here.
            await asyncio.wait((dispatcher,))

    async def settle(self, bus: InMemoryEventBus) -> None:
        """Wait while a handler of ``bus`` holds an event."""
        while self.in_flight is not None and self.in_flight[0].bus is bus:
            if self.settled is None:
                self.settled = asyncio.get_running_loop().create_future()
            await asyncio.shield(self.settled)


_OPEN, _CLOSING, _CLOSED = "open", "closing", "closed"


class InMemoryEventBus:
    """An :class:`~sagakit.ports.event_bus.EventBus` inside one process (see the module doc)."""

    def __init__(
        self, *, capacity: int = DEFAULT_CAPACITY, name: str | None = None, envelope: bool = False
    ) -> None:
        """``envelope=True`` sends every event through the JSON envelope, as a broker would:
        handlers get a copy. (A payload that is not JSON fails at ``publish`` either way.)"""
        if type(capacity) is not int or capacity < 1:
            raise DefinitionError("capacity", f"must be a positive integer, got {capacity!r}")
        if name is None:
            self._broker = _Broker("memory://", capacity)
        else:
            broker = _SHARED.get(name)
            if broker is None:
                broker = _SHARED[name] = _Broker(f"memory://{name}", capacity)
            self._broker = broker
        self._broker.open_buses += 1
        self._state = _OPEN
        self._consumers: list[_Consumer] = []
        self._closing: asyncio.Future[None] | None = None
        self._envelope = envelope

    @classmethod
    def from_url(cls, url: str) -> InMemoryEventBus:
        parts = urlsplit(url)
        shown = redact_url(url)
        name = (parts.netloc + parts.path).strip("/") or None
        capacity, envelope = DEFAULT_CAPACITY, False
        for key, values in parse_qs(parts.query).items():
            if key == "envelope" and values[-1] in ("0", "1", "false", "true"):
                envelope = values[-1] in ("1", "true")
            elif key == "envelope":
                raise ConfigurationError(f"{shown}: envelope must be true or false")
            elif key != "capacity":
                raise ConfigurationError(
                    f"{shown}: unknown option {key!r} (known: capacity, envelope)"
                )
            else:
                try:
                    capacity = int(values[-1])
                except ValueError:
                    raise ConfigurationError(f"{shown}: capacity must be an integer") from None
        try:
            return cls(capacity=capacity, name=name, envelope=envelope)
        except DefinitionError as exc:
            raise ConfigurationError(f"{shown}: {exc}") from exc

    @property
    def failures(self) -> list[DeliveryFailure]:
        """The latest failed deliveries (handler errors and ack timeouts), oldest first."""
        return self._broker.failures

    async def publish(self, event: Event) -> None:
        event = publishable(event)
        if self._state is not _OPEN and not (
            self._state is _CLOSING and _DELIVERING.get() is self._broker
        ):
            raise BackendError(
                self._broker.name, f"the event bus is closed; {event.type} not published"
            )
        # Encoded as a broker would, so that what a broker refuses is refused here.
        data = encode_event(event)
        if self._envelope:
            event = decode_event(data)
        await self._broker.put(event)

    async def subscribe(
        self,
        event_type: str,
        handler: Handler,
        *,
        group: str | None = None,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        ack_timeout: float = DEFAULT_ACK_TIMEOUT,
        backoff: float = DEFAULT_BACKOFF,
    ) -> _Subscription:
        ack_timeout, backoff = check_subscribe(
            event_type, handler, group, max_deliveries, ack_timeout, backoff
        )
        if self._state is not _OPEN:
            raise BackendError(self._broker.name, "the event bus is closed; cannot subscribe")
        consumer = _Consumer(
            self,
            self._broker.group(event_type, group),
            handler,
            max_deliveries,
            ack_timeout,
            backoff,
        )
        self._consumers.append(consumer)
        self._broker.join(consumer)
        return _Subscription(consumer)

    async def drain(self) -> None:
        await self._broker.drain()

    async def dead_letters(self, group: str, *, limit: int = 100) -> Sequence[DeadLetter]:
        check_limit(limit)
        self._refuse_closed("cannot read dead letters")
        letters = self._broker.dead.get(group, {})
        return [letter for letter, _ in list(letters.values())[:limit]]

    async def replay_dead_letter(self, group: str, dead_letter_id: str) -> None:
        self._refuse_closed("cannot replay a dead letter")
        self._broker.replay(group, dead_letter_id)

    def _refuse_closed(self, what: str) -> None:
        # As the broker buses, whose connection is gone: the broker may live on in
        # the other buses of its name, but this bus is done.
        if self._state is _CLOSED:
            raise BackendError(self._broker.name, f"the event bus is closed; {what}")

    async def close(self) -> None:
        """Stop taking events; handle what was accepted if no other bus shares the broker.

        Handlers running meanwhile may still publish (their work is in flight).
        """
        broker = self._broker
        # A handler closing its own bus cannot wait for the handlers, itself among them.
        waits = _DELIVERING.get() is not broker
        if self._closing is not None:  # closed, or closing in another task: wait for that
            if waits:
                await asyncio.shield(self._closing)
            return
        self._closing = asyncio.get_running_loop().create_future()
        self._state = _CLOSING
        try:
            if waits and broker.open_buses == 1:
                await broker.drain()
            for consumer in self._consumers:
                broker.leave(consumer)
            if not waits:
                # Closed once that handler has returned: a close() from outside meanwhile
                # waits for it, and then nothing of the bus runs (it returned at once).
                spawn(self._closed_after(self._closing))
                return
            await broker.settle(self)
        except BaseException:
            self._shut(self._closing)
            raise
        self._shut(self._closing)

    async def _closed_after(self, closing: asyncio.Future[None]) -> None:
        try:
            await self._broker.settle(self)
        finally:
            self._shut(closing)

    def _shut(self, closing: asyncio.Future[None]) -> None:
        self._consumers.clear()
        self._release()
        if not closing.done():
            closing.set_result(None)

    def _release(self) -> None:
        if self._state is not _CLOSED:
            self._state = _CLOSED
            self._broker.open_buses -= 1

    async def crash(self) -> None:
        """For tests: die as a killed process would, acknowledging nothing it holds."""
        if self._state is _CLOSED:
            return
        self._release()
        for consumer in self._consumers:
            consumer.killed = True
            self._broker.leave(consumer)
        self._consumers.clear()
