"""Write-ahead: every intent is in the log before the work it announces runs, on a log
that writes at once (memory) and on one that must be flushed (durable).

(Replaces the held-transitions tests: the in-memory log no longer lets the driver
hold records back, and these are the behaviours that held either way.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from saga_logs import BufferedLog, unfinished

from sagakit.adapters.memory_log import InMemorySagaLog
from sagakit.core.records import (
    CompensationStarted,
    SagaRecord,
    SagaStarted,
    StepCompleted,
    StepStarted,
)
from sagakit.core.saga import SagaDefinition, Step, StepContext
from sagakit.orchestration import Orchestrator


def typed(records: Sequence[Any]) -> list[tuple[str, Any]]:
    return [(type(r).__name__, r) for r in records]


class Interrupt(BaseException):
    """Stands for KeyboardInterrupt, which pytest would take for the user's own."""


def saga_of(pattern: str, fail_at: int | None, stuck_at: int | None) -> SagaDefinition:
    """One step per letter: ``s`` sync, ``a`` async, ``w`` sync returning an awaitable."""

    def make(i: int, kind: str) -> Step:
        def outcome(undo: bool) -> int:
            if undo and i == stuck_at:
                raise RuntimeError(f"cannot undo {i}")
            if not undo and i == fail_at:
                raise ValueError(f"step {i} fails")
            return i

        def sync_action(ctx: StepContext) -> int:
            return outcome(False)

        async def async_action(ctx: StepContext) -> int:
            await asyncio.sleep(0)
            return outcome(False)

        def deferred_action(ctx: StepContext) -> Any:
            return async_action(ctx)

        def sync_undo(ctx: StepContext) -> None:
            outcome(True)

        async def async_undo(ctx: StepContext) -> None:
            await asyncio.sleep(0)
            outcome(True)

        action = {"s": sync_action, "a": async_action, "w": deferred_action}[kind]
        undo = sync_undo if kind == "s" else async_undo
        return Step(f"s{i}", action, undo)

    return SagaDefinition("mixed", [make(i, kind) for i, kind in enumerate(pattern)])


async def _same_on_both(saga: SagaDefinition) -> None:
    logs: list[Any] = [InMemorySagaLog(), BufferedLog()]
    outcomes = [await Orchestrator(log).run(saga, "o-1", {"n": 1}) for log in logs]
    assert outcomes[0] == outcomes[1]
    memory, durable = [typed(await log.read("o-1")) for log in logs]
    assert memory == durable
    assert [await unfinished(log) for log in logs] == [[], []]


@pytest.mark.parametrize("pattern", ["sss", "sas", "asa", "sws", "aaa", "ssssss"])
@pytest.mark.parametrize(("fail_at", "stuck_at"), [(None, None), (0, None), (2, None), (2, 1)])
async def test_memory_and_durable_logs_get_the_same_records(
    pattern: str, fail_at: int | None, stuck_at: int | None
) -> None:
    await _same_on_both(saga_of(pattern, fail_at, stuck_at))


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_any_saga_leaves_the_same_records_on_both(data: st.DataObject) -> None:
    pattern = data.draw(st.text(alphabet="saw", min_size=0, max_size=7), label="pattern")
    steps = st.integers(0, max(len(pattern) - 1, 0))
    fail_at = data.draw(st.none() | steps, label="fail_at")
    stuck_at = data.draw(st.none() | steps, label="stuck_at")
    asyncio.run(_same_on_both(saga_of(pattern, fail_at, stuck_at)))


async def test_one_flush_per_transition_on_a_durable_log() -> None:
    log = BufferedLog()
    await Orchestrator(log).run(saga_of("sss", None, None), "o-1")
    # Created with its first intent; then each step's outcome and the next intent.
    assert log.flushes == 3


@pytest.mark.parametrize("log_kind", [InMemorySagaLog, BufferedLog])
@pytest.mark.parametrize("deferred", [False, True])
async def test_a_step_finds_every_earlier_transition_and_its_intent_written(
    log_kind: Any, deferred: bool
) -> None:
    log = log_kind()
    seen: list[list[tuple[str, Any]]] = []

    async def reads_the_log(ctx: StepContext) -> None:
        seen.append(typed(await log.read(ctx.saga_id)))

    def hands_back_a_read(ctx: StepContext) -> Any:
        return reads_the_log(ctx)

    third = hands_back_a_read if deferred else reads_the_log
    saga = SagaDefinition(
        "look", [Step("a", lambda ctx: 1), Step("b", lambda ctx: 2), Step("c", third)]
    )
    await Orchestrator(log).run(saga, "o-1")
    assert seen == [
        typed([
            SagaStarted("look", ("a", "b", "c"), {}),
            StepStarted(0), StepCompleted(0, 1),
            StepStarted(1), StepCompleted(1, 2),
            StepStarted(2),
        ])
    ]  # fmt: skip


@pytest.mark.parametrize("log_kind", [InMemorySagaLog, BufferedLog])
async def test_a_compensation_finds_its_intent_written(log_kind: Any) -> None:
    log = log_kind()
    seen: list[SagaRecord] = []

    async def undo(ctx: StepContext) -> None:
        seen.append((await log.read(ctx.saga_id))[-1])

    def fail(ctx: StepContext) -> None:
        raise ValueError("no")

    saga = SagaDefinition("undo", [Step("a", lambda ctx: 1, undo), Step("b", fail)])
    outcome = await Orchestrator(log).run(saga, "o-1")
    assert outcome.compensated_steps == ("a",)
    assert typed(seen) == typed([CompensationStarted(0)])


@pytest.mark.parametrize("log_kind", [InMemorySagaLog, BufferedLog])
async def test_a_run_stopped_in_a_sync_step_leaves_that_steps_intent(log_kind: Any) -> None:
    log = log_kind()
    calls: list[str] = []
    stop = True

    def second(ctx: StepContext) -> int:
        calls.append(f"second #{ctx.attempt}")
        if stop:
            raise Interrupt
        return 2

    saga = SagaDefinition(
        "stop", [Step("first", lambda ctx: calls.append("first")), Step("second", second)]
    )
    with pytest.raises(Interrupt):
        await Orchestrator(log).run(saga, "o-1")
    records = await log.read("o-1")
    assert typed(records[-2:]) == typed([StepCompleted(0), StepStarted(1)])
    assert await unfinished(log) == ["o-1"]

    stop = False
    [outcome] = await Orchestrator(log).recover({"stop": saga})
    assert outcome.ok
    # The first step did not run again; the second ran again as its attempt 2.
    assert calls == ["first", "second #1", "second #2"]


async def test_a_run_stopped_in_a_sync_compensation_leaves_its_intent() -> None:
    log = InMemorySagaLog()

    def undo(ctx: StepContext) -> None:
        raise Interrupt

    def fail(ctx: StepContext) -> None:
        raise ValueError("no")

    saga = SagaDefinition("stop", [Step("a", lambda ctx: 1, undo), Step("b", fail)])
    with pytest.raises(Interrupt):
        await Orchestrator(log).run(saga, "o-1")
    assert typed((await log.read("o-1"))[-1:]) == typed([CompensationStarted(0)])
