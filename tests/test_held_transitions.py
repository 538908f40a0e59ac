"""A volatile saga log lets the orchestrator hold synchronous transitions until its next await.

Holding must change nothing anyone can observe: the records end up the same as
when each transition is written at once, every await (where another coroutine
could read the log) comes after the held records are written, and a run
stopped mid-way leaves the intent of the step it stopped in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sagakit.adapters.memory_log import InMemorySagaLog
from sagakit.core.machine import (
    CompensationStarted,
    SagaRecord,
    SagaStarted,
    StepCompleted,
    StepStarted,
)
from sagakit.core.saga import SagaDefinition, Step, StepContext
from sagakit.orchestration import Orchestrator
from sagakit.ports.saga_log import ImmediateSagaLog


class ImmediateDurableLog(InMemorySagaLog):
    """The in-memory log declared durable: each transition must be written at once."""

    volatile = False


class AwaitedLog:
    """A log that offers only the awaited port methods, as a networked one does."""

    def __init__(self) -> None:
        self._log = InMemorySagaLog()

    async def append(self, saga_id: str, version: int, records: Sequence[SagaRecord]) -> None:
        await asyncio.sleep(0)  # a real round trip suspends
        await self._log.append(saga_id, version, records)

    async def read(self, saga_id: str) -> list[SagaRecord]:
        return await self._log.read(saga_id)

    async def unfinished(self) -> list[str]:
        return await self._log.unfinished()

    async def close(self) -> None:
        await self._log.close()


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


def test_the_in_memory_log_is_volatile_and_immediate() -> None:
    log = InMemorySagaLog()
    assert isinstance(log, ImmediateSagaLog)
    assert log.volatile is True


@pytest.mark.parametrize("pattern", ["sss", "sas", "asa", "sws", "aaa", "ssssss"])
@pytest.mark.parametrize(("fail_at", "stuck_at"), [(None, None), (0, None), (2, None), (2, 1)])
async def test_held_transitions_leave_the_same_records(
    pattern: str, fail_at: int | None, stuck_at: int | None
) -> None:
    saga = saga_of(pattern, fail_at, stuck_at)
    logs = [InMemorySagaLog(), ImmediateDurableLog(), AwaitedLog()]
    outcomes = [await Orchestrator(log).run(saga, "o-1", {"n": 1}) for log in logs]
    assert outcomes[0] == outcomes[1] == outcomes[2]
    held, immediate, awaited = [typed(await log.read("o-1")) for log in logs]
    assert held == immediate == awaited
    assert [await log.unfinished() for log in logs] == [[], [], []]


@pytest.mark.parametrize("deferred", [False, True])
async def test_a_step_that_awaits_finds_every_earlier_transition_written(deferred: bool) -> None:
    log = InMemorySagaLog()
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


async def test_a_compensation_that_awaits_finds_its_intent_written() -> None:
    log = InMemorySagaLog()
    seen: list[SagaRecord] = []

    async def undo(ctx: StepContext) -> None:
        seen.append((await log.read(ctx.saga_id))[-1])

    def fail(ctx: StepContext) -> None:
        raise ValueError("no")

    saga = SagaDefinition("undo", [Step("a", lambda ctx: 1, undo), Step("b", fail)])
    outcome = await Orchestrator(log).run(saga, "o-1")
    assert outcome.compensated_steps == ("a",)
    assert typed(seen) == typed([CompensationStarted(0)])


async def test_a_run_stopped_in_a_sync_step_leaves_that_steps_intent() -> None:
    log = InMemorySagaLog()
    calls: list[str] = []
    stop = True

    def second(ctx: StepContext) -> int:
        calls.append("second")
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
    assert await log.unfinished() == ["o-1"]

    stop = False
    [outcome] = await Orchestrator(log).recover({"stop": saga})
    assert outcome.ok
    assert calls == ["first", "second", "second"]  # the first step did not run again


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


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_saga_leaves_the_same_records_held_or_not(data: st.DataObject) -> None:
    pattern = data.draw(st.text(alphabet="saw", min_size=1, max_size=7), label="pattern")
    steps = st.integers(0, len(pattern) - 1)
    fail_at = data.draw(st.none() | steps, label="fail_at")
    stuck_at = data.draw(st.none() | steps, label="stuck_at")
    saga = saga_of(pattern, fail_at, stuck_at)

    async def run_on_each() -> None:
        logs = [InMemorySagaLog(), ImmediateDurableLog(), AwaitedLog()]
        outcomes = [await Orchestrator(log).run(saga, "o-1", {"n": 1}) for log in logs]
        assert outcomes[0] == outcomes[1] == outcomes[2]
        held, immediate, awaited = [typed(await log.read("o-1")) for log in logs]
        assert held == immediate == awaited

    asyncio.run(run_on_each())
