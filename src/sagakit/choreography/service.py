"""A choreographed service: methods that handle events, and a way to publish."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, TypeVar

from sagakit.core.event import Event
from sagakit.errors import DefinitionError
from sagakit.ports.event_bus import EventBus, Subscription

__all__ = ["Service", "handles"]

F = TypeVar("F", bound=Callable[..., Awaitable[None]])

_HANDLES = "__sagakit_handles__"


def handles(*event_types: str) -> Callable[[F], F]:
    """Mark a ``Service`` method as the handler of these event types."""
    if not event_types or not all(isinstance(t, str) and t for t in event_types):
        raise DefinitionError("event_types", "name at least one event type, as strings")

    def mark(method: F) -> F:
        setattr(method, _HANDLES, (*getattr(method, _HANDLES, ()), *event_types))
        return method

    return mark


class Service:
    """Base of a choreographed service.

    Subclasses mark handler methods with :func:`handles`; :meth:`attach`
    subscribes them to a bus. A service only ever talks to others through the
    events it publishes: no service holds a reference to another.
    """

    name: ClassVar[str] = ""
    _handled: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        found: dict[str, tuple[str, ...]] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                if callable(value) and hasattr(value, _HANDLES):
                    found[attr] = getattr(value, _HANDLES)
        cls._handled = tuple((t, attr) for attr, types in found.items() for t in types)

    def __init__(self) -> None:
        self._bus: EventBus | None = None
        self._subscriptions: list[Subscription] = []

    @property
    def bus(self) -> EventBus:
        if self._bus is None:
            raise RuntimeError(
                f"service {self.name or type(self).__name__} is not attached to a bus"
            )
        return self._bus

    async def attach(self, bus: EventBus) -> None:
        """Subscribe this service's handlers to ``bus``."""
        if self._bus is not None:
            raise RuntimeError(f"service {self.name!r} is already attached")
        self._bus = bus
        for event_type, attr in self._handled:
            self._subscriptions.append(await bus.subscribe(event_type, getattr(self, attr)))

    async def detach(self) -> None:
        for subscription in self._subscriptions:
            await subscription.cancel()
        self._subscriptions.clear()
        self._bus = None

    async def publish(self, event_type: str, saga_id: str, **payload: Any) -> Event:
        """Publish an event of this service; returns it as published."""
        event = Event(event_type, saga_id, payload, source=self.name)
        await self.bus.publish(event)
        return event
