"""The pure saga state machine: decide, evolve and replay."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sagakit.core.machine import (
    Begin,
    Command,
    CompensationRaised,
    CompensationSucceeded,
    Decision,
    Event,
    Finish,
    Plan,
    Resume,
    RunCompensation,
    RunStep,
    SagaState,
    StepRaised,
    StepStatus,
    StepSucceeded,
    decide,
    evolve,
    initial_state,
    replay,
)
from sagakit.core.records import (
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

# --- a driver in miniature ----------------------------------------------------------


class Oracle:
    """Decides each command's event: step ``fail_at`` fails, compensation ``stuck_at`` fails."""

    def __init__(
        self, fail_at: int | None = None, stuck_at: int | None = None, *, results: bool = True
    ) -> None:
        self.fail_at, self.stuck_at = fail_at, stuck_at
        self.results = results  # False: every step returns None
        self.ran: list[Command] = []

    def __call__(self, command: Command) -> Event:
        self.ran.append(command)
        match command:
            case RunStep(step, _):
                if step == self.fail_at:
                    return StepRaised(step, f"step {step} broke")
                return StepSucceeded(step, {"n": step} if self.results else None)
            case RunCompensation(step, _):
                if step == self.stuck_at:
                    return CompensationRaised(step, f"undo {step} broke")
                return CompensationSucceeded(step)
        raise AssertionError(f"the driver never executes {command!r}")


def typed(*items: object) -> list[tuple[type, object]]:
    return [(type(item), item) for item in items]


def plan_of(compensable: Sequence[bool]) -> Plan:
    return Plan("saga", tuple(f"s{i}" for i in range(len(compensable))), tuple(compensable))


def fold(plan: Plan, state: SagaState, records: Sequence[SagaRecord]) -> SagaState:
    for record in records:
        state = evolve(plan, state, record)
    return state


def carry_on(
    plan: Plan, decision: Decision, oracle: Oracle, before: SagaState | None = None
) -> tuple[SagaState, list[SagaRecord]]:
    """Run commands until Finish; returns the final state and every record written.

    Checks on the way that each decision's state is its records folded into the
    state before it (when ``before`` is given, for the first decision too)."""
    records = list(decision.records)
    if before is not None:
        assert fold(plan, before, decision.records) == decision.state
    budget = 2 * len(plan.steps) + 2  # each step runs, and is undone, at most once
    while True:
        (command,) = decision.commands
        if type(command) is Finish:
            assert command.status is decision.state.status
            return decision.state, records
        budget -= 1
        assert budget >= 0, "no Finish"
        state = decision.state
        decision = decide(plan, state, oracle(command))
        assert decision.flush
        assert fold(plan, state, decision.records) == decision.state
        records += decision.records


def simulate(compensable: Sequence[bool], oracle: Oracle) -> tuple[SagaState, list[SagaRecord]]:
    plan = plan_of(compensable)
    begun = decide(plan, initial_state(), Begin({}))
    assert typed(begun.records[0]) == typed(SagaStarted("saga", plan.steps, {}))
    return carry_on(plan, begun, oracle, before=initial_state())


def compensations(oracle: Oracle) -> list[int]:
    return [c.step for c in oracle.ran if type(c) is RunCompensation]


flags = st.lists(st.booleans(), min_size=0, max_size=12)


@st.composite
def failing_sagas(draw: st.DrawFn) -> tuple[list[bool], int]:
    compensable = draw(st.lists(st.booleans(), min_size=1, max_size=12))
    return compensable, draw(st.integers(0, len(compensable) - 1))


@st.composite
def stuck_sagas(draw: st.DrawFn) -> tuple[list[bool], int, int]:
    """A saga failing at step k whose compensation of an earlier step ``stuck`` fails."""
    n = draw(st.integers(2, 12))
    k = draw(st.integers(1, n - 1))
    stuck = draw(st.integers(0, k - 1))
    compensable = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    compensable[stuck] = True
    return compensable, k, stuck


