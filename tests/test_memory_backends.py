"""The in-memory saga log and event bus: the conformance suites, and what is theirs alone."""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from conformance.event_bus import EventBusConformance, event, recorder
from conformance.saga_log import SagaLogConformance, opening

from sagakit.adapters import memory_bus, open_event_bus, open_saga_log
from sagakit.adapters.memory_bus import DeliveryFailure, InMemoryEventBus
from sagakit.adapters.memory_log import InMemorySagaLog
from sagakit.core.event import Event
from sagakit.core.records import SagaFinished, SagaStatus
from sagakit.errors import BackendBusy, BackendError, ConfigurationError, DefinitionError
from sagakit.ports.event_bus import ALL_EVENTS, EventBus, new_event
from sagakit.ports.saga_log import SagaLog


# Handlers no bus can run: calling them only makes a generator.
def _generator(event: Event) -> Iterator[None]:
    yield


async def _async_generator(event: Event) -> AsyncIterator[None]:
    yield


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
    """Buses of one test share a broker named after the test; kill abandons a bus."""

    async def make_bus(self) -> EventBus:
        if not hasattr(self, "namespace"):
            self.namespace = f"conformance-{uuid.uuid4().hex}"
        return InMemoryEventBus(name=self.namespace)

    async def kill(self, bus: EventBus) -> None:
        assert isinstance(bus, InMemoryEventBus)
        await bus.crash()

    # --- opening ---------------------------------------------------------------------

    async def test_opened_by_url(self) -> None:
        bus = open_event_bus("memory://")
        assert isinstance(bus, InMemoryEventBus)
        await bus.close()

    async def test_memory_urls_with_a_name_share_one_broker(self) -> None:
        name = f"shared-{uuid.uuid4().hex}"
        a, b = open_event_bus(f"memory://{name}"), open_event_bus(f"memory://{name}")
        private = open_event_bus("memory://")
        got: list[Event] = []
        await b.subscribe("Tick", recorder(got), group="g")
        await a.publish(event("Tick"))
        await private.publish(event("Tick"))
        await a.drain()
        await private.drain()
        assert len(got) == 1
        for bus in (a, b, private):
            await bus.close()

    async def test_url_options(self) -> None:
        bus = open_event_bus("memory://?capacity=3")
        assert isinstance(bus, InMemoryEventBus)
        assert bus._broker.capacity == 3
        await bus.close()
        with pytest.raises(ConfigurationError, match="unknown option"):
            open_event_bus("memory://?capacty=3")
        with pytest.raises(ConfigurationError, match="capacity"):
            open_event_bus("memory://?capacity=many")
        with pytest.raises(ConfigurationError, match="capacity"):
            open_event_bus("memory://?capacity=0")

    async def test_the_envelope_option_checks_payloads_as_a_broker_would(self) -> None:
        bus = open_event_bus("memory://?envelope=true")
        got: list[Event] = []
        await bus.subscribe("Tick", recorder(got))
        payload = {"items": ["a"]}
        sent = Event("Tick", "s1", payload, "", "e1", 5, headers={"traceparent": "00-ab-cd-01"})
        await bus.publish(sent)
        with pytest.raises(DefinitionError) as excinfo:
            await bus.publish(Event("Tick", "s1", {"when": object()}))
        assert excinfo.value.field == "payload"
        await bus.drain()
        assert got == [sent]
        assert got[0].payload is not payload  # a copy, as from a broker
        with pytest.raises(ConfigurationError, match="envelope"):
            open_event_bus("memory://?envelope=maybe")
        await bus.close()

    @pytest.mark.parametrize(
        ("field", "kwargs"),
        [
            ("event_type", {"event_type": ""}),
            ("handler", {"handler": 42}),
            ("handler", {"handler": _generator}),  # its body would never run
            ("handler", {"handler": _async_generator}),
            ("group", {"group": ""}),
            ("max_deliveries", {"max_deliveries": 0}),
            ("max_deliveries", {"max_deliveries": 2.5}),
            ("ack_timeout", {"ack_timeout": 0}),
            ("ack_timeout", {"ack_timeout": float("inf")}),
            ("backoff", {"backoff": -1}),
            ("backoff", {"backoff": float("nan")}),
        ],
    )
    async def test_subscribe_names_the_bad_argument(
        self, field: str, kwargs: dict[str, object]
    ) -> None:
        bus = InMemoryEventBus()
        arguments: dict[str, object] = {"event_type": "Tick", "handler": recorder([]), **kwargs}
        with pytest.raises(DefinitionError) as excinfo:
            await bus.subscribe(**arguments)  # type: ignore[arg-type]
        assert excinfo.value.field == field
        await bus.close()

    async def test_publish_refuses_what_is_not_an_event(self) -> None:
        bus = InMemoryEventBus()
        with pytest.raises(DefinitionError) as excinfo:
            await bus.publish({"type": "Tick"})  # type: ignore[arg-type]
        assert excinfo.value.field == "event"
        await bus.close()

    # --- failures ----------------------------------------------------------------------

    async def test_failures_record_the_failing_handler(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        bus = InMemoryEventBus()

        async def broken(e: Event) -> None:
            raise ValueError("no stock")

        await bus.subscribe("OrderPlaced", broken, max_deliveries=1)
        await bus.subscribe("OrderPlaced", recorder([]))
        sent = event("OrderPlaced", "o-3")
        with caplog.at_level(logging.ERROR, logger="sagakit.bus"):
            await bus.publish(sent)
            await self.drain(bus)
        assert bus.failures == [DeliveryFailure(sent, broken.__qualname__, "ValueError: no stock")]
        assert "broken" in bus.failures[0].handler
        assert any("o-3" in r.getMessage() for r in caplog.records)
        # A subscription without a group files its dead letters under "".
        (letter,) = await bus.dead_letters("")
        assert (letter.event, letter.deliveries) == (sent, 1)
        await bus.close()

    async def test_a_backlog_overrunning_its_bounds_logs_a_bounded_number_of_lines(
        self, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # A detached service's group past its backlog bound buries every further event,
        # and past the dead letters kept drops the oldest: a line per event (20,000
        # lines for 130,000 events at the real bounds, made small here).
        monkeypatch.setattr(memory_bus, "BACKLOG_LIMIT", 100)
        monkeypatch.setattr(memory_bus, "DEAD_LETTERS_KEPT", 50)
        bus = InMemoryEventBus()
        subscription = await bus.subscribe("Tick", recorder([]), group="detached")
        await subscription.cancel()
        with caplog.at_level(logging.ERROR, logger="sagakit.bus"):
            for i in range(2_000):
                await bus.publish(event("Tick", f"o-{i}"))
            await self.drain(bus)
        assert len(caplog.records) <= 2, [r.getMessage() for r in caplog.records[:3]]
        assert "dropped the oldest" in caplog.records[0].getMessage()
        # Otherwise as before: the newest dead letters kept, the backlog bounded.
        letters = await bus.dead_letters("detached", limit=1_000)
        assert [d.event.saga_id for d in letters][-1] == "o-1999"
        assert len(letters) == 50
        await bus.close()

    async def test_handlers_refused_by_a_full_queue_log_a_bounded_number_of_lines(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        # Each handler publishing into a queue past twice its capacity fails with
        # BackendBusy: a line and a traceback per delivery, thousands of them.
        bus = InMemoryEventBus(capacity=20)

        async def fan_out(e: Event) -> None:
            for i in range(5):
                await bus.publish(event("Shipped", e.saga_id, i=i))

        await bus.subscribe("Ordered", fan_out, group="fan", backoff=0.0, max_deliveries=2)
        await bus.subscribe("Shipped", recorder([]), group="sink")
        with caplog.at_level(logging.ERROR, logger="sagakit.bus"):
            for i in range(1_000):
                await bus.publish(event("Ordered", f"o-{i}"))
            await self.drain(bus)
        refused = [f for f in bus.failures if f.error.startswith("BackendBusy")]
        assert len(refused) > 100, "the queue never overran: the test shows nothing"
        assert len(caplog.records) <= 2, [r.getMessage() for r in caplog.records[:3]]
        assert "BackendBusy" in caplog.records[0].getMessage()
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

        await bus.subscribe("Tick", impatient, max_deliveries=1)
        await bus.publish(event("Tick"))
        await self.drain(bus)
        assert len(errors) == 1
        assert "wait for itself" in str(errors[0])
        assert bus.failures[0].error.startswith("RuntimeError: ")
        await bus.close()

    async def test_a_handler_raising_cancelled_error_strands_nothing(self) -> None:
        # It used to end the dispatcher: drain() raised CancelledError in a caller
        # nobody cancelled, and the next event was never delivered.
        bus = InMemoryEventBus()
        got: list[int] = []

        async def rude(e: Event) -> None:
            if e["n"] == 0:
                raise asyncio.CancelledError
            got.append(e["n"])

        def sync_rude(e: Event) -> None:
            if e["n"] == 0:
                raise asyncio.CancelledError

        await bus.subscribe("Tick", rude, max_deliveries=1)
        await bus.subscribe("Tick", sync_rude, max_deliveries=1)
        await bus.publish(event("Tick", n=0))
        await bus.publish(event("Tick", n=1))
        await self.drain(bus)  # does not raise
        assert got == [1]
        assert [f.error.split(":")[0] for f in bus.failures] == ["CancelledError"] * 2
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
        await bus.close()

    async def test_a_live_consumer_holding_an_event_too_long_loses_it(self) -> None:
        bus = InMemoryEventBus()
        release = asyncio.Event()
        slow: list[Event] = []
        fast: list[Event] = []

        async def holds(e: Event) -> None:
            slow.append(e)
            await release.wait()

        await bus.subscribe("Tick", holds, group="g", ack_timeout=0.2)
        await bus.subscribe("Tick", recorder(fast), group="g", ack_timeout=0.2)
        sent = event("Tick")
        await bus.publish(sent)
        await self.drain(bus)
        release.set()
        assert [e.event_id for e in slow + fast] == [sent.event_id] * 2
        assert bus.failures[0].error == "TimeoutError: still running after the ack timeout (0.2s)"
        await asyncio.sleep(0.01)
        assert await bus.dead_letters("g") == []
        await bus.close()

    async def test_a_group_without_consumers_keeps_a_bounded_backlog(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(memory_bus, "BACKLOG_LIMIT", 3)
        bus = InMemoryEventBus()
        subscription = await bus.subscribe("Tick", recorder([]), group="g")
        await subscription.cancel()
        for i in range(5):
            await bus.publish(event("Tick", n=i))
        await self.drain(bus)
        letters = await bus.dead_letters("g")
        assert [d.event["n"] for d in letters] == [3, 4]
        assert all(d.error.startswith("BacklogFull") for d in letters)
        got: list[Event] = []
        await bus.subscribe("Tick", recorder(got), group="g")
        await self.drain(bus)
        assert [e["n"] for e in got] == [0, 1, 2]
        await bus.close()

    async def test_dead_letters_kept_per_group_are_bounded(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(memory_bus, "DEAD_LETTERS_KEPT", 2)
        bus = InMemoryEventBus()

        def poisoned(e: Event) -> None:
            raise ValueError(e["n"])

        await bus.subscribe("Tick", poisoned, group="g", max_deliveries=1)
        for i in range(4):
            await bus.publish(event("Tick", n=i))
        await self.drain(bus)
        assert [d.event["n"] for d in await bus.dead_letters("g")] == [2, 3]
        await bus.close()

    async def test_a_replayed_dead_letter_waits_for_a_consumer_of_its_group(self) -> None:
        bus = InMemoryEventBus()

        def poisoned(e: Event) -> None:
            raise ValueError("no")

        subscription = await bus.subscribe("Tick", poisoned, group="g", max_deliveries=1)
        await bus.publish(event("Tick"))
        await self.drain(bus)
        (letter,) = await bus.dead_letters("g")
        await subscription.cancel()
        await bus.replay_dead_letter("g", letter.id)
        await self.drain(bus)
        got: list[Event] = []
        await bus.subscribe("Tick", recorder(got), group="g")
        await self.drain(bus)
        assert got == [letter.event]
        await bus.close()

    @pytest.mark.parametrize("seed", range(5))
    async def test_no_event_is_lost_whatever_fails(self, seed: int) -> None:
        # Random failures, slow handlers, a small queue, several groups and copies:
        # each event ends acknowledged once per group, or as one dead letter there.
        rng = random.Random(seed)
        bus = InMemoryEventBus(name=f"chaos-{uuid.uuid4().hex}", capacity=8)
        other = InMemoryEventBus(name=bus._broker.name.removeprefix("memory://"))
        acked: dict[str, list[str]] = {}
        tries: dict[tuple[str, str], int] = {}

        def handler(group: str) -> Any:
            async def handle(e: Event) -> None:
                tries[group, e.event_id] = tries.get((group, e.event_id), 0) + 1
                if rng.random() < 0.2:
                    await asyncio.sleep(0.001)
                if rng.random() < 0.3:
                    raise ValueError("bad luck")
                acked.setdefault(group, []).append(e.event_id)

            return handle

        groups = ("a", "b", "c")
        for group in groups:
            for copy in (bus, other):
                await copy.subscribe(
                    "Tick", handler(group), group=group, max_deliveries=3, backoff=0.0
                )
        sent = [event("Tick", f"s{i % 7}", n=i) for i in range(200)]
        for e in sent:
            await rng.choice((bus, other)).publish(e)
        await self.drain(bus)
        for group in groups:
            dead = {d.event.event_id: d for d in await bus.dead_letters(group, limit=1000)}
            assert all(d.deliveries == 3 for d in dead.values())
            done = acked.get(group, [])
            assert len(done) == len(set(done)), "acknowledged twice"
            assert sorted(done + list(dead)) == sorted(e.event_id for e in sent)
        await other.close()
        await bus.close()

    # --- back-pressure and a loop that is never starved ------------------------------------

    async def test_a_handler_that_never_suspends_does_not_starve_the_loop(self) -> None:
        # Each Tick publishes two more without suspending: drain() with a timeout
        # used to never return while the queue grew without bound.
        bus = InMemoryEventBus(capacity=100)

        async def doubling(e: Event) -> None:
            await bus.publish(event("Tick"))
            await bus.publish(event("Tick"))

        subscription = await bus.subscribe("Tick", doubling, max_deliveries=2, backoff=0.01)
        await bus.publish(event("Tick"))
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await bus.drain()
        assert time.monotonic() - started < 2.0
        assert len(bus._broker.queue) <= 200
        assert any(f.error.startswith("BackendBusy") for f in bus.failures)
        await subscription.cancel()
        await self.drain(bus)
        await bus.close()

    async def test_publish_waits_while_the_queue_is_full(self) -> None:
        bus = InMemoryEventBus(capacity=5)
        handled: list[int] = []
        most = 0

        async def slow(e: Event) -> None:
            nonlocal most
            most = max(most, len(bus._broker.queue))
            await asyncio.sleep(0.002)
            handled.append(e["n"])

        await bus.subscribe("Tick", slow)
        published = 0

        async def producer() -> None:
            nonlocal published
            for i in range(40):
                await bus.publish(event("Tick", n=i))
                published += 1

        task = asyncio.create_task(producer())
        await asyncio.sleep(0.01)
        assert published < 40, "publish did not wait for room"
        await task
        await self.drain(bus)
        assert handled == list(range(40))
        assert most <= 5
        await bus.close()

    async def test_a_handler_overfilling_its_own_queue_is_told_to_retry(self) -> None:
        bus = InMemoryEventBus(capacity=2)
        raised: list[BaseException] = []

        async def fan_out(e: Event) -> None:
            try:
                for i in range(5):
                    await bus.publish(event("Leaf", n=i))
            except BackendBusy as exc:
                raised.append(exc)
                raise

        leaves: list[Event] = []
        await bus.subscribe("Root", fan_out, max_deliveries=1)
        await bus.subscribe("Leaf", recorder(leaves))
        await bus.publish(event("Root"))
        await self.drain(bus)
        assert len(raised) == 1
        assert raised[0].retryable
        assert len(leaves) == 4  # twice the capacity, then refused
        await bus.close()

    # --- closing -----------------------------------------------------------------------

    async def test_publish_after_close_names_the_bus(self) -> None:
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
            await bus.publish(event("Tock", n=e["n"]))  # in flight: still accepted

        await bus.subscribe("Tick", slow)
        for i in range(3):
            await bus.publish(event("Tick", n=i))
        await bus.close()
        assert done == [0, 1, 2]
        assert bus.failures == []

    async def test_a_handler_may_close_its_own_bus(self) -> None:
        bus = InMemoryEventBus()
        got: list[int] = []

        async def last(e: Event) -> None:
            got.append(e["n"])
            await bus.close()

        await bus.subscribe("Tick", last)
        await bus.publish(event("Tick", n=0))
        await bus.publish(event("Tick", n=1))
        await self.drain(bus)
        assert got == [0]
        assert bus.failures == []
        with pytest.raises(BackendError):
            await bus.publish(event("Tick"))

    async def test_a_second_close_waits_for_the_first(self) -> None:
        bus = InMemoryEventBus()
        done: list[int] = []

        async def slow(e: Event) -> None:
            await asyncio.sleep(0.05)
            done.append(e["n"])

        await bus.subscribe("Tick", slow)
        await bus.publish(event("Tick", n=0))
        first = asyncio.create_task(bus.close())
        await asyncio.sleep(0)
        await bus.close()
        assert done == [0]
        await first
        assert bus._broker.open_buses == 0

    async def test_a_crash_while_closing_counts_the_bus_once(self) -> None:
        name = f"crash-{uuid.uuid4().hex}"
        bus, other = InMemoryEventBus(name=name), InMemoryEventBus(name=name)
        release = asyncio.Event()

        async def holds(e: Event) -> None:
            await release.wait()

        await bus.subscribe("Tick", holds, group="g", ack_timeout=0.2)
        await bus.publish(event("Tick"))
        await asyncio.sleep(0.01)
        closing = asyncio.create_task(bus.close())
        await asyncio.sleep(0.01)
        await bus.crash()
        release.set()
        await closing
        assert bus._broker.open_buses == 1
        await other.close()
        assert bus._broker.open_buses == 0

    async def test_publish_returns_before_handlers_run(self) -> None:
        bus = InMemoryEventBus()
        got: list[Event] = []
        await bus.subscribe("Tick", recorder(got))
        await bus.publish(event("Tick"))
        assert got == []
        await self.drain(bus)
        assert len(got) == 1
        await bus.close()

    # --- the deterministic order the protocol node relies on --------------------------------

    async def test_delivery_is_breadth_first_with_star_subscribers_first(self) -> None:
        bus = InMemoryEventBus()
        log: list[str] = []

        async def placed(e: Event) -> None:
            log.append("placed:OrderPlaced")
            await bus.publish(event("PaymentTaken"))

        await bus.subscribe("OrderPlaced", placed)
        await bus.subscribe("OrderPlaced", recorder([], "second", log), group="second")
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


class TestInMemoryEventBusThroughTheEnvelope(EventBusConformance):
    """The suite again with every event encoded and decoded, as on a broker."""

    async def make_bus(self) -> EventBus:
        if not hasattr(self, "namespace"):
            self.namespace = f"enveloped-{uuid.uuid4().hex}"
        return InMemoryEventBus(name=self.namespace, envelope=True)

    async def kill(self, bus: EventBus) -> None:
        assert isinstance(bus, InMemoryEventBus)
        await bus.crash()


@pytest.mark.parametrize(
    "payload", [{"a": {1, 2}}, {"a": float("nan")}, {"a": 10**30}, {1: "x"}], ids=repr
)
@pytest.mark.parametrize("url", ["memory://", "memory://?envelope=true"])
async def test_the_in_memory_bus_refuses_what_every_broker_refuses(
    url: str, payload: dict[Any, Any]
) -> None:
    bus = open_event_bus(url)
    seen: list[Event] = []
    await bus.subscribe("X", seen.append, group="g")
    try:
        with pytest.raises(DefinitionError, match="payload: event X of saga s is not JSON"):
            await bus.publish(new_event("X", "s", payload))
        await bus.drain()
        assert seen == []
    finally:
        await bus.close()
