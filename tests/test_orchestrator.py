"""The orchestrator over the in-memory saga log."""

from __future__ import annotations

import asyncio
import gc
import math
from pathlib import Path
from typing import Any

import pytest
from saga_logs import BufferedLog, unfinished

from sagakit.adapters import open_event_bus, open_saga_log
from sagakit.adapters.memory_log import InMemorySagaLog
from sagakit.core.records import (
    CompensationCompleted,
    CompensationFailed,
    CompensationStarted,
    SagaFinished,
    SagaStarted,
    SagaStatus,
    StepCompleted,
    StepFailed,
    StepStarted,
)
from sagakit.core.saga import SagaDefinition, Step, StepContext
from sagakit.errors import ConfigurationError, DefinitionError, SagaError, SagaIdConflict
from sagakit.orchestration import Orchestrator


class Boom(Exception):
    pass


class Shop:
    """A saga of ``n`` steps that records every call; step ``fail_at`` raises Boom."""

    def __init__(
        self,
        n: int = 4,
        fail_at: int | None = None,
        stuck_at: int | None = None,
        name: str = "shop",
    ) -> None:
        self.calls: list[str] = []
        self.contexts: dict[str, StepContext] = {}
        self.fail_at, self.stuck_at = fail_at, stuck_at
        self.saga = SagaDefinition(
            name, [Step(f"s{i}", self._action(i), self._compensation(i)) for i in range(n)]
        )

    def _action(self, i: int) -> Any:
        async def action(ctx: StepContext) -> dict[str, Any]:
            self.calls.append(f"do s{i}")
            self.contexts[ctx.step] = StepContext(
                ctx.saga_id, ctx.step, ctx.data, dict(ctx.results)
            )
            await asyncio.sleep(0)
            if i == self.fail_at:
                raise Boom(f"s{i} is out of stock")
            return {"step": i, "seen": sorted(ctx.results)}

        return action

    def _compensation(self, i: int) -> Any:
        def compensation(ctx: StepContext) -> None:  # a plain function: sync is allowed
            self.calls.append(f"undo s{i}")
            self.contexts[f"undo {ctx.step}"] = ctx
            if i == self.stuck_at:
                raise RuntimeError(f"cannot undo s{i}")

        return compensation


def kinds(records: list[Any]) -> list[tuple[str, Any]]:
    return [(type(r).__name__, r) for r in records]


async def test_success_with_async_and_sync_actions() -> None:
    calls: list[str] = []

    async def reserve(ctx: StepContext) -> str:
        calls.append("reserve")
        return "r-1"

    def charge(ctx: StepContext) -> int:
        calls.append("charge")
        return 42

    saga = SagaDefinition("order", [Step("reserve", reserve), Step("charge", charge)])
    outcome = await Orchestrator().run(saga, "order-1", {"amount": 42})
    assert calls == ["reserve", "charge"]
    assert outcome.ok
    assert outcome.state is SagaStatus.COMPLETED
    assert (outcome.saga_id, outcome.completed_steps, outcome.compensated_steps) == (
        "order-1", ("reserve", "charge"), ()
    )  # fmt: skip
    assert (outcome.failed_step, outcome.error, outcome.stuck_step) == (None, None, None)
    assert outcome.results == {"reserve": "r-1", "charge": 42}


@pytest.mark.parametrize("k", [0, 1, 2, 3])
async def test_failure_at_step_k_compensates_earlier_steps_newest_first(k: int) -> None:
    shop = Shop(n=4, fail_at=k)
    outcome = await Orchestrator().run(shop.saga, "order-1")
    undone = [f"undo s{i}" for i in reversed(range(k))]
    assert shop.calls == [*(f"do s{i}" for i in range(k + 1)), *undone]
    assert f"undo s{k}" not in shop.calls
    assert not outcome.ok
    assert outcome.state is SagaStatus.COMPENSATED
    assert outcome.completed_steps == tuple(f"s{i}" for i in range(k))
    assert outcome.compensated_steps == tuple(f"s{i}" for i in reversed(range(k)))
    assert outcome.failed_step == f"s{k}"
    assert outcome.error == f"Boom: s{k} is out of stock"