@st.composite
def any_run(draw: st.DrawFn) -> tuple[list[bool], Oracle]:
    compensable = draw(flags)
    n = len(compensable)
    if n == 0:
        return compensable, Oracle()
    fail_at = draw(st.none() | st.integers(0, n - 1))
    stuck_at = draw(st.none() | st.integers(0, n - 1))
    return compensable, Oracle(fail_at, stuck_at)


# --- properties ---------------------------------------------------------------------


@given(failing_sagas())
def test_failure_compensates_exactly_the_earlier_compensable_steps_newest_first(
    case: tuple[list[bool], int],
) -> None:
    compensable, k = case
    oracle = Oracle(fail_at=k)
    state, _ = simulate(compensable, oracle)
    expected = [i for i in reversed(range(k)) if compensable[i]]
    assert compensations(oracle) == expected
    assert state.compensated(plan_of(compensable)) == expected
    assert state.status is SagaStatus.COMPENSATED
    assert state.failed_step == k
    assert state.error == f"step {k} broke"
    assert state.done == k
    assert state.stuck_step is None
    assert [c.step for c in oracle.ran if type(c) is RunStep] == list(range(k + 1))
    assert state.step_status(k) is StepStatus.FAILED
    for i in range(k):
        want = StepStatus.COMPENSATED if compensable[i] else StepStatus.COMPLETED
        assert state.step_status(i, compensable[i]) is want
    for i in range(k + 1, len(compensable)):
        assert state.step_status(i) is StepStatus.PENDING


@given(flags)
def test_success_compensates_nothing(compensable: list[bool]) -> None:
    oracle = Oracle()
    state, records = simulate(compensable, oracle)
    assert state.status is SagaStatus.COMPLETED
    assert state.done == len(compensable)
    assert compensations(oracle) == []
    assert typed(records[-1]) == typed(SagaFinished(SagaStatus.COMPLETED))
    assert all(state.attempt_of(i) == 1 for i in range(len(compensable)))
    assert all(state.step_status(i) is StepStatus.COMPLETED for i in range(len(compensable)))


@given(stuck_sagas())
def test_failed_compensation_leaves_the_saga_stuck(case: tuple[list[bool], int, int]) -> None:
    compensable, k, stuck = case
    oracle = Oracle(fail_at=k, stuck_at=stuck)
    state, records = simulate(compensable, oracle)
    undone = [i for i in reversed(range(k)) if compensable[i] and i > stuck]
    assert state.status is SagaStatus.FAILED
    assert state.stuck_step == stuck
    assert state.stuck_error == f"undo {stuck} broke"
    assert state.compensated(plan_of(compensable)) == undone
    assert compensations(oracle) == [*undone, stuck]
    assert state.step_status(stuck) is StepStatus.COMPENSATION_FAILED
    assert typed(*records[-2:]) == typed(
        CompensationFailed(stuck, f"undo {stuck} broke"), SagaFinished(SagaStatus.FAILED)
    )
    with pytest.raises(InvalidTransition):
        decide(plan_of(compensable), state, CompensationSucceeded(stuck))


@given(any_run())
def test_replay_of_the_whole_log_gives_back_the_final_state(
    case: tuple[list[bool], Oracle],
) -> None:
    compensable, oracle = case
    plan = plan_of(compensable)
    state, records = simulate(compensable, oracle)
    rebuilt = replay(plan, records)
    assert typed(rebuilt.started) == typed(records[0])
    assert rebuilt.state == state
    assert rebuilt.results == {f"s{i}": {"n": i} for i in range(state.done)}
    assert decide(plan, rebuilt.state, Resume()) == Decision(
        state, (), (Finish(state.status),), False
    )


