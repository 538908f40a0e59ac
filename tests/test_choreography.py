"""Choreography in process: the e-commerce services of seeds 000/001 over InMemoryEventBus."""

from __future__ import annotations

from typing import Any

import pytest

from sagakit import Event, InMemoryEventBus, SagaStatus, Service, handles
from sagakit.choreography.ecommerce import Faults, Shop, open_shop


async def shop_on_bus(**kwargs: Any) -> tuple[InMemoryEventBus, Shop]:
    bus = InMemoryEventBus()
    return bus, await open_shop(bus, **kwargs)


def types(shop: Shop, saga_id: str) -> list[str]:
    return [e.type for e in shop.tracker[saga_id].events]


def count(shop: Shop, saga_id: str, event_type: str) -> int:
    return types(shop, saga_id).count(event_type)


def event_of(shop: Shop, saga_id: str, event_type: str) -> Event:
    (event,) = [e for e in shop.tracker[saga_id].events if e.type == event_type]
    return event


# --- the three flows ---------------------------------------------------------------------


async def test_success() -> None:
    bus, shop = await shop_on_bus()
    reservation = await shop.order("saga42", "abc123")
    assert reservation.ok
    assert reservation.reservation_id == "r1"
    await bus.drain()
    saga = shop.tracker["saga42"]
    assert saga.status is SagaStatus.COMPLETED
    assert types(shop, "saga42") == ["InventoryReserved", "PaymentCharged", "ShipmentCreated"]
    reserved, charged, shipped = saga.events
    assert (reserved.source, reserved["reservation_id"]) == ("inventory", "r1")
    assert (charged.source, charged["payment_id"], charged["amount"]) == ("payment", "p1", 99.99)
    assert (shipped.source, shipped["shipment_id"]) == ("shipping", "s1")
    assert bus.failures == []


async def test_payment_failure_releases_the_reservation() -> None:
    bus, shop = await shop_on_bus()
    shop.faults.fail("saga43", "payment")
    await shop.order("saga43", "abc123")
    await bus.drain()
    assert shop.tracker["saga43"].status is SagaStatus.COMPENSATED
    assert types(shop, "saga43") == ["InventoryReserved", "PaymentFailed", "InventoryReleased"]
    assert event_of(shop, "saga43", "PaymentFailed")["reason"] == "insufficient_funds"
    assert event_of(shop, "saga43", "InventoryReleased")["reservation_id"] == "r1"


async def test_shipping_failure_refunds_then_releases() -> None:
    bus, shop = await shop_on_bus()
    shop.faults.fail("saga44", "shipping")
    await shop.order("saga44", "abc123")
    await bus.drain()
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


async def test_inventory_failure_ends_the_saga() -> None:
    bus, shop = await shop_on_bus()
    shop.faults.fail("saga45", "inventory")
    reservation = await shop.order("saga45", "abc123")
    await bus.drain()
    assert not reservation.ok
    assert reservation.reason == "out_of_stock"
    assert types(shop, "saga45") == ["InventoryReservationFailed"]
    assert shop.tracker["saga45"].status is SagaStatus.COMPENSATED


async def test_sagas_interleave_without_mixing() -> None:
    bus, shop = await shop_on_bus()
    shop.faults.fail("bad", "payment")
    for saga_id in ("ok1", "bad", "ok2"):
        await shop.order(saga_id, "abc123")
    await bus.drain()
    assert shop.tracker["ok1"].status is SagaStatus.COMPLETED
    assert shop.tracker["ok2"].status is SagaStatus.COMPLETED
    assert shop.tracker["bad"].status is SagaStatus.COMPENSATED
    assert [shop.inventory.reservations[s].reservation_id for s in ("ok1", "bad", "ok2")] == [
        "r1",
        "r2",
        "r3",
    ]


# --- stock -------------------------------------------------------------------------------


async def test_stock_runs_out() -> None:
    bus, shop = await shop_on_bus(stock={"abc": 1})
    first = await shop.order("o1", "abc")
    second = await shop.order("o2", "abc")
    await bus.drain()
    assert first.ok
    assert not second.ok
    assert second.reason == "out_of_stock"
    assert event_of(shop, "o2", "InventoryReservationFailed")["reason"] == "out_of_stock"
    assert shop.inventory.stock == {"abc": 0}
    assert not (await shop.order("o3", "unknown-sku")).ok


