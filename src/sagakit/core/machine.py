"""The saga state machine: pure functions from (state, outcome) to (state, command).

The orchestrator executes commands and feeds their outcomes back; the saga log
records the outcomes and the intents (``StepStarted``...). Replaying a log
through :func:`replay` gives back the state and the command to carry on with,
which is all that resuming a saga after a crash needs.

Invariants (property-tested): on a failure at step k, exactly the compensable
steps among 0..k-1 are compensated, newest first; the failing step is not
compensated, because it never completed; on success nothing is compensated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from enum import StrEnum
from functools import partial
from typing import Any, NamedTuple

from sagakit.errors import DefinitionError, InvalidTransition

__all__ = [
    "Command",
    "CompensationCompleted",
    "CompensationFailed",
    "CompensationStarted",
    "Finish",
    "Outcome",
    "Replay",
    "RunCompensation",
    "RunStep",
    "SagaFinished",
    "SagaRecord",
    "SagaStarted",
    "SagaState",
    "SagaStatus",
    "StepCompleted",
    "StepFailed",
    "StepStarted",
    "decide",
    "forward_path",
    "intent_of",
    "replay",
    "start",
]


class SagaStatus(StrEnum):
    RUNNING = "running"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    # A compensation failed: the saga is stuck half-undone and needs an operator.
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in _FINAL


_FINAL = frozenset({SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED})


# --- records: what a saga log holds -------------------------------------------------
# NamedTuples: cheap to build on the hot path, and plainly data.


class SagaStarted(NamedTuple):
    saga: str
    steps: tuple[str, ...]
    data: Mapping[str, Any]


class StepStarted(NamedTuple):
    step: int
    attempt: int = 1


class StepCompleted(NamedTuple):
    step: int
    result: Any = None


class StepFailed(NamedTuple):
    step: int
    error: str
    attempt: int = 1


class CompensationStarted(NamedTuple):
    step: int


class CompensationCompleted(NamedTuple):
    step: int


class CompensationFailed(NamedTuple):
    step: int
    error: str


class SagaFinished(NamedTuple):
    status: SagaStatus


Outcome = StepCompleted | StepFailed | CompensationCompleted | CompensationFailed
SagaRecord = (
    SagaStarted
    | StepStarted
    | StepCompleted
    | StepFailed
    | CompensationStarted
    | CompensationCompleted
    | CompensationFailed
    | SagaFinished
)


# --- commands: what the driver must do next -----------------------------------------


class RunStep(NamedTuple):
    step: int


class RunCompensation(NamedTuple):
    step: int


class Finish(NamedTuple):
    status: SagaStatus


Command = RunStep | RunCompensation | Finish


def _same_kind_eq(self: tuple[Any, ...], other: object) -> bool:
    return type(self) is type(other) and tuple.__eq__(self, other)


def _same_kind_ne(self: tuple[Any, ...], other: object) -> bool:
    return not _same_kind_eq(self, other)


# NamedTuples compare as plain tuples, so RunStep(1) would equal
# RunCompensation(1) and StepStarted(1) CompensationStarted(1): a record or
# command equals only one of its own kind.
for _kind in (
    SagaStarted,
    StepStarted,
    StepCompleted,
    StepFailed,
    CompensationStarted,
    CompensationCompleted,
    CompensationFailed,
    SagaFinished,
    RunStep,
    RunCompensation,
    Finish,
):
    _kind.__eq__ = _same_kind_eq  # type: ignore[method-assign]
    _kind.__ne__ = _same_kind_ne  # type: ignore[assignment,method-assign]
    # Defining __eq__ drops the inherited hash. The tuple's own serves: a
    # RunStep and a RunCompensation of one step share it, and still differ.
    _kind.__hash__ = tuple.__hash__  # type: ignore[method-assign]


class SagaState(NamedTuple):
    """Where a saga stands. Completed steps are always the prefix ``0..done-1``."""

    status: SagaStatus
    done: int = 0
    failed_step: int | None = None
    compensated: tuple[int, ...] = ()  # in the order they ran, newest step first
    error: str | None = None  # why failed_step failed
    stuck_step: int | None = None  # the step whose compensation failed (status FAILED)
    stuck_error: str | None = None


# Calling a NamedTuple class goes through its Python-level __new__, which
# costs about as much as the rest of a transition; the hot path builds these
# tuples directly from all their fields instead.
_new_state: Callable[[tuple[Any, ...]], SagaState] = partial(tuple.__new__, SagaState)
_new_step_completed: Callable[[tuple[int, Any]], StepCompleted] = partial(
    tuple.__new__, StepCompleted
)
new_saga_started: Callable[[tuple[str, tuple[str, ...], Mapping[str, Any]]], SagaStarted] = partial(
    tuple.__new__, SagaStarted
)

# Commands and intents are immutable: the common ones are built once, not per saga.
_CACHED = 64
_RUN_STEP = tuple(RunStep(i) for i in range(_CACHED))
_RUN_COMPENSATION = tuple(RunCompensation(i) for i in range(_CACHED))
_STEP_STARTED = tuple(StepStarted(i) for i in range(_CACHED))
_COMPENSATION_STARTED = tuple(CompensationStarted(i) for i in range(_CACHED))
# Outcomes too, where they carry nothing but the step: a saga log may keep its
# records for as long as the process lives, and a record shared costs no memory.
_STEP_COMPLETED_NONE = tuple(StepCompleted(i) for i in range(_CACHED))
_COMPENSATION_COMPLETED = tuple(CompensationCompleted(i) for i in range(_CACHED))
_FINISH = {status: Finish(status) for status in SagaStatus}
_FINISHED = {status: SagaFinished(status) for status in SagaStatus}
_RUNNING, _COMPENSATING = SagaStatus.RUNNING, SagaStatus.COMPENSATING
_COMPLETED, _COMPENSATED = SagaStatus.COMPLETED, SagaStatus.COMPENSATED


def step_completed(index: int, result: Any) -> StepCompleted:
    """The record of step ``index`` completing with ``result``."""
    if result is None and 0 <= index < _CACHED:
        return _STEP_COMPLETED_NONE[index]
    return _new_step_completed((index, result))


def compensation_completed(index: int) -> CompensationCompleted:
    """The record of step ``index``'s compensation completing."""
    if 0 <= index < _CACHED:
        return _COMPENSATION_COMPLETED[index]
    return CompensationCompleted(index)


