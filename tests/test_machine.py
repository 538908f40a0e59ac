"""The pure saga state machine: start, decide, intent_of and replay."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sagakit.core.machine import (
    Command,
    CompensationCompleted,
    CompensationFailed,
    CompensationStarted,
    Finish,
    Outcome,
    Replay,
    RunCompensation,
    RunStep,
    SagaFinished,
    SagaRecord,
    SagaStarted,
    SagaState,
    SagaStatus,
    StepCompleted,
    StepFailed,
    StepStarted,
    compensation_completed,
    decide,
    forward_path,
    intent_of,
    replay,
    start,
    step_completed,
)
from sagakit.errors import InvalidTransition

# --- a driver in miniature ----------------------------------------------------------


class Oracle:
    """Decides each command's outcome: step ``fail_at`` fails, compensation ``stuck_at`` fails."""

    def __init__(self, fail_at: int | None = None, stuck_at: int | None = None) -> None:
        self.fail_at, self.stuck_at = fail_at, stuck_at
        self.ran: list[Command] = []

    def __call__(self, command: Command) -> Outcome:
        self.ran.append(command)
        if type(command) is RunStep:
            if command.step == self.fail_at:
                return StepFailed(command.step, f"step {command.step} broke")
            return StepCompleted(command.step, {"n": command.step})
        if type(command) is RunCompensation:
            if command.step == self.stuck_at:
                return CompensationFailed(command.step, f"undo {command.step} broke")
            return CompensationCompleted(command.step)
        raise AssertionError(f"the driver never executes {command!r}")


def typed(*items: object) -> list[tuple[type, object]]:
    """Records and commands are NamedTuples, equal across kinds: compare kinds too."""
    return [(type(item), item) for item in items]


def names(n: int) -> tuple[str, ...]:
    return tuple(f"s{i}" for i in range(n))


def carry_on(
    compensable: Sequence[bool], state: SagaState, command: Command, oracle: Oracle
) -> tuple[SagaState, list[SagaRecord]]:
    """Execute commands until Finish, returning the final state and the records written."""
    records: list[SagaRecord] = []
    budget = 2 * len(compensable) + 1  # each step runs, and is undone, at most once
    while type(command) is not Finish:
        budget -= 1
        assert budget >= 0, f"no Finish after {2 * len(compensable) + 1} commands"
        outcome = oracle(command)
        state, command = decide(compensable, state, outcome)
        records += [outcome, intent_of(command)]
    assert typed(command) == typed(Finish(state.status))
    return state, records


def simulate(compensable: Sequence[bool], oracle: Oracle) -> tuple[SagaState, list[SagaRecord]]:
    """Run a saga from the start, as the orchestrator does, with the records it would log."""
    state, command = start(compensable)
    first: list[SagaRecord] = [
        SagaStarted("saga", names(len(compensable)), {}),
        intent_of(command),
    ]
    state, rest = carry_on(compensable, state, command, oracle)
    return state, first + rest


def compensations(oracle: Oracle) -> list[int]:
    return [c.step for c in oracle.ran if type(c) is RunCompensation]


flags = st.lists(st.booleans(), min_size=1, max_size=12)


@st.composite
def failing_sagas(draw: st.DrawFn) -> tuple[list[bool], int]:
    compensable = draw(flags)
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
    assert list(state.compensated) == expected
    assert k not in state.compensated
    assert state.status is SagaStatus.COMPENSATED
    assert state.failed_step == k
    assert state.error == f"step {k} broke"
    assert state.done == k
    assert state.stuck_step is None
    # Steps after the failing one never ran.
    assert [c.step for c in oracle.ran if type(c) is RunStep] == list(range(k + 1))


@given(st.integers(1, 12).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n - 1))))
def test_failure_with_every_step_compensable_undoes_all_earlier_steps(
    case: tuple[int, int],
) -> None:
    n, k = case
    state, _ = simulate([True] * n, Oracle(fail_at=k))
    assert state.compensated == tuple(reversed(range(k)))
    assert state.status is SagaStatus.COMPENSATED


