"""The in-process event bus: a FIFO queue drained by one dispatcher task."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import NamedTuple

from sagakit.core.event import Event
from sagakit.errors import BackendError
from sagakit.ports.event_bus import ALL_EVENTS, Handler

__all__ = ["DeliveryFailure", "InMemoryEventBus"]

log = logging.getLogger("sagakit.bus")


class DeliveryFailure(NamedTuple):
    event: Event
    handler: str
    error: str


class _Subscription:
    __slots__ = ("_bus", "_event_type", "_handler")

    def __init__(self, bus: InMemoryEventBus, event_type: str, handler: Handler) -> None:
        self._bus, self._event_type, self._handler = bus, event_type, handler

    async def cancel(self) -> None:
        self._bus._unsubscribe(self._event_type, self._handler)


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
        # Tuples, replaced rather than mutated, so a dispatch in progress keeps
        # the subscribers it started with.
        self._handlers[event_type] = (*self._handlers.get(event_type, ()), handler)
        return _Subscription(self, event_type, handler)

    def _unsubscribe(self, event_type: str, handler: Handler) -> None:
        handlers = list(self._handlers.get(event_type, ()))
        if handler in handlers:
            handlers.remove(handler)
            self._handlers[event_type] = tuple(handlers)

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