@given(any_run(), st.data())
def test_replay_of_any_prefix_carries_on_to_the_same_end_with_the_next_attempt(
    case: tuple[list[bool], Oracle], data: st.DataObject
) -> None:
    compensable, oracle = case
    plan = plan_of(compensable)
    final, records = simulate(compensable, oracle)
    cut = data.draw(st.integers(1, len(records)), label="cut")
    prefix = records[:cut]
    _, state, results = replay(plan, prefix)
    completed = [r for r in prefix if type(r) is StepCompleted]
    assert results == {f"s{r.step}": r.result for r in completed}
    resumed = decide(plan, state, Resume())
    assert fold(plan, state, resumed.records) == resumed.state
    in_flight = type(prefix[-1]) in (StepStarted, CompensationStarted)
    if in_flight:
        # Announced again, as the next attempt of the same command.
        (again,) = resumed.records
        assert type(again) is type(prefix[-1])
        assert again.step == prefix[-1].step
        assert again.attempt == 2
        (command,) = resumed.commands
        assert command.attempt == 2  # type: ignore[union-attr]
    end, rest = carry_on(plan, resumed, Oracle(oracle.fail_at, oracle.stuck_at))
    assert end._replace(attempts={}, undo_attempts={}) == final._replace(
        attempts={}, undo_attempts={}
    )
    # Replaying the whole resumed log rebuilds the same state, attempts included.
    assert replay(plan, prefix + rest).state == end


@st.composite
def long_runs(draw: st.DrawFn) -> tuple[list[bool], int | None, int | None]:
    """Sagas on both sides of the steps whose common decisions are shared (64)."""
    n = draw(st.sampled_from([1, 2, 3, 62, 63, 64, 65, 66, 70]))
    compensable = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    fail_at = draw(st.none() | st.integers(0, n - 1))
    stuck_at = draw(st.none() | st.integers(0, n - 1))
    return compensable, fail_at, stuck_at


@given(long_runs())
def test_steps_without_results_take_the_same_path_as_steps_with_them(
    case: tuple[list[bool], int | None, int | None],
) -> None:
    """Steps returning None go through decisions shared by every saga (for the first
    64 steps): each must still be its records folded into the state before it
    (carry_on checks that), and end where steps returning values end."""
    compensable, fail_at, stuck_at = case
    plan = plan_of(compensable)
    plain, plain_records = simulate(compensable, Oracle(fail_at, stuck_at, results=False))
    valued, valued_records = simulate(compensable, Oracle(fail_at, stuck_at))
    assert plain == valued
    assert [type(r) for r in plain_records] == [type(r) for r in valued_records]
    assert replay(plan, plain_records).state == plain
    assert replay(plan, plain_records).results == {f"s{i}": None for i in range(plain.done)}


def test_the_commonest_decisions_are_shared_between_sagas() -> None:
    plan = plan_of([True] * 3)
    first, second = (decide(plan, initial_state(), Begin({})) for _ in range(2))
    assert first.records[1] is second.records[1]  # StepStarted(0)
    forward = [decide(plan, first.state, StepSucceeded(0)) for _ in range(2)]
    assert forward[0] is forward[1]
    assert forward[0] == Decision(
        SagaState(SagaStatus.RUNNING, done=1, active=1),
        (StepCompleted(0), StepStarted(1)),
        (RunStep(1),),
        True,
    )
    # A result, or a second attempt, is the saga's own.
    assert decide(plan, first.state, StepSucceeded(0, 5)) is not decide(
        plan, first.state, StepSucceeded(0, 5)
    )


# --- unit tests ---------------------------------------------------------------------


def test_begin_announces_the_first_step() -> None:
    plan = plan_of([False, True])
    decision = decide(plan, initial_state(), Begin({"k": 1}))
    assert typed(*decision.records) == typed(
        SagaStarted("saga", ("s0", "s1"), {"k": 1}), StepStarted(0, 1)
    )
    assert typed(*decision.commands) == typed(RunStep(0, 1))
    assert decision.flush
    assert decision.state.step_status(0) is StepStatus.RUNNING
    assert decision.state.attempt_of(0) == 1
    assert decision.state.attempt_of(1) == 0


def test_a_saga_of_no_steps_completes_at_once() -> None:
    plan = plan_of([])
    decision = decide(plan, initial_state(), Begin({}))
    assert typed(*decision.records) == typed(
        SagaStarted("saga", (), {}), SagaFinished(SagaStatus.COMPLETED)
    )
    assert typed(*decision.commands) == typed(Finish(SagaStatus.COMPLETED))
    assert decision.state.status is SagaStatus.COMPLETED


