"""The e-commerce choreography nodes of seeds 000/001: event_bus, inventory, payment, shipping.

All four share one in-process bus and one set of services. Every event a
service publishes is printed as a message from that service to ``event_bus``
whose body is the event, so the whole choreography can be read from the output.
"""

from __future__ import annotations

from sagakit.adapters.memory_bus import InMemoryEventBus
from sagakit.choreography.ecommerce import SERVICES, Shop, open_shop
from sagakit.core.event import Event
from sagakit.errors import DefinitionError
from sagakit.node.host import Body, Host, Node
from sagakit.node.protocol import (
    ErrorCode,
    RequestError,
    optional_bool,
    require_msg_id,
    require_str,
)

__all__ = ["EventBusNode", "InventoryNode", "ShopNode"]

BUS_NODE = "event_bus"


class _ShopState:
    """The bus and services, created on first use and shared by the shop nodes."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.bus = InMemoryEventBus()
        self._shop: Shop | None = None

    async def shop(self) -> Shop:
        if self._shop is None:
            self._shop = await open_shop(self.bus)
            await self.bus.subscribe("*", self._print)
        return self._shop

    async def _print(self, event: Event) -> None:
        self.host.send(event.source or BUS_NODE, BUS_NODE, event.body())


class ShopNode(Node):
    def __init__(self, name: str, host: Host) -> None:
        super().__init__(name, host)
        self.state: _ShopState = host.shared("shop", lambda: _ShopState(host))

    async def finish(self) -> None:
        await self.state.bus.drain()


class EventBusNode(ShopNode):
    """``init`` with ``services`` attaches exactly those services to the bus."""

    async def on_init(self, src: str, body: Body) -> Body | None:
        services = body.get("services", list(SERVICES))
        if type(services) is not list or not all(type(s) is str for s in services):
            raise RequestError(ErrorCode.MALFORMED_REQUEST, "services: must be a list of strings")
        shop = await self.state.shop()
        try:
            await shop.set_active(services)
        except DefinitionError as exc:
            raise RequestError(ErrorCode.MALFORMED_REQUEST, str(exc)) from exc
        return await super().on_init(src, body)


class InventoryNode(ShopNode):
    """``reserve_inventory`` starts an order saga; ``fail_*`` flags inject failures."""

    async def on_reserve_inventory(self, src: str, body: Body) -> Body | None:
        msg_id = require_msg_id(body)
        saga_id = require_str(body, "saga_id")
        sku = require_str(body, "sku")
        quantity = body.get("quantity", 1)
        if type(quantity) is not int or quantity < 1:
            raise RequestError(
                ErrorCode.MALFORMED_REQUEST, "quantity: must be a positive integer", saga_id=saga_id
            )
        flags = {s: optional_bool(body, f"fail_{s}") for s in SERVICES}
        shop = await self.state.shop()
        if saga_id not in shop.inventory.reservations:
            for service, fail in flags.items():
                if fail:
                    shop.faults.fail(saga_id, service)
        reservation = await shop.order(saga_id, sku, quantity)
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
