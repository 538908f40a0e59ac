"""The event bus port: publish events durably, deliver them to consumer groups.

Semantics every backend gives (the conformance suite in
``tests/conformance/event_bus.py`` checks each point on every backend):

- ``publish`` stamps an event that has no id (``event_id=""``) or no time
  (``timestamp=0``) with a fresh id and the current time (:func:`stamped`),
  before anything is sent: the copies a bus stores, retries and redelivers all
  carry that id. It keeps an id or a time the event has.
- Names are the same on every bus: a group is 1 to 64 letters, digits, ``.``,
  ``-`` or ``_``; an event type at most 255 bytes of UTF-8, without ``*``,
  ``#`` or control characters (``"*"`` alone subscribes to every type). Others
  raise :class:`~sagakit.errors.DefinitionError` naming the field.
- ``publish`` returns once the bus has durably accepted the event (a JetStream
  ack, a RabbitMQ publisher confirm, a Redis ``XADD`` reply, the in-process
  queue's slot) and raises :class:`~sagakit.errors.BackendError` otherwise: an
  event is never dropped silently. A full in-process queue makes ``publish``
  wait (back-pressure), it does not grow without bound.
- ``subscribe(event_type, handler, group="inventory")`` joins a durable
  consumer group. Every group receives every event of the type; the handlers
  of one group compete, each event going to one of them, so a service scales
  out by running more copies. Without a group, the subscription is the
  handler's own (it receives every event of the type, as a group of one).
  A group is durable: once subscribed, it keeps the events published while
  none of its consumers runs and delivers them when one subscribes again. It
  receives the events published after its first subscription, not before.
- Delivery is at least once, with explicit acknowledgement: a handler that
  returns acknowledges the event; one that raises, or is still running at
  ``ack_timeout`` (it is then cancelled), gets it again after at least
  ``backoff`` seconds (a backend may grow the wait for further failures); a
  consumer that dies holding an event loses it to another consumer of its
  group once ``ack_timeout`` passes (a backend may also take an event from a
  live consumer that holds it that long: handlers must be idempotent).
- After ``max_deliveries`` failed deliveries the event goes to the group's
  dead letters with the last error, the group and the delivery count. A
  delivery counts when its handler raised or did not finish within
  ``ack_timeout``; events a consumer held without having started them
  (fetched ahead, given back at ``close``, lost with a dead process) do not,
  so a service restarted often with a backlog dead-letters nothing. (A hung
  handler counts on every bus; one dying with its process counts from its
  event's second delivery on NATS and Redis, from the first in memory, not on
  RabbitMQ: see ``docs/event-buses.md``.) :meth:`EventBus.dead_letters` lists them and
  :meth:`EventBus.replay_dead_letter` delivers one again, to that group only,
  and removes it from the dead letters. Replaying an id the group does not
  hold raises :class:`~sagakit.errors.DefinitionError` (field
  ``dead_letter_id``). The dead letters of a subscription without a group are
  listed under the group ``""``.
- ``close`` stops taking new events, lets the handlers in flight finish (each
  at most until its ``ack_timeout``) and acknowledges what they finished;
  ``publish``, ``subscribe``, ``dead_letters`` and ``replay_dead_letter`` after
  ``close`` raise :class:`~sagakit.errors.BackendError`. From a handler,
  ``close`` returns at once and the bus closes once that handler has returned;
  another ``close`` meanwhile waits for it.
- ``drain`` from a handler, or from a task a handler started (``wait_for``),
  raises ``RuntimeError``: it would wait for itself.
- Ordering: each backend documents what it keeps (for one saga's events, in
  one group, with one consumer, publication order is kept on every backend
  while no delivery fails; a redelivery may overtake later events).

Handlers may be coroutine functions or plain functions. The wire format of an
event is one versioned JSON envelope, the same on every broker
(:mod:`sagakit.core.envelope`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

from sagakit.core.event import NO_HEADERS, Event

__all__ = [
    "ALL_EVENTS",
    "DEFAULT_ACK_TIMEOUT",
    "DEFAULT_BACKOFF",
    "DEFAULT_MAX_DELIVERIES",
    "DeadLetter",
    "EventBus",
    "Handler",
    "Subscription",
    "new_event",
    "new_event_id",
    "stamped",
]

# A handler returns to acknowledge and raises to ask for a redelivery.
Handler = Callable[[Event], Awaitable[None] | None]

# Subscribing to this type receives every event (trackers, taps, audit logs).
ALL_EVENTS = "*"

# Five tries, then a dead letter: enough to ride out a restart of a peer, few
# enough that a poisoned event stops costing work within seconds.
DEFAULT_MAX_DELIVERIES = 5
# Seconds a consumer may hold an event before its group hands it to another.
DEFAULT_ACK_TIMEOUT = 30.0
# Seconds before an event whose handler raised is delivered again.
DEFAULT_BACKOFF = 1.0


def new_event_id() -> str:
    # 128 random bits, as uuid4 has, at a fraction of uuid4's cost.
    return os.urandom(16).hex()


def new_event(
    type: str,
    saga_id: str,
    payload: Mapping[str, Any],
    *,
    source: str = "",
    headers: Mapping[str, str] = NO_HEADERS,
) -> Event:
    """An event stamped as it is made: a fresh id and the current time.

    The core makes no ids and reads no clock (an :class:`Event` made without them
    is unstamped); they are given here, at the edge (``Service.publish``).
    """
    return Event(type, saga_id, payload, source, new_event_id(), int(time.time()), headers)


def stamped(event: Event) -> Event:
    """``event`` with a fresh id if it has none and the current time if it has none
    (what ``publish`` sends); an event that has both is returned as it is."""
    if event.event_id and event.timestamp:
        return event
    return Event(
        event.type,
        event.saga_id,
        event.payload,
        event.source,
        event.event_id or new_event_id(),
        event.timestamp or int(time.time()),
        event.headers,
    )


class DeadLetter(NamedTuple):
    """An event that a group gave up on, and why."""

    id: str  # the dead letter's id on this bus (what replay_dead_letter takes)
    group: str
    event: Event
    error: str  # the last delivery's error, "ExceptionType: message"
    deliveries: int
    failed_at: float  # seconds since the epoch


class Subscription(Protocol):
    async def cancel(self) -> None:
        """Stop this subscription's deliveries; events it holds go back to its group."""
        ...


@runtime_checkable
class EventBus(Protocol):
    async def publish(self, event: Event) -> None: ...

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
        """Call ``handler`` for every event of ``event_type`` (``"*"``: every event)."""
        ...

    async def drain(self) -> None:
        """Wait until every event published so far through this bus, and every event
        those handlers published in turn, has been handled by this process's
        subscriptions (acknowledged or dead-lettered)."""
        ...

    async def dead_letters(self, group: str, *, limit: int = 100) -> Sequence[DeadLetter]:
        """The group's dead letters, oldest first."""
        ...

    async def replay_dead_letter(self, group: str, dead_letter_id: str) -> None:
        """Deliver a dead letter to its group again and remove it from the dead letters."""
        ...

    async def close(self) -> None: ...
