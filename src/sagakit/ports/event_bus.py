"""The event bus port: publish events, subscribe handlers by event type."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

from sagakit.core.event import Event

__all__ = ["ALL_EVENTS", "EventBus", "Handler", "Subscription"]

Handler = Callable[[Event], Awaitable[None]]

# Subscribing to this type receives every event (trackers, taps, audit logs).
ALL_EVENTS = "*"


class Subscription(Protocol):
    async def cancel(self) -> None: ...


@runtime_checkable
class EventBus(Protocol):
    """At-least-once delivery of events to every handler subscribed to their type.

    ``publish`` returns once the bus has accepted the event, not once handlers
    ran: delivery is asynchronous on every backend, the in-process one included,
    so code written against one behaves the same on another. Events of one
    publisher are delivered in the order published. A handler that raises does
    not stop delivery to the others.
    """

    async def publish(self, event: Event) -> None: ...

    async def subscribe(self, event_type: str, handler: Handler) -> Subscription:
        """Call ``handler`` for every event of ``event_type`` (``"*"``: every event)."""
        ...

    async def drain(self) -> None:
        """Wait until every event published so far has been handled."""
        ...

    async def close(self) -> None: ...