async def test_steps_without_compensation_are_skipped_when_undoing() -> None:
    calls: list[str] = []

    def step(name: str, undoable: bool) -> Step:
        def do(ctx: StepContext) -> None:
            calls.append(f"do {name}")
            if name == "d":
                raise Boom

        def undo(ctx: StepContext) -> None:
            calls.append(f"undo {name}")

        return Step(name, do, undo if undoable else None)

    saga = SagaDefinition(
        "s", [step("a", True), step("b", False), step("c", True), step("d", True)]
    )
    outcome = await Orchestrator().run(saga, "x")
    assert calls == ["do a", "do b", "do c", "do d", "undo c", "undo a"]
    assert outcome.compensated_steps == ("c", "a")
    assert outcome.error == "Boom"


async def test_results_and_data_reach_later_steps_and_compensations() -> None:
    shop = Shop(n=3, fail_at=2)
    await Orchestrator().run(shop.saga, "order-7", {"customer": "ada"})
    first, second = shop.contexts["s0"], shop.contexts["s1"]
    assert (first.saga_id, first.step, first.data, first.results) == (
        "order-7",
        "s0",
        {"customer": "ada"},
        {},
    )
    assert second.results == {"s0": {"step": 0, "seen": []}}
    assert shop.contexts["s2"].results["s1"] == {"step": 1, "seen": ["s0"]}
    undo = shop.contexts["undo s1"]
    assert undo.step == "s1"
    assert undo.result == {"step": 1, "seen": ["s0"]}
    assert undo.data == {"customer": "ada"}
    assert shop.contexts["undo s0"].result == {"step": 0, "seen": []}


async def test_success_log_records_every_transition_in_order() -> None:
    log = InMemorySagaLog()
    shop = Shop(n=2)
    await Orchestrator(log).run(shop.saga, "order-1", {"n": 1})
    assert kinds(await log.read("order-1")) == kinds([
        SagaStarted("shop", ("s0", "s1"), {"n": 1}),
        StepStarted(0),
        StepCompleted(0, {"step": 0, "seen": []}),
        StepStarted(1),
        StepCompleted(1, {"step": 1, "seen": ["s0"]}),
        SagaFinished(SagaStatus.COMPLETED),
    ])  # fmt: skip
    assert await unfinished(log) == []


async def test_failure_log_records_compensations() -> None:
    log = InMemorySagaLog()
    shop = Shop(n=2, fail_at=1)
    await Orchestrator(log).run(shop.saga, "order-1")
    assert kinds((await log.read("order-1"))[3:]) == kinds([
        StepStarted(1),
        StepFailed(1, "Boom: s1 is out of stock"),
        CompensationStarted(0),
        CompensationCompleted(0),
        SagaFinished(SagaStatus.COMPENSATED),
    ])  # fmt: skip


async def test_a_repeated_run_returns_the_recorded_outcome_and_runs_nothing() -> None:
    log = InMemorySagaLog()
    shop = Shop(n=3, fail_at=2)
    first = await Orchestrator(log).run(shop.saga, "order-1", {"n": 1})
    calls, records = list(shop.calls), await log.read("order-1")
    for orchestrator in (Orchestrator(log), Orchestrator(log)):
        again = await orchestrator.run(shop.saga, "order-1", {"n": 1})
        assert again == first
    assert shop.calls == calls
    assert await log.read("order-1") == records


async def test_same_saga_id_with_another_definition_conflicts() -> None:
    orchestrator = Orchestrator()
    await orchestrator.run(Shop(n=2).saga, "order-1")
    other = Shop(n=3)
    with pytest.raises(SagaIdConflict) as excinfo:
        await orchestrator.run(other.saga, "order-1")
    assert other.calls == []
    assert excinfo.value.saga_id == "order-1"
    assert excinfo.value.recorded == '["shop",["s0","s1"]]'
    assert excinfo.value.requested == '["shop",["s0","s1","s2"]]'
    with pytest.raises(SagaIdConflict):
        await orchestrator.run(Shop(n=2, name="refund").saga, "order-1")


