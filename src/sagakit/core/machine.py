"""The saga state machine: ``decide(plan, state, event, now) -> Decision``, and ``replay``.

Pure: no I/O, no clock (time comes in as ``now``), no randomness. A driver
feeds it events (a saga begins, a step's action succeeded or raised, a
compensation did, a saga is resumed from its log) and carries out what the
:class:`Decision` says: write ``records`` to the saga's journal, make them
durable first when ``flush`` is set, then run ``commands``.

Every change of state is a record: ``decide`` works out the records an event
produces and folds them into the state with :func:`evolve`, the same function
that :func:`replay` folds a saga's log with. So the state replay rebuilds is
the state the driver had, attempts included.

State keeps a status per step (:meth:`SagaState.step_status`) and the attempt
of each step's action and compensation (:meth:`SagaState.attempt_of`). Steps run
in order, so those are kept compactly: how many steps completed, how far the
compensations have got, the one command in flight, and the attempts above the
first (rare: only a resumed or retried command has one). Each transition costs
the same whatever the saga's length.

Invariants (property-tested): on a failure at step k, exactly the compensable
steps among 0..k-1 are compensated, newest first; the failing step is not
compensated, because it never completed; on success nothing is compensated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from enum import StrEnum
from functools import partial
from types import MappingProxyType
from typing import Any, NamedTuple

from sagakit.core.commands import (
    Begin,
    Command,
    CompensationRaised,
    CompensationSucceeded,
    Event,
    Finish,
    Resume,
    RunCompensation,
    RunStep,
    StepRaised,
    StepSucceeded,
)
from sagakit.core.records import (
    CompensationCompleted,
    CompensationFailed,
    CompensationStarted,
    SagaFinished,
    SagaRecord,
    SagaStarted,
    SagaStatus,
    StepCompleted,
    StepFailed,
    StepStarted,
)
from sagakit.errors import InvalidTransition

# The records live in sagakit.core.records; they are named here too for the
# modules that read a log through the machine.
__all__ = [
    "Begin",
    "Command",
    "CompensationCompleted",
    "CompensationFailed",
    "CompensationRaised",
    "CompensationStarted",
    "CompensationSucceeded",
    "Decision",
    "Event",
    "Finish",
    "Plan",
    "Replay",
    "Resume",
    "RunCompensation",
    "RunStep",
    "SagaFinished",
    "SagaRecord",
    "SagaStarted",
    "SagaState",
    "SagaStatus",
    "StepCompleted",
    "StepFailed",
    "StepRaised",
    "StepStarted",
    "StepStatus",
    "StepSucceeded",
    "decide",
    "evolve",
    "initial_state",
    "replay",
]


class Plan(NamedTuple):
    """What the machine knows of a saga definition: its name, steps, and which can be undone."""

    name: str
    steps: tuple[str, ...]
    compensable: tuple[bool, ...]


class StepStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"  # its action was announced, and no outcome is recorded yet
    COMPLETED = "completed"
    FAILED = "failed"  # its action raised: the saga compensates the steps before it
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"


_NO_ATTEMPTS: Mapping[int, int] = MappingProxyType({})


class SagaState(NamedTuple):
    """Where a saga stands (see the module docstring for how it is kept)."""

    status: SagaStatus
    done: int = 0  # steps 0..done-1 completed
    active: int | None = None  # the step whose action or compensation is announced
    failed_step: int | None = None
    error: str | None = None  # why failed_step failed
    # Compensable steps in undone_from..done-1 have been compensated.
    undone_from: int = 0
    stuck_step: int | None = None  # the step whose compensation failed
    stuck_error: str | None = None
    # Attempts above the first: step -> attempt, for actions and compensations.
    attempts: Mapping[int, int] = _NO_ATTEMPTS
    undo_attempts: Mapping[int, int] = _NO_ATTEMPTS

    def attempt_of(self, step: int, *, compensation: bool = False) -> int:
        """The attempt of the step's action (or compensation) last announced; 0 for none."""
        if compensation:
            announced = self.failed_step is not None and (
                self.undone_from <= step < self.done
                or step == self.stuck_step
                or (step == self.active and self.status is SagaStatus.COMPENSATING)
            )
            return self.undo_attempts.get(step, 1) if announced else 0
        announced = (
            step < self.done
            or step == self.failed_step
            or (step == self.active and self.status is SagaStatus.RUNNING)
        )
        return self.attempts.get(step, 1) if announced else 0

    def step_status(self, step: int, compensable: bool = True) -> StepStatus:
        """The status of step ``step`` (``compensable``: whether it has a compensation)."""
        if step == self.failed_step:
            return StepStatus.FAILED
        if step >= self.done:
            if step == self.done and self.active == step and self.status is SagaStatus.RUNNING:
                return StepStatus.RUNNING
            return StepStatus.PENDING
        if self.failed_step is None or not compensable:
            return StepStatus.COMPLETED
        if step == self.stuck_step:
            return StepStatus.COMPENSATION_FAILED
        if step == self.active:
            return StepStatus.COMPENSATING
        if step >= self.undone_from:
            return StepStatus.COMPENSATED
        return StepStatus.COMPLETED

    def compensated(self, plan: Plan) -> list[int]:
        """The steps compensated so far, in the order they were, newest step first."""
        if self.failed_step is None:
            return []
        return [i for i in range(self.done - 1, self.undone_from - 1, -1) if plan.compensable[i]]