@given(flags)
def test_success_compensates_nothing(compensable: list[bool]) -> None:
    oracle = Oracle()
    state, records = simulate(compensable, oracle)
    assert state == SagaState(SagaStatus.COMPLETED, done=len(compensable))
    assert compensations(oracle) == []
    assert typed(records[-1]) == typed(SagaFinished(SagaStatus.COMPLETED))


@given(stuck_sagas())
def test_failed_compensation_leaves_the_saga_stuck(case: tuple[list[bool], int, int]) -> None:
    compensable, k, stuck = case
    oracle = Oracle(fail_at=k, stuck_at=stuck)
    state, records = simulate(compensable, oracle)
    undone = [i for i in reversed(range(k)) if compensable[i] and i > stuck]
    assert state.status is SagaStatus.FAILED
    assert state.stuck_step == stuck
    assert state.stuck_error == f"undo {stuck} broke"
    assert list(state.compensated) == undone
    # The failing compensation was the last command executed: nothing older was undone.
    assert compensations(oracle) == [*undone, stuck]
    assert typed(*records[-2:]) == typed(
        CompensationFailed(stuck, f"undo {stuck} broke"), SagaFinished(SagaStatus.FAILED)
    )
    with pytest.raises(InvalidTransition):
        decide(compensable, state, CompensationCompleted(stuck - 1 if stuck else 0))


@given(any_run())
def test_replay_of_the_whole_log_gives_back_the_final_state(
    case: tuple[list[bool], Oracle],
) -> None:
    compensable, oracle = case
    state, records = simulate(compensable, oracle)
    rebuilt = replay(compensable, records)
    assert isinstance(rebuilt, Replay)
    assert typed(rebuilt.started) == typed(records[0])
    assert rebuilt.state == state
    assert typed(rebuilt.command) == typed(Finish(state.status))
    assert rebuilt.results == {f"s{i}": {"n": i} for i in range(state.done)}


@given(any_run(), st.data())
def test_replay_of_any_prefix_carries_on_to_the_same_end(
    case: tuple[list[bool], Oracle], data: st.DataObject
) -> None:
    compensable, oracle = case
    final, records = simulate(compensable, oracle)
    cut = data.draw(st.integers(1, len(records)), label="cut")
    prefix = records[:cut]
    _, state, command, results = replay(compensable, prefix)
    assert state.status.is_final == (type(command) is Finish)
    completed = [r for r in prefix if type(r) is StepCompleted]
    assert results == {f"s{r.step}": r.result for r in completed}
    resumed, rest = carry_on(compensable, state, command, Oracle(oracle.fail_at, oracle.stuck_at))
    assert resumed == final
    # What the resumed driver writes ends the same way the uninterrupted log does.
    if rest:
        assert typed(rest[-1]) == typed(records[-1])


# --- unit tests ---------------------------------------------------------------------


def test_start_runs_the_first_step() -> None:
    assert start([False, True]) == (SagaState(SagaStatus.RUNNING), RunStep(0))


def test_start_rejects_a_saga_without_steps() -> None:
    with pytest.raises(ValueError, match="at least one step"):
        start([])


@pytest.mark.parametrize(
    ("command", "intent"),
    [
        (RunStep(3), StepStarted(3)),
        (RunCompensation(2), CompensationStarted(2)),
        (Finish(SagaStatus.COMPENSATED), SagaFinished(SagaStatus.COMPENSATED)),
    ],
)
def test_intent_of(command: Command, intent: SagaRecord) -> None:
    assert typed(intent_of(command)) == typed(intent)


