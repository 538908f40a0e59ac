"""The e-commerce choreography nodes of seeds 000/001: event_bus, inventory, payment, shipping.

All four share one in-process bus and one set of services. Every event a
service publishes is printed as a message from that service to ``event_bus``
whose body is the event, so the whole choreography can be read from the output.
"""

from __future__ import annotations

from sagakit.adapters.memory_bus import InMemoryEventBus
from sagakit.choreography.ecommerce import SERVICES, Shop, open_shop
from sagakit.choreography.service import Service
from sagakit.core.event import Event
from sagakit.errors import DefinitionError
from sagakit.node.host import Body, Host, Node
from sagakit.node.protocol import (
    ErrorCode,
    RequestError,
    optional_bool,
    require_id,
    require_msg_id_of,
)

__all__ = ["EventBusNode", "InventoryNode", "ShopNode"]

BUS_NODE = "event_bus"
# The largest quantity one reservation takes: beyond it a price times the
# quantity is no longer an amount a float holds exactly (or at all: 10**400).
MAX_QUANTITY = 1_000_000


class _ShopState:
    """The bus and services, created on first use and shared by the shop nodes.

    Keeps the records of the newest ``max_sagas`` sagas (to answer a retried
    ``reserve_inventory``); an older saga is forgotten whole, and a request
    naming it again starts a new saga.
    """

    def __init__(self, host: Host) -> None:
        self.host = host
        self.bus = InMemoryEventBus()
        self._shop: Shop | None = None
        self._sagas: dict[str, None] = {}  # saga ids, oldest first
        self._max_sagas = host.settings.max_sagas

    def started(self, shop: Shop, saga_id: str) -> None:
        """Keep ``saga_id``'s records, forgetting the oldest saga's beyond the cap."""
        sagas = self._sagas
        sagas[saga_id] = None
        while len(sagas) > self._max_sagas:
            oldest = next(iter(sagas))
            del sagas[oldest]
            shop.forget(oldest)

    async def shop(self) -> Shop:
        if self._shop is None:
            self._shop = await open_shop(self.bus)
            await self.bus.subscribe("*", self._print)
        return self._shop

    async def _print(self, event: Event) -> None:
        self.host.send(event.source or BUS_NODE, BUS_NODE, event.body())


class ShopNode(Node):
    # The events a request sets off run to the end before the next request is
    # read: the output is then the same however the input is cut or paced.
    settles = True

    def __init__(self, name: str, host: Host) -> None:
        super().__init__(name, host)
        self.state: _ShopState = host.shared("shop", lambda: _ShopState(host))

    async def settle(self) -> None:
        await self.state.bus.drain()

    async def finish(self) -> None:
        await self.state.bus.drain()


class EventBusNode(ShopNode):
    """``init`` with ``services`` attaches exactly those services to the bus."""

    async def on_init(self, src: str, body: Body) -> Body | None:
        services = body.get("services", list(SERVICES))
        if type(services) is not list or not all(type(s) is str for s in services):
            raise RequestError(ErrorCode.MALFORMED_REQUEST, "services: must be a list of strings")
        self.init_ids(body)  # before the services change: a refused init changes nothing
        shop = await self.state.shop()
        try:
            await shop.set_active(services)
        except DefinitionError as exc:
            raise RequestError(ErrorCode.MALFORMED_REQUEST, str(exc)) from exc
        return await super().on_init(src, body)


class InventoryNode(ShopNode):
    """``reserve_inventory`` starts an order saga; ``fail_*`` flags inject failures.

    Everything is checked before anything changes: a request that cannot be
    served leaves no stock taken, no reservation and no planted failure, so
    its retry runs whole. A retry of a known saga is answered from its record,
    and must name the same sku and quantity (code 22 otherwise).
    """

    async def on_reserve_inventory(self, src: str, body: Body) -> Body | None:
        msg_id = require_msg_id_of(body)
        saga_id = require_id(body, "saga_id")
        try:
            _encodable("saga_id", saga_id)
            sku = require_id(body, "sku")
            _encodable("sku", sku)
            quantity = body.get("quantity", 1)
            if type(quantity) is not int or not 1 <= quantity <= MAX_QUANTITY:
                raise RequestError(
                    ErrorCode.MALFORMED_REQUEST,
                    f"quantity: must be a whole number from 1 to {MAX_QUANTITY}",
                )
            flags = [s for s in SERVICES if optional_bool(body, f"fail_{s}")]
        except RequestError as exc:
            exc.extra.setdefault("saga_id", saga_id)
            raise
        shop = await self.state.shop()
        reservation = shop.inventory.reservations.get(saga_id)
        if reservation is not None:
            if (reservation.sku, reservation.quantity) != (sku, quantity):
                raise RequestError(
                    ErrorCode.PRECONDITION_FAILED,
                    f"saga {saga_id!r} already reserved {reservation.quantity} of "
                    f"{reservation.sku!r}; a retry must ask for the same",
                    saga_id=saga_id,
                )
        else:
            if not _attached(shop.inventory):
                raise RequestError(
                    ErrorCode.TEMPORARILY_UNAVAILABLE,
                    "the inventory service is not attached to the event bus "
                    "(init event_bus with it among services); nothing was reserved",
                    saga_id=saga_id,
                )
            for service in flags:
                shop.faults.fail(saga_id, service)
            try:
                reservation = await shop.order(saga_id, sku, quantity)
            except BaseException:
                shop.forget(saga_id)
                raise
            self.state.started(shop, saga_id)
        if not reservation.ok:
            raise RequestError(
                ErrorCode.ABORT,
                f"inventory reservation failed: {reservation.reason}",
                saga_id=saga_id,
                reason=reservation.reason,
            )
        return {
            "type": "reserve_inventory_ok",
            "in_reply_to": msg_id,
            "saga_id": saga_id,
            "reservation_id": reservation.reservation_id,
        }


def _encodable(name: str, value: str) -> None:
    """Refuse text no event can carry (a lone surrogate, from an escape such as
    ``\\ud800``) before anything is reserved, naming the field."""
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise RequestError(
                ErrorCode.MALFORMED_REQUEST, f"{name}: must be valid Unicode, not {value[:80]!r}"
            ) from None


def _attached(service: Service) -> bool:
    try:
        service.bus  # noqa: B018 - the property raises when the service is detached
    except RuntimeError:
        return False
    return True
