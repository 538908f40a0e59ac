"""The argument checks every event bus makes, so the backends refuse the same input alike.

A backend adds its own limits after these (a broker's name rules, a server's maximums).
"""

from __future__ import annotations

import inspect
import math
import re
from typing import Any

from sagakit.core.event import Event
from sagakit.errors import BackendRefused, DefinitionError
from sagakit.ports.event_bus import stamped

__all__ = ["check_limit", "check_server_version", "check_subscribe", "publishable"]


def publishable(event: object) -> Event:
    """The event ``publish`` sends: anything but an Event is refused; one without
    an id or a time is stamped (the port's contract: :func:`stamped`)."""
    if not isinstance(event, Event):
        raise DefinitionError("event", f"must be an Event, got {type(event).__name__}")
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
    if not isinstance(event_type, str) or not event_type:
        raise DefinitionError("event_type", "must be a non-empty string")
    if not callable(handler):
        raise DefinitionError("handler", "must be a function or coroutine function")
    # Calling one only makes a generator: its body would never run, and every event
    # would be acknowledged unhandled.
    if inspect.isgeneratorfunction(handler) or inspect.isasyncgenfunction(handler):
        raise DefinitionError(
            "handler", f"{handler!r} is a generator function (a yield in it?): it would never run"
        )
    # A blank group would name a queue, a stream key or a consumer nobody can tell apart.
    if group is not None and (not isinstance(group, str) or not group.strip()):
        raise DefinitionError("group", f"must be a non-empty string, or None; got {group!r}")
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
