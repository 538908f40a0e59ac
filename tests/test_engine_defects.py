"""Defects found by probing the engine before its rebuild, each kept gone by a test."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from saga_logs import BufferedLog, unfinished

from sagakit.adapters.memory_log import InMemorySagaLog
from sagakit.core.records import SagaStatus
from sagakit.core.saga import SagaDefinition, Step, StepContext
from sagakit.errors import SagaError, SagaIdConflict
from sagakit.orchestration import Orchestrator


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


async def test_a_step_exception_whose_str_raises_still_compensates() -> None:
    undone: list[str] = []

    def explode(ctx: StepContext) -> None:
        raise Unprintable

    saga = SagaDefinition(
        "odd", [Step("a", lambda ctx: 1, lambda ctx: undone.append("a")), Step("b", explode)]
    )
    log = InMemorySagaLog()
    outcome = await Orchestrator(log).run(saga, "o-1")
    assert outcome.state is SagaStatus.COMPENSATED
    assert undone == ["a"]
    assert outcome.error is not None
    assert outcome.error.startswith("Unprintable")
    assert await unfinished(log) == []


async def test_a_compensation_exception_whose_str_raises_leaves_the_saga_failed() -> None:
    def undo(ctx: StepContext) -> None:
        raise Unprintable

    def fail(ctx: StepContext) -> None:
        raise ValueError("no")

    saga = SagaDefinition("odd", [Step("a", lambda ctx: 1, undo), Step("b", fail)])
    outcome = await Orchestrator().run(saga, "o-1")
    assert outcome.state is SagaStatus.FAILED
    assert outcome.stuck_step == "a"


async def test_compensating_80000_steps_is_linear() -> None:
    """decide() once copied the tuple of compensated steps at each compensation: O(n^2),
    6 s for 80,000 steps failing at the last (0.04 s when they completed)."""
    n = 80_000

    def fail(ctx: StepContext) -> None:
        raise ValueError("last")

    steps = [Step(f"s{i}", lambda ctx: None, lambda ctx: None) for i in range(n - 1)]
    saga = SagaDefinition("long", [*steps, Step("last", fail)])
    outcome = await Orchestrator().run(saga, "o-1")
    assert outcome.state is SagaStatus.COMPENSATED
    assert len(outcome.compensated_steps) == n - 1
    assert outcome.compensated_steps[0] == f"s{n - 2}"
    assert outcome.compensated_steps[-1] == "s0"


async def test_steps_named_with_a_comma_do_not_join_another_definitions_run() -> None:
    gate = asyncio.Event()

    async def wait(ctx: StepContext) -> None:
        await gate.wait()

    one = SagaDefinition("s", [Step("a, b", wait)])
    two = SagaDefinition("s", [Step("a", wait), Step("b", wait)])
    orchestrator = Orchestrator()
    first = asyncio.create_task(orchestrator.run(one, "o-1"))
    await asyncio.sleep(0)
    with pytest.raises(SagaIdConflict):
        await orchestrator.run(two, "o-1")
    gate.set()
    assert (await first).ok
    with pytest.raises(SagaIdConflict):
        await orchestrator.run(two, "o-1")  # and not from the log either


@pytest.mark.parametrize("log_kind", [InMemorySagaLog, BufferedLog])
async def test_a_saga_id_reused_with_another_input_conflicts(log_kind: Any) -> None:
    calls: list[Any] = []
    saga = SagaDefinition("pay", [Step("charge", lambda ctx: calls.append(ctx.data.get("amount")))])
    orchestrator = Orchestrator(log_kind())
    assert (await orchestrator.run(saga, "p-1", {"amount": 5})).ok
    with pytest.raises(SagaIdConflict) as excinfo:
        await orchestrator.run(saga, "p-1", {"amount": 500})
    assert "500" in str(excinfo.value)
    with pytest.raises(SagaIdConflict):
        await orchestrator.run(saga, "p-1")  # no input is another input too
    # The same input again is the same request: answered from the log.
    assert (await orchestrator.run(saga, "p-1", {"amount": 5})).ok
    # A tuple recorded is a list read back from a durable log: still the same input.
    assert (await orchestrator.run(saga, "p-2", {"items": (1, 2)})).ok
    assert (await orchestrator.run(saga, "p-2", {"items": [1, 2]})).ok
    assert calls == [5, None]  # each ran once


async def test_a_concurrent_run_with_another_input_conflicts() -> None:
    gate = asyncio.Event()

    async def wait(ctx: StepContext) -> None:
        await gate.wait()

    saga = SagaDefinition("pay", [Step("charge", wait)])
    orchestrator = Orchestrator()
    first = asyncio.create_task(orchestrator.run(saga, "p-1", {"amount": 5}))
    await asyncio.sleep(0)
    with pytest.raises(SagaIdConflict):
        await orchestrator.run(saga, "p-1", {"amount": 6})
    gate.set()
    assert (await first).ok


class Opaque:
    pass


@pytest.mark.parametrize("log_kind", [InMemorySagaLog, BufferedLog])
@pytest.mark.parametrize(
    "data", [{"when": Opaque()}, {"n": math.nan}, {"big": 2**70}, {1: "int key"}, {"s": {1, 2}}]
)
async def test_a_saga_input_that_is_not_json_is_refused_before_anything_runs(
    log_kind: Any, data: dict[Any, Any]
) -> None:
    calls: list[str] = []
    saga = SagaDefinition("s", [Step("a", lambda ctx: calls.append("a"))])
    log = log_kind()
    with pytest.raises(SagaError) as excinfo:
        await Orchestrator(log).run(saga, "o-1", data)
    assert excinfo.value.saga_id == "o-1"
    assert "not a JSON value" in str(excinfo.value)
    assert calls == []
    assert await log.read("o-1") == []


@pytest.mark.parametrize("log_kind", [InMemorySagaLog, BufferedLog])
@pytest.mark.parametrize("result", [Opaque(), {1, 2}, math.inf, 2**70, {"k": Opaque()}])
async def test_a_step_result_that_is_not_json_fails_the_step_and_compensates(
    log_kind: Any, result: Any
) -> None:
    """The result cannot be recorded, so the saga cannot carry it on: the step counts
    as failed (naming the saga and the step), and the steps before it are undone."""
    undone: list[str] = []
    saga = SagaDefinition(
        "s",
        [
            Step("a", lambda ctx: 1, lambda ctx: undone.append("a")),
            Step("b", lambda ctx: result, lambda ctx: undone.append("b")),
        ],
    )
    log = log_kind()
    outcome = await Orchestrator(log).run(saga, "o-1")
    assert outcome.state is SagaStatus.COMPENSATED
    assert outcome.failed_step == "b"
    assert outcome.error is not None
    assert "SagaError" in outcome.error
    assert "'o-1'" in outcome.error
    assert "'b'" in outcome.error
    assert undone == ["a"]
    assert "b" not in outcome.results


def _run_in(call: Any, in_compensation: bool) -> list[Step]:
    """Two steps where ``call`` runs as step b's action, or (``in_compensation``) as step
    a's compensation once step b has failed."""

    def fail(ctx: StepContext) -> None:
        raise ValueError("no")

    if in_compensation:
        return [Step("a", lambda ctx: 1, call), Step("b", fail)]
    return [Step("a", lambda ctx: 1, lambda ctx: None), Step("b", call)]