async def test_concurrent_runs_of_one_saga_id_run_the_steps_once() -> None:
    shop = Shop(n=3)
    orchestrator = Orchestrator()
    first, second = await asyncio.gather(
        orchestrator.run(shop.saga, "order-1"), orchestrator.run(shop.saga, "order-1")
    )
    assert shop.calls == ["do s0", "do s1", "do s2"]
    assert first == second
    assert first.ok


async def test_concurrent_run_with_another_definition_conflicts() -> None:
    shop = Shop(n=2)
    orchestrator = Orchestrator()
    results = await asyncio.gather(
        orchestrator.run(shop.saga, "order-1"),
        orchestrator.run(Shop(n=3).saga, "order-1"),
        return_exceptions=True,
    )
    assert results[0].ok  # type: ignore[union-attr]
    assert isinstance(results[1], SagaIdConflict)


def _gated() -> tuple[asyncio.Event, SagaDefinition]:
    """A one-step saga whose step waits for the event returned with it."""
    gate = asyncio.Event()

    async def slow(ctx: StepContext) -> int:
        await gate.wait()
        return 1

    return gate, SagaDefinition("slow", [Step("slow", slow)])


async def _run_and_join(
    orchestrator: Orchestrator, saga: SagaDefinition, saga_id: str
) -> tuple[asyncio.Task[Any], asyncio.Task[Any]]:
    """A run of ``saga_id`` and, once that waits in its step, a second caller joining it."""
    runner = asyncio.create_task(orchestrator.run(saga, saga_id))
    await asyncio.sleep(0)
    joiner = asyncio.create_task(orchestrator.run(saga, saga_id))
    await asyncio.sleep(0)
    return runner, joiner


async def test_a_cancelled_joiner_does_not_break_the_running_saga() -> None:
    """A caller that joined a run and was cancelled leaves a cancelled waiter behind:
    setting its result must not raise InvalidStateError out of the owner's run()."""
    gate, saga = _gated()
    owner, joiner = await _run_and_join(Orchestrator(), saga, "order-1")
    joiner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await joiner
    gate.set()
    async with asyncio.timeout(5):
        outcome = await owner
    assert outcome.ok


@pytest.mark.parametrize("log_kind", [InMemorySagaLog, BufferedLog])
async def test_callers_waiting_for_a_cancelled_run_carry_the_saga_on(log_kind: Any) -> None:
    """The caller that ran a saga was cancelled (a request timed out, say); the callers
    that joined it were not, and must get the saga's outcome, not a CancelledError."""
    gate = asyncio.Event()
    calls: list[str] = []

    async def reserve(ctx: StepContext) -> int:
        calls.append("reserve")
        await gate.wait()
        return 1

    def charge(ctx: StepContext) -> int:
        calls.append("charge")
        return 2

    saga = SagaDefinition("order", [Step("reserve", reserve), Step("charge", charge)])
    log = log_kind()
    orchestrator = Orchestrator(log)
    runner = asyncio.create_task(orchestrator.run(saga, "order-1"))
    await asyncio.sleep(0)
    joiners = [asyncio.create_task(orchestrator.run(saga, "order-1")) for _ in range(2)]
    await asyncio.sleep(0)
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    gate.set()
    async with asyncio.timeout(5):
        outcomes = await asyncio.gather(*joiners)
    assert outcomes[0] == outcomes[1]
    assert outcomes[0].ok
    assert dict(outcomes[0].results) == {"reserve": 1, "charge": 2}
    # The step under way when the runner stopped runs again (at least once), the rest once.
    assert calls == ["reserve", "reserve", "charge"]
    assert await unfinished(log) == []


async def test_a_cancelled_joiner_of_a_cancelled_run_stays_cancelled() -> None:
    gate, saga = _gated()
    orchestrator = Orchestrator()
    runner, joiner = await _run_and_join(orchestrator, saga, "order-1")
    joiner.cancel()
    runner.cancel()
    for task in (joiner, runner):
        with pytest.raises(asyncio.CancelledError):
            await task
    # Nobody carried it on: it waits, in the log, for recover().
    assert await unfinished(orchestrator.log) == ["order-1"]
    gate.set()
    outcomes = await orchestrator.recover({"slow": saga})
    assert [o.ok for o in outcomes] == [True]


