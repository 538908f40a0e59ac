"""Workers sharing a saga log: start/result/serve, leases, takeover, reconnection, and
what a step is told (idempotency key, attempt). On the in-memory log, and on the
in-memory log acting durable (flushes, round trips)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from saga_logs import BufferedLog, FlakyLog, start_in, unfinished
from worker_sagas import STUBBORN

from sagakit.adapters.memory_log import InMemorySagaLog
from sagakit.cli.worker import load_sagas
from sagakit.core.records import (
    CompensationCompleted,
    CompensationStarted,
    SagaStatus,
    StepCompleted,
    StepStarted,
)
from sagakit.core.saga import SagaDefinition, Step, StepContext
from sagakit.errors import (
    BackendRefused,
    BackendUnavailable,
    ConfigurationError,
    LeaseLost,
    SagaError,
    SagaIdConflict,
)
from sagakit.orchestration import Orchestrator
from sagakit.ports.saga_log import Claim

_ROOT = Path(__file__).resolve().parent.parent


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def recording_saga(name: str = "trip", n: int = 3, fail_at: int | None = None) -> Any:
    """A saga whose steps record (step, attempt, idempotency key) as they run."""
    calls: list[tuple[str, int, str]] = []

    def action(i: int) -> Any:
        def run(ctx: StepContext) -> int:
            calls.append((f"do {ctx.step}", ctx.attempt, ctx.idempotency_key))
            if i == fail_at:
                raise RuntimeError("refused")
            return i

        return run

    def undo(ctx: StepContext) -> None:
        calls.append((f"undo {ctx.step}", ctx.attempt, ctx.idempotency_key))

    saga = SagaDefinition(name, [Step(f"s{i}", action(i), undo) for i in range(n)])
    return saga, calls


# --- start, result, serve -------------------------------------------------------------


@pytest.mark.parametrize("log_kind", [InMemorySagaLog, BufferedLog])
async def test_start_records_and_a_serving_worker_runs_it(log_kind: Any) -> None:
    log = log_kind()
    saga, calls = recording_saga()
    client = Orchestrator(log)
    assert await client.start(saga, "t-1", {"who": "ada"}) is True
    assert await client.start(saga, "t-1", {"who": "ada"}) is False  # the same request again
    assert calls == []
    summary = await client.status("t-1")
    assert summary is not None
    assert (summary.status, summary.owner) == (SagaStatus.RUNNING, None)
    async with Orchestrator(log, sagas=[saga], poll_interval=0.01) as worker:
        outcome = await client.result("t-1", timeout=5)
        assert worker.owner != client.owner
    assert outcome.ok
    assert outcome.results == {"s0": 0, "s1": 1, "s2": 2}
    assert [c[:2] for c in calls] == [("do s0", 1), ("do s1", 1), ("do s2", 1)]
    assert [s.saga_id for s in await client.list(status=SagaStatus.COMPLETED)] == ["t-1"]
    assert await client.list(status=[SagaStatus.RUNNING]) == []


async def test_start_of_a_used_id_with_another_input_conflicts() -> None:
    saga, _ = recording_saga()
    orchestrator = Orchestrator()
    await orchestrator.start(saga, "t-1", {"who": "ada"})
    with pytest.raises(SagaIdConflict):
        await orchestrator.start(saga, "t-1", {"who": "grace"})


async def test_result_of_an_unknown_saga_and_a_timeout() -> None:
    saga, _ = recording_saga()
    orchestrator = Orchestrator()
    with pytest.raises(SagaError, match="no such saga"):
        await orchestrator.result("nope", timeout=1)
    await orchestrator.start(saga, "t-1")  # nobody serves it
    # It says which saga and how long: asyncio's own TimeoutError is blank.
    with pytest.raises(TimeoutError, match=r"saga 't-1': no outcome within 0\.05 s"):
        await orchestrator.result("t-1", timeout=0.05)


async def test_result_without_the_definition_reports_the_compensation() -> None:
    saga, _ = recording_saga(fail_at=2)
    log = InMemorySagaLog()
    await Orchestrator(log).run(saga, "t-1")
    outcome = await Orchestrator(log).result("t-1")
    assert outcome.state is SagaStatus.COMPENSATED
    assert outcome.compensated_steps == ("s1", "s0")
    assert outcome.failed_step == "s2"


async def test_recover_reports_what_it_could_not_carry_on_and_goes_on() -> None:
    log = InMemorySagaLog()
    saga, _ = recording_saga()
    await Orchestrator(log).start(saga, "a")
    await Orchestrator(log).start(SagaDefinition("gone", []), "b")
    await Orchestrator(log).start(saga, "c")
    recovered = await Orchestrator(log, sagas=[saga]).recover()
    assert sorted(o.saga_id for o in recovered) == ["a", "c"]
    assert recovered.missing == {"b": "gone"}
    assert await unfinished(log) == ["b"]


# --- leases -------------------------------------------------------------------------


async def test_run_of_a_saga_held_by_a_live_worker_waits_for_its_outcome() -> None:
    log = InMemorySagaLog()
    gate = asyncio.Event()
    calls: list[str] = []

    async def slow(ctx: StepContext) -> int:
        calls.append(f"slow by {ctx.attempt}")
        await gate.wait()
        return 7

    saga = SagaDefinition("slow", [Step("slow", slow)])
    holder = Orchestrator(log, owner="holder")
    other = Orchestrator(log, owner="other", poll_interval=0.01)
    held = asyncio.create_task(holder.run(saga, "s-1"))
    await asyncio.sleep(0.01)
    waiting = asyncio.create_task(other.run(saga, "s-1"))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    gate.set()
    async with asyncio.timeout(5):
        assert (await waiting) == (await held)
    assert calls == ["slow by 1"]


async def test_a_saga_whose_holder_died_is_taken_over_when_its_lease_expires() -> None:
    clock = Clock()
    log = InMemorySagaLog(clock=clock)
    saga, calls = recording_saga(n=2)
    # A worker that died after announcing the first step: its lease lives on, for now.
    journal = await log.create(
        "t-1",
        [*(await _opening(saga))],
        owner="dead",
        ttl=30,
    )
    assert journal is not None
    taker = Orchestrator(log, owner="taker", poll_interval=0.01)
    task = asyncio.create_task(taker.run(saga, "t-1"))
    await asyncio.sleep(0.05)
    assert not task.done()  # the lease is live: it waits
    assert await taker.recover() == []  # and recovery leaves it alone
    clock.now += 31
    async with asyncio.timeout(5):
        outcome = await task
    assert outcome.ok
    # The step announced by the dead worker runs again, as attempt 2.
    assert [c[:2] for c in calls] == [("do s0", 2), ("do s1", 1)]


@pytest.mark.parametrize("log_kind", [InMemorySagaLog, BufferedLog])
@pytest.mark.parametrize("how", ["recover", "serve"])
async def test_a_worker_restarted_under_its_name_takes_its_sagas_over_at_once(
    log_kind: Any, how: str
) -> None:
    clock = Clock()
    inner = InMemorySagaLog(clock=clock)
    log = inner if log_kind is InMemorySagaLog else BufferedLog(inner)
    saga, calls = recording_saga(n=2)
    # "w1" died after announcing the first step; its lease has 30 s to go.
    journal = await log.create("t-1", await _opening(saga), owner="w1", ttl=30)
    assert journal is not None
    await journal.flush()
    # Another name leaves it alone while the lease lives.
    assert await Orchestrator(log, sagas=[saga], owner="w2").recover() == []
    # The same name, in a new process, takes it over at once (the clock never moves).
    again = Orchestrator(log, sagas=[saga], owner="w1", poll_interval=0.01)
    if how == "recover":
        recovered = await again.recover()
        assert [o.saga_id for o in recovered] == ["t-1"]
    else:
        async with again, asyncio.timeout(5):
            outcome = await again.result("t-1")
        assert outcome.ok
    assert [c[:2] for c in calls] == [("do s0", 2), ("do s1", 1)]
    summary = await log.status("t-1")
    assert summary is not None
    assert (summary.status, summary.owner) == (SagaStatus.COMPLETED, None)


async def test_recover_leaves_the_sagas_its_own_runs_drive_alone() -> None:
    log = InMemorySagaLog()
    gate = asyncio.Event()
    attempts: list[int] = []

    async def slow(ctx: StepContext) -> None:
        attempts.append(ctx.attempt)
        await gate.wait()

    saga = SagaDefinition("slow", [Step("slow", slow)])
    worker = Orchestrator(log, sagas=[saga], owner="w1")
    running = asyncio.create_task(worker.run(saga, "s-1"))
    await asyncio.sleep(0.01)
    # Leased to "w1", and driven here: not left behind by anyone.
    assert await worker.recover() == []
    gate.set()
    async with asyncio.timeout(5):
        assert (await running).ok
    assert attempts == [1]


async def _opening(saga: SagaDefinition) -> list[Any]:
    from sagakit.core.machine import Begin, decide, initial_state

    return list(decide(saga.plan, initial_state(), Begin({})).records)


@pytest.mark.parametrize("log_kind", [InMemorySagaLog, BufferedLog])
async def test_a_lost_lease_stops_the_driver_before_its_next_action(log_kind: Any) -> None:
    clock = Clock()
    inner = InMemorySagaLog(clock=clock)
    log = inner if log_kind is InMemorySagaLog else BufferedLog(inner)
    entered, gate = asyncio.Event(), asyncio.Event()
    calls: list[str] = []

    async def first(ctx: StepContext) -> int:
        calls.append(f"first by {ctx.attempt}")
        entered.set()
        await gate.wait()
        return 1

    def second(ctx: StepContext) -> int:
        calls.append("second")
        return 2

    saga = SagaDefinition("pair", [Step("first", first), Step("second", second)])
    stalled = Orchestrator(log, owner="stalled", lease_ttl=10)
    task = asyncio.create_task(stalled.run(saga, "p-1"))
    async with asyncio.timeout(5):
        await entered.wait()
    clock.now += 11  # it stalled past its lease; another worker claims the saga
    claim = await inner.claim("p-1", owner="taker", ttl=1000)
    assert claim is not None
    gate.set()
    await asyncio.sleep(0.05)
    # The stalled worker wrote nothing more and ran nothing more: the saga is the taker's.
    assert calls == ["first by 1"]
    assert [type(r) for r in await inner.read("p-1")] == [type(r) for r in claim.records]
    assert not task.done()  # its caller waits for the new holder's outcome
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_journal_fenced_off_raises_lease_lost() -> None:
    log = InMemorySagaLog()
    saga, _ = recording_saga()
    journal = await log.create("t-1", await _opening(saga), owner="a", ttl=0.001)
    assert journal is not None
    await asyncio.sleep(0.01)  # a's lease expires
    assert await log.claim("t-1", owner="b", ttl=10) is not None
    with pytest.raises(LeaseLost):
        journal.stage([StepCompleted(0, 0)])


async def test_leases_are_renewed_while_a_step_runs() -> None:
    log = InMemorySagaLog()
    gate = asyncio.Event()

    async def slow(ctx: StepContext) -> None:
        await gate.wait()

    saga = SagaDefinition("slow", [Step("slow", slow)])
    runner = Orchestrator(log, owner="runner", lease_ttl=0.15)
    task = asyncio.create_task(runner.run(saga, "s-1"))
    for _ in range(4):  # well past the first lease's end
        await asyncio.sleep(0.1)
        assert await Orchestrator(log, owner="thief").recover() == []
    summary = await log.status("s-1")
    assert summary is not None
    assert summary.owner == "runner"
    gate.set()
    assert (await task).ok
    await runner.close()


async def test_a_clean_stop_gives_the_leases_up() -> None:
    log = InMemorySagaLog()
    entered = asyncio.Event()
    calls: list[str] = []

    async def slow(ctx: StepContext) -> None:
        calls.append(f"{ctx.saga_id} #{ctx.attempt}")
        entered.set()
        await asyncio.sleep(3600)

    saga = SagaDefinition("slow", [Step("slow", slow)])
    client = Orchestrator(log)
    await client.start(saga, "s-1")
    async with Orchestrator(log, sagas=[saga], owner="w1", poll_interval=0.01):
        async with asyncio.timeout(5):
            await entered.wait()
        summary = await log.status("s-1")
        assert summary is not None
        assert summary.owner == "w1"
    summary = await log.status("s-1")
    assert summary is not None
    assert summary.owner is None  # given up: another worker may take it at once
    claims = await log.claim_next(owner="w2", ttl=10, limit=5)
    assert [c.journal.saga_id for c in claims] == ["s-1"]
    assert calls == ["s-1 #1"]


# --- reconnecting ---------------------------------------------------------------------


async def test_a_worker_rides_out_a_backend_restart() -> None:
    log = FlakyLog()
    saga, calls = recording_saga()
    orchestrator = Orchestrator(log, retry_for=5)
    log.failures = 3  # the create and the flushes after it fail, then the server is back
    outcome = await orchestrator.run(saga, "t-1")
    assert outcome.ok
    assert log.failed == 3
    assert [c[0] for c in calls] == ["do s0", "do s1", "do s2"]


async def test_a_backend_down_for_longer_than_retry_for_is_an_error() -> None:
    log = FlakyLog()
    saga, _ = recording_saga()
    log.failures = 1000
    with pytest.raises(BackendUnavailable):
        await Orchestrator(log, retry_for=0.2).run(saga, "t-1")


async def test_a_flush_that_fails_for_a_while_writes_each_record_once() -> None:
    log = FlakyLog()
    saga, _ = recording_saga()
    orchestrator = Orchestrator(log, retry_for=5)
    log.failures = 0
    task = asyncio.create_task(orchestrator.run(saga, "t-1"))
    await asyncio.sleep(0)
    log.failures = 2
    assert (await task).ok
    records = await log.read("t-1")
    assert [type(r).__name__ for r in records].count("StepCompleted") == 3


# --- what a step is told ------------------------------------------------------------


async def test_idempotency_keys_are_stable_per_saga_step_and_kind() -> None:
    log = InMemorySagaLog()
    saga, calls = recording_saga(fail_at=2)
    await Orchestrator(log).run(saga, "t-1")
    keys = {what: key for what, _, key in calls}
    assert len(set(keys.values())) == len(keys)  # do s0, do s1, do s2, undo s1, undo s0
    assert all(len(k) == 64 and int(k, 16) >= 0 for k in keys.values())
    again, again_calls = recording_saga(fail_at=2)
    await Orchestrator().run(again, "t-1")  # another log, the same saga id: the same keys
    assert {what: key for what, _, key in again_calls} == keys
    other, other_calls = recording_saga(fail_at=2)
    await Orchestrator().run(other, "t-2")
    assert not set(keys.values()) & {key for _, _, key in other_calls}


async def test_a_resumed_compensation_is_told_its_attempt() -> None:
    log = InMemorySagaLog()
    saga, calls = recording_saga(n=2, fail_at=1)
    opening = await _opening(saga)
    await log.create(
        "t-1",
        [
            *opening,
            StepCompleted(0, 0),
            StepStarted(1),
            *[],
        ],
        owner=None,
        ttl=1,
    )
    journal = (await log.claim("t-1", owner="x", ttl=10)).journal  # type: ignore[union-attr]
    from sagakit.core.records import StepFailed

    journal.stage([StepFailed(1, "RuntimeError: refused"), CompensationStarted(0)])
    await log.release(journal)
    [outcome] = await Orchestrator(log).recover({"trip": saga})
    assert outcome.state is SagaStatus.COMPENSATED
    assert [c[:2] for c in calls] == [("undo s0", 2)]
    assert (await log.read("t-1"))[-3:-1] == [CompensationStarted(0, 2), CompensationCompleted(0)]


async def test_a_worker_leaves_a_saga_it_has_no_definition_for_without_spinning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = InMemorySagaLog()
    saga, calls = recording_saga()
    client = Orchestrator(log)
    await client.start(SagaDefinition("elsewhere", []), "x-1")
    await client.start(saga, "t-1")
    async with Orchestrator(log, sagas=[saga], lease_ttl=60, poll_interval=0.02):
        assert (await client.result("t-1", timeout=5)).ok
        await asyncio.sleep(0.3)
    warnings = [r for r in caplog.records if "no definition" in r.getMessage()]
    assert len(warnings) == 1  # claimed once, then held unrenewed until its lease expires
    assert await unfinished(log) == ["x-1"]
    assert len(calls) == 3


async def test_a_worker_stopping_gives_back_the_sagas_it_had_no_definition_for() -> None:
    # The operator who forgot a definition stops the worker and starts it again with
    # it: the saga must run at once, not after the first worker's lease (60 s here).
    log = InMemorySagaLog()
    saga, calls = recording_saga("elsewhere", n=1)
    await Orchestrator(log).start(saga, "x-1")
    async with Orchestrator(log, lease_ttl=60, poll_interval=0.02) as forgetful:
        for _ in range(100):
            status = await log.status("x-1")
            if status is not None and status.owner == forgetful.owner:
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("the worker never claimed the saga")
    status = await log.status("x-1")
    assert status is not None
    assert status.owner is None
    async with Orchestrator(log, sagas=[saga], lease_ttl=60, poll_interval=0.02) as fixed:
        assert (await fixed.result("x-1", timeout=5)).ok
    assert len(calls) == 1


async def test_result_asked_as_the_run_ends_gets_its_outcome() -> None:
    """result() once joined a run in a task of its own; a run that ended before that
    task started must not leave it waiting for ever."""
    orch = Orchestrator()
    gate = asyncio.Event()

    async def slow(ctx: StepContext) -> None:
        await gate.wait()

    saga = SagaDefinition("slow", [Step("a", slow)])
    running = asyncio.ensure_future(orch.run(saga, "x"))
    await asyncio.sleep(0)  # the run now waits at its step
    gate.set()  # it ends at the next turn of the loop, before result()'s joiner starts
    outcome = await orch.result("x", timeout=2)
    assert outcome.state is SagaStatus.COMPLETED
    assert (await running) == outcome


class RefusingLog(InMemorySagaLog):
    """Answers ``answers`` claims, then refuses every one for good (as PostgreSQL
    does for a database that does not exist)."""

    def __init__(self, answers: int) -> None:
        super().__init__()
        self.answers = answers
        self.claims = 0

    async def claim_next(self, *, owner: str, ttl: float, limit: int) -> list[Claim]:
        self.claims += 1
        if self.claims > self.answers:
            raise BackendRefused("test", 'database "nosuchdb" does not exist')
        return await super().claim_next(owner=owner, ttl=ttl, limit=limit)


async def test_serve_on_a_log_that_refuses_from_the_first_claim_raises() -> None:
    """serve() logged the refusal every second for ever: `sagakit worker` with a
    database that does not exist (or a bad password) never exited."""
    log = RefusingLog(answers=0)
    with pytest.raises(BackendRefused, match="nosuchdb"):
        async with asyncio.timeout(5):
            await Orchestrator(log).serve()
    assert log.claims == 1


async def test_serve_rides_out_a_refusal_once_the_log_has_answered() -> None:
    log = RefusingLog(answers=1)
    serving = asyncio.create_task(Orchestrator(log, poll_interval=0.01).serve())
    await asyncio.sleep(0.2)
    assert not serving.done()
    assert log.claims > 2
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving


TOO_BIG = "x" * 100


class TooBigLog(BufferedLog):
    """Refuses for good to record the step result TOO_BIG (as a database refuses a value
    too large for it)."""

    def _wrap(self, journal: Any) -> Any:
        wrapped = super()._wrap(journal)
        if wrapped is not None:
            flush = wrapped.flush

            async def refusing_flush() -> None:
                if any(type(r) is StepCompleted and r.result == TOO_BIG for r in wrapped._staged):
                    raise BackendRefused("test", "value too large")
                await flush()

            wrapped.flush = refusing_flush
        return wrapped


def _too_big_saga() -> tuple[SagaDefinition, list[int]]:
    attempts: list[int] = []

    def big(ctx: StepContext) -> str:
        attempts.append(ctx.attempt)
        return TOO_BIG

    return SagaDefinition("big", [Step("a", big), Step("b", lambda ctx: None)]), attempts


async def test_recover_tries_a_saga_the_log_refuses_once_and_returns() -> None:
    """A failed saga's lease was given up at once: recover() claimed it again in the
    same call, re-ran its step and failed again, for ever (hundreds of runs a second)."""
    saga, attempts = _too_big_saga()
    log = TooBigLog()
    orchestrator = Orchestrator(log, sagas=[saga])
    await orchestrator.start(saga, "b-1")
    async with asyncio.timeout(5):
        recovered = await orchestrator.recover()
    assert list(recovered) == []
    assert isinstance(recovered.errors["b-1"], BackendRefused)
    assert attempts == [1]
    # Kept, unrenewed, until it expires: then any worker tries it again.
    summary = await log.status("b-1")
    assert summary is not None
    assert summary.owner == orchestrator.owner


async def test_serve_retries_a_saga_the_log_refuses_once_a_lease_not_in_a_loop() -> None:
    saga, attempts = _too_big_saga()
    log = TooBigLog()
    orchestrator = Orchestrator(log, sagas=[saga], lease_ttl=0.4, poll_interval=0.01)
    await orchestrator.start(saga, "b-1")
    serving = asyncio.create_task(orchestrator.serve())
    await asyncio.sleep(1.0)
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    assert 2 <= len(attempts) <= 4, attempts  # once, then once each time the lease ran out


async def test_a_run_the_log_refuses_can_be_run_again_at_once_by_its_caller() -> None:
    saga, attempts = _too_big_saga()
    orchestrator = Orchestrator(TooBigLog())
    for _ in range(2):
        with pytest.raises(BackendRefused):
            await orchestrator.run(saga, "b-1")
    assert attempts == [1, 2]


# --- the worker command ---------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_ends_a_worker_whose_step_ignores_the_first(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """The first signal asks the sagas to stop; a step that ignores cancellation (or
    blocks) kept the worker alive, and signals after it did nothing: only SIGKILL
    ended it. The second one now ends it at once, as a kill would."""
    store = f"sqlite:///{tmp_path / 'sagas.db'}"

    start_in(store, STUBBORN, "stubborn-1")
    mark = tmp_path / "step-started"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(_ROOT / "tests"), str(_ROOT / "src")]),
        "SAGAKIT_TEST_MARK": str(mark),
    }
    command = [sys.executable, "-m", "sagakit.cli", "worker", "--store", store]
    with open(tmp_path / "worker.log", "wb") as err:
        worker = subprocess.Popen(
            [*command, "--sagas", "worker_sagas:STUBBORN"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 30
        while not mark.exists():
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()
            assert time.monotonic() < deadline, "the worker did not start the step"
            time.sleep(0.05)
        worker.send_signal(signum)
        time.sleep(0.5)
        assert worker.poll() is None  # still waiting for the step, as asked
        worker.send_signal(signum)
        code = worker.wait(timeout=15)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert code == -signum, (tmp_path / "worker.log").read_text()


@pytest.mark.parametrize(("spec", "problem"), [(".relative:X", "relative"), ("..up:X", "relative")])
def test_a_worker_spec_naming_a_relative_module_is_refused(spec: str, problem: str) -> None:
    """import_module raised a bare TypeError ('package' argument is required)."""
    with pytest.raises(ConfigurationError, match=problem):
        load_sagas(spec)


async def test_a_run_in_flight_when_its_orchestrator_closes_keeps_its_lease() -> None:
    """close() stopped renewing the leases of run()s still in flight: another worker
    took the saga over mid-step and ran that step again while it still ran here."""
    log = InMemorySagaLog()
    attempts: list[tuple[str, int]] = []

    async def slow(ctx: StepContext) -> None:
        attempts.append((ctx.step, ctx.attempt))
        await asyncio.sleep(0.4)

    saga = SagaDefinition("slow", [Step("a", slow), Step("b", slow)])
    first = Orchestrator(log, lease_ttl=0.15)
    running = asyncio.create_task(first.run(saga, "s-1"))
    await asyncio.sleep(0.05)
    await first.close()
    async with Orchestrator(log, sagas=[saga], lease_ttl=0.15):
        assert (await running).ok
    assert attempts == [("a", 1), ("b", 1)]


async def test_a_refusal_that_stops_serving_under_async_with_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = RefusingLog(answers=0)
    async with Orchestrator(log):
        await asyncio.sleep(0.05)
    assert "nosuchdb" in caplog.text


class StopWorking(BaseException):
    """A library's own request to stop (as gevent's Timeout or pytest's outcomes are)."""


async def test_a_step_raising_a_base_exception_stops_serve_instead_of_a_hot_loop(
    tmp_path: Path,
) -> None:
    """Given back at once, the saga was claimed again at the next poll and its step
    re-run about a thousand times a second, each with an error line."""
    runs: list[int] = []

    def stop(ctx: StepContext) -> None:
        runs.append(ctx.attempt)
        raise StopWorking("stop")

    saga = SagaDefinition("stopping", [Step("a", stop)])
    url = f"sqlite:///{tmp_path / 'sagas.db'}"
    async with Orchestrator(url, sagas=[saga]) as starter:
        await starter.start(saga, "s-1")
    orchestrator = Orchestrator(url, sagas=[saga], poll_interval=0.01)
    with pytest.raises(StopWorking):
        async with asyncio.timeout(10):
            await orchestrator.serve()
    assert runs == [1]
    # Given back, not stranded: the next worker carries it on at once.
    summary = await orchestrator.status("s-1")
    assert summary is not None
    assert summary.owner is None
    await orchestrator.close()