def test_begin_only_from_the_initial_state() -> None:
    plan = plan_of([True])
    begun = decide(plan, initial_state(), Begin({}))
    with pytest.raises(InvalidTransition):
        decide(plan, begun.state, Begin({}))


def test_records_and_commands_equal_only_their_own_kind() -> None:
    assert RunStep(1) != RunCompensation(1)
    assert len({RunStep(1), RunCompensation(1), RunStep(1)}) == 2
    assert StepSucceeded(1) != CompensationSucceeded(1)
    assert StepStarted(1) != CompensationStarted(1)
    assert StepStarted(1) != (1, 1)
    assert StepStarted(1) == StepStarted(1)
    assert len({StepStarted(1), CompensationStarted(1), StepStarted(1)}) == 2


def test_decide_failure_skips_steps_without_compensation() -> None:
    plan = plan_of([True, False, True, True])
    state, records = simulate([True, False, True, True], Oracle(fail_at=3))
    assert state.compensated(plan) == [2, 0]
    assert [type(r).__name__ for r in records[-6:]] == [
        "StepFailed",
        "CompensationStarted",
        "CompensationCompleted",
        "CompensationStarted",
        "CompensationCompleted",
        "SagaFinished",
    ]


def test_the_state_does_not_grow_while_compensating() -> None:
    """Compensating n steps used to copy a tuple of the compensated steps at each one:
    O(n^2), 6 s for 80,000 steps failing at the last. The state is now the same size
    whatever the number of steps compensated."""
    n = 80_000
    plan = Plan("long", tuple(f"s{i}" for i in range(n)), (True,) * n)
    sizes = set()
    state = initial_state()
    decision = decide(plan, state, Begin({}))
    for i in range(n - 1):
        decision = decide(plan, decision.state, StepSucceeded(i))
    decision = decide(plan, decision.state, StepRaised(n - 1, "no"))
    while True:
        (command,) = decision.commands
        if type(command) is Finish:
            break
        state = decision.state
        sizes.add(sum(sys.getsizeof(field) for field in state))
        decision = decide(plan, state, CompensationSucceeded(command.step))
    assert decision.state.status is SagaStatus.COMPENSATED
    assert len(sizes) <= 3  # small ints are cached or not; nothing grows with n
    assert decision.state.compensated(plan) == list(reversed(range(n - 1)))


COMPENSATING = SagaState(SagaStatus.COMPENSATING, done=2, failed_step=2, error="x", undone_from=2)


@pytest.mark.parametrize(
    ("state", "event"),
    [
        pytest.param(SagaState(SagaStatus.RUNNING, active=0), StepSucceeded(1), id="step-ahead"),
        pytest.param(SagaState(SagaStatus.RUNNING, done=1), StepSucceeded(1), id="not-announced"),
        pytest.param(SagaState(SagaStatus.RUNNING, 1, 1), StepRaised(0, "x"), id="fail-old"),
        pytest.param(
            SagaState(SagaStatus.RUNNING, active=0), CompensationSucceeded(0), id="undo-running"
        ),
        pytest.param(
            SagaState(SagaStatus.RUNNING, active=0), CompensationRaised(0, "x"), id="undo-fail"
        ),
        pytest.param(SagaState(SagaStatus.COMPLETED, 3), StepSucceeded(3), id="after-done"),
        pytest.param(SagaState(SagaStatus.COMPLETED, 3), StepRaised(2, "x"), id="fail-done"),
        pytest.param(COMPENSATING._replace(active=1), CompensationSucceeded(0), id="wrong-order"),
        pytest.param(COMPENSATING, CompensationSucceeded(2), id="undo-the-failed-step"),
        pytest.param(COMPENSATING._replace(active=1), StepSucceeded(1), id="step-while-undoing"),
    ],
)
def test_decide_rejects_events_that_do_not_fit(state: SagaState, event: Event) -> None:
    with pytest.raises(InvalidTransition):
        decide(plan_of([True, True, True]), state, event)


def test_decide_rejects_what_is_not_an_event() -> None:
    with pytest.raises(InvalidTransition, match="not an event"):
        decide(plan_of([True]), initial_state(), StepCompleted(0))  # type: ignore[arg-type]