def _run_step(index: int) -> RunStep:
    return _RUN_STEP[index] if 0 <= index < _CACHED else RunStep(index)


# States are immutable, and on the way every saga takes (no failure yet) they
# differ only in how many steps are done: those are built once, not per step.
_RUNNING_STATES = tuple(SagaState(_RUNNING, done) for done in range(_CACHED))
_COMPLETED_STATES = tuple(SagaState(_COMPLETED, done) for done in range(_CACHED))
_FINISH_COMPLETED = _FINISH[_COMPLETED]
# Every saga starts the same way: one start serves all.
_INITIAL: tuple[SagaState, Command] = (_RUNNING_STATES[0], _RUN_STEP[0])


def start(compensable: Sequence[bool]) -> tuple[SagaState, Command]:
    """The state and first command of a new saga with these steps."""
    if not compensable:
        raise DefinitionError("steps", "a saga needs at least one step")
    return _INITIAL


def _new_intent(command: Command) -> SagaRecord:
    kind = type(command)
    if kind is RunStep:
        i = command.step  # type: ignore[union-attr]
        return _STEP_STARTED[i] if 0 <= i < _CACHED else StepStarted(i)
    if kind is RunCompensation:
        i = command.step  # type: ignore[union-attr]
        return _COMPENSATION_STARTED[i] if 0 <= i < _CACHED else CompensationStarted(i)
    return _FINISHED[command.status]  # type: ignore[union-attr]


class _Intents(dict[Command, SagaRecord]):
    """The intents of the common commands, built once; any other is built when asked for."""

    def __missing__(self, command: Command) -> SagaRecord:
        return _new_intent(command)


_INTENTS = _Intents(
    [(_RUN_STEP[i], _STEP_STARTED[i]) for i in range(_CACHED)]
    + [(_RUN_COMPENSATION[i], _COMPENSATION_STARTED[i]) for i in range(_CACHED)]
    + [(_FINISH[status], _FINISHED[status]) for status in SagaStatus]
)

# intent_of(command): the record that announces a command before the driver
# carries it out. A dict lookup, not a function: the driver asks once per transition.
intent_of: Callable[[Command], SagaRecord] = _INTENTS.__getitem__


# The record of a step completing with no result, then decide's state, command and intent.
Advance = tuple[StepCompleted, SagaState, Command, SagaRecord]


