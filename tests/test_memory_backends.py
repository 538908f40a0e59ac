"""The in-memory saga log and event bus: the conformance suites, and what is theirs alone."""

from __future__ import annotations

import asyncio
import logging

import pytest
from conformance.event_bus import EventBusConformance, event, recorder
from conformance.saga_log import SagaLogConformance, opening

from sagakit.adapters import open_event_bus, open_saga_log
from sagakit.adapters.memory_bus import DeliveryFailure, InMemoryEventBus
from sagakit.adapters.memory_log import InMemorySagaLog
from sagakit.core.event import Event
from sagakit.core.records import SagaFinished, SagaStatus
from sagakit.errors import BackendError
from sagakit.ports.event_bus import ALL_EVENTS, EventBus
from sagakit.ports.saga_log import SagaLog


class TestInMemorySagaLog(SagaLogConformance):
    """On a clock of its own, which the suite moves instead of sleeping."""

    async def make_log(self) -> SagaLog:
        self.now = 1_700_000_000.0
        return InMemorySagaLog(clock=lambda: self.now)

    async def advance_clock(self, log: SagaLog, seconds: float) -> None:
        self.now += seconds

    async def test_opened_by_url(self) -> None:
        log = open_saga_log("memory://")
        assert isinstance(log, InMemorySagaLog)
        assert open_saga_log("memory://") is not log  # each URL opens its own log

    async def test_records_stay_readable_after_close(self) -> None:
        log = InMemorySagaLog()
        journal = await log.create("o-1", opening(), owner="w-1", ttl=60)
        assert journal is not None
        journal.stage([SagaFinished(SagaStatus.COMPLETED)])
        await journal.flush()
        await log.close()
        assert len(await log.read("o-1")) == 3


class TestInMemoryEventBus(EventBusConformance):
    async def make_bus(self) -> EventBus:
        return InMemoryEventBus()

    async def test_opened_by_url(self) -> None:
        bus = open_event_bus("memory://")
        assert isinstance(bus, InMemoryEventBus)
        await bus.close()

    async def test_failures_record_the_failing_handler(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        bus = InMemoryEventBus()

        async def broken(e: Event) -> None:
            raise ValueError("no stock")

        await bus.subscribe("OrderPlaced", broken)
        await bus.subscribe("OrderPlaced", recorder([]))
        sent = event("OrderPlaced", "o-3")
        with caplog.at_level(logging.ERROR, logger="sagakit.bus"):
            await bus.publish(sent)
            await self.drain(bus)
        assert bus.failures == [DeliveryFailure(sent, broken.__qualname__, "ValueError: no stock")]
        assert "broken" in bus.failures[0].handler
        assert any("o-3" in r.getMessage() for r in caplog.records)
        await bus.close()

    async def test_drain_inside_a_handler_raises(self) -> None:
        bus = InMemoryEventBus()
        errors: list[BaseException] = []

        async def impatient(e: Event) -> None:
            try:
                await bus.drain()
            except RuntimeError as exc:
                errors.append(exc)
                raise

        await bus.subscribe("Tick", impatient)
        await bus.publish(event("Tick"))
        await self.drain(bus)
        assert len(errors) == 1
        assert "wait for itself" in str(errors[0])
        assert bus.failures[0].error.startswith("RuntimeError: ")
        await bus.close()

    async def test_publish_after_close_raises_backend_error(self) -> None:
        bus = InMemoryEventBus()
        got: list[Event] = []
        await bus.subscribe("Tick", recorder(got))
        await bus.close()
        with pytest.raises(BackendError) as excinfo:
            await bus.publish(event("Tick"))
        assert excinfo.value.backend == "memory://"
        assert "Tick" in str(excinfo.value)
        await self.drain(bus)
        assert got == []

    async def test_close_waits_for_accepted_events(self) -> None:
        bus = InMemoryEventBus()
        done: list[int] = []

        async def slow(e: Event) -> None:
            await asyncio.sleep(0.005)
            done.append(e["n"])

        await bus.subscribe("Tick", slow)
        for i in range(3):
            await bus.publish(event("Tick", n=i))
        await bus.close()
        assert done == [0, 1, 2]

    async def test_publish_returns_before_handlers_run(self) -> None:
        bus = InMemoryEventBus()
        got: list[Event] = []
        await bus.subscribe("Tick", recorder(got))
        await bus.publish(event("Tick"))
        assert got == []
        await self.drain(bus)
        assert len(got) == 1
        await bus.close()

    async def test_delivery_is_breadth_first_with_star_subscribers_first(self) -> None:
        bus = InMemoryEventBus()
        log: list[str] = []

        async def placed(e: Event) -> None:
            log.append("placed:OrderPlaced")
            await bus.publish(event("PaymentTaken"))

        await bus.subscribe("OrderPlaced", placed)
        await bus.subscribe("OrderPlaced", recorder([], "second", log))
        await bus.subscribe("PaymentTaken", recorder([], "paid", log))
        await bus.subscribe(ALL_EVENTS, recorder([], "star", log))
        await bus.publish(event("OrderPlaced"))
        await bus.publish(event("Tick"))
        await self.drain(bus)
        assert log == [
            "star:OrderPlaced",
            "placed:OrderPlaced",
            "second:OrderPlaced",
            "star:Tick",
            "star:PaymentTaken",
            "paid:PaymentTaken",
        ]
        await bus.close()

    async def test_a_subscription_made_during_dispatch_starts_with_the_next_event(self) -> None:
        bus = InMemoryEventBus()
        late: list[Event] = []

        async def subscriber(e: Event) -> None:
            if e["n"] == 0:
                await bus.subscribe("Tick", recorder(late))

        await bus.subscribe("Tick", subscriber)
        await bus.publish(event("Tick", n=0))
        await bus.publish(event("Tick", n=1))
        await self.drain(bus)
        assert [e["n"] for e in late] == [1]
        await bus.close()
