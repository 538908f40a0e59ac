"""The in-memory saga log's own rules: leases on its clock, fencing, the caps on finished
sagas (their number and their weight in records), and the JSON rule on values. (The
port's conformance suite runs on it too, in tests/test_memory_backends.py.)"""

from __future__ import annotations

from typing import Any

import pytest

from sagakit.adapters import open_saga_log
from sagakit.adapters.memory_log import (
    DEFAULT_MAX_FINISHED,
    DEFAULT_MAX_RECORDS,
    InMemorySagaLog,
)
from sagakit.core.records import (
    SagaFinished,
    SagaRecord,
    SagaStarted,
    SagaStatus,
    StepCompleted,
    StepStarted,
)
from sagakit.errors import ConfigurationError, LeaseLost, SagaError
from sagakit.ports.saga_log import Journal, SagaLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def opening(data: Any = None) -> list[SagaRecord]:
    return [SagaStarted("order", ("reserve", "charge"), data or {}), StepStarted(0)]


FINISH: list[SagaRecord] = [
    StepCompleted(0, 1),
    StepStarted(1),
    StepCompleted(1, 2),
    SagaFinished(SagaStatus.COMPLETED),
]


async def test_it_is_the_port_and_not_durable() -> None:
    log = InMemorySagaLog()
    assert isinstance(log, SagaLog)
    assert log.durable is False
    journal = await log.create("o-1", opening(), owner="w1", ttl=10)
    assert isinstance(journal, Journal)
    assert journal.version == 2
    assert await log.create("o-1", opening(), owner="w2", ttl=10) is None


async def test_a_claim_fences_the_previous_holder() -> None:
    clock = Clock()
    log = InMemorySagaLog(clock=clock)
    first = await log.create("o-1", opening(), owner="w1", ttl=10)
    assert first is not None
    assert first.lease is not None
    assert await log.claim("o-1", owner="w2", ttl=10) is None  # w1's lease is live
    clock.now += 11
    claim = await log.claim("o-1", owner="w2", ttl=10)
    assert claim is not None
    assert claim.records == opening()
    assert claim.journal.lease is not None
    assert claim.journal.lease.epoch == first.lease.epoch + 1
    with pytest.raises(LeaseLost) as excinfo:
        first.stage([StepCompleted(0, 1)])
    assert excinfo.value.saga_id == "o-1"
    assert await log.read("o-1") == opening()  # nothing written by the stale holder
    assert await log.renew([first], ttl=10) == ["o-1"]
    claim.journal.stage(FINISH)
    await claim.journal.flush()
    assert (await log.status("o-1")).status is SagaStatus.COMPLETED  # type: ignore[union-attr]
    assert await log.claim("o-1", owner="w3", ttl=10) is None  # finished


async def test_claim_next_takes_expired_and_released_sagas_oldest_first() -> None:
    clock = Clock()
    log = InMemorySagaLog(clock=clock)
    held = await log.create("a", opening(), owner="w1", ttl=10)
    await log.create("b", opening(), owner=None, ttl=10)
    released = await log.create("c", opening(), owner="w1", ttl=100)
    assert held is not None
    assert released is not None
    await log.release(released)
    assert [c.journal.saga_id for c in await log.claim_next(owner="w2", ttl=5, limit=10)] == [
        "b",
        "c",
    ]
    assert await log.claim_next(owner="w3", ttl=5, limit=10) == []
    clock.now += 10
    assert [c.journal.saga_id for c in await log.claim_next(owner="w3", ttl=5, limit=1)] == ["a"]
    assert await log.renew([held], ttl=10) == ["a"]


async def test_renew_extends_a_live_lease() -> None:
    clock = Clock()
    log = InMemorySagaLog(clock=clock)
    journal = await log.create("a", opening(), owner="w1", ttl=10)
    assert journal is not None
    clock.now += 8
    assert await log.renew([journal], ttl=10) == []
    assert journal.lease is not None
    assert journal.lease.expires_at == clock.now + 10
    clock.now += 8
    assert await log.claim("a", owner="w2", ttl=10) is None
    summary = await log.status("a")
    assert summary is not None
    assert summary.owner == "w1"


