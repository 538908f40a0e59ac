"""A choreographed service: methods that handle events, and a way to publish."""

from __future__ import annotations

import warnings
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, TypeVar

from sagakit.core.event import Event
from sagakit.errors import DefinitionError
from sagakit.ports.event_bus import (
    DEFAULT_ACK_TIMEOUT,
    DEFAULT_BACKOFF,
    DEFAULT_MAX_DELIVERIES,
    EventBus,
    Subscription,
    new_event,
)

__all__ = ["Service", "handles"]

# Handlers may be coroutine functions or plain functions, as the bus accepts both.
F = TypeVar("F", bound=Callable[..., Awaitable[None] | None])

_HANDLES = "__sagakit_handles__"


def handles(*event_types: str) -> Callable[[F], F]:
    """Mark a ``Service`` method as the handler of these event types."""
    if not event_types or not all(isinstance(t, str) and t for t in event_types):
        raise DefinitionError("event_types", "name at least one event type, as strings")

    def mark(method: F) -> F:
        setattr(method, _HANDLES, (*getattr(method, _HANDLES, ()), *event_types))
        # Only a Service subclass's attach() subscribes a mark: one on a function of
        # a module or a function body is silently never called. A warning, not an
        # error: such a function may still be put in a class body by assignment.
        path = getattr(getattr(method, "__func__", method), "__qualname__", "").split(".")
        if len(path) == 1 or path[-2] == "<locals>":
            warnings.warn(
                f"@handles on {'.'.join(path)}, a plain function: only a method of a"
                " Service subclass is subscribed (by attach)",
                stacklevel=2,
            )
        return method

    return mark


class Service:
    """Base of a choreographed service.

    Subclasses mark handler methods with :func:`handles`; :meth:`attach`
    subscribes them to a bus in the consumer group named after the service, so
    copies of one service compete for its events (it scales out) while every
    other service gets them too. A service only ever talks to others through
    the events it publishes: no service holds a reference to another. In a
    named service one method handles each type: :meth:`attach` refuses two
    (in the group they would compete, each getting only some of the events).

    At-least-once buses deliver some events twice, and out of order when a
    delivery is retried: handlers must be idempotent per saga. The delivery
    settings (``max_deliveries``, ``ack_timeout``, ``backoff``) may be set per
    class or per instance before :meth:`attach`.
    """

    name: ClassVar[str] = ""
    _handled: ClassVar[tuple[tuple[str, str], ...]] = ()
    max_deliveries: int = DEFAULT_MAX_DELIVERIES
    ack_timeout: float = DEFAULT_ACK_TIMEOUT
    backoff: float = DEFAULT_BACKOFF

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        found: dict[str, tuple[str, ...]] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                marked = _marks(klass.__name__, attr, value)
                if marked is not None:
                    found[attr] = marked
        # One subscription per (type, method): a type marked twice on one method is one.
        cls._handled = tuple(
            dict.fromkeys((t, attr) for attr, types in found.items() for t in types)
        )

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
        """Subscribe this service's handlers to ``bus``, in the group named after it."""
        if self._bus is not None:
            raise RuntimeError(f"service {self.name!r} is already attached")
        group = self.name or None  # an unnamed service: subscriptions of its own
        if group is not None:
            _one_method_per_type(type(self).__name__, self._handled)
        self._bus = bus
        try:
            for event_type, attr in self._handled:
                subscription = await bus.subscribe(
                    event_type,
                    getattr(self, attr),
                    group=group,
                    max_deliveries=self.max_deliveries,
                    ack_timeout=self.ack_timeout,
                    backoff=self.backoff,
                )
                self._subscriptions.append(subscription)
        except BaseException:
            # All or nothing: a service half attached would miss some of its events.
            await self.detach()
            raise

    async def detach(self) -> None:
        for subscription in self._subscriptions:
            await subscription.cancel()
        self._subscriptions.clear()
        self._bus = None

    async def publish(self, event_type: str, saga_id: str, **payload: Any) -> Event:
        """Publish an event of this service; returns it as published (stamped with its id
        and time)."""
        event = new_event(event_type, saga_id, payload, source=self.name)
        await self.bus.publish(event)
        return event


def _marks(owner: str, attr: str, value: object) -> tuple[str, ...] | None:
    """The types ``value`` (a class attribute) is marked to handle, None if unmarked.

    The mark may sit under a staticmethod or classmethod (``@staticmethod`` above
    ``@handles``): ignoring it there attached the service without that handler.
    """
    inner = value.__func__ if isinstance(value, staticmethod | classmethod) else None
    if isinstance(value, property):
        inner = value.fget
    for candidate in (value, inner):
        marked = getattr(candidate, _HANDLES, None)
        if isinstance(marked, tuple):
            break
    else:
        return None
    if isinstance(value, property) or not (callable(value) or isinstance(value, classmethod)):
        raise DefinitionError(
            "handles",
            f"{owner}.{attr}: a {type(value).__name__} cannot handle events; mark a method",
        )
    return marked


def _one_method_per_type(service: str, handled: tuple[tuple[str, str], ...]) -> None:
    """Refuse two methods handling one type: in the service's group their subscriptions
    would compete, each method getting some of the events and missing the others."""
    methods: dict[str, list[str]] = {}
    for event_type, attr in handled:
        methods.setdefault(event_type, []).append(attr)
    for event_type, attrs in methods.items():
        if len(attrs) > 1:
            raise DefinitionError(
                "handles",
                f"{service}: {event_type!r} is handled by {' and '.join(attrs)}; in the"
                " service's group they would compete for its events, each seeing only"
                " some: handle it in one method",
            )
