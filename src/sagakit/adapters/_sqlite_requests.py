"""Requests to the SQLite saga log's writer thread (:mod:`sagakit.adapters.sqlite_log`):
made on the event loop, run on the thread, answered on the loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

__all__ = ["Request", "consume", "settle"]


class Request:
    """One call to run on the writer thread; ``future`` gets its result."""

    __slots__ = ("args", "future", "loop", "on_done", "run", "writes")

    def __init__(
        self,
        run: Callable[..., Any],
        args: tuple[Any, ...],
        writes: bool,
        on_done: Callable[[Any, BaseException | None], None] | None = None,
    ) -> None:
        self.run = run
        self.args = args
        self.writes = writes
        self.on_done = on_done
        self.loop = asyncio.get_running_loop()
        self.future: asyncio.Future[Any] = self.loop.create_future()


def settle(done: list[tuple[Request, Any, BaseException | None]]) -> None:
    """On the loop's thread: tell the journals, then the callers."""
    for request, result, error in done:
        if request.on_done is not None:
            request.on_done(result, error)
        future = request.future
        if future.done():  # the caller was cancelled; the work stands all the same
            continue
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)


def consume(future: asyncio.Future[Any]) -> None:
    """Retrieve a result nobody awaits (a failed give-back: those leases expire instead)."""
    if not future.cancelled():
        future.exception()