async def test_finished_sagas_beyond_the_cap_are_forgotten_oldest_first() -> None:
    log = InMemorySagaLog(max_finished=2)
    running = await log.create("running", opening(), owner="w", ttl=10)
    assert running is not None
    for saga_id in ("f1", "f2", "f3"):
        journal = await log.create(saga_id, opening(), owner="w", ttl=10)
        assert journal is not None
        journal.stage(FINISH)
    assert await log.read("f1") == []
    assert await log.status("f1") is None
    assert [s.saga_id for s in await log.list()] == ["f3", "f2", "running"]
    # An evicted id is unknown again: it can be created anew.
    assert await log.create("f1", opening(), owner="w", ttl=10) is not None


def test_the_default_cap_and_the_url_option() -> None:
    assert InMemorySagaLog().max_finished == DEFAULT_MAX_FINISHED == 100_000
    log = open_saga_log("memory://?max_finished=5")
    assert isinstance(log, InMemorySagaLog)
    assert log.max_finished == 5
    assert open_saga_log("memory://?max_finished=0").max_finished == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "url",
    ["memory://?max_finished=-1", "memory://?max_finished=x", "memory://?size=3", "memory://host"],
)
def test_bad_url_options_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfigurationError):
        open_saga_log(url)


async def begun(log: InMemorySagaLog, saga_id: str, steps: int) -> Journal:
    """A saga of ``steps`` steps, started and running its first."""
    names = tuple(f"step{n}" for n in range(steps))
    journal = await log.create(
        saga_id, [SagaStarted("order", names, {}), StepStarted(0)], owner="w", ttl=10
    )
    assert journal is not None
    return journal


async def run_whole(log: InMemorySagaLog, saga_id: str, steps: int) -> None:
    """A saga of ``steps`` steps run to its end. Its weight (records plus steps):
    SagaStarted, two records a step and SagaFinished, plus its steps: 3 x steps + 2."""
    journal = await begun(log, saga_id, steps)
    for n in range(steps):
        journal.stage([StepCompleted(n, None)])
        journal.stage([StepStarted(n + 1)] if n + 1 < steps else [])
    journal.stage([SagaFinished(SagaStatus.COMPLETED)])


async def kept(log: InMemorySagaLog) -> list[str]:
    return [s.saga_id for s in reversed(await log.list(limit=1000))]


async def test_finished_sagas_past_the_record_budget_are_forgotten_oldest_first() -> None:
    log = InMemorySagaLog(max_records=30)
    # Running sagas weigh nothing against the budget, however many records they
    # hold, and are never forgotten: this one is over the budget alone.
    running = await begun(log, "running", 20)
    for n in range(19):
        running.stage([StepCompleted(n, None), StepStarted(n + 1)])
    for saga_id in ("l1", "l2", "l3", "l4"):
        await run_whole(log, saga_id, 1)  # weight 5 each: 20
    assert await kept(log) == ["running", "l1", "l2", "l3", "l4"]
    await run_whole(log, "h1", 3)  # weight 11: 31, over 30, so the oldest goes
    assert await kept(log) == ["running", "l2", "l3", "l4", "h1"]
    await run_whole(log, "h2", 3)  # 37: two light sagas go for one heavy one
    assert await kept(log) == ["running", "l4", "h1", "h2"]
    # A forgotten id is unknown again (as past max_finished): created anew.
    assert await log.read("l1") == []
    assert await log.status("l2") is None
    assert await log.create("l1", opening(), owner="w", ttl=10) is not None
    assert len(await log.read("running")) == 40


async def test_a_saga_heavier_than_the_budget_is_forgotten_once_it_finishes() -> None:
    """The bound holds with no exception: the saga that finished last goes too when it
    alone is over the budget, after every older one. A retry of it runs it anew, as
    the retry of any forgotten saga does; a lighter saga after it is kept."""
    log = InMemorySagaLog(max_records=10)
    await run_whole(log, "light", 1)  # weight 5
    await run_whole(log, "heavy", 5)  # weight 17
    assert await kept(log) == []
    assert await log.status("heavy") is None
    assert await log.create("heavy", opening(), owner="w", ttl=10) is not None
    await run_whole(log, "after", 2)  # weight 8
    assert await kept(log) == ["heavy", "after"]