def initial_state() -> SagaState:
    """The state of a saga before its log opens."""
    return _INITIAL


_INITIAL = SagaState(SagaStatus.RUNNING)


class Decision(NamedTuple):
    """The state after an event, the records to write, and the commands to run.

    ``flush``: the records must be durable before any command runs (an intent
    before the action it announces; an outcome before the saga's end is
    reported). False only when there is nothing to write.
    """

    state: SagaState
    records: tuple[SagaRecord, ...]
    commands: tuple[Command, ...]
    flush: bool


# --- evolve: one record's effect on the state ----------------------------------------
# States, records and commands are built from all their fields with
# tuple.__new__, not by calling the class or _replace (which cost several times
# as much): a saga makes a few per step.

_state: Callable[[tuple[Any, ...]], SagaState] = partial(tuple.__new__, SagaState)
_RUNNING, _COMPENSATING = SagaStatus.RUNNING, SagaStatus.COMPENSATING
_COMPLETED, _COMPENSATED, _FAILED = SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED
# Values with nothing but a status: one of each.
_FINISH = {status: Finish(status) for status in SagaStatus}
_FINISHED = {status: SagaFinished(status) for status in SagaStatus}


def _pending_compensation(compensable: tuple[bool, ...], undone_from: int) -> int:
    """The step whose compensation runs next, or -1 when none is left."""
    step = undone_from - 1
    while step >= 0 and not compensable[step]:
        step -= 1
    return step


def _misfit(record: object, state: SagaState) -> InvalidTransition:
    return InvalidTransition(f"{record!r} does not fit {state}")


def _with_attempt(attempts: Mapping[int, int], step: int, attempt: int) -> Mapping[int, int]:
    if attempt <= 1 and step not in attempts:
        return attempts
    return MappingProxyType({**attempts, step: attempt})