def test_replay_of_a_log_interrupted_after_an_intent_reruns_the_step_as_attempt_2() -> None:
    plan = plan_of([True, True])
    records: list[SagaRecord] = [
        SagaStarted("saga", ("s0", "s1"), {"k": 1}),
        StepStarted(0),
        StepCompleted(0, 10),
        StepStarted(1),
    ]
    rebuilt = replay(plan, records)
    assert rebuilt.state.active == 1
    assert rebuilt.state.step_status(1) is StepStatus.RUNNING
    assert rebuilt.results == {"s0": 10}
    assert rebuilt.started is records[0]
    resumed = decide(plan, rebuilt.state, Resume())
    assert typed(*resumed.records) == typed(StepStarted(1, 2))
    assert typed(*resumed.commands) == typed(RunStep(1, 2))
    assert resumed.state.attempt_of(1) == 2
    # A crash again: the third attempt, rebuilt from the log.
    again = replay(plan, [*records, *resumed.records])
    assert again.state == resumed.state
    assert typed(*decide(plan, again.state, Resume()).records) == typed(StepStarted(1, 3))
    # Its failure is recorded with its attempt.
    failed = decide(plan, resumed.state, StepRaised(1, "no"))
    assert typed(failed.records[0]) == typed(StepFailed(1, "no", 2))


def test_replay_of_an_interrupted_compensation_reruns_it() -> None:
    plan = plan_of([True, True])
    records: list[SagaRecord] = [
        SagaStarted("saga", ("s0", "s1"), {}),
        StepStarted(0),
        StepCompleted(0),
        StepStarted(1),
        StepFailed(1, "x"),
        CompensationStarted(0),
    ]
    state = replay(plan, records).state
    assert state.status is SagaStatus.COMPENSATING
    assert state.step_status(0) is StepStatus.COMPENSATING
    resumed = decide(plan, state, Resume())
    assert typed(*resumed.commands) == typed(RunCompensation(0, 2))
    assert resumed.state.attempt_of(0, compensation=True) == 2


def test_resume_of_a_log_ending_on_an_outcome_announces_what_comes_next() -> None:
    plan = plan_of([True, True])
    records: list[SagaRecord] = [SagaStarted("saga", ("s0", "s1"), {}), StepStarted(0)]
    records.append(StepCompleted(0))
    resumed = decide(plan, replay(plan, records).state, Resume())
    assert typed(*resumed.records) == typed(StepStarted(1, 1))


def test_a_recorded_only_saga_starts_with_attempt_1() -> None:
    """A saga recorded by start() has no intent yet: its first step is attempt 1."""
    plan = plan_of([True])
    state = replay(plan, [SagaStarted("saga", ("s0",), {})]).state
    resumed = decide(plan, state, Resume())
    assert typed(*resumed.commands) == typed(RunStep(0, 1))


@pytest.mark.parametrize(
    "records",
    [
        pytest.param([], id="empty"),
        pytest.param([StepStarted(0), StepCompleted(0)], id="no-start"),
        pytest.param([("s", ("a",), {})], id="plain-tuple"),
    ],
)
def test_replay_rejects_a_log_not_opening_with_saga_started(records: list[Any]) -> None:
    with pytest.raises(InvalidTransition, match="SagaStarted"):
        replay(plan_of([True]), records)


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param([StepStarted(0), StepCompleted(1)], id="out-of-order"),
        pytest.param([StepStarted(0), StepCompleted(3)], id="out-of-range"),
        pytest.param([StepCompleted(0)], id="outcome-without-intent"),
        pytest.param([StepStarted(0), StepCompleted(0), SagaFinished(SagaStatus.FAILED)], id="end"),
        pytest.param([StepStarted(5)], id="intent-out-of-range"),
    ],
)
def test_replay_rejects_a_corrupt_log(tail: list[SagaRecord]) -> None:
    with pytest.raises(InvalidTransition):
        replay(plan_of([True]), [SagaStarted("saga", ("s0",), {}), *tail])
