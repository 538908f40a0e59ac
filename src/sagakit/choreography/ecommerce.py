"""The e-commerce choreography of the seed texts: Inventory, Payment and Shipping.

Forward path: ``InventoryReserved -> PaymentCharged -> ShipmentCreated``.
Compensations: ``PaymentFailed -> InventoryReleased`` and
``ShipmentFailed -> PaymentRefunded -> InventoryReleased``.
``InventoryReservationFailed`` ends a saga that had nothing to undo yet.

Every handler is idempotent per saga: a redelivered event (at-least-once
brokers redeliver) finds the saga's effect already recorded and publishes
nothing new, except what the bus has not taken yet: an outcome is recorded
before it is published, so a publish that fails (a broker away for a moment)
fails the delivery, and its redelivery publishes that same event again (same
event id) rather than nothing (which left the saga stuck for ever).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

from sagakit.choreography.service import Service, handles
from sagakit.choreography.tracker import SagaTracker
from sagakit.core.event import Event
from sagakit.core.machine import SagaStatus
from sagakit.errors import DefinitionError, SagaIdConflict
from sagakit.ports.event_bus import EventBus, new_event

__all__ = [
    "SERVICES",
    "STATUS_AFTER",
    "Faults",
    "Inventory",
    "Payment",
    "Reservation",
    "Shipping",
    "Shop",
    "open_shop",
]

DEFAULT_PRICE = 99.99

STATUS_AFTER: Mapping[str, SagaStatus] = {
    "InventoryReserved": SagaStatus.RUNNING,
    "PaymentCharged": SagaStatus.RUNNING,
    "ShipmentCreated": SagaStatus.COMPLETED,
    "InventoryReservationFailed": SagaStatus.COMPENSATED,
    "PaymentFailed": SagaStatus.COMPENSATING,
    "ShipmentFailed": SagaStatus.COMPENSATING,
    "PaymentRefunded": SagaStatus.COMPENSATING,
    "InventoryReleased": SagaStatus.COMPENSATED,
}


@dataclass
class Faults:
    """Business failures to inject, per saga and service (the node's ``fail_*`` flags)."""

    DEFAULT_REASONS: ClassVar[Mapping[str, str]] = {
        "inventory": "out_of_stock",
        "payment": "insufficient_funds",
        "shipping": "no_carrier_available",
    }
    _planned: dict[tuple[str, str], str] = field(default_factory=dict)

    def fail(self, saga_id: str, service: str, reason: str | None = None) -> None:
        self._planned[saga_id, service] = reason or self.DEFAULT_REASONS.get(service, "failed")

    def reason(self, saga_id: str, service: str) -> str | None:
        return self._planned.get((saga_id, service))

    def forget(self, saga_id: str) -> None:
        for service in SERVICES:
            self._planned.pop((saga_id, service), None)


class _Counter:
    """Ids such as r1, r2... as the seeds number them."""

    def __init__(self, prefix: str) -> None:
        self._prefix, self._n = prefix, 0

    def __call__(self) -> str:
        self._n += 1
        return f"{self._prefix}{self._n}"


class _Outboxed(Service):
    """A service that publishes each outcome it recorded until the bus has taken it."""

    def __init__(self) -> None:
        super().__init__()
        self._outbox: dict[str, list[Event]] = {}  # saga id -> recorded, not yet published

    async def _announce(self, event_type: str, saga_id: str, **payload: Any) -> None:
        """Publish an outcome just recorded; kept to publish again if the bus refuses it."""
        event = new_event(event_type, saga_id, payload, source=self.name)
        self._outbox.setdefault(saga_id, []).append(event)
        await self._resend(saga_id)

    async def _resend(self, saga_id: str) -> None:
        """Publish what this service recorded for the saga and the bus has not taken yet."""
        waiting = self._outbox.get(saga_id, [])
        for event in list(waiting):
            await self.bus.publish(event)
            if event in waiting:  # another handler of the saga may have sent it meanwhile
                waiting.remove(event)
        if not waiting:
            self._outbox.pop(saga_id, None)


class Reservation(NamedTuple):
    saga_id: str
    reservation_id: str | None  # None when the reservation failed
    sku: str
    quantity: int
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.reservation_id is not None


class Inventory(_Outboxed):
    """Stock per SKU. ``stock=None`` means every SKU is always available."""

    name = "inventory"

    def __init__(self, stock: Mapping[str, int] | None = None, faults: Faults | None = None):
        super().__init__()
        self.stock = None if stock is None else dict(stock)
        self.faults = faults or Faults()
        self.reservations: dict[str, Reservation] = {}
        self.released: set[str] = set()
        self._ids = _Counter("r")

    async def reserve(self, saga_id: str, sku: str, quantity: int) -> Reservation:
        """Start a saga: reserve stock and publish the outcome. Idempotent per saga: the
        same order again returns its reservation; another order under its id raises
        SagaIdConflict."""
        if not isinstance(sku, str) or not sku:
            raise DefinitionError("sku", "must be a non-empty string")
        if type(quantity) is not int or quantity < 1:
            raise DefinitionError("quantity", f"must be a positive integer, got {quantity!r}")
        known = self.reservations.get(saga_id)
        if known is not None:
            if (known.sku, known.quantity) != (sku, quantity):
                # A saga id is an idempotency key: reused for another order it is an
                # error, as Orchestrator.run says of a saga id reused with other input.
                raise SagaIdConflict(
                    saga_id, f"an order of {known.quantity} {known.sku!r}", f"{quantity} {sku!r}"
                )
            return known
        reason = self.faults.reason(saga_id, self.name)
        if reason is None and self.stock is not None and self.stock.get(sku, 0) < quantity:
            reason = "out_of_stock"
        if reason is not None:
            failed = self.reservations[saga_id] = Reservation(saga_id, None, sku, quantity, reason)
            try:
                await self.publish(
                    "InventoryReservationFailed", saga_id, sku=sku, quantity=quantity, reason=reason
                )
            except BaseException:
                del self.reservations[saga_id]  # not published: a retry decides again
                raise
            return failed
        if self.stock is not None:
            self.stock[sku] -= quantity
        reservation = self.reservations[saga_id] = Reservation(saga_id, self._ids(), sku, quantity)
        try:
            await self.publish(
                "InventoryReserved",
                saga_id,
                reservation_id=reservation.reservation_id,
                sku=sku,
                quantity=quantity,
            )
        except BaseException:
            # Not published, so no saga: undo the reservation, or a retry would
            # find it and answer "reserved" for a saga that never runs.
            del self.reservations[saga_id]
            if self.stock is not None:
                self.stock[sku] += quantity
            raise
        return reservation

    @handles("PaymentFailed", "PaymentRefunded")
    async def release(self, event: Event) -> None:
        reservation = self.reservations.get(event.saga_id)
        if reservation is None or not reservation.ok or event.saga_id in self.released:
            await self._resend(event.saga_id)
            return
        self.released.add(event.saga_id)
        if self.stock is not None:
            self.stock[reservation.sku] = self.stock.get(reservation.sku, 0) + reservation.quantity
        await self._announce(
            "InventoryReleased", event.saga_id, reservation_id=reservation.reservation_id
        )


class Payment(_Outboxed):
    """Charges for reserved stock at ``prices[sku]`` (``default_price`` otherwise)."""

    name = "payment"

    def __init__(
        self,
        prices: Mapping[str, float] | None = None,
        default_price: float = DEFAULT_PRICE,
        faults: Faults | None = None,
    ):
        super().__init__()
        self.prices = dict(prices or {})
        self.default_price = default_price
        self.faults = faults or Faults()
        self.charges: dict[str, dict[str, Any]] = {}  # saga id -> payment_id, amount
        self.declined: dict[str, str] = {}
        self.refunded: set[str] = set()
        self._ids = _Counter("p")

    @handles("InventoryReserved")
    async def charge(self, event: Event) -> None:
        saga_id = event.saga_id
        if saga_id in self.charges or saga_id in self.declined:
            await self._resend(saga_id)
            return
        reason = self.faults.reason(saga_id, self.name)
        if reason is not None:
            self.declined[saga_id] = reason
            await self._announce("PaymentFailed", saga_id, reason=reason)
            return
        unit = self.prices.get(event.get("sku", ""), self.default_price)
        amount = round(unit * event.get("quantity", 1), 2)
        charge = self.charges[saga_id] = {"payment_id": self._ids(), "amount": amount}
        await self._announce("PaymentCharged", saga_id, **charge)

    @handles("ShipmentFailed")
    async def refund(self, event: Event) -> None:
        charge = self.charges.get(event.saga_id)
        if charge is None or event.saga_id in self.refunded:
            await self._resend(event.saga_id)
            return
        self.refunded.add(event.saga_id)
        await self._announce("PaymentRefunded", event.saga_id, **charge)


class Shipping(_Outboxed):
    name = "shipping"

    def __init__(self, faults: Faults | None = None):
        super().__init__()
        self.faults = faults or Faults()
        self.shipments: dict[str, str] = {}
        self.failed: dict[str, str] = {}
        self._ids = _Counter("s")

    @handles("PaymentCharged")
    async def ship(self, event: Event) -> None:
        saga_id = event.saga_id
        if saga_id in self.shipments or saga_id in self.failed:
            await self._resend(saga_id)
            return
        reason = self.faults.reason(saga_id, self.name)
        if reason is not None:
            self.failed[saga_id] = reason
            await self._announce("ShipmentFailed", saga_id, reason=reason)
            return
        shipment_id = self.shipments[saga_id] = self._ids()
        await self._announce("ShipmentCreated", saga_id, shipment_id=shipment_id)


SERVICES = ("inventory", "payment", "shipping")


@dataclass
class Shop:
    """The three services of the seeds on one bus, with a tracker watching it."""

    bus: EventBus
    inventory: Inventory
    payment: Payment
    shipping: Shipping
    tracker: SagaTracker
    faults: Faults

    def services(self) -> dict[str, Service]:
        return {"inventory": self.inventory, "payment": self.payment, "shipping": self.shipping}

    async def set_active(self, names: Iterable[str]) -> None:
        """Attach exactly the named services to the bus (the others stop listening)."""
        wanted = set(names)
        unknown = wanted.difference(SERVICES)
        if unknown:
            raise DefinitionError(
                "services", f"unknown {sorted(unknown)}; known: {', '.join(SERVICES)}"
            )
        for name, service in self.services().items():
            attached = service._bus is not None
            if name in wanted and not attached:
                await service.attach(self.bus)
            elif name not in wanted and attached:
                await service.detach()

    async def order(self, saga_id: str, sku: str, quantity: int = 1) -> Reservation:
        """Start one order saga; its choreography then runs on the bus."""
        return await self.inventory.reserve(saga_id, sku, quantity)

    def forget(self, saga_id: str) -> None:
        """Drop every record of a finished saga (a bounded host keeps only the newest)."""
        for records in (
            self.inventory.reservations,
            self.payment.charges,
            self.payment.declined,
            self.shipping.shipments,
            self.shipping.failed,
        ):
            records.pop(saga_id, None)
        self.tracker.forget(saga_id)
        self.inventory.released.discard(saga_id)
        self.payment.refunded.discard(saga_id)
        for service in (self.inventory, self.payment, self.shipping):
            service._outbox.pop(saga_id, None)
        self.faults.forget(saga_id)


async def open_shop(
    bus: EventBus,
    *,
    stock: Mapping[str, int] | None = None,
    prices: Mapping[str, float] | None = None,
    services: Iterable[str] = SERVICES,
) -> Shop:
    """Create the services, attach the named ones and a tracker to ``bus``."""
    faults = Faults()
    tracker = SagaTracker(STATUS_AFTER)
    await tracker.attach(bus)
    shop = Shop(
        bus,
        Inventory(stock, faults),
        Payment(prices, faults=faults),
        Shipping(faults),
        tracker,
        faults,
    )
    await shop.set_active(services)
    return shop
