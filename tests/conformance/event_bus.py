"""Conformance suite for event bus backends.

A backend's tests subclass :class:`EventBusConformance` (not collected by pytest
itself: its name does not start with ``Test``) and implement
:meth:`EventBusConformance.make_bus`, returning a new, ready bus with no
subscribers::

    class TestNatsEventBus(EventBusConformance):
        async def make_bus(self) -> EventBus:
            return await NatsEventBus.connect(NATS_URL, subject_prefix=uuid4().hex)

Delivery is asynchronous on every backend, so each test publishes, then waits
with ``drain()`` (bounded by :attr:`EventBusConformance.timeout`), then looks.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sagakit.core.event import Event
from sagakit.ports.event_bus import ALL_EVENTS, EventBus, Handler

__all__ = ["EventBusConformance", "recorder"]


def recorder(into: list[Event], label: str | None = None, log: list[str] | None = None) -> Handler:
    """A handler appending each event to ``into`` (and ``label:type`` to ``log``)."""

    async def handler(event: Event) -> None:
        into.append(event)
        if log is not None:
            log.append(f"{label}:{event.type}")

    return handler


def event(type_: str = "OrderPlaced", saga_id: str = "o-1", **payload: object) -> Event:
    return Event(type_, saga_id, payload, timestamp=1_700_000_000)


def bodies(events: list[Event]) -> list[dict[str, object]]:
    return [e.body() for e in events]


class EventBusConformance(ABC):
    """What every :class:`~sagakit.ports.event_bus.EventBus` backend must do."""

    timeout: float = 10.0

    @abstractmethod
    async def make_bus(self) -> EventBus:
        """A new bus with no subscribers."""

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[EventBus]:
        bus = await self.make_bus()
        try:
            yield bus
        finally:
            async with asyncio.timeout(self.timeout):
                await bus.close()

    async def drain(self, bus: EventBus) -> None:
        async with asyncio.timeout(self.timeout):
            await bus.drain()

    async def test_is_an_event_bus(self) -> None:
        async with self.opened() as bus:
            assert isinstance(bus, EventBus)

    async def test_drain_with_nothing_published_returns(self) -> None:
        async with self.opened() as bus:
            await self.drain(bus)
            await bus.publish(event("Nobody"))  # no subscriber: dropped, no error
            await self.drain(bus)

    async def test_a_subscriber_gets_its_type_and_no_other(self) -> None:
        async with self.opened() as bus:
            placed: list[Event] = []
            await bus.subscribe("OrderPlaced", recorder(placed))
            sent = [event("OrderPlaced", n=1), event("PaymentTaken"), event("OrderPlaced", n=2)]
            for e in sent:
                await bus.publish(e)
            await self.drain(bus)
            assert bodies(placed) == bodies([sent[0], sent[2]])

    async def test_delivered_events_keep_their_id_and_body(self) -> None:
        async with self.opened() as bus:
            got: list[Event] = []
            await bus.subscribe("OrderPlaced", recorder(got))
            sent = Event("OrderPlaced", "o-9", {"items": ["a", "b"], "amount": 3}, timestamp=12)
            await bus.publish(sent)
            await self.drain(bus)
            assert len(got) == 1
            assert got[0].event_id == sent.event_id
            assert got[0].body() == sent.body()
            assert list(got[0].body()) == list(sent.body())

    async def test_every_handler_of_a_type_receives(self) -> None:
        async with self.opened() as bus:
            lists: list[list[Event]] = [[], [], []]
            for got in lists:
                await bus.subscribe("OrderPlaced", recorder(got))
            sent = [event(n=i) for i in range(3)]
            for e in sent:
                await bus.publish(e)
            await self.drain(bus)
            for got in lists:
                assert bodies(got) == bodies(sent)

    async def test_star_receives_every_event(self) -> None:
        async with self.opened() as bus:
            everything: list[Event] = []
            await bus.subscribe(ALL_EVENTS, recorder(everything))
            await bus.subscribe("OrderPlaced", recorder([]))
            sent = [event("OrderPlaced"), event("Unsubscribed"), event("PaymentTaken", "o-2")]
            for e in sent:
                await bus.publish(e)
            await self.drain(bus)
            assert bodies(everything) == bodies(sent)

    async def test_order_of_one_publisher_is_kept(self) -> None:
        async with self.opened() as bus:
            got: list[Event] = []
            await bus.subscribe("Tick", recorder(got))
            sent = [event("Tick", n=i) for i in range(50)]
            for e in sent:
                await bus.publish(e)
            await self.drain(bus)
            assert [e["n"] for e in got] == list(range(50))

    async def test_drain_waits_for_slow_async_handlers(self) -> None:
        async with self.opened() as bus:
            finished: list[int] = []

            async def slow(e: Event) -> None:
                for _ in range(3):
                    await asyncio.sleep(0.005)
                finished.append(e["n"])

            await bus.subscribe("Tick", slow)
            for i in range(5):
                await bus.publish(event("Tick", n=i))
            await self.drain(bus)
            assert finished == [0, 1, 2, 3, 4]

    async def test_drain_waits_for_chains_of_events(self) -> None:
        async with self.opened() as bus:
            seen: list[str] = []

            async def placed(e: Event) -> None:
                seen.append(e.type)
                await bus.publish(event("StockReserved", e.saga_id))

            async def reserved(e: Event) -> None:
                seen.append(e.type)
                await asyncio.sleep(0.005)
                await bus.publish(event("PaymentTaken", e.saga_id))

            async def paid(e: Event) -> None:
                seen.append(f"{e.type}:{e.saga_id}")

            await bus.subscribe("OrderPlaced", placed)
            await bus.subscribe("StockReserved", reserved)
            await bus.subscribe("PaymentTaken", paid)
            await bus.publish(event("OrderPlaced", "o-5"))
            await self.drain(bus)
            assert seen == ["OrderPlaced", "StockReserved", "PaymentTaken:o-5"]

    async def test_a_raising_handler_stops_neither_others_nor_later_events(self) -> None:
        async with self.opened() as bus:
            before: list[Event] = []
            after: list[Event] = []

            async def broken(e: Event) -> None:
                raise ValueError(f"cannot handle {e['n']}")

            await bus.subscribe("Tick", recorder(before))
            await bus.subscribe("Tick", broken)
            await bus.subscribe("Tick", recorder(after))
            for i in range(3):
                await bus.publish(event("Tick", n=i))
            await self.drain(bus)
            assert [e["n"] for e in before] == [0, 1, 2]
            assert [e["n"] for e in after] == [0, 1, 2]

    async def test_cancel_stops_delivery_to_that_subscription_only(self) -> None:
        async with self.opened() as bus:
            cancelled: list[Event] = []
            kept: list[Event] = []
            subscription = await bus.subscribe("Tick", recorder(cancelled))
            await bus.subscribe("Tick", recorder(kept))
            await bus.publish(event("Tick", n=0))
            await self.drain(bus)
            await subscription.cancel()
            await bus.publish(event("Tick", n=1))
            await self.drain(bus)
            assert [e["n"] for e in cancelled] == [0]
            assert [e["n"] for e in kept] == [0, 1]

    async def test_cancel_of_a_star_subscription(self) -> None:
        async with self.opened() as bus:
            got: list[Event] = []
            subscription = await bus.subscribe(ALL_EVENTS, recorder(got))
            await subscription.cancel()
            await bus.publish(event("Tick"))
            await self.drain(bus)
            assert got == []

    async def test_cancel_twice_is_harmless(self) -> None:
        async with self.opened() as bus:
            got: list[Event] = []
            handler = recorder(got)
            first = await bus.subscribe("Tick", handler)
            await first.cancel()
            await first.cancel()
            await bus.subscribe("Tick", handler)
            await bus.publish(event("Tick"))
            await self.drain(bus)
            assert len(got) == 1

    async def test_cancelling_a_subscription_again_leaves_a_newer_one_alone(self) -> None:
        async with self.opened() as bus:
            got: list[Event] = []
            handler = recorder(got)
            old = await bus.subscribe("Tick", handler)
            await old.cancel()
            await bus.subscribe("Tick", handler)
            await old.cancel()  # cancels ``old``, already cancelled, not the new subscription
            await bus.publish(event("Tick"))
            await self.drain(bus)
            assert len(got) == 1

    async def test_one_handler_subscribed_twice_is_cancelled_once(self) -> None:
        async with self.opened() as bus:
            got: list[Event] = []
            handler = recorder(got)
            first = await bus.subscribe("Tick", handler)
            await bus.subscribe("Tick", handler)
            await first.cancel()
            await bus.publish(event("Tick"))
            await self.drain(bus)
            assert len(got) == 1

    async def test_events_of_many_sagas_all_arrive(self) -> None:
        async with self.opened() as bus:
            got: list[Event] = []
            await bus.subscribe("OrderPlaced", recorder(got))
            sent = [event("OrderPlaced", f"o-{i}") for i in range(20)]
            await asyncio.gather(*(bus.publish(e) for e in sent))
            await self.drain(bus)
            assert sorted(e.saga_id for e in got) == sorted(e.saga_id for e in sent)
