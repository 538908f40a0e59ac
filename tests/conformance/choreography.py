"""The e-commerce choreography of seeds 000/001, on any event bus.

A backend runs these scenarios by subclassing :class:`ChoreographyConformance`
(not collected itself: its name does not start with ``Test``) and implementing
``make_bus``, as for :class:`conformance.event_bus.EventBusConformance`::

    class TestChoreographyOnNats(ChoreographyConformance):
        async def make_bus(self) -> EventBus:
            return await connect_to_this_tests_namespace()

Every bus a test makes shares that test's namespace (the services of
:meth:`ChoreographyConformance.separate` run on buses of their own, as separate
processes would). Buses are closed after the test. Each scenario waits for
``drain()`` and then for the tracker to see what it expects, so it holds on
buses whose delivery is asynchronous.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from typing import Any

import pytest

from sagakit.choreography.ecommerce import (
    STATUS_AFTER,
    Faults,
    Inventory,
    Payment,
    Shipping,
    Shop,
    open_shop,
)
from sagakit.choreography.tracker import SagaTracker
from sagakit.core.event import Event
from sagakit.core.machine import SagaStatus
from sagakit.errors import BackendError, BackendUnavailable
from sagakit.ports.event_bus import EventBus

__all__ = ["ChoreographyConformance", "count", "event_of", "types"]


def types(shop: Shop, saga_id: str) -> list[str]:
    return [e.type for e in shop.tracker[saga_id].events]


def count(shop: Shop, saga_id: str, event_type: str) -> int:
    return types(shop, saga_id).count(event_type)


def event_of(shop: Shop, saga_id: str, event_type: str) -> Event:
    (event,) = [e for e in shop.tracker[saga_id].events if e.type == event_type]
    return event


class ChoreographyConformance(ABC):
    """The choreography scenario tests, on the bus a subclass makes."""

    timeout: float = 10.0
    settle: float = 0.3  # how long a test watches that nothing more happens

    @abstractmethod
    async def make_bus(self) -> EventBus:
        """A new bus with no subscribers, on this test's shared namespace."""

    @pytest.fixture(autouse=True)
    async def _close_buses(self) -> AsyncIterator[None]:
        self._buses: list[EventBus] = []
        yield
        for bus in reversed(self._buses):
            with suppress(BackendError):
                async with asyncio.timeout(self.timeout):
                    await bus.close()

    async def bus(self) -> EventBus:
        bus = await self.make_bus()
        self._buses.append(bus)
        return bus

    async def shop(self, **kwargs: Any) -> Shop:
        return await open_shop(await self.bus(), **kwargs)

    async def separate(self, **kwargs: Any) -> Shop:
        """The three services and the tracker, each on a bus of its own."""
        faults = Faults()
        tracker = SagaTracker(STATUS_AFTER)
        inventory = Inventory(kwargs.get("stock"), faults)
        payment = Payment(kwargs.get("prices"), faults=faults)
        shipping = Shipping(faults)
        await tracker.attach(await self.bus())
        for service in (inventory, payment, shipping):
            await service.attach(await self.bus())
        return Shop(inventory.bus, inventory, payment, shipping, tracker, faults)

    async def until(self, check: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {self.timeout}s waiting for {what}")
            await asyncio.sleep(0.01)

    async def settled(self, shop: Shop, *expected: tuple[str, int]) -> None:
        """Wait for each (saga id, event count) to be seen, then a quiet moment."""
        async with asyncio.timeout(self.timeout):
            await shop.bus.drain()

        def seen() -> bool:
            sagas = shop.tracker.sagas
            return all(s in sagas and len(sagas[s].events) >= n for s, n in expected)

        await self.until(seen, f"events {expected}")
        await asyncio.sleep(self.settle)

    # --- the three flows ---------------------------------------------------------------

    async def test_success(self) -> None:
        shop = await self.shop()
        reservation = await shop.order("saga42", "abc123")
        assert reservation.ok
        assert reservation.reservation_id == "r1"
        await self.settled(shop, ("saga42", 3))
        saga = shop.tracker["saga42"]
        assert saga.status is SagaStatus.COMPLETED
        assert types(shop, "saga42") == ["InventoryReserved", "PaymentCharged", "ShipmentCreated"]
        reserved, charged, shipped = saga.events
        assert (reserved.source, reserved["reservation_id"]) == ("inventory", "r1")
        assert (charged.source, charged["payment_id"], charged["amount"]) == (
            "payment",
            "p1",
            99.99,
        )
        assert (shipped.source, shipped["shipment_id"]) == ("shipping", "s1")

    async def test_payment_failure_releases_the_reservation(self) -> None:
        shop = await self.shop()
        shop.faults.fail("saga43", "payment")
        await shop.order("saga43", "abc123")
        await self.settled(shop, ("saga43", 3))
        assert shop.tracker["saga43"].status is SagaStatus.COMPENSATED
        assert types(shop, "saga43") == ["InventoryReserved", "PaymentFailed", "InventoryReleased"]
        assert event_of(shop, "saga43", "PaymentFailed")["reason"] == "insufficient_funds"
        assert event_of(shop, "saga43", "InventoryReleased")["reservation_id"] == "r1"

    async def test_shipping_failure_refunds_then_releases(self) -> None:
        shop = await self.shop()
        shop.faults.fail("saga44", "shipping")
        await shop.order("saga44", "abc123")
        await self.settled(shop, ("saga44", 5))
        assert shop.tracker["saga44"].status is SagaStatus.COMPENSATED
        assert types(shop, "saga44") == [
            "InventoryReserved",
            "PaymentCharged",
            "ShipmentFailed",
            "PaymentRefunded",
            "InventoryReleased",
        ]
        charged = event_of(shop, "saga44", "PaymentCharged")
        refunded = event_of(shop, "saga44", "PaymentRefunded")
        assert refunded["payment_id"] == charged["payment_id"]
        assert refunded["amount"] == charged["amount"]

    async def test_inventory_failure_ends_the_saga(self) -> None:
        shop = await self.shop()
        shop.faults.fail("saga45", "inventory")
        reservation = await shop.order("saga45", "abc123")
        await self.settled(shop, ("saga45", 1))
        assert not reservation.ok
        assert reservation.reason == "out_of_stock"
        assert types(shop, "saga45") == ["InventoryReservationFailed"]
        assert shop.tracker["saga45"].status is SagaStatus.COMPENSATED

    async def test_sagas_interleave_without_mixing(self) -> None:
        shop = await self.shop()
        shop.faults.fail("bad", "payment")
        for saga_id in ("ok1", "bad", "ok2"):
            await shop.order(saga_id, "abc123")
        await self.settled(shop, ("ok1", 3), ("bad", 3), ("ok2", 3))
        assert shop.tracker["ok1"].status is SagaStatus.COMPLETED
        assert shop.tracker["ok2"].status is SagaStatus.COMPLETED
        assert shop.tracker["bad"].status is SagaStatus.COMPENSATED
        reservations = shop.inventory.reservations
        assert [reservations[s].reservation_id for s in ("ok1", "bad", "ok2")] == ["r1", "r2", "r3"]

    async def test_services_on_buses_of_their_own(self) -> None:
        # As separate processes would: each service and the tracker on its own bus.
        shop = await self.separate()
        shop.faults.fail("bad", "shipping")
        for saga_id in ("ok", "bad"):
            await shop.order(saga_id, "abc123")
        await self.until(
            lambda: all(
                s in shop.tracker.sagas and shop.tracker[s].status.is_final for s in ("ok", "bad")
            ),
            "both sagas to finish",
        )
        await asyncio.sleep(self.settle)
        assert shop.tracker["ok"].status is SagaStatus.COMPLETED
        assert shop.tracker["bad"].status is SagaStatus.COMPENSATED
        assert count(shop, "bad", "PaymentRefunded") == 1
        assert count(shop, "bad", "InventoryReleased") == 1
        assert len(shop.payment.charges) == 2

    # --- stock -------------------------------------------------------------------------

    async def test_stock_runs_out(self) -> None:
        shop = await self.shop(stock={"abc": 1})
        first = await shop.order("o1", "abc")
        second = await shop.order("o2", "abc")
        await self.settled(shop, ("o1", 3), ("o2", 1))
        assert first.ok
        assert not second.ok
        assert second.reason == "out_of_stock"
        assert event_of(shop, "o2", "InventoryReservationFailed")["reason"] == "out_of_stock"
        assert shop.inventory.stock == {"abc": 0}
        assert not (await shop.order("o3", "unknown-sku")).ok

    async def test_released_reservation_returns_stock(self) -> None:
        shop = await self.shop(stock={"abc": 1})
        shop.faults.fail("o1", "payment")
        await shop.order("o1", "abc")
        await self.settled(shop, ("o1", 3))
        assert shop.inventory.stock == {"abc": 1}
        assert (await shop.order("o2", "abc")).ok
        await self.settled(shop, ("o2", 3))
        assert shop.tracker["o2"].status is SagaStatus.COMPLETED
        assert shop.inventory.stock == {"abc": 0}

    async def test_quantity_is_reserved_and_released(self) -> None:
        shop = await self.shop(stock={"abc": 5})
        shop.faults.fail("o1", "shipping")
        await shop.order("o1", "abc", 3)
        assert shop.inventory.stock == {"abc": 2}
        assert not (await shop.order("o2", "abc", 3)).ok
        await self.settled(shop, ("o1", 5))
        assert shop.inventory.stock == {"abc": 5}

    async def test_repeated_order_is_idempotent(self) -> None:
        shop = await self.shop(stock={"abc": 2})
        first = await shop.order("o1", "abc")
        again = await shop.order("o1", "abc")
        await self.settled(shop, ("o1", 3))
        assert first == again
        assert shop.inventory.stock == {"abc": 1}
        assert types(shop, "o1") == ["InventoryReserved", "PaymentCharged", "ShipmentCreated"]

    @pytest.mark.parametrize(
        ("sku", "quantity", "amount"),
        [("abc", 3, 59.97), ("abc", 1, 19.99), ("xyz", 7, 0.7), ("other", 2, 199.98)],
    )
    async def test_payment_prices_per_sku_and_quantity(
        self, sku: str, quantity: int, amount: float
    ) -> None:
        shop = await self.shop(prices={"abc": 19.99, "xyz": 0.1})
        await shop.order("o1", sku, quantity)
        await self.settled(shop, ("o1", 3))
        assert event_of(shop, "o1", "PaymentCharged")["amount"] == amount
        assert shop.payment.charges["o1"]["amount"] == amount

    async def test_inactive_service_does_not_react(self) -> None:
        shop = await self.shop(services=["inventory", "payment"])
        await shop.order("o1", "abc")
        await self.settled(shop, ("o1", 2))
        assert types(shop, "o1") == ["InventoryReserved", "PaymentCharged"]
        assert shop.tracker["o1"].status is SagaStatus.RUNNING
        await shop.set_active(["inventory", "payment", "shipping"])
        await shop.order("o2", "abc")
        await self.settled(shop, ("o2", 3))
        assert shop.tracker["o2"].status is SagaStatus.COMPLETED

    async def test_a_service_that_fails_for_a_while_is_retried_and_the_saga_completes(
        self,
    ) -> None:
        class FlakyPayment(Payment):
            """The card processor is down for the first two tries."""

            backoff = 0.05
            tries = 0

            async def charge(self, event: Event) -> None:
                self.tries += 1
                if self.tries <= 2:
                    raise ConnectionError("card processor unreachable")
                await super().charge(event)

        bus = await self.bus()
        shop = await open_shop(bus, services=["inventory", "shipping"])
        payment = FlakyPayment(faults=shop.faults)
        await payment.attach(bus)
        await shop.order("o1", "abc")
        await self.settled(shop, ("o1", 3))
        assert shop.tracker["o1"].status is SagaStatus.COMPLETED
        assert payment.tries == 3
        assert len(payment.charges) == 1
        assert list(await bus.dead_letters("payment")) == []

    async def test_a_publish_the_bus_refuses_once_is_made_again_on_the_redelivery(
        self,
    ) -> None:
        # A service recorded its outcome (a charge, a shipment), then its publish failed
        # (a broker away for a moment): the delivery failed and came again, found the
        # outcome recorded and published nothing, and the saga stayed stuck for ever.
        bus = _RefusingOnce(await self.bus(), refuse={"PaymentCharged", "ShipmentFailed",
                            "PaymentRefunded", "InventoryReleased", "ShipmentCreated"})  # fmt: skip
        faults = Faults()
        tracker = SagaTracker(STATUS_AFTER)
        await tracker.attach(bus)
        inventory, payment, shipping = (
            Inventory(None, faults),
            Payment(faults=faults),
            Shipping(faults),
        )
        for service in (inventory, payment, shipping):
            service.backoff = 0.05
            await service.attach(bus)
        shop = Shop(bus, inventory, payment, shipping, tracker, faults)
        faults.fail("o2", "shipping")
        await shop.order("o1", "abc")
        await shop.order("o2", "abc")
        await self.settled(shop, ("o1", 3), ("o2", 5))
        assert tracker["o1"].status is SagaStatus.COMPLETED
        assert tracker["o2"].status is SagaStatus.COMPENSATED
        assert bus.refused == 5
        assert (len(payment.charges), len(payment.refunded)) == (2, 1)  # charged once each

    async def test_a_service_that_always_fails_leaves_a_dead_letter(self) -> None:
        class BrokenShipping(Shipping):
            backoff = 0.01
            max_deliveries = 2

            async def ship(self, event: Event) -> None:
                raise RuntimeError("label printer on fire")

        bus = await self.bus()
        shop = await open_shop(bus, services=["inventory", "payment"])
        await BrokenShipping(shop.faults).attach(bus)
        await shop.order("o1", "abc")
        await self.settled(shop, ("o1", 2))
        deadline = time.monotonic() + self.timeout
        while not await bus.dead_letters("shipping"):
            assert time.monotonic() < deadline, "no dead letter in group shipping"
            await asyncio.sleep(0.02)
        (letter,) = await bus.dead_letters("shipping")
        assert (letter.event.type, letter.event.saga_id) == ("PaymentCharged", "o1")
        assert letter.error == "RuntimeError: label printer on fire"
        assert letter.deliveries == 2
        assert shop.tracker["o1"].status is SagaStatus.RUNNING  # stuck, for an operator to see

    # --- events twice, and out of order: every handler is idempotent per saga -------------

    async def test_redelivered_inventory_reserved_charges_once(self) -> None:
        shop = await self.shop()
        await shop.order("o1", "abc")
        await self.settled(shop, ("o1", 3))
        await shop.bus.publish(event_of(shop, "o1", "InventoryReserved"))
        await self.settled(shop, ("o1", 3))
        assert count(shop, "o1", "PaymentCharged") == 1
        assert count(shop, "o1", "ShipmentCreated") == 1
        assert len(shop.payment.charges) == 1

    async def test_redelivered_payment_failed_releases_once(self) -> None:
        shop = await self.shop(stock={"abc": 1})
        shop.faults.fail("o1", "payment")
        await shop.order("o1", "abc")
        await self.settled(shop, ("o1", 3))
        failed = event_of(shop, "o1", "PaymentFailed")
        await shop.bus.publish(failed)
        await shop.bus.publish(failed)
        await self.settled(shop, ("o1", 3))
        assert count(shop, "o1", "InventoryReleased") == 1
        assert shop.inventory.stock == {"abc": 1}

    async def test_redelivered_shipment_failed_refunds_once(self) -> None:
        shop = await self.shop(stock={"abc": 1})
        shop.faults.fail("o1", "shipping")
        await shop.order("o1", "abc")
        await self.settled(shop, ("o1", 5))
        await shop.bus.publish(event_of(shop, "o1", "ShipmentFailed"))
        await self.settled(shop, ("o1", 5))
        assert count(shop, "o1", "PaymentRefunded") == 1
        assert count(shop, "o1", "InventoryReleased") == 1
        assert shop.inventory.stock == {"abc": 1}

    async def test_copies_of_an_event_with_new_ids_change_nothing(self) -> None:
        # A publisher that retried after a lost ack sends the same fact under a new id.
        shop = await self.shop(stock={"abc": 1})
        shop.faults.fail("o1", "shipping")
        await shop.order("o1", "abc")
        await self.settled(shop, ("o1", 5))
        for event_type in ("InventoryReserved", "PaymentCharged", "ShipmentFailed"):
            old = event_of(shop, "o1", event_type)
            await shop.bus.publish(Event(old.type, old.saga_id, old.payload, source=old.source))
        await self.settled(shop, ("o1", 8))
        assert len(shop.payment.charges) == 1
        assert len(shop.shipping.failed) == 1
        assert count(shop, "o1", "PaymentRefunded") == 1
        assert count(shop, "o1", "InventoryReleased") == 1
        assert shop.inventory.stock == {"abc": 1}
        assert shop.tracker["o1"].status is SagaStatus.COMPENSATED

    @pytest.mark.parametrize(
        ("fail", "redelivered", "final"),
        [
            (None, "InventoryReserved", SagaStatus.COMPLETED),
            (None, "PaymentCharged", SagaStatus.COMPLETED),
            ("payment", "PaymentFailed", SagaStatus.COMPENSATED),
            ("payment", "InventoryReserved", SagaStatus.COMPENSATED),
            ("shipping", "ShipmentFailed", SagaStatus.COMPENSATED),
            ("shipping", "PaymentCharged", SagaStatus.COMPENSATED),
        ],
    )
    async def test_a_late_event_does_not_reopen_a_finished_saga(
        self, fail: str | None, redelivered: str, final: SagaStatus
    ) -> None:
        shop = await self.shop()
        if fail:
            shop.faults.fail("o1", fail)
        await shop.order("o1", "abc")
        done = 5 if fail == "shipping" else 3
        await self.settled(shop, ("o1", done))
        assert shop.tracker["o1"].status is final
        old = event_of(shop, "o1", redelivered)
        await shop.bus.publish(Event(old.type, old.saga_id, old.payload, source=old.source))
        await self.settled(shop, ("o1", done + 1))
        assert shop.tracker["o1"].status is final
        assert len(shop.tracker["o1"].events) == done + 1

    async def test_the_tracker_takes_events_in_any_order(self) -> None:
        bus = await self.bus()
        shop = await open_shop(bus, services=[])
        steps = ["InventoryReserved", "PaymentCharged", "ShipmentFailed", "PaymentRefunded"]
        events = [Event(t, "o1", {}, source="test") for t in [*steps, "InventoryReleased"]]
        for event in reversed(events):
            await bus.publish(event)
        await self.settled(shop, ("o1", 5))
        assert shop.tracker["o1"].status is SagaStatus.COMPENSATED
        shop2 = await open_shop(await self.bus(), services=[])
        # Compensating, then a late forward event: still compensating.
        for event_type in ("PaymentFailed", "InventoryReserved"):
            await shop2.bus.publish(Event(event_type, "o2", {}, source="test"))
        await self.settled(shop2, ("o2", 2))
        assert shop2.tracker["o2"].status is SagaStatus.COMPENSATING


class _RefusingOnce:
    """A bus whose broker refuses the first publish of each of some event types."""

    def __init__(self, bus: EventBus, refuse: set[str]) -> None:
        self._bus, self._refuse, self.refused = bus, set(refuse), 0

    async def publish(self, event: Event) -> None:
        if event.type in self._refuse:
            self._refuse.discard(event.type)
            self.refused += 1
            raise BackendUnavailable("test://", f"broker away; {event.type} not published")
        await self._bus.publish(event)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bus, name)