def evolve(plan: Plan, state: SagaState, record: SagaRecord) -> SagaState:
    """The state once ``record`` is in the saga's log; InvalidTransition when it does not fit."""
    status, done, active, failed, error, undone_from, stuck, stuck_error, tries, undo_tries = state
    match record:
        case StepStarted(step, attempt):
            if status is _RUNNING and step == done < len(plan.steps) and active in (None, step):
                tries = _with_attempt(tries, step, attempt)
                return _state((_RUNNING, done, step, None, None, 0, None, None, tries, undo_tries))
        case StepCompleted(step, _):
            if status is _RUNNING and step == active:
                return _state(
                    (_RUNNING, step + 1, None, None, None, 0, None, None, tries, undo_tries)
                )
        case StepFailed(step, why, _):
            if status is _RUNNING and step == active:
                return _state(
                    (_COMPENSATING, done, None, step, why, done, None, None, tries, undo_tries)
                )
        case CompensationStarted(step, attempt):
            if (
                status is _COMPENSATING
                and stuck is None
                and active in (None, step)
                and step >= 0
                and step == _pending_compensation(plan.compensable, undone_from)
            ):
                undo_tries = _with_attempt(undo_tries, step, attempt)
                return _state(
                    (
                        _COMPENSATING,
                        done,
                        step,
                        failed,
                        error,
                        undone_from,
                        None,
                        None,
                        tries,
                        undo_tries,
                    )
                )
        case CompensationCompleted(step):
            if status is _COMPENSATING and step == active:
                return _state(
                    (_COMPENSATING, done, None, failed, error, step, None, None, tries, undo_tries)
                )
        case CompensationFailed(step, why, _):
            if status is _COMPENSATING and step == active:
                return _state(
                    (
                        _COMPENSATING,
                        done,
                        None,
                        failed,
                        error,
                        undone_from,
                        step,
                        why,
                        tries,
                        undo_tries,
                    )
                )
        case SagaFinished(final):
            if active is None and final is _final_status(plan, state):
                return _state(
                    (
                        final,
                        done,
                        None,
                        failed,
                        error,
                        undone_from,
                        stuck,
                        stuck_error,
                        tries,
                        undo_tries,
                    )
                )
        case SagaStarted():
            if state == _INITIAL:
                return state
    raise _misfit(record, state)


def _final_status(plan: Plan, state: SagaState) -> SagaStatus | None:
    """How the saga ends now, or None when it has more to do."""
    if state.status is _RUNNING:
        return _COMPLETED if state.done == len(plan.steps) else None
    if state.status is _COMPENSATING:
        if state.stuck_step is not None:
            return _FAILED
        if _pending_compensation(plan.compensable, state.undone_from) < 0:
            return _COMPENSATED
    return None


# --- decide ----------------------------------------------------------------------------


_decision: Callable[[tuple[Any, ...]], Decision] = partial(tuple.__new__, Decision)
_step_completed: Callable[[tuple[int, Any]], StepCompleted] = partial(tuple.__new__, StepCompleted)
_step_failed: Callable[[tuple[int, str, int]], StepFailed] = partial(tuple.__new__, StepFailed)
_step_started: Callable[[tuple[int, int]], StepStarted] = partial(tuple.__new__, StepStarted)
_run_step: Callable[[tuple[int, int]], RunStep] = partial(tuple.__new__, RunStep)
_undo_started: Callable[[tuple[int, int]], CompensationStarted] = partial(
    tuple.__new__, CompensationStarted
)
_run_undo: Callable[[tuple[int, int]], RunCompensation] = partial(tuple.__new__, RunCompensation)
_saga_started: Callable[[tuple[str, tuple[str, ...], Mapping[str, Any]]], SagaStarted] = partial(
    tuple.__new__, SagaStarted
)

# Shared values for the transitions nearly every saga makes, on its first attempts,
# at its first steps: the same values for every saga, made once here, like Python's
# small integers. A saga then costs no new tuple for an intent, a command, or (on
# the way forward, with no result) a whole decision; and a log that keeps its
# records keeps these shared objects. Past _SHARED steps, or on a later attempt,
# decide builds the same values anew: they are equal, only not shared.
_SHARED = 64
_STARTED = [_step_started((step, 1)) for step in range(_SHARED + 1)]
_RUN = [(_run_step((step, 1)),) for step in range(_SHARED + 1)]
_DONE = [_step_completed((step, None)) for step in range(_SHARED)]
_UNDO_STARTED = [_undo_started((step, 1)) for step in range(_SHARED)]
_UNDO = [(_run_undo((step, 1)),) for step in range(_SHARED)]
_UNDONE = [CompensationCompleted(step) for step in range(_SHARED)]
_FINISHING = {status: (_FINISH[status],) for status in SagaStatus}
# Running step k, nothing else ever announced twice; and completed after k steps.
_AT = [
    _state((_RUNNING, k, k, None, None, 0, None, None, _NO_ATTEMPTS, _NO_ATTEMPTS))
    for k in range(_SHARED + 1)
]
_ENDED = [
    _state((_COMPLETED, k, None, None, None, 0, None, None, _NO_ATTEMPTS, _NO_ATTEMPTS))
    for k in range(_SHARED + 1)
]
# Step k completed with no result: on to step k+1, or (k the last step) the end.
_FORWARD = [
    _decision((_AT[k + 1], (_DONE[k], _STARTED[k + 1]), _RUN[k + 1], True)) for k in range(_SHARED)
]
_LAST = [
    _decision((_ENDED[k + 1], (_DONE[k], _FINISHED[_COMPLETED]), _FINISHING[_COMPLETED], True))
    for k in range(_SHARED)
]


