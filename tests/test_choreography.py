"""Choreography in process: the e-commerce services of seeds 000/001 over InMemoryEventBus.

The scenarios themselves live in ``conformance/choreography.py`` and run here on
``memory://``; the broker backends run the same class on their servers.
"""

from __future__ import annotations

import uuid
import warnings
from typing import Any

import pytest
from conformance.choreography import ChoreographyConformance, types

from sagakit import Event, InMemoryEventBus, SagaStatus, Service, handles
from sagakit.choreography.ecommerce import STATUS_AFTER, Faults, Shop, open_shop
from sagakit.choreography.tracker import SagaTracker
from sagakit.errors import BackendError, DefinitionError, SagaIdConflict
from sagakit.ports.event_bus import EventBus


async def shop_on_bus(**kwargs: Any) -> tuple[InMemoryEventBus, Shop]:
    bus = InMemoryEventBus()
    return bus, await open_shop(bus, **kwargs)


class TestChoreographyInMemory(ChoreographyConformance):
    """The buses of one test share a broker named after it."""

    settle = 0.0  # the in-process bus is done when drain() returns

    async def make_bus(self) -> EventBus:
        if not hasattr(self, "namespace"):
            self.namespace = f"choreography-{uuid.uuid4().hex}"
        return InMemoryEventBus(name=self.namespace)


async def test_no_handler_fails_in_the_three_flows() -> None:
    bus, shop = await shop_on_bus()
    shop.faults.fail("declined", "payment")
    shop.faults.fail("unshippable", "shipping")
    for saga_id in ("ok", "declined", "unshippable"):
        await shop.order(saga_id, "abc")
    await bus.drain()
    assert [shop.tracker[s].status for s in ("ok", "declined", "unshippable")] == [
        SagaStatus.COMPLETED,
        SagaStatus.COMPENSATED,
        SagaStatus.COMPENSATED,
    ]
    assert bus.failures == []


async def test_services_subscribe_in_groups_named_after_them() -> None:
    # Two copies of one service compete for its events; the other services still get each.
    bus = InMemoryEventBus()
    shop = await open_shop(bus, services=["inventory", "shipping"])
    payments = [shop.payment, type(shop.payment)(faults=shop.faults)]
    for payment in payments:
        await payment.attach(bus)
    for i in range(4):
        await shop.order(f"o{i}", "abc")
    await bus.drain()
    assert sorted(len(p.charges) for p in payments) == [2, 2]
    assert all(types(shop, f"o{i}")[-1] == "ShipmentCreated" for i in range(4))


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
    # It can attach again, and its group kept what was published meanwhile:
    # a service that restarts catches up on the events it missed.
    await audit.attach(bus)
    await bus.drain()
    assert audit.seen == ["letters:A", "letters:A", "more:C", "letters:B"]
    await bus.publish(Event("B", "s1"))
    await bus.drain()
    assert audit.seen[-1] == "letters:B"
    assert len(audit.seen) == 5


async def test_an_unnamed_service_does_not_keep_events_while_detached() -> None:
    class Anonymous(Service):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        @handles("A")
        def on_a(self, event: Event) -> None:  # a plain function handler
            self.seen.append(event.type)

    bus, anonymous = InMemoryEventBus(), Anonymous()
    await anonymous.attach(bus)
    await anonymous.detach()
    await bus.publish(Event("A", "s1"))
    await bus.drain()
    await anonymous.attach(bus)
    await bus.publish(Event("A", "s2"))
    await bus.drain()
    assert anonymous.seen == ["A"]


