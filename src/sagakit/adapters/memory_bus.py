"""The in-process event bus: a FIFO queue drained by one dispatcher task."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import NamedTuple

from sagakit.core.event import Event
from sagakit.errors import BackendError, DefinitionError
from sagakit.ports.event_bus import ALL_EVENTS, Handler

__all__ = ["DeliveryFailure", "InMemoryEventBus"]

log = logging.getLogger("sagakit.bus")


class DeliveryFailure(NamedTuple):
    event: Event
    handler: str
    error: str


class _Subscription:
    __slots__ = ("_bus", "event_type", "handler")

    def __init__(self, bus: InMemoryEventBus, event_type: str, handler: Handler) -> None:
        self._bus: InMemoryEventBus | None = bus
        self.event_type, self.handler = event_type, handler

    async def cancel(self) -> None:
        """Stop this subscription's deliveries; cancelling again does nothing."""
        if self._bus is not None:
            self._bus._unsubscribe(self)
            self._bus = None


def _name(handler: Handler) -> str:
    return getattr(handler, "__qualname__", None) or repr(handler)


class InMemoryEventBus:
    """An :class:`~sagakit.ports.event_bus.EventBus` inside one process.

    Events are handled one at a time in the order they were published, every
    subscriber of an event before the next event (breadth first), with the
    ``"*"`` subscribers first. That order is deterministic, which makes the
    choreography of a test or of the protocol node repeatable line for line.
    A handler that raises is logged and recorded in :attr:`failures`.
    """

    def __init__(self) -> None:
        # Per event type: the live subscriptions, and their handlers as a tuple
        # for dispatch, replaced rather than mutated so that a dispatch in
        # progress keeps the subscribers it started with.
        self._subscriptions: dict[str, list[_Subscription]] = {}
        self._handlers: dict[str, tuple[Handler, ...]] = {}
        self._queue: deque[Event] = deque()
        self._dispatcher: asyncio.Task[None] | None = None
        self._closed = False
        self.failures: list[DeliveryFailure] = []

    @classmethod
    def from_url(cls, url: str) -> InMemoryEventBus:
        return cls()

    async def publish(self, event: Event) -> None:
        if self._closed:
            raise BackendError("memory://", f"the event bus is closed; {event.type} not published")
        self._queue.append(event)
        if self._dispatcher is None:
            self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch())

    async def subscribe(self, event_type: str, handler: Handler) -> _Subscription:
        if not isinstance(event_type, str) or not event_type:
            raise DefinitionError("event_type", "must be a non-empty string")
        if not callable(handler):
            raise DefinitionError("handler", "must be an async callable taking an Event")
        subscription = _Subscription(self, event_type, handler)
        subscriptions = self._subscriptions.setdefault(event_type, [])
        subscriptions.append(subscription)
        self._handlers[event_type] = tuple(s.handler for s in subscriptions)
        return subscription

    def _unsubscribe(self, subscription: _Subscription) -> None:
        subscriptions = self._subscriptions.get(subscription.event_type, [])
        # By identity: the same handler may be subscribed twice, each cancelled on its own.
        subscriptions[:] = [s for s in subscriptions if s is not subscription]
        self._handlers[subscription.event_type] = tuple(s.handler for s in subscriptions)

    async def _dispatch(self) -> None:
        queue, handlers = self._queue, self._handlers
        try:
            while queue:
                event = queue.popleft()
                for handler in handlers.get(ALL_EVENTS, ()) + handlers.get(event.type, ()):
                    try:
                        await handler(event)
                    except Exception as exc:
                        self._failed(event, handler, exc)
        finally:
            self._dispatcher = None

    def _failed(self, event: Event, handler: Handler, exc: Exception) -> None:
        failure = DeliveryFailure(event, _name(handler), f"{type(exc).__name__}: {exc}")
        self.failures.append(failure)
        log.error(
            "handler %s failed on %s of saga %s: %s",
            failure.handler,
            event.type,
            event.saga_id,
            failure.error,
            exc_info=exc,
        )

    async def drain(self) -> None:
        if self._dispatcher is not None and self._dispatcher is asyncio.current_task():
            raise RuntimeError("drain() inside an event handler would wait for itself")
        while self._dispatcher is not None:
            await asyncio.shield(self._dispatcher)

    async def close(self) -> None:
        """Stop accepting events, then wait for those already accepted."""
        self._closed = True
        await self.drain()
