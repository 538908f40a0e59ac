"""Logging what may happen once per event without writing a line per event.

A backlog overrunning its bound drops or refuses every further event: a line each
would be hundreds of thousands of lines, burying everything else in the log.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

__all__ = ["Aggregated"]


class Aggregated:
    """The first occurrence of a kind is logged at once; those after it are counted and
    the count logged once every ``interval`` seconds while the event loop runs (so the
    last of them are reported too). A kind quiet for an interval starts again."""

    def __init__(self, logger: logging.Logger, level: int, interval: float = 5.0) -> None:
        self._log, self._level, self._interval = logger, level, interval
        # Per kind: how many since the last line, the latest message and arguments, and
        # the loop its report is due on. Bounded by the kinds in flight: a kind leaves
        # once a report finds it quiet.
        self._counts: dict[str, list[Any]] = {}

    def __call__(self, kind: str, message: str, *args: object) -> None:
        loop = asyncio.get_running_loop()
        entry = self._counts.get(kind)
        if entry is not None and entry[3] is not loop:  # its report died with its loop
            entry = None
        if entry is None:
            self._log.log(
                self._level,
                message + " (more of these are counted, a line every %gs)",
                *args,
                self._interval,
            )
            self._counts[kind] = [0, message, args, loop]
            loop.call_later(self._interval, self._report, kind)
            return
        entry[0] += 1
        entry[1], entry[2] = message, args

    def _report(self, kind: str) -> None:
        entry = self._counts.get(kind)
        if entry is None:
            return
        if not entry[0]:
            del self._counts[kind]
            return
        count, message, args, loop = entry
        self._log.log(
            self._level, "%d more in %gs, the latest: " + message, count, self._interval, *args
        )
        entry[0] = 0
        loop.call_later(self._interval, self._report, kind)