def forward_path(compensable: Sequence[bool]) -> tuple[Advance, ...]:
    """For each step ``i``: the record of step ``i`` completing with no result,
    and the state, command and intent that :func:`decide` gives when step
    ``i`` completes (whatever its result) on a saga running forward.

    Those are the same for every saga of a definition, which keeps them, so
    that a driver looks the commonest transition up instead of asking for
    it. Valid only where the command was ``RunStep(i)``: the machine issues
    that only to a running saga with ``i`` steps done.
    """
    path = []
    for i in range(len(compensable)):
        completed = step_completed(i, None)
        state, command = decide(compensable, _running(i), completed)
        path.append((completed, state, command, intent_of(command)))
    return tuple(path)


def _running(done: int) -> SagaState:
    return _RUNNING_STATES[done] if done < _CACHED else SagaState(_RUNNING, done)


def _completed(done: int) -> SagaState:
    return _COMPLETED_STATES[done] if done < _CACHED else SagaState(_COMPLETED, done)


def _compensable_before(compensable: Sequence[bool], step: int) -> int:
    """The newest step before ``step`` that has a compensation, or -1."""
    index = step - 1
    while index >= 0 and not compensable[index]:
        index -= 1
    return index


def _pending_compensation(compensable: Sequence[bool], state: SagaState) -> int:
    """The step whose compensation runs next, or -1 when none is left."""
    return _compensable_before(
        compensable, state.compensated[-1] if state.compensated else state.done
    )


def _next_compensation(state: SagaState, index: int) -> tuple[SagaState, Command]:
    """Compensate step ``index`` next, or finish compensated when it is -1."""
    if index >= 0:
        return state, _RUN_COMPENSATION[index] if index < _CACHED else RunCompensation(index)
    _, done, failed_step, compensated, error, _, _ = state
    final = _new_state((_COMPENSATED, done, failed_step, compensated, error, None, None))
    return final, _FINISH[_COMPENSATED]


def decide(
    compensable: Sequence[bool], state: SagaState, outcome: Outcome
) -> tuple[SagaState, Command]:
    """The next state and command after ``outcome``; raises InvalidTransition otherwise.

    ``compensable[i]`` tells whether step ``i`` has a compensation.
    """
    kind = type(outcome)
    status = state.status
    if status is _RUNNING and outcome.step == state.done:
        # States built directly, not with _replace: replay and the forward path ask this often.
        if kind is StepCompleted:
            done = state.done + 1
            if done == len(compensable):
                return _completed(done), _FINISH_COMPLETED
            return _running(done), _run_step(done)
        if kind is StepFailed:
            error = outcome.error  # type: ignore[union-attr]
            failing = _new_state((_COMPENSATING, state.done, outcome.step, (), error, None, None))
            return _next_compensation(failing, _compensable_before(compensable, state.done))
    elif (
        status is _COMPENSATING
        and outcome.step >= 0
        and outcome.step == _pending_compensation(compensable, state)
    ):
        if kind is CompensationCompleted:
            _, done, failed_step, compensated, error, _, _ = state
            step = outcome.step
            compensated = (*compensated, step)
            undoing = _new_state((_COMPENSATING, done, failed_step, compensated, error, None, None))
            return _next_compensation(undoing, _compensable_before(compensable, step))
        if kind is CompensationFailed:
            stuck = state._replace(
                status=SagaStatus.FAILED,
                stuck_step=outcome.step,
                stuck_error=outcome.error,  # type: ignore[union-attr]
            )
            return stuck, _FINISH[SagaStatus.FAILED]
    raise InvalidTransition(f"{kind.__name__}(step={outcome.step}) does not fit {state}")


class Replay(NamedTuple):
    """A saga rebuilt from its log."""

    started: SagaStarted
    state: SagaState
    command: Command
    results: dict[str, Any]


def replay(compensable: Sequence[bool], records: Iterable[SagaRecord]) -> Replay:
    """Fold a saga's log back into its state and the command to carry on with.

    A ``StepStarted`` without its outcome leaves ``RunStep`` as the command: the
    step may or may not have run before the crash, so it runs again (actions
    must be idempotent, as in any at-least-once system).
    """
    it = iter(records)
    first = next(it, None)
    if type(first) is not SagaStarted:
        raise InvalidTransition(f"a saga log must open with SagaStarted, not {first!r}")
    state, command = start(compensable)
    results: dict[str, Any] = {}
    for record in it:
        kind = type(record)
        if kind is StepStarted or kind is CompensationStarted or kind is SagaFinished:
            continue
        # decide() first: it rejects a step index the saga does not have.
        state, command = decide(compensable, state, record)  # type: ignore[arg-type]
        if kind is StepCompleted:
            results[first.steps[record.step]] = record.result  # type: ignore[union-attr]
    return Replay(first, state, command, results)