@pytest.mark.parametrize("in_compensation", [False, True])
async def test_an_error_message_that_is_not_utf8_is_recorded_and_the_saga_ends(
    tmp_path: Any, in_compensation: bool
) -> None:
    """A message with a lone surrogate (a file name decoded with surrogateescape) once
    made the error record unwritable on a durable log: run() raised and the saga was
    left running, failing the same way on every retry."""
    message = "no such file: caf\udce9.txt"

    def broken(ctx: StepContext) -> None:
        raise FileNotFoundError(message)

    steps = _run_in(broken, in_compensation)
    saga = SagaDefinition("files", steps)
    orchestrator = Orchestrator(f"sqlite:///{tmp_path / 'sagas.db'}")
    try:
        outcome = await orchestrator.run(saga, "f-1")
        assert await unfinished(orchestrator.log) == []
        assert (await orchestrator.result("f-1")) == outcome
    finally:
        await orchestrator.close()
    error = outcome.stuck_error if in_compensation else outcome.error
    assert outcome.state is (SagaStatus.FAILED if in_compensation else SagaStatus.COMPENSATED)
    assert error == "FileNotFoundError: no such file: caf\\udce9.txt"


@pytest.mark.parametrize("log_kind", [InMemorySagaLog, BufferedLog])
async def test_an_input_changed_by_its_caller_after_the_start_changes_nothing(
    log_kind: Any,
) -> None:
    """The input was copied one level deep: a list inside it, changed by the caller
    while the saga ran, changed what the steps read and (in memory) what was logged."""
    seen: list[Any] = []

    async def look(ctx: StepContext) -> None:
        await asyncio.sleep(0)
        seen.append(ctx.data["order"]["items"])

    saga = SagaDefinition("order", [Step("a", look), Step("b", look)])
    log = log_kind()
    orchestrator = Orchestrator(log)
    data: dict[str, Any] = {"order": {"items": [1, 2]}}
    running = asyncio.create_task(orchestrator.run(saga, "o-1", data))
    await asyncio.sleep(0)
    data["order"]["items"].append(3)
    data["order"]["note"] = "changed"
    assert (await running).ok
    assert seen == [[1, 2], [1, 2]]
    assert (await log.read("o-1"))[0].data == {"order": {"items": [1, 2]}}
    # The same request again is answered from the log, and the changed one conflicts.
    assert (await orchestrator.run(saga, "o-1", {"order": {"items": [1, 2]}})).ok
    with pytest.raises(SagaIdConflict):
        await orchestrator.run(saga, "o-1", data)
    # start() records a copy too.
    later: dict[str, Any] = {"order": {"items": [7]}}
    assert await orchestrator.start(saga, "o-2", later)
    later["order"]["items"].append(8)
    assert (await log.read("o-2"))[0].data == {"order": {"items": [7]}}