def _intent(step: int, attempt: int) -> tuple[SagaRecord, tuple[Command, ...]]:
    """StepStarted and RunStep, shared ones when they can be."""
    if attempt == 1 and 0 <= step < _SHARED:
        return _STARTED[step], _RUN[step]
    return _step_started((step, attempt)), (_run_step((step, attempt)),)


def _undo_intent(step: int, attempt: int) -> tuple[SagaRecord, tuple[Command, ...]]:
    """CompensationStarted and RunCompensation, shared ones when they can be."""
    if attempt == 1 and 0 <= step < _SHARED:
        return _UNDO_STARTED[step], _UNDO[step]
    return _undo_started((step, attempt)), (_run_undo((step, attempt)),)


def _announce(
    plan: Plan,
    outcome: SagaRecord | None,
    status: SagaStatus,
    done: int,
    failed: int | None,
    error: str | None,
    undone_from: int,
    stuck: int | None,
    stuck_error: str | None,
    tries: Mapping[int, int],
    undo_tries: Mapping[int, int],
) -> Decision:
    """The decision once ``outcome`` left the saga with these fields, nothing in flight:
    the intent of what comes next (or the saga's end), and the command to run it."""
    intent: SagaRecord
    commands: tuple[Command, ...]
    active: int | None
    if status is _RUNNING:
        if done < len(plan.steps):
            if tries is _NO_ATTEMPTS:  # the common case: nothing ran twice
                attempt = 1
            else:
                attempt = tries.get(done, 0) + 1
                tries = _with_attempt(tries, done, attempt)
            intent, commands = _intent(done, attempt)
            active = done
        else:
            status = _COMPLETED
            intent, commands, active = _FINISHED[status], _FINISHING[status], None
    else:
        step = -1 if stuck is not None else _pending_compensation(plan.compensable, undone_from)
        if step >= 0:
            if undo_tries is _NO_ATTEMPTS:
                attempt = 1
            else:
                attempt = undo_tries.get(step, 0) + 1
                undo_tries = _with_attempt(undo_tries, step, attempt)
            intent, commands = _undo_intent(step, attempt)
            active = step
        else:
            status = _COMPENSATED if stuck is None else _FAILED
            intent, commands, active = _FINISHED[status], _FINISHING[status], None
    after = _state(
        (status, done, active, failed, error, undone_from, stuck, stuck_error, tries, undo_tries)
    )
    return _decision((after, (intent,) if outcome is None else (outcome, intent), commands, True))