async def test_result_calls_that_timed_out_leave_nothing_behind() -> None:
    """result() joined a run here in a shielded task of its own: each call that timed out
    left that task and a waiter behind for as long as the run lasted (without bound for a
    saga stuck in a step), and when the run's caller was cancelled those orphans carried
    the saga on for callers long gone."""
    gate, saga = _gated()
    orchestrator = Orchestrator()
    runner = asyncio.create_task(orchestrator.run(saga, "order-1"))
    await asyncio.sleep(0)
    tasks = len(asyncio.all_tasks())
    for _ in range(100):
        with pytest.raises(TimeoutError):
            await orchestrator.result("order-1", timeout=0.001)
    assert len(asyncio.all_tasks()) == tasks
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    gate.set()
    await asyncio.sleep(0.05)
    assert len(asyncio.all_tasks()) == tasks - 1
    # Nobody carried it on: it waits, in the log, for recover().
    assert await unfinished(orchestrator.log) == ["order-1"]
    # A result() caller still waiting when the runner is cancelled carries it on.
    gate, saga = _gated()
    runner = asyncio.create_task(orchestrator.run(saga, "order-2"))
    await asyncio.sleep(0)
    waiting = asyncio.create_task(orchestrator.result("order-2", timeout=5))
    await asyncio.sleep(0)
    runner.cancel()
    gate.set()
    assert (await waiting).ok


async def test_a_failing_compensation_leaves_the_saga_failed() -> None:
    log = InMemorySagaLog()
    shop = Shop(n=4, fail_at=3, stuck_at=1)
    outcome = await Orchestrator(log).run(shop.saga, "order-1")
    assert shop.calls[-2:] == ["undo s2", "undo s1"]
    assert "undo s0" not in shop.calls
    assert outcome.state is SagaStatus.FAILED
    assert not outcome.ok
    assert outcome.stuck_step == "s1"
    assert outcome.stuck_error == "RuntimeError: cannot undo s1"
    assert outcome.compensated_steps == ("s2",)
    assert outcome.failed_step == "s3"
    assert kinds((await log.read("order-1"))[-2:]) == kinds(
        [CompensationFailed(1, "RuntimeError: cannot undo s1"), SagaFinished(SagaStatus.FAILED)]
    )
    assert await unfinished(log) == []


async def test_crashed_saga_resumes_in_a_new_orchestrator() -> None:
    log = InMemorySagaLog()
    calls: list[str] = []
    entered, gate = asyncio.Event(), asyncio.Event()

    async def one(ctx: StepContext) -> int:
        calls.append("one")
        return ctx.data["base"]

    async def two(ctx: StepContext) -> int:
        calls.append("two")
        entered.set()
        await gate.wait()
        return ctx.results["one"] + 1

    async def three(ctx: StepContext) -> int:
        calls.append("three")
        return ctx.results["two"] + 1

    saga = SagaDefinition("count", [Step("one", one), Step("two", two), Step("three", three)])
    task = asyncio.create_task(Orchestrator(log).run(saga, "c-1", {"base": 10}))
    async with asyncio.timeout(5):
        await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == ["one", "two"]
    assert await unfinished(log) == ["c-1"]

    gate.set()
    outcomes = await Orchestrator(log).recover({"count": saga})
    assert calls == ["one", "two", "two", "three"]
    assert [o.saga_id for o in outcomes] == ["c-1"]
    assert outcomes[0].ok
    assert outcomes[0].results == {"one": 10, "two": 11, "three": 12}
    assert await unfinished(log) == []
    records = await log.read("c-1")
    assert [type(r).__name__ for r in records] == [
        "SagaStarted", "StepStarted", "StepCompleted",
        "StepStarted", "StepStarted",  # announced again on resuming
        "StepCompleted", "StepStarted", "StepCompleted", "SagaFinished",
    ]  # fmt: skip
    # Recovering again finds nothing to do.
    assert await Orchestrator(log).recover({"count": saga}) == []