@pytest.mark.parametrize("in_compensation", [False, True])
async def test_a_step_whose_awaited_future_was_cancelled_elsewhere_fails(
    in_compensation: bool,
) -> None:
    """A CancelledError out of a step whose own task nobody cancelled (it awaited a
    future cancelled elsewhere) stopped the saga as a cancellation would: run() raised
    CancelledError to a caller nobody cancelled, and serve() gave the lease up and ran
    the step again at once, a thousand times a second, without a word."""
    gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    gone.cancel()
    calls: list[str] = []

    async def wait(ctx: StepContext) -> None:
        calls.append(ctx.step)
        await gone

    steps = _run_in(wait, in_compensation)
    saga = SagaDefinition("waits", steps)
    log = InMemorySagaLog()
    orchestrator = Orchestrator(log, sagas=[saga])
    outcome = await orchestrator.run(saga, "w-1")
    if in_compensation:
        assert outcome.state is SagaStatus.FAILED
        assert outcome.stuck_error == "CancelledError"
    else:
        assert outcome.state is SagaStatus.COMPENSATED
        assert outcome.error == "CancelledError"
    # Served: run once, not again and again.
    await orchestrator.start(saga, "w-2")
    serving = asyncio.create_task(orchestrator.serve())
    await asyncio.sleep(0.2)
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    assert calls == [calls[0]] * 2
    assert await unfinished(log) == []


async def test_a_run_cancelled_from_outside_still_stops_and_gives_its_lease_up() -> None:
    entered = asyncio.Event()

    async def wait(ctx: StepContext) -> None:
        entered.set()
        await asyncio.sleep(3600)

    saga = SagaDefinition("waits", [Step("a", wait)])
    log = InMemorySagaLog()
    running = asyncio.create_task(Orchestrator(log).run(saga, "w-1"))
    await entered.wait()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    summary = await log.status("w-1")
    assert summary is not None
    assert summary.status is SagaStatus.RUNNING
    assert summary.owner is None