def decide(plan: Plan, state: SagaState, event: Event, now: float = 0.0) -> Decision:
    """What ``event`` makes of a saga in ``state``; InvalidTransition when it does not fit.

    ``now`` is the driver's clock, for the deadlines later rules will have; no
    rule reads it yet.

    Each state is worked out directly, not by folding the decision's records
    with :func:`evolve` (which costs several times as much); the two agree
    (property-tested). Events are told apart by ``type()``, ahead of any
    ``match``, whose class patterns would cost more than the rest of this.
    """
    kind = type(event)
    status, done, active, failed, error, undone_from, _, _, tries, undo_tries = state
    if kind is StepSucceeded:
        step, result = event  # type: ignore[misc]
        if status is _RUNNING and step == active:
            if (
                result is None
                and 0 <= step < _SHARED
                and tries is _NO_ATTEMPTS
                and undo_tries is _NO_ATTEMPTS
            ):
                # The commonest transition: its decision is one for every saga.
                return (_FORWARD if step + 1 < len(plan.steps) else _LAST)[step]
            outcome: SagaRecord = (
                _DONE[step]
                if result is None and 0 <= step < _SHARED
                else _step_completed((step, result))
            )
            return _announce(
                plan, outcome, _RUNNING, step + 1, None, None, 0, None, None, tries, undo_tries
            )
        raise _misfit(StepCompleted(step, result), state)
    if kind is StepRaised:
        step, why = event  # type: ignore[misc]
        outcome = _step_failed((step, why, tries.get(step, 1)))
        if status is _RUNNING and step == active:
            return _announce(
                plan, outcome, _COMPENSATING, done, step, why, done, None, None, tries, undo_tries
            )
        raise _misfit(outcome, state)
    if kind is CompensationSucceeded:
        step = event.step  # type: ignore[union-attr]
        if status is _COMPENSATING and step == active:
            outcome = _UNDONE[step] if 0 <= step < _SHARED else CompensationCompleted(step)
            return _announce(
                plan,
                outcome,
                _COMPENSATING,
                done,
                failed,
                error,
                step,
                None,
                None,
                tries,
                undo_tries,
            )
        raise _misfit(CompensationCompleted(step), state)
    if kind is CompensationRaised:
        step, why = event  # type: ignore[misc]
        outcome = CompensationFailed(step, why, undo_tries.get(step, 1))
        if status is _COMPENSATING and step == active:
            return _announce(
                plan,
                outcome,
                _COMPENSATING,
                done,
                failed,
                error,
                undone_from,
                step,
                why,
                tries,
                undo_tries,
            )
        raise _misfit(outcome, state)
    if kind is Begin:
        if state is not _INITIAL and state != _INITIAL:
            raise _misfit(event, state)
        started = _saga_started((plan.name, plan.steps, event.data))  # type: ignore[union-attr]
        if plan.steps:  # the saga's first step, as every saga's
            return _decision((_AT[0], (started, _STARTED[0]), _RUN[0], True))
        return _announce(plan, started, _RUNNING, 0, None, None, 0, None, None, tries, undo_tries)
    if kind is Resume:
        if status.is_final:
            return _decision((state, (), _FINISHING[status], False))
        if active is None:
            _, _, _, _, _, _, stuck, stuck_error, _, _ = state
            return _announce(
                plan,
                None,
                status,
                done,
                failed,
                error,
                undone_from,
                stuck,
                stuck_error,
                tries,
                undo_tries,
            )
        # Announced and never answered: it may or may not have run, so it runs
        # again (at least once), as its next attempt.
        again: SagaRecord
        commands: tuple[Command, ...]
        if status is _RUNNING:
            attempt = tries.get(active, 1) + 1
            again, commands = _intent(active, attempt)
        else:
            attempt = undo_tries.get(active, 1) + 1
            again, commands = _undo_intent(active, attempt)
        return _decision((evolve(plan, state, again), (again,), commands, True))
    raise InvalidTransition(f"not an event: {event!r}")


class Replay(NamedTuple):
    """A saga rebuilt from its log."""

    started: SagaStarted
    state: SagaState
    results: dict[str, Any]


def replay(plan: Plan, records: Iterable[SagaRecord]) -> Replay:
    """Fold a saga's log back into its state and its steps' results.

    The log must open with ``SagaStarted``; whether that names ``plan``'s saga
    is the caller's to check. Carry on with ``decide(plan, state, Resume())``.
    """
    it = iter(records)
    started = next(it, None)
    if type(started) is not SagaStarted:
        raise InvalidTransition(f"a saga log must open with SagaStarted, not {started!r}")
    state = initial_state()
    results: dict[str, Any] = {}
    steps = plan.steps
    for record in it:
        state = evolve(plan, state, record)
        if type(record) is StepCompleted:
            results[steps[record.step]] = record.result
    return Replay(started, state, results)