async def test_no_records_budget_keeps_no_finished_saga() -> None:
    log = InMemorySagaLog(max_records=0)
    await run_whole(log, "done", 1)
    running = await begun(log, "running", 2)
    assert await kept(log) == ["running"]
    running.stage([StepCompleted(0, None), StepStarted(1)])
    assert len(await log.read("running")) == 4


async def test_both_caps_apply_whichever_comes_first() -> None:
    log = InMemorySagaLog(max_finished=2, max_records=1000)
    for saga_id in ("a", "b", "c"):
        await run_whole(log, saga_id, 1)
    assert await kept(log) == ["b", "c"]
    log = InMemorySagaLog(max_finished=1000, max_records=10)
    for saga_id in ("a", "b", "c"):
        await run_whole(log, saga_id, 1)
    assert await kept(log) == ["b", "c"]


def test_the_default_record_budget_and_the_url_option() -> None:
    assert InMemorySagaLog().max_records == DEFAULT_MAX_RECORDS == 1_000_000
    log = open_saga_log("memory://?max_finished=5&max_records=7")
    assert isinstance(log, InMemorySagaLog)
    assert (log.max_finished, log.max_records) == (5, 7)
    log = open_saga_log("memory://?max_records=0")
    assert isinstance(log, InMemorySagaLog)
    assert (log.max_finished, log.max_records) == (DEFAULT_MAX_FINISHED, 0)


@pytest.mark.parametrize("raw", ["-1", "x", "1.5", "", "1e6"])
def test_a_bad_record_budget_in_the_url_is_a_configuration_error(raw: str) -> None:
    with pytest.raises(ConfigurationError, match="max_records must be a whole number"):
        open_saga_log(f"memory://?max_finished=5&max_records={raw}")


@pytest.mark.parametrize("value", [-1, True, 1.5, "3", None])
def test_a_bad_record_budget_is_a_configuration_error(value: Any) -> None:
    with pytest.raises(ConfigurationError, match="max_records must be a whole number"):
        InMemorySagaLog(max_records=value)


def test_an_unknown_url_option_names_both_known_ones() -> None:
    with pytest.raises(ConfigurationError, match=r"max_finished=N&max_records=M.*unknown: size"):
        open_saga_log("memory://?size=3")


async def test_values_must_be_json() -> None:
    log = InMemorySagaLog()
    with pytest.raises(SagaError, match="input"):
        await log.create("o-1", opening({"when": object()}), owner="w", ttl=10)
    assert await log.status("o-1") is None
    journal = await log.create("o-2", opening(), owner="w", ttl=10)
    assert journal is not None
    with pytest.raises(SagaError) as excinfo:
        journal.stage([StepCompleted(0, {1, 2})])
    assert excinfo.value.step == "reserve"
    with pytest.raises(SagaError):
        journal.stage([StepCompleted(0, 2**80)])
    assert await log.read("o-2") == opening()


async def test_list_filters_by_status_newest_first_and_history_has_times() -> None:
    clock = Clock()
    log = InMemorySagaLog(clock=clock)
    for saga_id in ("a", "b", "c"):
        journal = await log.create(saga_id, opening(), owner="w", ttl=10)
        assert journal is not None
        clock.now += 1
        if saga_id != "b":
            journal.stage(FINISH)
    assert [s.saga_id for s in await log.list()] == ["c", "b", "a"]
    assert [s.saga_id for s in await log.list(status=SagaStatus.RUNNING)] == ["b"]
    assert [s.saga_id for s in await log.list(status=[SagaStatus.COMPLETED], limit=1)] == ["c"]
    history = await log.history("a")
    assert [h.seq for h in history] == list(range(6))
    assert history[0].recorded_at == 1000.0
    assert history[-1].recorded_at == 1001.0
    assert await log.history("nope") == []