async def test_attach_is_all_or_nothing() -> None:
    class Refusing(InMemoryEventBus):
        """A bus whose broker refuses the second subscription (a connection lost midway)."""

        calls = 0

        async def subscribe(self, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls == 2:
                raise BackendError("memory://", "connection lost")
            return await super().subscribe(*args, **kwargs)

    bus, audit = Refusing(), Audit()
    with pytest.raises(BackendError):
        await audit.attach(bus)
    with pytest.raises(RuntimeError):
        audit.bus  # noqa: B018
    await bus.publish(Event("A", "s1"))
    await bus.drain()
    assert audit.seen == []  # the first subscription was cancelled
    await audit.attach(bus)  # and it can attach again; its group kept the event meanwhile
    await bus.drain()
    assert audit.seen == ["letters:A"]


async def test_two_methods_of_a_named_service_handling_one_type_are_refused() -> None:
    # In the service's group the two subscriptions competed: each method silently
    # got every other event, and missed the rest.
    class Mail(Service):
        name = "mail"

        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        @handles("OrderPlaced")
        def confirm(self, event: Event) -> None:
            self.seen.append("confirm")

        @handles("OrderPlaced", "*")
        def audit(self, event: Event) -> None:
            self.seen.append("audit")

    bus, mail = InMemoryEventBus(), Mail()
    with pytest.raises(DefinitionError, match="'OrderPlaced' is handled by confirm and audit"):
        await mail.attach(bus)
    with pytest.raises(RuntimeError):
        mail.bus  # noqa: B018  (nothing was attached)

    class Anonymous(Mail):
        name = ""  # subscriptions of its own: both methods get every event

    anonymous = Anonymous()
    await anonymous.attach(bus)
    await bus.publish(Event("OrderPlaced", "s1"))
    await bus.drain()
    assert sorted(anonymous.seen) == ["audit", "audit", "confirm"]


async def test_one_method_marked_twice_for_a_type_is_subscribed_once() -> None:
    class Twice(Service):
        name = "twice"

        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        @handles("A")
        @handles("A", "B")
        def on(self, event: Event) -> None:
            self.seen.append(event.type)

    bus, twice = InMemoryEventBus(), Twice()
    await twice.attach(bus)
    for event_type in ("A", "B", "A"):
        await bus.publish(Event(event_type, "s1"))
    await bus.drain()
    assert twice.seen == ["A", "B", "A"]
    assert len(twice._subscriptions) == 2


async def test_static_and_class_methods_handle_whichever_way_they_are_marked() -> None:
    # @staticmethod or @classmethod above @handles hid the mark (the class attribute
    # was the wrapper, and a classmethod is not even callable): the service attached
    # without those handlers and their events were never handled, with no error.
    seen: list[str] = []

    class Wrapped(Service):
        name = "wrapped"

        @staticmethod
        @handles("A")
        async def static_outer(event: Event) -> None:
            seen.append(f"static_outer {event.type}")

        @handles("B")
        @staticmethod
        def static_inner(event: Event) -> None:
            seen.append(f"static_inner {event.type}")

        @classmethod
        @handles("C")
        async def class_outer(cls, event: Event) -> None:
            seen.append(f"class_outer {cls.__name__} {event.type}")

        @handles("D")
        @classmethod
        def class_inner(cls, event: Event) -> None:
            seen.append(f"class_inner {cls.__name__} {event.type}")

    bus = InMemoryEventBus()
    await Wrapped().attach(bus)
    for event_type in "ABCD":
        await bus.publish(Event(event_type, "s1"))
    await bus.drain()
    assert seen == [
        "static_outer A",
        "static_inner B",
        "class_outer Wrapped C",
        "class_inner Wrapped D",
    ]


def test_a_mark_on_what_cannot_handle_an_event_is_refused_with_the_class() -> None:
    with pytest.raises(DefinitionError, match=r"Odd\.total: .*property"):

        class Odd(Service):
            name = "odd"

            @property
            @handles("A")
            def total(self) -> int:
                return 0


def test_handles_on_a_plain_function_warns_that_nothing_subscribes_it() -> None:
    """attach() subscribes the marked methods of a Service subclass; a mark on a function
    outside one was silently never called."""
    with pytest.warns(UserWarning, match="plain function"):

        @handles("OrderPlaced")
        async def on_order(event: Event) -> None:
            return None

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a method, even of a class made in a function: quiet

        class Audit(Service):
            @handles("OrderPlaced")
            async def on_order(self, event: Event) -> None:
                return None


async def test_attach_twice_is_refused() -> None:
    bus, audit = InMemoryEventBus(), Audit()
    await audit.attach(bus)
    with pytest.raises(RuntimeError):
        await audit.attach(bus)


async def test_an_order_id_reused_for_another_order_is_a_conflict() -> None:
    """The same order again gets its reservation back; another order under its id was
    answered the first one's reservation as if it were its own."""
    bus, shop = await shop_on_bus()
    first = await shop.order("o1", "abc", 2)
    assert await shop.order("o1", "abc", 2) is first
    for sku, quantity in (("xyz", 2), ("abc", 3)):
        with pytest.raises(SagaIdConflict) as raised:
            await shop.order("o1", sku, quantity)
        assert raised.value.saga_id == "o1"
    await bus.drain()
    assert types(shop, "o1").count("InventoryReserved") == 1


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


async def test_an_order_whose_failure_was_not_published_is_decided_again_on_retry() -> None:
    # The failed reservation was recorded before its InventoryReservationFailed was
    # published: when that publish failed, the retried order found it and returned
    # without publishing, and the saga was never seen by anyone.
    class Refusing(InMemoryEventBus):
        refused = False

        async def publish(self, event: Event) -> None:
            if event.type == "InventoryReservationFailed" and not self.refused:
                self.refused = True
                raise BackendError("memory://", "broker away")
            await super().publish(event)

    bus = Refusing()
    shop = await open_shop(bus, stock={"abc": 0})
    with pytest.raises(BackendError):
        await shop.order("o1", "abc")
    reservation = await shop.order("o1", "abc")
    await bus.drain()
    assert (reservation.ok, reservation.reason) == (False, "out_of_stock")
    assert types(shop, "o1") == ["InventoryReservationFailed"]
    assert shop.tracker["o1"].status is SagaStatus.COMPENSATED


async def test_the_tracker_keeps_a_bounded_number_of_sagas_finished_ones_first() -> None:
    # It kept every saga it ever saw, each with all its events: a tracker on a
    # long-running bus grew with every order, and one saga that never ends (or a
    # handler publishing to itself) grew it without bound too.
    bus = InMemoryEventBus()
    tracker = SagaTracker(STATUS_AFTER, max_sagas=3, max_events=4)
    await tracker.attach(bus)
    await bus.publish(Event("InventoryReserved", "running-1"))
    await bus.publish(Event("InventoryReserved", "done-1"))
    await bus.publish(Event("ShipmentCreated", "done-1"))
    await bus.publish(Event("InventoryReserved", "running-2"))
    await bus.publish(Event("InventoryReserved", "new-1"))  # over 3: done-1 goes
    await bus.drain()
    assert list(tracker.sagas) == ["running-1", "running-2", "new-1"]
    await bus.publish(Event("Unknown", "new-2"))  # none finished: the oldest goes
    await bus.drain()
    assert list(tracker.sagas) == ["running-2", "new-1", "new-2"]

    for n in range(10):
        await bus.publish(Event("Tick", "new-2", {"n": n}))
    await bus.publish(Event("InventoryReleased", "new-2"))  # past the cap: still counts
    await bus.drain()
    saga = tracker["new-2"]
    assert len(saga.events) == len(saga.seen) == 4
    assert saga.dropped == 8
    assert saga.status is SagaStatus.COMPENSATED

    tracker.forget("new-2")
    tracker.forget("never-seen")
    assert list(tracker.sagas) == ["running-2", "new-1"]


def test_the_tracker_bounds_are_checked() -> None:
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(DefinitionError, match="max_sagas"):
            SagaTracker(STATUS_AFTER, max_sagas=bad)  # type: ignore[arg-type]
        with pytest.raises(DefinitionError, match="max_events"):
            SagaTracker(STATUS_AFTER, max_events=bad)  # type: ignore[arg-type]