async def test_recover_skips_sagas_this_orchestrator_is_running() -> None:
    log = InMemorySagaLog()
    calls: list[str] = []
    entered, gate = asyncio.Event(), asyncio.Event()

    async def slow(ctx: StepContext) -> None:
        calls.append(ctx.saga_id)
        entered.set()
        await gate.wait()

    saga = SagaDefinition("slow", [Step("slow", slow)])
    orchestrator = Orchestrator(log)
    task = asyncio.create_task(orchestrator.run(saga, "busy"))
    async with asyncio.timeout(5):
        await entered.wait()
    await log.create(
        "idle", [SagaStarted("slow", ("slow",), {}), StepStarted(0)], owner=None, ttl=1
    )
    gate.set()  # "idle" runs to its end at once; "busy" is not waited for by recover
    async with asyncio.timeout(5):
        outcomes = await orchestrator.recover({"slow": saga})
        busy = await task
    assert [o.saga_id for o in outcomes] == ["idle"]
    assert busy.ok
    assert calls == ["busy", "idle"]


async def test_recover_carries_on_past_a_saga_without_its_definition() -> None:
    """It used to stop at the first saga whose definition was missing: the rest were
    never recovered. Now it carries them on and reports the missing ones."""
    log = InMemorySagaLog()
    shop = Shop(n=1)
    await log.create("o-1", [SagaStarted("order", ("a",), {}), StepStarted(0)], owner=None, ttl=1)
    await log.create("o-2", [SagaStarted("shop", ("s0",), {}), StepStarted(0)], owner=None, ttl=1)
    recovered = await Orchestrator(log).recover({"shop": shop.saga})
    assert [o.saga_id for o in recovered] == ["o-2"]
    assert recovered.missing == {"o-1": "order"}
    assert shop.calls == ["do s0"]
    # Left to a worker that has the definition: unleased, still unfinished.
    summary = await log.status("o-1")
    assert summary is not None
    assert summary.owner is None
    assert await unfinished(log) == ["o-1"]


@pytest.mark.parametrize("step", [1, 7], ids=["out-of-order", "out-of-range"])
async def test_a_log_that_cannot_be_replayed_is_a_saga_error(step: int) -> None:
    log = InMemorySagaLog()
    await log.create(
        "o-1", [SagaStarted("shop", ("s0", "s1"), {}), StepCompleted(step)], owner=None, ttl=1
    )
    shop = Shop(n=2)
    with pytest.raises(SagaError, match="cannot be replayed") as excinfo:
        await Orchestrator(log).run(shop.saga, "o-1")
    assert excinfo.value.saga_id == "o-1"
    assert shop.calls == []


@pytest.mark.parametrize("saga_id", ["", 5, None, b"id"])
async def test_bad_saga_id_is_a_definition_error(saga_id: Any) -> None:
    shop = Shop(n=1)
    with pytest.raises(DefinitionError) as excinfo:
        await Orchestrator().run(shop.saga, saga_id)
    assert excinfo.value.field == "saga_id"
    assert shop.calls == []


@pytest.mark.parametrize("data", [[("a", 1)], "abc", 3])
async def test_bad_data_is_a_definition_error(data: Any) -> None:
    with pytest.raises(DefinitionError) as excinfo:
        await Orchestrator().run(Shop(n=1).saga, "o-1", data)
    assert excinfo.value.field == "data"


async def test_saga_must_be_a_definition() -> None:
    with pytest.raises(DefinitionError) as excinfo:
        await Orchestrator().run("shop", "o-1")  # type: ignore[arg-type]
    assert excinfo.value.field == "saga"


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("retry_for", math.nan),  # would retry an outage for ever
        ("retry_for", -1.0),
        ("retry_for", math.inf),
        ("retry_for", "30"),
        ("poll_interval", 0.0),  # would poll a held saga in a busy loop
        ("poll_interval", math.nan),
        ("poll_interval", True),
        ("lease_ttl", 0),
    ],
)
def test_bad_timing_options_are_definition_errors_naming_the_option(
    option: str, value: Any, tmp_path: Path
) -> None:
    db = tmp_path / "never.db"
    with pytest.raises(DefinitionError) as excinfo:
        Orchestrator(f"sqlite:///{db}", **{option: value})
    assert excinfo.value.field == option
    assert not db.exists()  # refused before the URL was opened


