"""Checks of the keyword options that saga logs take from Python: the same rule as their
URL options, refused when the log is made (not at first use, nor as a driver's
TypeError), with a ConfigurationError naming the option."""

from __future__ import annotations

import math

from sagakit.errors import ConfigurationError

__all__ = ["count", "seconds"]


def count(name: str, value: object, *, least: int) -> int:
    """A whole number of at least ``least``. A bool is refused: ``True`` for a pool size
    is a mistake, not 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigurationError(f"{name} must be a whole number >= {least}, not {value!r:.100}")
    return value


def seconds(name: str, value: object, *, zero: bool) -> float:
    """A finite number of seconds, above zero (or from zero when ``zero``)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not zero)
    ):
        least = ">= 0" if zero else "> 0"
        raise ConfigurationError(f"{name} must be a number of seconds {least}, not {value!r:.100}")
    return float(value)