def test_records_and_commands_equal_only_their_own_kind() -> None:
    """NamedTuples compare as plain tuples: RunStep(1) would equal RunCompensation(1),
    and a dict keyed by commands once merged them. Each kind now equals only itself."""
    assert RunStep(1) != RunCompensation(1)
    assert StepStarted(1) != CompensationStarted(1)
    assert StepStarted(1) != (1, 1)
    assert StepStarted(1) == StepStarted(1)
    assert len({RunStep(1), RunCompensation(1), RunStep(1)}) == 2
    for i in range(70):
        assert type(intent_of(RunStep(i))) is StepStarted
        assert type(intent_of(RunCompensation(i))) is CompensationStarted
    assert type(intent_of(RunStep(-1))) is StepStarted
    assert intent_of(RunStep(-1)).step == -1


def test_status_finality() -> None:
    final = {s for s in SagaStatus if s.is_final}
    assert final == {SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED}


def test_decide_advances_and_completes() -> None:
    comp = [True, True]
    state, command = start(comp)
    state, command = decide(comp, state, StepCompleted(0, "a"))
    assert state == SagaState(SagaStatus.RUNNING, done=1)
    assert typed(command) == typed(RunStep(1))
    state, command = decide(comp, state, StepCompleted(1, "b"))
    assert state == SagaState(SagaStatus.COMPLETED, done=2)
    assert typed(command) == typed(Finish(SagaStatus.COMPLETED))


def test_decide_failure_skips_steps_without_compensation() -> None:
    comp = [True, False, True, True]
    state = SagaState(SagaStatus.RUNNING, done=3)
    state, command = decide(comp, state, StepFailed(3, "no"))
    assert state.status is SagaStatus.COMPENSATING
    assert typed(command) == typed(RunCompensation(2))
    state, command = decide(comp, state, CompensationCompleted(2))
    assert typed(command) == typed(RunCompensation(0))
    state, command = decide(comp, state, CompensationCompleted(0))
    assert typed(command) == typed(Finish(SagaStatus.COMPENSATED))
    assert state.compensated == (2, 0)


def test_long_sagas_beyond_any_command_cache() -> None:
    n = 150
    state, records = simulate([i % 3 != 0 for i in range(n)], Oracle(fail_at=n - 1))
    assert state.status is SagaStatus.COMPENSATED
    assert state.compensated == tuple(i for i in reversed(range(n - 1)) if i % 3 != 0)
    assert typed(*records[-3:-1]) == typed(CompensationStarted(1), CompensationCompleted(1))
    assert typed(intent_of(RunStep(n))) == typed(StepStarted(n))
    assert typed(intent_of(RunCompensation(n))) == typed(CompensationStarted(n))
    assert replay([i % 3 != 0 for i in range(n)], records).state == state


def test_failure_of_the_first_step_finishes_compensated_at_once() -> None:
    state, command = decide([True], SagaState(SagaStatus.RUNNING), StepFailed(0, "x"))
    assert typed(command) == typed(Finish(SagaStatus.COMPENSATED))
    assert state == SagaState(SagaStatus.COMPENSATED, failed_step=0, error="x")


COMPENSATING = SagaState(SagaStatus.COMPENSATING, done=2, failed_step=2, error="x")


@pytest.mark.parametrize(
    ("state", "outcome"),
    [
        pytest.param(SagaState(SagaStatus.RUNNING), StepCompleted(1), id="step-ahead"),
        pytest.param(SagaState(SagaStatus.RUNNING, done=2), StepCompleted(1), id="step-again"),
        pytest.param(SagaState(SagaStatus.RUNNING, done=1), StepFailed(0, "x"), id="fail-old"),
        pytest.param(SagaState(SagaStatus.RUNNING), CompensationCompleted(0), id="undo-running"),
        pytest.param(SagaState(SagaStatus.RUNNING), CompensationFailed(0, "x"), id="undo-fail"),
        pytest.param(SagaState(SagaStatus.COMPLETED, done=3), StepCompleted(3), id="after-done"),
        pytest.param(SagaState(SagaStatus.COMPLETED, done=3), StepFailed(2, "x"), id="fail-done"),
        pytest.param(COMPENSATING, CompensationCompleted(0), id="undo-wrong-order"),
        pytest.param(COMPENSATING, CompensationCompleted(2), id="undo-the-failed-step"),
        pytest.param(COMPENSATING, StepCompleted(2), id="step-while-undoing"),
        pytest.param(
            COMPENSATING._replace(status=SagaStatus.COMPENSATED, compensated=(1, 0)),
            CompensationCompleted(0),
            id="undo-after-final",
        ),
        pytest.param(
            COMPENSATING._replace(status=SagaStatus.FAILED, stuck_step=1),
            CompensationCompleted(0),
            id="undo-after-stuck",
        ),
    ],
)
def test_decide_rejects_outcomes_that_do_not_fit(state: SagaState, outcome: Outcome) -> None:
    with pytest.raises(InvalidTransition, match=type(outcome).__name__):
        decide([True, True, True], state, outcome)


