"""The driver of one saga: decide, stage, flush when the log is durable, dispatch, await.

It knows nothing of leases being renewed or of other callers; the
:class:`~sagakit.orchestration.Orchestrator` around it does. It runs a saga's
commands one at a time, in the order the state machine gives them.
"""

from __future__ import annotations

import logging
from asyncio import CancelledError, current_task
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from time import time
from typing import Any

from sagakit.core.machine import (
    CompensationRaised,
    CompensationSucceeded,
    Decision,
    Event,
    RunCompensation,
    RunStep,
    StepRaised,
    StepSucceeded,
    decide,
)
from sagakit.core.outcome import SagaOutcome, outcome_of
from sagakit.core.records import check_json
from sagakit.core.saga import PLAIN_RESULTS, SagaDefinition, StepContext
from sagakit.errors import InvalidTransition, LeaseLost, SagaError
from sagakit.ports.saga_log import Journal

__all__ = ["describe", "drive"]

log = logging.getLogger("sagakit.orchestrator")


def describe(exc: BaseException) -> str:
    """``Type: message`` for an exception, whatever its ``__str__`` does, as text every
    saga log can record (valid UTF-8)."""
    name = type(exc).__name__
    try:
        text = str(exc)
    except Exception:  # a broken __str__ must not leave the saga unfinished
        return f"{name}: (its message could not be read)"
    error = f"{name}: {text}" if text else name
    if not error.isascii():
        try:
            error.encode()
        except UnicodeEncodeError:
            # A lone surrogate (a file name decoded with surrogateescape, say) has no
            # UTF-8: no saga log could record the error, and the saga would be stuck.
            error = error.encode("utf-8", "backslashreplace").decode()
    return error


async def drive(
    saga: SagaDefinition,
    saga_id: str,
    data: Mapping[str, Any],
    journal: Journal,
    decision: Decision,
    results: dict[str, Any],
    flush: Callable[[Journal], Awaitable[None]] | None,
    lost: set[str],
) -> SagaOutcome:
    """Carry the saga on from ``decision``, whose records are staged and flushed.

    ``flush``: how to make staged records durable (None on a log that is not
    durable). ``lost``: the ids of sagas whose lease the renewer found lost; the
    driver stops, raising LeaseLost, before its next action when its saga is
    among them.
    """
    plan, steps = saga.plan, saga.steps
    state, _, commands, _ = decision
    while True:
        for command in commands:
            if lost and saga_id in lost:
                lease = journal.lease
                raise LeaseLost(saga_id, lease.owner if lease else "?", lease.epoch if lease else 0)
            event: Event
            # Dispatched on type(), not with match: the class patterns of a match
            # cost more than running a step that does nothing.
            kind = type(command)
            if kind is RunStep:
                index, attempt = command  # type: ignore[misc]
                step = steps[index]
                name = step.name
                # Called here, not in a helper coroutine: most steps do not
                # suspend, and a coroutine per step would cost more than the step.
                try:
                    value = step.action(
                        _tuple_new(StepContext, (saga_id, name, data, results, attempt, False))
                    )
                    if value is not None and (
                        step.action_is_async
                        or (type(value) not in PLAIN_RESULTS and hasattr(type(value), "__await__"))
                    ):
                        value = await value
                except Exception as exc:
                    event = _step_raised(saga_id, name, index, exc)
                except CancelledError as exc:
                    if _stopping():
                        raise
                    event = _step_raised(saga_id, name, index, exc)
                else:
                    if value is None:  # most steps' result: nothing to check
                        results[name] = None
                        event = _NO_RESULT[index] if index < _SHARED else _succeeded((index, None))
                    else:
                        event = _step_succeeded(saga_id, name, index, value, results)
            elif kind is RunCompensation:
                index, attempt = command  # type: ignore[misc]
                step = steps[index]
                # The machine decides a compensation only for a step that has one.
                compensation = step.compensation
                assert compensation is not None
                try:
                    value = compensation(
                        _tuple_new(StepContext, (saga_id, step.name, data, results, attempt, True))
                    )
                    if value is not None and (
                        step.compensation_is_async
                        or (type(value) not in PLAIN_RESULTS and hasattr(type(value), "__await__"))
                    ):
                        await value
                except Exception as exc:
                    event = _compensation_raised(saga_id, step.name, index, exc)
                except CancelledError as exc:
                    if _stopping():
                        raise
                    event = _compensation_raised(saga_id, step.name, index, exc)
                else:
                    event = _UNDONE[index] if index < _SHARED else CompensationSucceeded(index)
            else:  # Finish
                return outcome_of(saga_id, plan, state, results)
        try:
            state, records, commands, durable = decide(plan, state, event, time())
        except InvalidTransition as exc:  # a bug, not the saga's fault: say which saga
            raise SagaError(saga_id, f"cannot carry on: {exc}") from exc
        if records:
            journal.stage(records)
            if durable and flush is not None:
                await flush(journal)


# Events and contexts are built with tuple.__new__ from all their fields: calling
# a NamedTuple class costs about twice as much, and a saga makes several per step.
_tuple_new = tuple.__new__
_raised: Callable[[tuple[int, str]], StepRaised] = partial(tuple.__new__, StepRaised)
_succeeded: Callable[[tuple[int, Any]], StepSucceeded] = partial(tuple.__new__, StepSucceeded)
# "Step k returned None", the commonest event, made once for the first steps
# (events are immutable values: one serves every saga).
_SHARED = 64
_NO_RESULT = [_succeeded((index, None)) for index in range(_SHARED)]
_UNDONE = [CompensationSucceeded(index) for index in range(_SHARED)]


def _stopping() -> bool:
    """Whether a CancelledError out of a step is this task being cancelled (the saga
    stops) rather than the step's own error: something it awaited was cancelled
    elsewhere, which would raise the same again on every retry."""
    task = current_task()
    return task is None or task.cancelling() > 0


def _step_raised(saga_id: str, name: str, index: int, exc: BaseException) -> Event:
    error = describe(exc)
    if log.isEnabledFor(logging.INFO):  # a third of the benchmark's sagas fail a step
        log.info("saga %s: step %s failed: %s", saga_id, name, error)
    return _raised((index, error))


def _step_succeeded(
    saga_id: str, name: str, index: int, value: Any, results: dict[str, Any]
) -> Event:
    try:
        check_json(value)
    except (TypeError, ValueError) as exc:
        # The result cannot be recorded, so the saga cannot carry it on: the
        # step counts as failed, and the steps before it are compensated.
        error = describe(SagaError(saga_id, f"step {name!r} returned a non-JSON value: {exc}"))
        log.error("%s", error)
        return StepRaised(index, error)
    results[name] = value
    return _succeeded((index, value))


def _compensation_raised(saga_id: str, name: str, index: int, exc: BaseException) -> Event:
    error = describe(exc)
    log.error("saga %s: compensation of %s failed: %s", saga_id, name, error)
    return CompensationRaised(index, error)
