"""The argument checks every event bus makes, so the backends refuse the same input alike.

A backend adds its own limits after these (a broker's name rules, a server's maximums).
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from typing import Any

from sagakit.core.event import Event
from sagakit.errors import BackendRefused, DefinitionError
from sagakit.ports.event_bus import ALL_EVENTS, stamped

__all__ = [
    "GROUP",
    "check_event_type",
    "check_limit",
    "check_server_version",
    "check_subscribe",
    "publishable",
]


# The names every bus takes: the strictest broker's (RabbitMQ's), so that a name one
# bus takes, every bus takes. A group names queues (AMQP: 255 bytes with the prefix,
# type and punctuation); an event type is a routing key (a 255-byte short string)
# where '*' and '#' are wildcards.
GROUP = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_TYPE_BYTES = 255


def check_event_type(event_type: object, field: str, *, subscribing: bool = False) -> None:
    """Refuse an event type some bus cannot carry (``"*"`` is every type, to subscribe)."""
    if not isinstance(event_type, str) or not event_type:
        raise DefinitionError(field, f"must be a non-empty string, got {event_type!r}")
    if subscribing and event_type == ALL_EVENTS:
        return
    shown = repr(event_type[:40]) + ("..." if len(event_type) > 40 else "")
    if "*" in event_type or "#" in event_type:
        raise DefinitionError(field, f"{shown}: '*' and '#' are wildcards, not in a type")
    if not event_type.isprintable():
        raise DefinitionError(field, f"{shown}: no control characters or line breaks")
    try:
        size = len(event_type.encode())
    except UnicodeEncodeError:
        raise DefinitionError(field, f"{shown} is not valid Unicode") from None
    if size > MAX_TYPE_BYTES:
        raise DefinitionError(field, f"{shown} is {size} bytes of UTF-8; at most {MAX_TYPE_BYTES}")


def publishable(event: object) -> Event:
    """The event ``publish`` sends: anything but an Event is refused, as is a type some
    bus cannot carry (field ``type``); one without an id or a time is stamped (the
    port's contract: :func:`stamped`)."""
    if not isinstance(event, Event):
        raise DefinitionError("event", f"must be an Event, got {type(event).__name__}")
    check_event_type(event.type, "type")
    return stamped(event)


def check_subscribe(
    event_type: object,
    handler: object,
    group: object,
    max_deliveries: object,
    ack_timeout: object,
    backoff: object,
) -> tuple[float, float]:
    """Refuse ``subscribe`` arguments no bus can honour; ``(ack_timeout, backoff)`` as floats."""
    check_event_type(event_type, "event_type", subscribing=True)
    if not callable(handler):
        raise DefinitionError("handler", "must be a function or coroutine function")
    # Calling one only makes a generator: its body would never run, and every event
    # would be acknowledged unhandled.
    if inspect.isgeneratorfunction(handler) or inspect.isasyncgenfunction(handler):
        raise DefinitionError(
            "handler", f"{handler!r} is a generator function (a yield in it?): it would never run"
        )
    _takes_the_event(handler)
    if group is not None and (not isinstance(group, str) or not GROUP.fullmatch(group)):
        raise DefinitionError(
            "group", f"{group!r}: 1 to 64 letters, digits, '.', '-' or '_' (or None)"
        )
    if type(max_deliveries) is not int or max_deliveries < 1:  # bool is not a count
        raise DefinitionError(
            "max_deliveries", f"must be a positive integer, got {max_deliveries!r}"
        )
    seconds: list[float] = []
    for field, value in (("ack_timeout", ack_timeout), ("backoff", backoff)):
        if not _seconds(value):
            raise DefinitionError(field, f"must be a finite number of seconds, got {value!r}")
        seconds.append(float(value))  # type: ignore[arg-type]
    if seconds[0] <= 0:
        raise DefinitionError("ack_timeout", f"must be more than 0 seconds, got {ack_timeout!r}")
    return seconds[0], seconds[1]


def _takes_the_event(handler: Callable[..., object]) -> None:
    """Refuse a handler that cannot be called as ``handler(event)``: taken, it would
    fail every delivery with a TypeError until its events were dead letters."""
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):
        return  # a builtin or the like that does not say: let it run
    try:
        signature.bind(None)
    except TypeError:
        raise DefinitionError(
            "handler",
            f"{handler!r} must take one argument, the event; its signature is {signature}",
        ) from None


def check_limit(limit: object, *, least: int = 0) -> int:
    """Refuse a ``dead_letters`` limit that is not a whole number of at least ``least``."""
    if type(limit) is not int or limit < least:
        raise DefinitionError("limit", f"must be an integer >= {least}, got {limit!r}")
    return limit


def check_server_version(
    backend: str, server: str, version: str, least: tuple[int, int], needs: str
) -> None:
    """Refuse a broker older than ``least`` (BackendRefused: a retry cannot help).

    ``version`` as the server reports it ("" or another form: not refused);
    ``needs``: what the bus relies on that older servers lack or get wrong.
    """
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is not None and (int(found[1]), int(found[2])) < least:
        need = ".".join(map(str, least))
        raise BackendRefused(
            backend,
            f"the {server} server is version {version}; this event bus needs {need} or newer"
            f" ({needs})",
        )


def _seconds(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )
