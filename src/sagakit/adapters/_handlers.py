"""Calling an event handler: a plain function, or a coroutine function run without a task
while it does not suspend (most handlers never do, and a task per delivery costs a turn of
the event loop), for at most its ``ack_timeout``; and knowing, on the broker buses, whether
code runs in a handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine, Generator
from contextvars import ContextVar, Token
from types import CoroutineType
from typing import Any, TypeVar

__all__ = [
    "ENDS_PROCESS",
    "GRACE",
    "call_handler",
    "done_handling",
    "forget",
    "handling",
    "in_handler",
    "refuse_in_handler",
    "run_handler",
    "spawn",
    "wait_handler",
]

log = logging.getLogger("sagakit.bus")

# What a handler may raise to end the process (Ctrl-C, sys.exit()): let through, as
# anywhere else. Any other exception, BaseException subclasses included (pytest.fail()
# raises one), is a failed delivery: caught as such, it cannot kill a consumer's task.
ENDS_PROCESS = (KeyboardInterrupt, SystemExit)


# The bus whose handlers run in this context. A context var, not the running task:
# every task started from a handler inherits it (asyncio.wait_for's own task on
# Python 3.11, ensure_future's, gather's), and such a task waiting for the bus's
# handlers waits for the one awaiting it as surely as the handler itself would.
_HANDLING: ContextVar[object | None] = ContextVar("sagakit_handling", default=None)


def handling(bus: object) -> Token[object | None]:
    """Mark the running task (and the tasks it starts) as running ``bus``'s handlers.

    Called first thing in the task of a bus's consumer: the mark stays in that task's
    own copy of the context. A consumer that also does other work in that task ends
    the mark with :func:`done_handling`.
    """
    return _HANDLING.set(bus)


def done_handling(mark: Token[object | None]) -> None:
    """End the mark :func:`handling` made."""
    _HANDLING.reset(mark)


def in_handler(bus: object) -> bool:
    """Whether this runs in a handler of ``bus``, or in a task a handler started."""
    return _HANDLING.get() is bus


def refuse_in_handler(bus: object, what: str = "drain()") -> None:
    """Refuse what would wait for the handlers of ``bus`` from one of them (a deadlock)."""
    if in_handler(bus):
        raise RuntimeError(f"{what} inside an event handler would wait for itself")


_T = TypeVar("_T")
_SPAWNED: set[asyncio.Task[Any]] = set()


def spawn(work: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
    """Run ``work`` in a task of its own, kept until done (a stop a handler asked for)."""
    task = asyncio.get_running_loop().create_task(work)
    _SPAWNED.add(task)
    task.add_done_callback(_SPAWNED.discard)
    task.add_done_callback(forget)
    return task


def call_handler(handler: Callable[[Any], Any], event: Any) -> asyncio.Task[Any] | None:
    """Run ``handler(event)``: None once it is done, or the task it goes on in if it suspended.

    An exception the handler raises before suspending is raised here.
    """
    result = handler(event)
    if result is None:
        return None
    loop = asyncio.get_running_loop()
    if type(result) is not CoroutineType:
        if not inspect.isawaitable(result):
            return None  # a plain function that returned something: done
        return loop.create_task(_await(result))
    try:
        yielded = result.send(None)
    except StopIteration:
        return None
    return loop.create_task(_resume(result, yielded))


# Seconds a handler cancelled at its ack timeout has to end. One that catches the
# cancellation and goes on is then no longer waited for: it would otherwise hold its
# consumer, and the close of its bus, for as long as it runs.
GRACE = 1.0
_ABANDONED: set[asyncio.Task[Any]] = set()  # referenced while they run, as spawn's


async def run_handler(
    handler: Callable[[Any], Any], event: Any, ack_timeout: float
) -> BaseException | None:
    """Run ``handler(event)`` for at most ``ack_timeout`` seconds (every bus alike).

    None if it returned; else what its delivery failed with: what it raised, or a
    ``TimeoutError`` if it was still running at ``ack_timeout`` (it is then cancelled,
    see :func:`wait_handler`). ``KeyboardInterrupt`` and ``SystemExit`` go through, as
    does the cancellation of the calling task (the consumer stopping).
    """
    try:
        task = call_handler(handler, event)
    except asyncio.CancelledError as exc:
        if _cancelling():
            raise
        return exc  # the handler's own, nobody asked for: a failed delivery
    except ENDS_PROCESS:
        raise
    except BaseException as exc:
        return exc
    if task is None:
        return None
    return await wait_handler(task, ack_timeout, handler)


async def wait_handler(
    task: asyncio.Task[Any], ack_timeout: float, handler: object = None
) -> BaseException | None:
    """Wait for the task of a handler that suspended (:func:`run_handler`'s second half).

    Still running at ``ack_timeout``, it is cancelled and given :data:`GRACE` seconds
    to end, then left running (logged): whatever it does after its cancellation, the
    delivery has failed with ``TimeoutError`` and the consumer goes on.
    """
    try:
        await asyncio.wait((task,), timeout=ack_timeout)
    except asyncio.CancelledError:
        # Stopped (a crash, a test's kill): the handler stops with its consumer, as
        # when it ran in the consumer's own task.
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait((task,), timeout=GRACE)
        raise
    if task.done():
        try:
            task.result()
        except ENDS_PROCESS:
            raise
        except BaseException as exc:  # a CancelledError of its own included
            return exc
        return None
    task.cancel()
    task.add_done_callback(forget)
    await asyncio.wait((task,), timeout=GRACE)
    if not task.done():
        _ABANDONED.add(task)
        task.add_done_callback(_ABANDONED.discard)
        name = getattr(handler, "__qualname__", None) or repr(handler)
        log.warning(
            "handler %s still runs %gs after its cancellation at the ack timeout (%gs):"
            " no longer waited for, its delivery failed",
            name,
            GRACE,
            ack_timeout,
        )
    return TimeoutError(f"still running after the ack timeout ({ack_timeout:g}s)")


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def forget(task: asyncio.Task[Any]) -> None:
    """A done callback for a task nobody awaits: its error is not "never retrieved"."""
    if not task.cancelled():
        task.exception()


class _Resume:
    """Drive a handler's coroutine on from where its first step suspended, inside a task."""

    __slots__ = ("_coro", "_yielded")

    def __init__(self, coro: CoroutineType[Any, Any, Any], yielded: Any) -> None:
        self._coro, self._yielded = coro, yielded

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, yielded = self._coro, self._yielded
        while True:
            try:
                sent = yield yielded
            except GeneratorExit:  # the task was destroyed unfinished: end the handler too
                coro.close()
                raise
            except BaseException as exc:  # thrown in by the task (a cancellation)
                try:
                    yielded = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    yielded = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


async def _resume(coro: CoroutineType[Any, Any, Any], yielded: Any) -> Any:
    return await _Resume(coro, yielded)


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable
