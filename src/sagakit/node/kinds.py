"""The node kinds this package ships, registered by the node names of the seeds."""

from __future__ import annotations

from sagakit.node.host import Node, Registry
from sagakit.node.saga_node import SagaNode
from sagakit.node.shop_node import EventBusNode, InventoryNode, ShopNode

__all__ = ["default_registry"]


def default_registry() -> Registry:
    registry = Registry(default=Node)
    registry.register("saga")(SagaNode)
    registry.register("event_bus")(EventBusNode)
    registry.register("inventory")(InventoryNode)
    registry.register("payment", "shipping")(ShopNode)
    return registry
