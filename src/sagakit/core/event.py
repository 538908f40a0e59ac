"""Events: the facts that choreographed services publish and react to."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from sagakit.errors import DefinitionError

__all__ = ["NO_HEADERS", "Event"]

# Keys of an event's wire body that are the event's own, not its payload.
RESERVED = frozenset({"type", "saga_id", "timestamp"})

# Most events carry no headers: they share this one read-only mapping.
NO_HEADERS: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened in one saga, as told by the service it happened in.

    The wire body (:meth:`body`) is ``{"type", "saga_id", <payload...>, "timestamp"}``,
    the structure of the seed texts. ``event_id``, ``source`` and ``headers``
    (trace context such as ``traceparent``: strings to strings) travel beside
    the body; the event id is also what an inbox deduplicates on. On a broker
    the whole event travels as one envelope (:mod:`sagakit.core.envelope`).

    An event made without ``event_id`` (``""``) or ``timestamp`` (``0``) is
    unstamped: the core reads no clock and draws no random numbers, so the bus
    that publishes it gives it a fresh id and the current time
    (:func:`sagakit.ports.event_bus.stamped`; ``Service.publish`` stamps its
    events as it makes them). Redeliveries carry the id given at publish, which
    is what deduplication goes by; publishing one unstamped event twice makes
    two events. To publish an event again as the same event (a retry after an
    error), give it an ``event_id`` of your own.
    """

    type: str
    saga_id: str
    payload: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""
    event_id: str = ""  # "": not stamped yet
    timestamp: int = 0  # 0: not stamped yet
    headers: Mapping[str, str] = field(default_factory=lambda: NO_HEADERS)

    def __post_init__(self) -> None:
        if not isinstance(self.type, str) or not self.type:
            raise DefinitionError("type", "an event type must be a non-empty string")
        if self.type == "*":
            raise DefinitionError("type", '"*" stands for every event type when subscribing')
        if not isinstance(self.saga_id, str) or not self.saga_id:
            raise DefinitionError("saga_id", "must be a non-empty string")
        if type(self.timestamp) is not int:
            raise DefinitionError("timestamp", "must be an integer (seconds since the epoch)")
        if not isinstance(self.payload, Mapping):
            raise DefinitionError(
                "payload", f"must be a mapping, got {type(self.payload).__name__}"
            )
        clash = RESERVED.intersection(self.payload)
        if clash:
            raise DefinitionError(
                "payload", f"keys {sorted(clash)} are the event's own and cannot be payload"
            )
        if self.headers is not NO_HEADERS:
            if not isinstance(self.headers, Mapping):
                raise DefinitionError(
                    "headers", f"must be a mapping, got {type(self.headers).__name__}"
                )
            for key, value in self.headers.items():
                if not isinstance(key, str) or not isinstance(value, str):
                    raise DefinitionError(
                        "headers", f"names and values must be strings, got {key!r}: {value!r}"
                    )

    def __getitem__(self, key: str) -> Any:
        return self.payload[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.payload.get(key, default)

    def body(self) -> dict[str, Any]:
        """The event as the seed texts write it: type, saga_id, payload, timestamp."""
        return {
            "type": self.type,
            "saga_id": self.saga_id,
            **self.payload,
            "timestamp": self.timestamp,
        }

    @classmethod
    def from_body(
        cls, body: Mapping[str, Any], *, source: str = "", event_id: str | None = None
    ) -> Event:
        """The inverse of :meth:`body`; the field that is missing or ill-typed is named.

        Without ``event_id``, or a body without ``timestamp``, the event is unstamped
        (publishing stamps it).
        """
        payload = {k: v for k, v in body.items() if k not in RESERVED}
        timestamp = body.get("timestamp", 0)
        if not isinstance(timestamp, int) or isinstance(timestamp, bool):
            raise DefinitionError("timestamp", "must be an integer (seconds since the epoch)")
        return cls(
            type=body.get("type"),  # type: ignore[arg-type]  # checked in __post_init__
            saga_id=body.get("saga_id"),  # type: ignore[arg-type]
            payload=payload,
            source=source,
            event_id=event_id or "",
            timestamp=timestamp,
        )