@pytest.mark.parametrize("seconds", [math.nan, -1.0, math.inf, "5", True])
async def test_result_refuses_a_timeout_that_is_not_seconds(seconds: Any) -> None:
    orchestrator = Orchestrator()
    await orchestrator.start(Shop(n=1).saga, "o-1")
    with pytest.raises(DefinitionError) as excinfo:
        await orchestrator.result("o-1", timeout=seconds)
    assert excinfo.value.field == "timeout"


@pytest.mark.parametrize("concurrency", [0, -3, 2.0, "4", True])
async def test_serve_refuses_a_concurrency_that_is_not_a_count(concurrency: Any) -> None:
    # 0 used to poll for ever without ever running a saga.
    with pytest.raises(DefinitionError) as excinfo:
        await asyncio.wait_for(Orchestrator().serve(concurrency=concurrency), 5)
    assert excinfo.value.field == "concurrency"


async def test_open_by_url() -> None:
    orchestrator = Orchestrator("memory://")
    assert isinstance(orchestrator.log, InMemorySagaLog)
    assert (await orchestrator.run(Shop(n=2).saga, "o-1")).ok
    assert isinstance(open_saga_log("MEMORY://"), InMemorySagaLog)
    log = InMemorySagaLog()
    assert Orchestrator(log).log is log


@pytest.mark.parametrize("opener", [Orchestrator, open_saga_log, open_event_bus])
def test_unknown_scheme_lists_the_available_ones(opener: Any) -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        opener("foo://x")
    assert "foo://" in str(excinfo.value)
    assert "available: " in str(excinfo.value)
    assert "memory://" in str(excinfo.value)


@pytest.mark.parametrize("url", ["memory", "", "memory:/x", "/var/lib/sagas.db"])
@pytest.mark.parametrize("opener", [Orchestrator, open_saga_log, open_event_bus])
def test_malformed_url_is_a_configuration_error(opener: Any, url: str) -> None:
    with pytest.raises(ConfigurationError, match="malformed"):
        opener(url)


async def test_the_recorded_input_does_not_follow_the_callers_dict() -> None:
    seen: list[object] = []

    def remember(ctx: StepContext) -> None:
        seen.append(ctx.data["guest"])

    saga = SagaDefinition("stay", [Step("book", remember)])
    data = {"guest": "Ada"}
    log = InMemorySagaLog()
    await Orchestrator(log).run(saga, "stay-1", data)
    data["guest"] = "Grace"
    started = (await log.read("stay-1"))[0]
    assert isinstance(started, SagaStarted)
    assert started.data == {"guest": "Ada"}
    assert seen == ["Ada"]


@pytest.mark.parametrize("data", [None, {}])
async def test_an_empty_input_is_read_only_and_recorded_as_empty(data: Any) -> None:
    log = InMemorySagaLog()
    seen: list[Any] = []

    def look(ctx: StepContext) -> None:
        seen.append(ctx.data)
        with pytest.raises(TypeError):
            ctx.data["sneaked"] = 1  # type: ignore[index]

    saga = SagaDefinition("look", [Step("a", look)])
    assert (await Orchestrator(log).run(saga, "o-1", data)).ok
    assert seen == [{}]
    started = (await log.read("o-1"))[0]
    assert isinstance(started, SagaStarted)
    assert dict(started.data) == {}


async def test_a_failing_step_leaves_no_reference_cycle() -> None:
    """A caught exception whose traceback holds the driver's frame would be a cycle per
    failed saga, freed only by the cyclic collector: the node fails a third of its sagas."""

    def fail(ctx: StepContext) -> None:
        raise Boom("no")

    def undo_fails(ctx: StepContext) -> None:
        raise RuntimeError("stuck")

    saga = SagaDefinition("cycles", [Step("a", lambda ctx: 1, undo_fails), Step("b", fail)])
    orchestrator = Orchestrator()
    await orchestrator.run(saga, "warm-up")
    gc.collect()
    gc.disable()
    try:
        for n in range(20):
            outcome = await orchestrator.run(saga, f"o-{n}")
            assert outcome.state is SagaStatus.FAILED
        assert gc.collect() == 0
    finally:
        gc.enable()


