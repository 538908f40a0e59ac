"""The e-commerce choreography of the article (seed 003), written with sagakit.

Four services, no coordinator: each reacts to the events it subscribes to and
publishes its own. Run it with ``python examples/order_choreography.py``.
"""

import asyncio

from sagakit import Event, InMemoryEventBus, Service, handles


class OrderService(Service):
    name = "order"

    async def create_order(self, order: dict[str, int]) -> None:
        print(f"OrderService: Creating order {order['order_id']}")
        await self.publish("OrderCreated", f"order-{order['order_id']}", **order)

    @handles("OrderCreated")
    async def order_created(self, event: Event) -> None:
        print(f"OrderService: Order {event['order_id']} created")


class InventoryService(Service):
    name = "inventory"

    @handles("OrderCreated")
    async def check_inventory(self, event: Event) -> None:
        print(f"InventoryService: Checking inventory for order {event['order_id']}")
        await self.publish("InventoryChecked", event.saga_id, **event.payload)

    @handles("InventoryChecked")
    async def inventory_checked(self, event: Event) -> None:
        print(f"InventoryService: Inventory checked for order {event['order_id']}")


class PaymentService(Service):
    name = "payment"

    @handles("InventoryChecked")
    async def process_payment(self, event: Event) -> None:
        print(f"PaymentService: Processing payment for order {event['order_id']}")
        await self.publish("PaymentProcessed", event.saga_id, **event.payload)

    @handles("PaymentProcessed")
    async def payment_processed(self, event: Event) -> None:
        print(f"PaymentService: Payment processed for order {event['order_id']}")


class ShippingService(Service):
    name = "shipping"

    @handles("PaymentProcessed")
    async def arrange_shipping(self, event: Event) -> None:
        print(f"ShippingService: Arranging shipping for order {event['order_id']}")
        await self.publish("ShippingArranged", event.saga_id, **event.payload)

    @handles("ShippingArranged")
    async def shipping_arranged(self, event: Event) -> None:
        print(f"ShippingService: Shipping arranged for order {event['order_id']}")


async def main() -> None:
    bus = InMemoryEventBus()
    orders = OrderService()
    for service in (orders, InventoryService(), PaymentService(), ShippingService()):
        await service.attach(bus)

    await orders.create_order({"order_id": 1, "product_id": 101, "quantity": 2})
    await bus.drain()  # let the choreography run to its end


if __name__ == "__main__":
    asyncio.run(main())