async def test_released_reservation_returns_stock() -> None:
    bus, shop = await shop_on_bus(stock={"abc": 1})
    shop.faults.fail("o1", "payment")
    await shop.order("o1", "abc")
    await bus.drain()
    assert shop.inventory.stock == {"abc": 1}
    assert (await shop.order("o2", "abc")).ok
    await bus.drain()
    assert shop.tracker["o2"].status is SagaStatus.COMPLETED
    assert shop.inventory.stock == {"abc": 0}


async def test_quantity_is_reserved_and_released() -> None:
    bus, shop = await shop_on_bus(stock={"abc": 5})
    shop.faults.fail("o1", "shipping")
    await shop.order("o1", "abc", 3)
    assert shop.inventory.stock == {"abc": 2}
    assert not (await shop.order("o2", "abc", 3)).ok
    await bus.drain()
    assert shop.inventory.stock == {"abc": 5}


async def test_repeated_order_is_idempotent() -> None:
    bus, shop = await shop_on_bus(stock={"abc": 2})
    first = await shop.order("o1", "abc")
    again = await shop.order("o1", "abc")
    await bus.drain()
    assert first == again
    assert shop.inventory.stock == {"abc": 1}
    assert types(shop, "o1") == ["InventoryReserved", "PaymentCharged", "ShipmentCreated"]


# --- redelivery: handlers are idempotent per saga ---------------------------------------


async def test_redelivered_inventory_reserved_charges_once() -> None:
    bus, shop = await shop_on_bus()
    await shop.order("o1", "abc")
    await bus.drain()
    await bus.publish(event_of(shop, "o1", "InventoryReserved"))
    await bus.drain()
    assert count(shop, "o1", "PaymentCharged") == 1
    assert count(shop, "o1", "ShipmentCreated") == 1
    assert len(shop.payment.charges) == 1


async def test_redelivered_payment_failed_releases_once() -> None:
    bus, shop = await shop_on_bus(stock={"abc": 1})
    shop.faults.fail("o1", "payment")
    await shop.order("o1", "abc")
    await bus.drain()
    failed = event_of(shop, "o1", "PaymentFailed")
    await bus.publish(failed)
    await bus.publish(failed)
    await bus.drain()
    assert count(shop, "o1", "InventoryReleased") == 1
    assert shop.inventory.stock == {"abc": 1}


async def test_redelivered_shipment_failed_refunds_once() -> None:
    bus, shop = await shop_on_bus(stock={"abc": 1})
    shop.faults.fail("o1", "shipping")
    await shop.order("o1", "abc")
    await bus.drain()
    await bus.publish(event_of(shop, "o1", "ShipmentFailed"))
    await bus.drain()
    assert count(shop, "o1", "PaymentRefunded") == 1
    assert count(shop, "o1", "InventoryReleased") == 1
    assert shop.inventory.stock == {"abc": 1}


@pytest.mark.parametrize(
    ("fail", "redelivered", "final"),
    [
        (None, "InventoryReserved", SagaStatus.COMPLETED),
        (None, "PaymentCharged", SagaStatus.COMPLETED),
        ("payment", "PaymentFailed", SagaStatus.COMPENSATED),
        ("shipping", "ShipmentFailed", SagaStatus.COMPENSATED),
    ],
)
async def test_redelivery_does_not_reopen_a_finished_saga(
    fail: str | None, redelivered: str, final: SagaStatus
) -> None:
    # At-least-once brokers redeliver: the tracker must not move a finished
    # saga back to running or compensating because an old event came again.
    bus, shop = await shop_on_bus()
    if fail:
        shop.faults.fail("o1", fail)
    await shop.order("o1", "abc")
    await bus.drain()
    assert shop.tracker["o1"].status is final
    await bus.publish(event_of(shop, "o1", redelivered))
    await bus.drain()
    assert shop.tracker["o1"].status is final


# --- payment -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sku", "quantity", "amount"),
    [("abc", 3, 59.97), ("abc", 1, 19.99), ("xyz", 7, 0.7), ("other", 2, 199.98)],
)
async def test_payment_prices_per_sku_and_quantity(sku: str, quantity: int, amount: float) -> None:
    bus, shop = await shop_on_bus(prices={"abc": 19.99, "xyz": 0.1})
    await shop.order("o1", sku, quantity)
    await bus.drain()
    assert event_of(shop, "o1", "PaymentCharged")["amount"] == amount
    assert shop.payment.charges["o1"]["amount"] == amount


# --- the Service API -------------------------------------------------------------------