async def test_finished_sagas_share_equal_records_without_mixing_values() -> None:
    """A finished saga's records are kept shared with equal ones of other sagas (memory
    and the cyclic collector): reading them back gives each saga's own values."""
    log = InMemorySagaLog()
    logs = {}
    for saga_id, result in (("a", 1), ("b", True), ("c", 1), ("d", {"k": [1]}), ("e", "x")):
        records = [
            *opening(),
            StepCompleted(0, result),
            StepStarted(1),
            StepCompleted(1, None),
            SagaFinished(SagaStatus.COMPLETED),
        ]
        journal = await log.create(saga_id, records[:2], owner="w", ttl=10)
        assert journal is not None
        journal.stage(records[2:])
        logs[saga_id] = records
    for saga_id, records in logs.items():
        back = await log.read(saga_id)
        assert back == records
        assert [type(r.result) for r in back if type(r) is StepCompleted] == [
            type(r.result) for r in records if type(r) is StepCompleted
        ]
    assert (await log.read("a"))[2] is (await log.read("c"))[2]
    history = await log.history("a")
    assert [h.record for h in history] == logs["a"]


async def test_a_batch_like_one_written_before_is_still_checked_and_fenced() -> None:
    """Batches with no value in them are recognised when they come again (their
    checks skipped); one that carries a value never is, and every batch is fenced."""
    clock = Clock()
    log = InMemorySagaLog(clock=clock)
    plain = (StepStarted(1), StepCompleted(1, None))
    for saga_id in ("a", "b"):
        journal = await log.create(saga_id, opening(), owner="w", ttl=10)
        assert journal is not None
        journal.stage((StepCompleted(0, None), StepStarted(1)))
        clock.now += 1
        journal.stage((*plain[1:], SagaFinished(SagaStatus.COMPLETED)))
        assert (await log.status(saga_id)).status is SagaStatus.COMPLETED  # type: ignore[union-attr]
        with pytest.raises(LeaseLost):  # finished: no more writes
            journal.stage((*plain[1:], SagaFinished(SagaStatus.COMPLETED)))
        assert [h.recorded_at for h in await log.history(saga_id)] == [clock.now - 1] * 4 + [
            clock.now
        ] * 2
    # A float past 2**64 is a JSON value; the integer equal to it is not.
    journal = await log.create("c", opening(), owner="w", ttl=10)
    assert journal is not None
    journal.stage((StepCompleted(0, 2.0**64), StepStarted(1)))
    other = await log.create("d", opening(), owner="w", ttl=10)
    assert other is not None
    with pytest.raises(SagaError):
        other.stage((StepCompleted(0, 2**64), StepStarted(1)))
    assert await log.read("d") == opening()


async def test_status_tells_when_a_saga_was_created_and_last_written() -> None:
    clock = Clock()
    log = InMemorySagaLog(clock=clock)
    journal = await log.create("a", opening(), owner="w", ttl=10)
    assert journal is not None
    clock.now += 5
    journal.stage(FINISH[:2])
    summary = await log.status("a")
    assert summary is not None
    assert (summary.created_at, summary.updated_at, summary.records) == (1000.0, 1005.0, 4)
    clock.now += 5
    journal.stage(FINISH[2:])
    summary = await log.status("a")
    assert summary is not None
    assert (summary.created_at, summary.updated_at, summary.records) == (1000.0, 1010.0, 6)
    assert [h.recorded_at for h in await log.history("a")] == [1000.0] * 2 + [1005.0] * 2 + [
        1010.0
    ] * 2


async def test_a_long_run_past_the_cap_keeps_the_newest_finished_sagas() -> None:
    """Eviction takes the oldest finished saga at once however many went before it
    (it used to scan the slots of every saga evicted so far: slower with each one)."""
    log = InMemorySagaLog(max_finished=10)
    running = await log.create("running", opening(), owner="w", ttl=10)
    assert running is not None
    for n in range(5000):
        journal = await log.create(f"s{n}", opening(), owner="w", ttl=10)
        assert journal is not None
        journal.stage(FINISH)
    kept = [s.saga_id for s in await log.list(limit=100)]
    assert kept == [f"s{n}" for n in reversed(range(4990, 5000))] + ["running"]
    assert await log.read("s4989") == []