def test_replay_of_a_log_interrupted_after_an_intent_reruns_the_step() -> None:
    records = [
        SagaStarted("s", ("a", "b"), {"k": 1}),
        StepStarted(0),
        StepCompleted(0, 10),
        StepStarted(1),
    ]
    rebuilt = replay([True, True], records)
    assert rebuilt.state == SagaState(SagaStatus.RUNNING, done=1)
    assert typed(rebuilt.command) == typed(RunStep(1))
    assert rebuilt.results == {"a": 10}
    assert rebuilt.started is records[0]


def test_replay_of_an_interrupted_compensation_reruns_it() -> None:
    records = [
        SagaStarted("s", ("a", "b"), {}),
        StepStarted(0),
        StepCompleted(0),
        StepStarted(1),
        StepFailed(1, "x"),
        CompensationStarted(0),
    ]
    rebuilt = replay([True, True], records)
    assert rebuilt.state.status is SagaStatus.COMPENSATING
    assert typed(rebuilt.command) == typed(RunCompensation(0))


@pytest.mark.parametrize(
    "records",
    [
        pytest.param([], id="empty"),
        pytest.param([StepStarted(0), StepCompleted(0)], id="no-start"),
        pytest.param([("s", ("a",), {})], id="plain-tuple"),
    ],
)
def test_replay_rejects_a_log_not_opening_with_saga_started(records: list[SagaRecord]) -> None:
    with pytest.raises(InvalidTransition, match="SagaStarted"):
        replay([True], records)


def test_replay_rejects_a_corrupt_log() -> None:
    records = [SagaStarted("s", ("a", "b"), {}), StepStarted(0), StepCompleted(1)]
    with pytest.raises(InvalidTransition):
        replay([True, True], records)


def test_replay_of_a_step_index_out_of_range_is_an_invalid_transition() -> None:
    """Not an IndexError from looking the step's name up before decide() checks it."""
    records = [SagaStarted("s", ("a",), {}), StepStarted(0), StepCompleted(3)]
    with pytest.raises(InvalidTransition):
        replay([True], records)


@pytest.mark.parametrize("index", [0, 5, 63, 64, 1000])
def test_record_builders_give_records_equal_to_the_classes(index: int) -> None:
    for record, expected in [
        (step_completed(index, None), StepCompleted(index)),
        (step_completed(index, {"id": 1}), StepCompleted(index, {"id": 1})),
        (compensation_completed(index), CompensationCompleted(index)),
    ]:
        assert type(record) is type(expected)
        assert record == expected


@given(st.lists(st.booleans(), min_size=1, max_size=70))
def test_forward_path_is_what_decide_answers_on_a_saga_running_forward(
    compensable: list[bool],
) -> None:
    path = forward_path(compensable)
    assert len(path) == len(compensable)
    for i, (completed, state, command, intent) in enumerate(path):
        assert typed(completed) == typed(StepCompleted(i, None))
        expected_state, expected_command = decide(
            compensable, SagaState(SagaStatus.RUNNING, i), StepCompleted(i, {"any": "result"})
        )
        assert state == expected_state
        assert typed(command) == typed(expected_command)
        assert typed(intent) == typed(intent_of(expected_command))