class Audit(Service):
    name = "audit"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    @handles("A", "B")
    async def on_letters(self, event: Event) -> None:
        self.seen.append(f"letters:{event.type}")

    @handles("C")
    @handles("D")
    async def on_more(self, event: Event) -> None:
        self.seen.append(f"more:{event.type}")
        await self.publish("B", event.saga_id, after=event.type)


async def test_handles_several_types() -> None:
    bus, audit = InMemoryEventBus(), Audit()
    await audit.attach(bus)
    for event_type in ("A", "B", "C", "D", "E"):
        await bus.publish(Event(event_type, "s1"))
    await bus.drain()
    assert audit.seen == [
        "letters:A",
        "letters:B",
        "more:C",
        "more:D",
        "letters:B",
        "letters:B",
    ]


async def test_publish_stamps_the_source() -> None:
    bus, audit, got = InMemoryEventBus(), Audit(), []

    async def tap(event: Event) -> None:
        got.append(event)

    await bus.subscribe("*", tap)
    await audit.attach(bus)
    published = await audit.publish("Z", "s1", n=1)
    await bus.drain()
    assert got == [published]
    assert (published.source, published.type, published["n"]) == ("audit", "Z", 1)


async def test_detach_stops_handling() -> None:
    bus, audit = InMemoryEventBus(), Audit()
    await audit.attach(bus)
    await bus.publish(Event("A", "s1"))
    await bus.drain()
    await audit.detach()
    await bus.publish(Event("A", "s1"))
    await bus.publish(Event("C", "s1"))
    await bus.drain()
    assert audit.seen == ["letters:A"]
    with pytest.raises(RuntimeError):
        audit.bus  # noqa: B018
    await audit.attach(bus)  # and it can attach again
    await bus.publish(Event("B", "s1"))
    await bus.drain()
    assert audit.seen == ["letters:A", "letters:B"]


async def test_attach_twice_is_refused() -> None:
    bus, audit = InMemoryEventBus(), Audit()
    await audit.attach(bus)
    with pytest.raises(RuntimeError):
        await audit.attach(bus)


async def test_inactive_service_does_not_react() -> None:
    bus, shop = await shop_on_bus(services=["inventory", "payment"])
    await shop.order("o1", "abc")
    await bus.drain()
    assert types(shop, "o1") == ["InventoryReserved", "PaymentCharged"]
    assert shop.tracker["o1"].status is SagaStatus.RUNNING
    await shop.set_active(["inventory", "payment", "shipping"])
    await shop.order("o2", "abc")
    await bus.drain()
    assert shop.tracker["o2"].status is SagaStatus.COMPLETED


# --- services talk only through events ----------------------------------------------------


def _reachable(root: object, stop: tuple[object, ...]) -> list[object]:
    """Objects reachable from ``root``'s attributes, not looking inside ``stop`` objects."""
    seen: dict[int, object] = {}
    todo = [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, str | bytes | int | float | type(None)):
            continue
        seen[id(obj)] = obj
        if any(obj is s for s in stop):
            continue
        if isinstance(obj, dict):
            todo.extend(obj.keys())
            todo.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset):
            todo.extend(obj)
        elif hasattr(obj, "__self__"):  # a bound method
            todo.append(obj.__self__)
        else:
            todo.extend(getattr(obj, "__dict__", {}).values())
            for slot in getattr(type(obj), "__slots__", ()):
                if hasattr(obj, slot):
                    todo.append(getattr(obj, slot))
    return [o for o in seen.values() if o is not root]


async def test_services_share_only_the_bus() -> None:
    bus, shop = await shop_on_bus()
    services = list(shop.services().values())
    assert all(service.bus is bus for service in services)
    # The Faults plan is the tests' (and node's) injection of failures, read-only
    # to the services: not a channel between them.
    stop = (bus, shop.faults)
    reach = {id(s): _reachable(s, stop) for s in services}
    for service in services:
        others = [o for o in reach[id(service)] if isinstance(o, Service) and o is not service]
        assert others == [], f"{service.name} holds a reference to {others}"
    for a in services:
        for b in services:
            if a is b:
                continue
            shared = {id(o) for o in reach[id(a)]} & {id(o) for o in reach[id(b)]}
            assert shared <= {id(bus), id(shop.faults)}, (a.name, b.name)


def test_faults_plan() -> None:
    faults = Faults()
    faults.fail("s1", "payment")
    faults.fail("s1", "shipping", "storm")
    assert faults.reason("s1", "payment") == "insufficient_funds"
    assert faults.reason("s1", "shipping") == "storm"
    assert faults.reason("s1", "inventory") is None
    assert faults.reason("s2", "payment") is None