async def test_sagas_read_back_alike() -> None:
    saga = SagaDefinition("happy", [Step("a", lambda ctx: None), Step("b", lambda ctx: None)])
    log = InMemorySagaLog()
    orchestrator = Orchestrator(log)
    for saga_id in ("h-1", "h-2"):
        assert (await orchestrator.run(saga, saga_id)).ok
    first, second = await log.read("h-1"), await log.read("h-2")
    assert first == second
    first.append(first[-1])  # a reader's copy: changing it changes nothing kept
    assert await log.read("h-2") == second
    assert await unfinished(log) == []


async def test_a_sync_compensation_that_returns_an_awaitable_is_awaited() -> None:
    """Compensations are called inline, as actions are: what one returns is awaited
    when it is awaitable, and a failure while awaiting it is the compensation's."""
    undone: list[str] = []

    async def later(name: str, fail: bool) -> None:
        await asyncio.sleep(0)
        if fail:
            raise RuntimeError(f"cannot undo {name}")
        undone.append(name)

    def undo_a(ctx: StepContext) -> Any:
        return later(ctx.step, fail=False)

    def undo_b(ctx: StepContext) -> Any:
        return later(ctx.step, fail=True)

    def ok(ctx: StepContext) -> None:
        return None

    def boom(ctx: StepContext) -> None:
        raise Boom("no")

    undone_first = SagaDefinition("deferred", [Step("a", ok, undo_a), Step("c", boom)])
    outcome = await Orchestrator().run(undone_first, "o-1")
    assert outcome.state is SagaStatus.COMPENSATED
    assert undone == ["a"]

    stuck = SagaDefinition("deferred-stuck", [Step("b", ok, undo_b), Step("c", boom)])
    outcome = await Orchestrator().run(stuck, "o-2")
    assert outcome.state is SagaStatus.FAILED
    assert (outcome.stuck_step, outcome.stuck_error) == ("b", "RuntimeError: cannot undo b")


_ONE = SagaDefinition("one", [Step("a", lambda ctx: None)])


@pytest.mark.parametrize("sagas", [_ONE, None, 5, "one", [_ONE, 5]])
def test_sagas_that_are_not_definitions_are_refused_naming_the_option(sagas: Any) -> None:
    """One definition on its own or None raised a bare TypeError (not iterable)."""
    with pytest.raises(DefinitionError) as excinfo:
        Orchestrator(sagas=sagas)
    assert excinfo.value.field == "sagas"


@pytest.mark.parametrize("sagas", [_ONE, 5, "one", [_ONE, 5], {"one": 5}, {"one": "one"}])
async def test_recover_refuses_sagas_that_are_not_definitions_naming_the_option(
    sagas: Any,
) -> None:
    """recover([5]) raised AttributeError ('int' object has no attribute 'name')."""
    orchestrator = Orchestrator()
    with pytest.raises(DefinitionError) as excinfo:
        await orchestrator.recover(sagas)
    assert excinfo.value.field == "sagas"
    assert await orchestrator.recover({"one": _ONE}) == []
    assert await orchestrator.recover([_ONE]) == []


@pytest.mark.parametrize("status", [5, object(), [5]])
async def test_list_of_a_status_that_is_not_one_names_the_option(status: Any) -> None:
    with pytest.raises(DefinitionError) as excinfo:
        await Orchestrator().list(status=status)
    assert excinfo.value.field == "status"


@pytest.mark.parametrize("log", [None, 5, b"memory://", object()])
def test_a_log_that_is_neither_a_saga_log_nor_a_url_is_refused_naming_it(log: Any) -> None:
    """Orchestrator(None) (an unset environment variable, say) raised AttributeError:
    'NoneType' object has no attribute 'durable'."""
    with pytest.raises(DefinitionError) as excinfo:
        Orchestrator(log)
    assert excinfo.value.field == "log"
